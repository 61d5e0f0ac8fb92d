#!/usr/bin/env bash
# Create .venv and install nanoseg with everything it needs; does nothing that is already done.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${NANOSEG_VENV:-.venv}"
PY="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
    echo "setup: creating virtual environment $VENV" >&2
    "$PY" -m venv "$VENV"
fi
stamp="$VENV/.nanoseg-installed"
want="$(sha256sum pyproject.toml | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    echo "setup: installing torch, torchvision and nanoseg[dev] into $VENV" >&2
    "$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null
    "$VENV/bin/python" -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
    "$VENV/bin/python" -m pip install -q -e ".[dev]"
    echo "$want" > "$stamp"
fi
