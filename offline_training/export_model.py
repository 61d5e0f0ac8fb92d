"""``nanoseg export MODEL --format onnx|tensorrt [--max-batch K] [--int8 --calibration DIR]``:
write the engine artefacts of a checkpoint."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from nanoseg.checkpoint import Checkpoint, input_shape, load_checkpoint
from nanoseg.export import export_checkpoint_onnx
from nanoseg.mask_decoding import with_decoding


def calibration_frames(ckpt: Checkpoint, dataset: Path, count: int) -> Iterator[np.ndarray]:
    """The first ``count`` images of a synthetic data set as model inputs (1, C, H, W), each
    placed at the top left of a zero input as ``Segmenter.segment_gray`` places it."""
    from nanoseg_training.evaluate import iter_images, load_coco

    c, h, w = input_shape(ckpt)
    for _, gray in iter_images(dataset, load_coco(dataset), count, progress=False):
        x = np.zeros((1, c, h, w), np.float32)
        x[0, :, : gray.shape[0], : gray.shape[1]] = gray[: h, : w]
        yield x


def export(model_path: Path, fmt: str, out: Path, cache_dir: Path | None = None, mask_tta: int | None = None,
           max_batch: int = 1, calibration: Path | None = None, calibration_images: int = 20,
           keep_float: tuple[str, ...] = (), reduce_range: bool = False) -> Path:
    """Write ``out``; the graph predicts masks with the model's mask decoding (``mask_tta``
    replaces its view count) on up to ``max_batch`` images per run; with ``calibration`` (a
    synthetic validation set) its convolutions are quantised to int8 (``nanoseg_training.quantize``;
    ``reduce_range``: 7-bit weights, for CPUs without VNNI)."""
    ckpt = load_checkpoint(model_path)
    onnx_bytes = export_checkpoint_onnx(ckpt, with_decoding(ckpt.mask_decoding, tta=mask_tta),
                                        str(ckpt.meta.get("name", "")), max_batch=max_batch)
    if calibration is not None:
        from nanoseg_training.quantize import quantize_int8

        onnx_bytes = quantize_int8(onnx_bytes, calibration_frames(ckpt, calibration, calibration_images), keep_float,
                                   reduce_range)
    if fmt == "onnx":
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(onnx_bytes)
        return out
    from nanoseg.engines.tensorrt_engine import build_plan

    plan = build_plan(onnx_bytes, fp16=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(plan)
    return out


def cmd_export(args: argparse.Namespace) -> int:
    model = Path(args.model)
    if args.reduce_range and not args.int8:
        print("nanoseg export: error: --reduce-range is an --int8 option", file=sys.stderr)
        return 2
    if args.int8 and (args.format != "onnx" or not args.calibration):
        print("nanoseg export: error: --int8 needs --format onnx and --calibration DIR "
              "(a synthetic validation set, not the test set)", file=sys.stderr)
        return 2
    suffix = (".int8.onnx" if args.int8 else ".onnx") if args.format == "onnx" else ".plan"
    out = Path(args.out) if args.out else model.with_suffix(suffix)
    try:
        path = export(model, args.format, out, mask_tta=args.mask_tta, max_batch=args.max_batch,
                      calibration=Path(args.calibration) if args.int8 else None,
                      calibration_images=args.calibration_images, keep_float=tuple(args.keep_float or ()),
                      reduce_range=args.reduce_range)
    except ValueError as err:
        print(f"nanoseg export: error: {err}", file=sys.stderr)
        return 2
    print(json.dumps({"format": args.format, "int8": bool(args.int8), "max_batch": args.max_batch,
                      "path": str(path), "bytes": path.stat().st_size}))
    return 0
