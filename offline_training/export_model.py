"""``nanoseg export MODEL --format onnx|tensorrt``: write the engine artefacts of a checkpoint."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from nanoseg.checkpoint import load_checkpoint
from nanoseg.engines.factory import input_shape
from nanoseg.export import checkpoint_metadata, export_onnx_bytes


def export(model_path: Path, fmt: str, out: Path, cache_dir: Path | None = None) -> Path:
    ckpt = load_checkpoint(model_path)
    meta = checkpoint_metadata(ckpt.model_config.model_dump(mode="json"), ckpt.input_spec,
                               str(ckpt.meta.get("name", "")))
    onnx_bytes = export_onnx_bytes(ckpt.build(), input_shape(ckpt), meta)
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
    path = export(model, args.format, out)
    print(json.dumps({"format": args.format, "path": str(path), "bytes": path.stat().st_size}))
    return 0
