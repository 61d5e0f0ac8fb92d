"""Peak memory of one 8000 x 8000 uint16 frame through the daemon's frame pipeline.

    .venv/bin/python benchmarks/bench_large_frame.py [--model models/default/model.pt]
        [--size 8000] [--pixel-size-nm 8] [--threads 2] [--out results.json]

The frame is the benchmark scene (bench_common.synthetic_frame: 512 x 512 px, 8 nm, paper preset,
transmission counts around I0 = 4000) repeated over the whole frame, four scenes in turn, so
wires lie everywhere (with ``--pixel-size-nm 8``, the model's scale, every frame pixel is a model
pixel: (size / 448)^2 tiles, hundreds to thousands of instances). It runs ``analyse_frame``
(prepare -> tiles -> engine -> box-local merge -> cap and filters -> particle table) with the
shipped model on the CPU, then encodes the masks as the store and the publisher do. Printed: the
tiles, the instances (and those over ``max_instances``), the seconds, and the peak resident set
(VmHWM of /proc/self/status), absolute and above the resident set once model and frame were
loaded. Before masks were kept box-local, such a frame failed with MemoryError (one
full-frame mask per instance: 64 MB each).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import DEFAULT_MODEL, DOSE, machine_facts, synthetic_frame


def rss_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--size", type=int, default=8000, help="frame height and width, px")
    ap.add_argument("--pixel-size-nm", type=float, default=8.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from nanoseg.masks import encode_rle_batch
    from nanoseg.postprocess import PostprocessConfig
    from nanoseg_daemon.contracts import FrameJob, FrameMetadata
    from nanoseg_daemon.model_slot import load_model
    from nanoseg_daemon.pipeline import ProfileBook, analyse_frame

    scenes = [synthetic_frame(11, i).counts for i in range(4)]
    reps = -(-args.size // 512)
    rows = [np.concatenate([scenes[(r + c) % 4] for c in range(reps)], axis=1) for r in range(reps)]
    frame = np.ascontiguousarray(np.concatenate(rows, axis=0)[: args.size, : args.size])
    del rows
    model = load_model(args.model, "torch", "cpu", args.threads, PostprocessConfig())
    profiles = ProfileBook("ptychography")
    job = FrameJob("bench", "bench/1", 1, frame, time.time(),
                   FrameMetadata(pixel_size_nm=args.pixel_size_nm, i0=DOSE), time.monotonic())
    base = rss_bytes("VmRSS")
    t0 = time.perf_counter()
    result = analyse_frame(job, model, profiles)
    rles = encode_rle_batch(result.instances.box_masks)
    seconds = time.perf_counter() - t0
    peak = rss_bytes("VmHWM")
    out = {
        "frame": [args.size, args.size, str(frame.dtype)], "pixel_size_nm": args.pixel_size_nm,
        "instances": len(result.instances), "instances_capped": result.instances_capped,
        "rles": len(rles), "seconds": round(seconds, 1), "timings_s": {k: round(v, 2) for k, v in result.timings.items()},
        "rss_after_load_gib": round(base / 2**30, 3), "peak_rss_gib": round(peak / 2**30, 3),
        "peak_rss_growth_gib": round((peak - base) / 2**30, 3), "machine": machine_facts(),
    }
    print(json.dumps(out, indent=1))
    if args.out:
        args.out.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
