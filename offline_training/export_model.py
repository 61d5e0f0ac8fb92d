"""``nanoseg export MODEL --format onnx|tensorrt``: write the engine artefacts of a checkpoint."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from nanoseg.checkpoint import load_checkpoint
from nanoseg.export import export_checkpoint_onnx
from nanoseg.mask_decoding import with_decoding


def export(model_path: Path, fmt: str, out: Path, cache_dir: Path | None = None, mask_tta: int | None = None) -> Path:
    """Write ``out``; the graph predicts masks with the model's mask decoding (``mask_tta``
    replaces its view count)."""
    ckpt = load_checkpoint(model_path)
    onnx_bytes = export_checkpoint_onnx(ckpt, with_decoding(ckpt.mask_decoding, tta=mask_tta), str(ckpt.meta.get("name", "")))
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
    suffix = ".onnx" if args.format == "onnx" else ".plan"
    out = Path(args.out) if args.out else model.with_suffix(suffix)
    path = export(model, args.format, out, mask_tta=args.mask_tta)
    print(json.dumps({"format": args.format, "path": str(path), "bytes": path.stat().st_size}))
    return 0
