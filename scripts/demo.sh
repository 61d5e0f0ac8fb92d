#!/usr/bin/env bash
# The main job: set up .venv (first time only), then the full loop in one process tree: a bluesky
# 0MQ proxy, the daemon with the shipped model, a simulated growth run monitored by a bluesky plan,
# a live table, and a report in out/demo (or the folder given). `nanoseg demo --help` for options.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
# nanoseg demo stops every process it starts (also on failure, Ctrl-C or SIGTERM); exec so that
# signals reach it directly.
exec .venv/bin/nanoseg demo --out "${1:-out/demo}" "${@:2}"
