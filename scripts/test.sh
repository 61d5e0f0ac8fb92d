#!/usr/bin/env bash
# Set up (when needed) and run every check: ruff, mypy on all four packages, then the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
VENV="${NANOSEG_VENV:-.venv}"
"$VENV/bin/ruff" check .
"$VENV/bin/mypy"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
exec "$VENV/bin/python" -m pytest -q -p no:cacheprovider "$@"
