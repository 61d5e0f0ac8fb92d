#!/usr/bin/env bash
# Train configs/training/gpu_default.yaml on one GPU within a wall-time budget, evaluate it on the
# held-out synthetic test set (seed 2) on the GPU, and run the CUDA checks of the torch engine.
#
#   bash scripts/gpu_train.sh OUT_DIR [TRAIN_SECONDS]
#   CONTINUE=1 bash scripts/gpu_train.sh OUT_DIR SECONDS   # same (warm) machine: SECONDS more
#   CONFIG=configs/training/gpu_continue.yaml ...          # another training config
#   ITERS=N ...  # max_iter N, no calibration run (the seconds per iteration known for this GPU)
#   EVAL=0 ...   # train only (evaluate the returned model on CPU: all device time goes to training)
#
# The schedule must end inside the budget (the learning-rate steps are fractions of max_iter), so
# a 60-iteration calibration run measures the seconds per iteration first and max_iter is set to
# fit. Works in an environment that has torch/torchvision but not nanoseg installed (a lent GPU
# machine): see scripts/device_env.sh (wheels from scripts/device_wheels.sh in .whl/).
# OUT_DIR gets: model.pt (float16 nanoseg checkpoint, split in <16 MB parts when SPLIT=1),
# config.yaml and metrics.csv of the run, eval.json, gpu_check.json, log.txt.
set -uo pipefail
out=${1:?usage: gpu_train.sh OUT_DIR [TRAIN_SECONDS]}
budget=${2:-420}
mkdir -p "$out"
exec > >(tee -a "$out/log.txt") 2>&1
# shellcheck source=scripts/device_env.sh
source "$(dirname "$0")/device_env.sh"
# ROI heads see a different number of boxes every iteration: let the allocator grow segments.
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
t0=$(date +%s)
stamp() { echo "[gpu_train +$(( $(date +%s) - t0 ))s] $*"; }

config=${CONFIG:-$repo/configs/training/gpu_default.yaml}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
$py -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'cuda', torch.cuda.is_available())"

test_set=$NANOSEG_CACHE/data/paper-test-s2-n${TEST_COUNT:=200}
if [ "${EVAL:-1}" != 0 ]; then
    stamp "generate the test set"
    [ -f "$test_set/annotations.json" ] || nanoseg generate paper --count "$TEST_COUNT" --seed 2 --no-od --quiet --out "$test_set" || exit 1
fi

runs=$NANOSEG_CACHE/runs
cfg=$NANOSEG_CACHE/gpu_default.yaml
minutes=$($py -c "print($budget * 1.08 / 60)")
# fit_max_iter METRICS SRC DST MODE: write SRC with solver.max_iter set so that the TRAIN_SECONDS
# budget is spent at the seconds per iteration METRICS shows. MODE calibrate: a fresh schedule
# (the first logged row, warm-up, is left out; at least 100 iterations); MODE continue: that many
# iterations more than the run has done (the last 20 rows timed).
fit_max_iter() {
    $py - "$1" "$2" "$3" "$budget" "$4" <<'PY'
import csv, sys, yaml
metrics, src, dst, budget, mode = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4]), sys.argv[5]
rows = list(csv.DictReader(open(metrics)))
timed = rows[-20:] if mode == "continue" else rows[1:]
spi = sum(float(r["seconds_per_iter"]) for r in timed) / max(len(timed), 1)
done = int(rows[-1]["iteration"]) if mode == "continue" else 0
cfg = yaml.safe_load(open(src))
cfg["solver"]["max_iter"] = done + max(int(0.93 * budget / spi), 0 if mode == "continue" else 100)
yaml.safe_dump(cfg, open(dst, "w"), sort_keys=False)
print(f"{mode} from iteration {done}: {spi:.3f} s/iteration -> max_iter {cfg['solver']['max_iter']} for {budget:.0f} s")
PY
}
if [ -n "${CONTINUE:-}" ]; then
    # A second call on a still-warm machine: the run continues for TRAIN_SECONDS more, its
    # max_iter raised to fit (the learning rate goes back up until the moved steps).
    [ -f "$runs/gpu_default/last.pt" ] && [ -f "$cfg" ] || { echo "CONTINUE: no run to continue in $runs"; exit 1; }
    fit_max_iter "$runs/gpu_default/metrics.csv" "$cfg" "$cfg" continue || exit 1
    stamp "train (continued)"
    nanoseg train "$cfg" --run-dir "$runs/gpu_default" --resume --max-minutes "$minutes" --quiet
    stamp "train ended (exit $?)"
elif [ -n "${ITERS:-}" ]; then
    # The seconds per iteration are known (a run on this kind of GPU): no calibration run.
    rm -rf "$runs/gpu_default" "$cfg"
    mkdir -p "$NANOSEG_CACHE"
    stamp "train $ITERS iterations (the training set is generated first)"
    nanoseg train "$config" --run-dir "$runs/gpu_default" --max-iter "$ITERS" --max-minutes "$minutes" --quiet
    stamp "train ended (exit $?)"
    cp "$runs/gpu_default/config.yaml" "$cfg"  # the run's config (max_iter ITERS): what CONTINUE=1 resumes
else
    stamp "calibrate (the training set is generated first)"
    rm -rf "$runs/calibrate" "$runs/gpu_default" "$cfg"
    nanoseg train "$config" --run-dir "$runs/calibrate" --stop-after "${CALIB_ITERS:-60}" --quiet &&
        fit_max_iter "$runs/calibrate/metrics.csv" "$config" "$cfg" calibrate
    rm -rf "$runs/calibrate"
    if [ -f "$cfg" ]; then
        stamp "train"
        nanoseg train "$cfg" --run-dir "$runs/gpu_default" --max-minutes "$minutes" --quiet
        stamp "train ended (exit $?)"
    else
        stamp "calibration failed: no training"
    fi
fi
cp "$runs/gpu_default/config.yaml" "$runs/gpu_default/metrics.csv" "$out/" 2>/dev/null
$py - "$runs/gpu_default" "$out/model.pt" <<'PY' 
import sys
from pathlib import Path
from nanoseg.checkpoint import save_checkpoint
from nanoseg_training.train import checkpoint_from_run
ckpt = checkpoint_from_run(Path(sys.argv[1]))
save_checkpoint(ckpt, sys.argv[2], half=True)
print("checkpoint:", ckpt.meta["iterations"], "iterations,", round(ckpt.meta["train_seconds"]), "s")
PY
model=$out/model.pt
[ -f "$model" ] || { echo "no trained checkpoint: the checks run on the shipped model"; model=$repo/models/default/model.pt; }

if [ "${EVAL:-1}" != 0 ]; then
    stamp "evaluate"
    nanoseg evaluate "$model" "$test_set" --out "$NANOSEG_CACHE/eval" --device cuda --no-plots --quiet
    cp "$NANOSEG_CACHE/eval/metrics.json" "$out/eval.json" 2>/dev/null
    stamp "gpu check"
    $py "$repo/benchmarks/gpu_check.py" --model "$model" --dataset "$test_set" --out "$out/gpu_check.json"
fi
if [ "${SPLIT:-0}" = 1 ] && [ -f "$out/model.pt" ]; then
    split -b 15M "$out/model.pt" "$out/model.pt.part-" && rm "$out/model.pt"
fi
stamp "done"
ls -la "$out"
