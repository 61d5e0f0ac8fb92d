"""``nanoseg models import-detectron2 CONFIG WEIGHTS --out DIR``: the command around
``nanoseg.detectron2_import`` (which converts; this writes the files and prints)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from nanoseg.checkpoint import save_checkpoint
from nanoseg.detectron2_import import (
    DEFAULT_PIXEL_SIZE_NM,
    Detectron2ImportError,
    import_detectron2,
)


def cmd_import_detectron2(args: argparse.Namespace) -> int:
    """``nanoseg models import-detectron2 CONFIG WEIGHTS --out DIR [--pixel-size-nm NM]``."""
    out = Path(args.out)
    pixel = args.pixel_size_nm if args.pixel_size_nm is not None else DEFAULT_PIXEL_SIZE_NM
    try:
        ckpt, report = import_detectron2(args.config, args.weights, pixel)
    except Detectron2ImportError as err:
        print(f"nanoseg models import-detectron2: error: {err}", file=sys.stderr)
        return 2
    report["pixel_size_nm_assumed"] = args.pixel_size_nm is None
    if args.pixel_size_nm is None:
        print(f"warning: pixel size unknown, recorded as {pixel} nm/px; frames are resampled to it "
              "(pass --pixel-size-nm with the pixel size of the training images)", file=sys.stderr)
    save_checkpoint(ckpt, out / "model.pt")
    (out / "import_report.json").write_text(json.dumps(report, indent=2) + "\n")
    keys = report["keys"]
    print(f"imported {keys['mapped']} of {keys['checkpoint']} detectron2 tensors "
          f"({len(keys['ignored'])} non-weights checked and skipped) into {out / 'model.pt'}")
    return 0
