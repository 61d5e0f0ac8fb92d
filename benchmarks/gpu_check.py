"""CUDA checks of the torch engine: same detections as on the CPU, and its speed on the GPU.

Runs a nanoseg checkpoint on the first N images of a synthetic data set with the torch engine on
the CPU and on CUDA, matches instances by mask IoU, and times CUDA inference (batch 1 and 4).
Also records whether TensorRT is importable (it is not on the lent machines). Prints one JSON
object, and writes it with ``--out``.

    python benchmarks/gpu_check.py --model models/default/model.pt --dataset DIR --out gpu.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nanoseg.checkpoint import load_checkpoint
from nanoseg.engines.factory import engine_from_checkpoint
from nanoseg.instances import Instances, mask_iou
from nanoseg.postprocess import PostprocessConfig
from nanoseg.segmenter import Segmenter
from nanoseg_training.evaluate import load_coco, read_gray


def mask_iou_matches(a: Instances, b: Instances) -> list[float]:
    """Best mask IoU in ``b`` of each instance of ``a`` (0 where ``b`` is empty)."""
    iou = mask_iou(a.masks, b.masks)
    return [float(v) for v in iou.max(axis=1)] if len(b) else [0.0] * len(a)


def tensorrt_status() -> str:
    try:
        import tensorrt  # type: ignore[import-not-found]
    except ImportError as err:
        return f"not importable: {err}"
    return f"tensorrt {tensorrt.__version__}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--dataset", type=Path, required=True, help="COCO data set (nanoseg generate)")
    ap.add_argument("--images", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=50, help="timed CUDA frames")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gpu_check: CUDA is not available here")

    ckpt = load_checkpoint(args.model)
    post = PostprocessConfig()
    images = sorted(load_coco(args.dataset)["images"], key=lambda im: int(im["id"]))[: args.images]
    grays = [read_gray(args.dataset / im["file_name"]) for im in images]
    cpu = Segmenter.for_checkpoint(engine_from_checkpoint(ckpt, "torch", "cpu", threads=8), ckpt, post)
    gpu_engine = engine_from_checkpoint(ckpt, "torch", "cuda")
    gpu = Segmenter.for_checkpoint(gpu_engine, ckpt, post)

    ious: list[float] = []
    counts = []
    for g in grays:
        a, b = cpu.segment_gray(g), gpu.segment_gray(g)
        counts.append((len(a), len(b)))
        ious += mask_iou_matches(a, b)
    frame = np.repeat(grays[0][None, None], ckpt.model_config.in_channels, axis=1).astype(np.float32)
    timings: dict[str, float] = {}
    for batch in (1, 4):
        x = np.repeat(frame, batch, axis=0)
        for _ in range(5):
            gpu_engine.infer(x)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(args.repeats):
            gpu_engine.infer(x)  # returns numpy: includes the device-to-host copy
        torch.cuda.synchronize()
        timings[f"batch{batch}_frames_per_second"] = batch * args.repeats / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    for g in grays:
        gpu.segment_gray(g)
    timings["segment_seconds_per_frame"] = (time.perf_counter() - t0) / len(grays)

    result: dict[str, Any] = {
        "device": torch.cuda.get_device_name(0),
        "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
        "model": str(args.model), "images": len(grays),
        "instances_cpu_vs_cuda": [list(c) for c in counts],
        "same_count_images": sum(a == b for a, b in counts),
        "mask_iou_min": float(min(ious)) if ious else None,
        "mask_iou_mean": float(np.mean(ious)) if ious else None,
        "cuda_engine": timings,
        "tensorrt": tensorrt_status(),
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
