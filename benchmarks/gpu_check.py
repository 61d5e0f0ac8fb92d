"""CUDA checks of the torch engine: same detections as on the CPU, and its speed on the GPU.

Runs a nanoseg checkpoint on the first N images of a synthetic data set with the torch engine on
the CPU and on CUDA, matches instances by mask IoU, and times CUDA inference (batch 1 and 4) and
a frame with post-processing on the device against the same on the host (masks compared).
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


def device_post_vs_host(gpu: Segmenter, grays: list[np.ndarray], repeats: int) -> dict[str, Any]:
    """Frame time of the CUDA engine with post-processing on the device (``device_postprocess``:
    scores, thresholds, pasting into box-local crops) and on the host (numpy), interleaved; the
    two paths' masks compared; and the moment statistics of the frame's particles on the device
    against the host's whole table and summary."""
    from nanoseg import device_postprocess as dp
    from nanoseg.particle_stats import frame_summary, particle_table

    on = {flag: Segmenter(gpu.engine, gpu.spec, gpu.post, gpu.mask_offset_px, gpu.mask_margin_px, device_post=flag)
          for flag in (True, False)}  # fmt: skip
    ious: list[float] = []
    for g in grays:
        ious += mask_iou_matches(on[False].segment_gray(g), on[True].segment_gray(g))
    times: dict[bool, list[float]] = {True: [], False: []}
    moments_s, table_s = [], []
    for k in range(max(repeats // 2, 1)):
        g = grays[k % len(grays)]
        for flag in (True, False):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            inst = on[flag].segment_gray(g)
            torch.cuda.synchronize()
            times[flag].append(time.perf_counter() - t0)
        masks = dp.DeviceMasks.from_host(inst.box_masks, gpu.engine.device)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        dp.moment_columns(masks)
        moments_s.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        frame_summary(particle_table(inst.box_masks))
        table_s.append(time.perf_counter() - t0)
    dev, host = np.median(times[True]), np.median(times[False])
    return {"frame_ms_device_post": 1000 * float(dev), "frame_ms_host_post": 1000 * float(host),
            "host_over_device": float(host / dev), "mask_iou_min": float(min(ious)) if ious else None,
            "moment_columns_ms_device": 1000 * float(np.median(moments_s)),
            "table_and_summary_ms_host": 1000 * float(np.median(table_s))}


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
    post_timing = device_post_vs_host(gpu, grays, args.repeats)

    result: dict[str, Any] = {
        "device": torch.cuda.get_device_name(0),
        "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
        "model": str(args.model), "images": len(grays),
        "instances_cpu_vs_cuda": [list(c) for c in counts],
        "same_count_images": sum(a == b for a, b in counts),
        "mask_iou_min": float(min(ious)) if ious else None,
        "mask_iou_mean": float(np.mean(ious)) if ious else None,
        "cuda_engine": timings,
        "post_processing_device_vs_host": post_timing,
        "tensorrt": tensorrt_status(),
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
