#!/usr/bin/env bash
# Download the wheels a lent GPU machine needs beside its torch (Python 3.12, x86_64 Linux; it
# reaches no package index) into DIR (default .whl/, ignored by git, carried with the working
# tree: scripts/device_env.sh installs them there). About 33 MB (py-spy: who holds the interpreter
# lock in gpu_daemon_check.sh); scipy, numpy and pillow are
# expected on the machine. PYVER=3.11 etc. for another Python.
#
#   bash scripts/device_wheels.sh [DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${1:-.whl}
pyver=${PYVER:-3.12}
abi=cp${pyver/./}
mkdir -p "$dir"
python3 -m pip download -q --only-binary=:all: --no-deps --python-version "$pyver" --implementation cp \
    --abi "$abi" --abi abi3 --abi none --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform any -d "$dir" \
    pyzmq msgpack msgpack-numpy orjson prometheus-client event-model jsonschema jsonschema-specifications \
    referencing rpds-py attrs jsonpointer pydantic pydantic-core annotated-types typing-inspection \
    typing-extensions pydantic-settings python-dotenv PyYAML h5py pycocotools scikit-image lazy-loader \
    tifffile imageio networkx tqdm py-spy
du -sh "$dir"
