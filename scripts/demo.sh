#!/usr/bin/env bash
# The main job. For now: generate a small synthetic data set and its preview.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
OUT="${1:-out/demo}"
.venv/bin/nanoseg generate paper --out "$OUT/dataset" --count 16 --seed 0
.venv/bin/nanoseg preview "$OUT/dataset" --out "$OUT/preview.png"
