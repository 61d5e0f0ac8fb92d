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
# two test processes (pytest-xdist): the suite's tests wait on sockets and subprocesses much of the
# time, so two share 2 cores well (9 min against 17 in one); NANOSEG_TEST_WORKERS=0 runs them in one
exec "$VENV/bin/python" -m pytest -q -p no:cacheprovider -n "${NANOSEG_TEST_WORKERS:-2}" "$@"
