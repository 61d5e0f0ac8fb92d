#!/usr/bin/env bash
# A separate virtual environment for the test Triton server (nvidia-pytriton + onnxruntime).
#
# Why separate: nvidia-pytriton 0.7 pins numpy<2 (and pulls tritonclient, which pins protobuf<7);
# installing it into .venv would downgrade numpy and protobuf under torch, onnx and a running
# training job. The server side only needs numpy + onnxruntime + nanoseg/engines (imported from
# the work tree through PYTHONPATH), so it lives on its own. The client (tritonclient[grpc]) is in
# .venv: `pip install -e .[triton]`.
# Idempotent; prints the environment's python. Tests find it at the same default path or through
# NANOSEG_PYTRITON_PYTHON.
set -euo pipefail
cd "$(dirname "$0")/.."
CACHE="${NANOSEG_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/nanoseg}"
VENV="${NANOSEG_PYTRITON_VENV:-$CACHE/pytriton-venv}"
PY="${PYTHON:-$(.venv/bin/python -c 'import sys; print(sys.base_prefix)')/bin/python3}"
if [ ! -x "$VENV/bin/python" ]; then
    echo "setup_pytriton: creating $VENV" >&2
    "$PY" -m venv "$VENV"
fi
if ! "$VENV/bin/python" -c "import pytriton, onnxruntime" 2>/dev/null; then
    echo "setup_pytriton: installing nvidia-pytriton and onnxruntime into $VENV" >&2
    "$VENV/bin/python" -m pip install -q "nvidia-pytriton>=0.7" "onnxruntime>=1.18"
fi
echo "$VENV/bin/python"
