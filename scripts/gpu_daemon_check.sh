#!/usr/bin/env bash
# The daemon on a lent GPU, end to end, with the shipped model (issue "Throughput at the edge"):
# the CUDA engines against the CPU on 20 test frames (mask IoU) and their speed
# (benchmarks/gpu_check.py), then the daemon over raw frames at 128² and 512² with the torch
# engine on the device: engine only, saturated frames/s, and p50/p95/p99 latency at half the
# saturated rate (benchmarks/bench_daemon.py), the statistics in STATS_WORKERS processes (default:
# the cores less 3); 128² again with frames packed 4 to a model input; 512² with two engine
# instances; the daemon's own ceiling on this machine (null engine, 0 detections), and, where
# py-spy is at hand (device_wheels.sh brings it), who holds Python's interpreter lock in a 128²
# run on the device (benchmarks/gil_share.py): one daemon process is capped near 1 / (lock ms
# per frame). Estimated 8-10 minutes on an H200 (not yet run on one).
#
#   bash scripts/device_wheels.sh            # here, before: the wheels the machine lacks, in .whl/
#   bash scripts/gpu_daemon_check.sh OUT_DIR [DEVICE]     # on the lent machine (DEVICE: cuda)
#
# OUT_DIR gets gpu_check.json, daemon_gpu.json, daemon_gpu_packed.json, daemon_gpu_instances2.json,
# daemon_null.json, gil.txt (py-spy's recording), gil_share.txt and log.txt. DEVICE=cpu is a dry run (fewer frames).
set -uo pipefail
out=${1:?usage: gpu_daemon_check.sh OUT_DIR [DEVICE]}
device=${2:-cuda}
mkdir -p "$out"
exec > >(tee -a "$out/log.txt") 2>&1
# shellcheck source=scripts/device_env.sh
source "$(dirname "$0")/device_env.sh"
t0=$(date +%s)
stamp() { echo "[gpu_daemon_check +$(( $(date +%s) - t0 ))s] $*"; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
model=${MODEL:-$repo/models/default/model.pt}
frames=2000 model_only=50 repeats=30
# the particle statistics in worker processes on the cores the engine leaves (statistics.workers)
workers=${STATS_WORKERS:-$(( $(nproc) > 4 ? $(nproc) - 3 : 1 ))}
[ "$device" = cpu ] && { frames=12; model_only=3; repeats=2; workers=1; }

test_set=$NANOSEG_CACHE/data/paper-test-s2-n20
stamp "generate 20 test frames"
[ -f "$test_set/annotations.json" ] || nanoseg generate paper --count 20 --seed 2 --quiet --out "$test_set" || exit 1
stamp "engines: agreement with the CPU and speed"
$py "$repo/benchmarks/gpu_check.py" --model "$model" --dataset "$test_set" --device "$device" \
    --repeats "$repeats" --out "$out/gpu_check.json"
stamp "daemon end to end"
$py "$repo/benchmarks/bench_daemon.py" --model "$model" --engine torch --device "$device" --sizes 128 512 \
    --frames "$frames" --model-only "$model_only" --offered 0.5 --timeout 120 --stats-workers "$workers" \
    --out "$out/daemon_gpu.json"
stamp "daemon end to end, 128² frames packed 4 to a model input"
$py "$repo/benchmarks/bench_daemon.py" --model "$model" --engine torch --device "$device" --sizes 128 --pack \
    --max-batch 16 --frames "$frames" --model-only "$model_only" --offered 0.5 --timeout 120 \
    --stats-workers "$workers" --out "$out/daemon_gpu_packed.json"
stamp "daemon end to end at 512², two engine instances (model.instances: concurrent batches on the device)"
$py "$repo/benchmarks/bench_daemon.py" --model "$model" --engine torch --device "$device" --sizes 512 --instances 2 \
    --frames "$(( frames / 2 ))" --model-only "$model_only" --unloaded 2 --timeout 120 --stats-workers "$workers" \
    --out "$out/daemon_gpu_instances2.json"
stamp "the daemon's own ceiling on this machine: null engine, no detections"
$py "$repo/benchmarks/bench_daemon.py" --model "$model" --engine null --null-detections 0 --sizes 128 512 --frames "$frames" \
    --timeout 120 --out "$out/daemon_null.json"
spy=$(command -v py-spy || echo /tmp/site/bin/py-spy)
if [ -x "$spy" ]; then
    stamp "who holds the interpreter lock, 128² on the device"
    "$spy" record --gil --threads -r 500 -f raw -o "$out/gil.txt" -- $py "$repo/benchmarks/bench_daemon.py" \
        --model "$model" --engine torch --device "$device" --sizes 128 --inputs raw --frames "$frames" \
        --model-only 3 --unloaded 1 --timeout 120 --stats-workers "$workers" \
        && $py "$repo/benchmarks/gil_share.py" "$out/gil.txt" --rate 500 --frames "$frames" --top 8 | tee "$out/gil_share.txt"
else
    stamp "py-spy not at hand: no interpreter-lock recording"
fi
stamp "done"
