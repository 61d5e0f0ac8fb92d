"""GPU checks of the engines: same detections as on the CPU, and their speed on the device.

1. Agreement: the first N images of a synthetic data set through the CPU torch engine and the
   device engines (torch CUDA; ONNX Runtime's CUDA provider when ``onnxruntime-gpu`` is there),
   instances matched by mask IoU (the issue's bar: >= 0.99).
2. Speed: ``Engine.infer`` frames/s (including the device-to-host copy of the outputs) at input
   sizes ``--sizes`` and batches ``--batches``, for torch on the device and for ONNX Runtime on a
   graph exported at that size and ``max_batch`` = the batch (``nanoseg.export``).
   ``--compile``: torch again with ``torch.compile`` on the backbone (the heads' shapes change per
   frame, so only the backbone is compiled).
3. Post-processing on the device (``nanoseg.device_postprocess``) against the host: frame time
   and masks compared (CUDA only).

``onnxruntime-gpu`` replaces the CPU package ``onnxruntime`` (both own the module): with
``--install-ort-gpu`` the script swaps them first (``pip uninstall onnxruntime``, then ``pip
install onnxruntime-gpu``, from ``--wheels DIR`` when the machine has no index), before anything
imports onnxruntime. Without it, or when that fails, the ONNX Runtime figures say why they are
missing. Also records whether TensorRT is importable. Prints one JSON object, and writes it
with ``--out``. ``--device cpu`` runs the same code on the CPU (a dry run, e.g. before a lent
GPU's short session).

    python benchmarks/gpu_check.py --model models/default/model.pt --dataset DIR --out gpu.json \
        [--install-ort-gpu [--wheels .whl]] [--sizes 128 512] [--batches 1 4 8] [--compile]
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # imported in main(), after --install-ort-gpu may have swapped onnxruntime
    from nanoseg.segmenter import Segmenter


def install_ort_gpu(wheels: Path | None) -> str:
    """Swap onnxruntime for onnxruntime-gpu in this interpreter's environment; what happened."""
    pip = [sys.executable, "-m", "pip", "-q"]
    source = ["--no-index", "--find-links", str(wheels)] if wheels else []
    subprocess.run([*pip, "uninstall", "-y", "onnxruntime"], capture_output=True, check=False, timeout=120)
    proc = subprocess.run([*pip, "install", "--no-deps", *source, "onnxruntime-gpu"], capture_output=True,
                          text=True, check=False, timeout=300)
    return "installed" if proc.returncode == 0 else f"pip install failed: {proc.stderr.strip()[-300:]}"


def ort_cuda_status() -> str | None:
    """None when ONNX Runtime's CUDA provider is available, else why not."""
    try:
        import onnxruntime as ort
    except ImportError as err:
        return f"onnxruntime not importable: {err}"
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return f"onnxruntime {ort.__version__} has no CUDAExecutionProvider ({ort.get_available_providers()})"
    return None


def device_post_vs_host(gpu: Segmenter, grays: list[np.ndarray], repeats: int) -> dict[str, Any]:
    """Frame time of the CUDA engine with post-processing on the device (``device_postprocess``:
    scores, thresholds, pasting into box-local crops) and on the host (numpy), interleaved; the
    two paths' masks compared; and the moment statistics of the frame's particles on the device
    against the host's whole table and summary."""
    import torch

    from nanoseg import device_postprocess as dp
    from nanoseg.particle_stats import frame_summary, particle_table
    from nanoseg.segmenter import Segmenter

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
        import tensorrt
    except ImportError as err:
        return f"not importable: {err}"
    return f"tensorrt {tensorrt.__version__}"


def mask_iou_matches(a: Any, b: Any) -> list[float]:
    """Best mask IoU in ``b`` of each instance of ``a`` (0 where ``b`` is empty)."""
    from nanoseg.instances import mask_iou

    iou = mask_iou(a.masks, b.masks)
    return [float(v) for v in iou.max(axis=1)] if len(b) else [0.0] * len(a)


def agreement(reference: Any, other: Any, grays: list[np.ndarray]) -> dict[str, Any]:
    """Instances of ``other`` against ``reference`` (Segmenters) on ``grays``."""
    ious: list[float] = []
    counts = []
    for g in grays:
        a, b = reference.segment_gray(g), other.segment_gray(g)
        counts.append((len(a), len(b)))
        ious += mask_iou_matches(a, b)
    return {"instances_reference_vs_device": [list(c) for c in counts],
            "same_count_images": sum(a == b for a, b in counts),
            "mask_iou_min": float(min(ious)) if ious else None,
            "mask_iou_mean": float(np.mean(ious)) if ious else None,
            "matched_at_0.99": float(np.mean(np.array(ious) >= 0.99)) if ious else None}


def frames_per_second(engine: Any, x: np.ndarray, repeats: int, sync: Any) -> float:
    for _ in range(3):
        engine.infer(x)
    sync()
    t0 = time.perf_counter()
    for _ in range(repeats):
        engine.infer(x)  # returns numpy: includes the device-to-host copy
    sync()
    return len(x) * repeats / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--dataset", type=Path, required=True, help="COCO data set (nanoseg generate)")
    ap.add_argument("--images", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=30, help="timed runs per (engine, size, batch)")
    ap.add_argument("--device", default="cuda", help="cuda, cuda:N, or cpu for a dry run")
    ap.add_argument("--sizes", type=int, nargs="+", default=[128, 512], help="square input sizes, px")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4, 8])
    ap.add_argument("--compile", action="store_true", help="also time torch with torch.compile on the backbone")
    ap.add_argument("--install-ort-gpu", action="store_true", help="swap onnxruntime for onnxruntime-gpu first")
    ap.add_argument("--wheels", type=Path, help="--install-ort-gpu from this wheel directory (no index)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    result: dict[str, Any] = {"python": platform.python_version()}
    if args.install_ort_gpu and args.device != "cpu":
        result["onnxruntime_gpu_install"] = install_ort_gpu(args.wheels)

    import torch

    from nanoseg.checkpoint import load_checkpoint
    from nanoseg.engines.factory import engine_from_checkpoint
    from nanoseg.engines.onnx_engine import OnnxEngine
    from nanoseg.export import export_checkpoint_onnx, export_onnx_bytes
    from nanoseg.mask_decoding import METADATA_KEY
    from nanoseg.postprocess import PostprocessConfig
    from nanoseg.segmenter import Segmenter
    from nanoseg_training.evaluate import load_coco, read_gray

    on_gpu = args.device.startswith("cuda")
    if on_gpu and not torch.cuda.is_available():
        raise SystemExit("gpu_check: CUDA is not available here (--device cpu for a dry run)")
    sync = torch.cuda.synchronize if on_gpu else (lambda: None)
    ort_missing = ort_cuda_status() if on_gpu else None
    ckpt = load_checkpoint(args.model)
    post = PostprocessConfig()
    images = sorted(load_coco(args.dataset)["images"], key=lambda im: int(im["id"]))[: args.images]
    grays = [read_gray(args.dataset / im["file_name"]) for im in images]
    cpu = Segmenter.for_checkpoint(engine_from_checkpoint(ckpt, "torch", "cpu", threads=8), ckpt, post)
    torch_dev = engine_from_checkpoint(ckpt, "torch", args.device)
    result["agreement"] = {"torch_" + args.device: agreement(cpu, Segmenter.for_checkpoint(torch_dev, ckpt, post), grays)}
    if ort_missing is None:
        ort_dev = OnnxEngine(export_checkpoint_onnx(ckpt), device=args.device, threads=8)
        result["agreement"]["onnxruntime_" + args.device] = agreement(
            cpu, Segmenter.for_checkpoint(ort_dev, ckpt, post), grays)

    c = ckpt.model_config.in_channels
    speed: dict[str, dict[str, float | str]] = {"torch": {}, "onnxruntime": {}}
    if args.compile:
        speed["torch_compile"] = {}
    frames = {}
    for size in args.sizes:  # the first test image, cropped or zero-padded to size x size
        gray = np.zeros((size, size), np.float32)
        g0 = grays[0][:size, :size]
        gray[: g0.shape[0], : g0.shape[1]] = g0
        frames[size] = frame = np.repeat(gray[None, None], c, axis=1)
        for batch in args.batches:
            key = f"{size}px_batch{batch}"
            x = np.repeat(frame, batch, axis=0)
            speed["torch"][key] = frames_per_second(torch_dev, x, args.repeats, sync)
            if ort_missing is not None:
                speed["onnxruntime"][key] = ort_missing
                continue
            graph = export_onnx_bytes(ckpt.build(), (c, size, size), {METADATA_KEY: ckpt.mask_decoding.model_dump_json()},
                                      ckpt.mask_decoding, ckpt.model_config, max_batch=batch)
            speed["onnxruntime"][key] = frames_per_second(OnnxEngine(graph, args.device, threads=8), x, args.repeats, sync)
    if args.compile:
        try:
            net = torch_dev.core.model  # type: ignore[attr-defined]  # a TorchEngine
            net.backbone = torch.compile(net.backbone, dynamic=False)
            for size in args.sizes:
                for batch in args.batches:
                    x = np.repeat(frames[size], batch, axis=0)
                    speed["torch_compile"][f"{size}px_batch{batch}"] = frames_per_second(torch_dev, x, args.repeats, sync)
        except Exception as err:  # a failed compile is a result, not a crash of the check
            speed["torch_compile"]["error"] = f"{type(err).__name__}: {err}"[:500]
    result.update({
        "device": torch.cuda.get_device_name(0) if on_gpu else f"cpu ({platform.processor() or platform.machine()})",
        "torch": torch.__version__, "cuda": torch.version.cuda, "model": str(args.model), "images": len(grays),
        "onnxruntime_cuda": (ort_missing or "available") if on_gpu else "not checked (--device cpu)",
        "frames_per_second": speed,
        "post_processing_device_vs_host": device_post_vs_host(Segmenter.for_checkpoint(torch_dev, ckpt, post), grays,
                                                              args.repeats) if on_gpu else "not measured (--device cpu)",
        "tensorrt": tensorrt_status(),
    })
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
