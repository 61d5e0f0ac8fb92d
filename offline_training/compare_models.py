"""``nanoseg models compare A.pt B.pt IMAGE... --out grid.png``: the same images through two models.

Each image is segmented by each model as ``nanoseg segment`` does (same profile and pixel size),
and the overlays are laid out as a grid: one row per model (the first model above), one column per
image, every tile scaled to the same height, the model's name written at the left of its row.
The per-model outputs of ``nanoseg segment`` (CSV, label TIFF, summaries) are kept beside the grid
in ``<out stem>_<model name>/``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from nanoseg_training.preview import montage

LABEL_WIDTH_PX = 120


def model_label(path: Path) -> str:
    """A model's short name for the grid and its output folders.

    Parameters
    ----------
    path : Path
        A nanoseg checkpoint.

    Returns
    -------
    str
        The directory's name for ``models/NAME/model.pt``, else the file's stem.
    """
    return path.parent.name if path.name == "model.pt" else path.stem


def _scaled_tile(path: Path, height: int) -> np.ndarray:
    """An overlay PNG as RGB, resized to ``height`` px with its aspect ratio kept."""
    img = Image.open(path).convert("RGB")
    width = max(1, round(img.width * height / img.height))
    return np.asarray(img.resize((width, height), Image.Resampling.LANCZOS))


def _label_tile(text: str, height: int) -> np.ndarray:
    """A dark tile ``LABEL_WIDTH_PX`` wide with ``text`` written in white."""
    img = Image.new("RGB", (LABEL_WIDTH_PX, height), (32, 32, 32))
    ImageDraw.Draw(img).text((6, height // 2 - 6), text[:18], fill=(255, 255, 255))
    return np.asarray(img)


def compare(models: list[Path], images: list[Path], out: Path, profile: str, pixel_size: float | str | None,
            tile_height: int = 256, threads: int = 2) -> Path:
    """Segment ``images`` with each of ``models`` and write the grid of their overlays.

    Parameters
    ----------
    models : list of Path
        nanoseg checkpoints, one grid row each, in this order.
    images : list of Path
        Image files (PNG, TIFF, ``.npy``), one column each.
    out : Path
        The grid PNG; each model's ``nanoseg segment`` outputs go to ``<out stem>_<label>/``.
    profile : str
        Frame profile (``configs/profiles``) for every image.
    pixel_size : float or str, optional
        ``--pixel-size`` of ``nanoseg segment``: nm per px, or ``auto``; None: the profile's.
    tile_height : int, optional
        Height of every tile, px.
    threads : int, optional
        CPU threads of the engine.

    Returns
    -------
    Path
        ``out``.

    Raises
    ------
    RuntimeError
        If a model could not segment an image (its overlay is missing).
    """
    from nanoseg.cli import main as cli_main

    lines: list[np.ndarray] = []
    labels: list[str] = []
    for model in models:
        label = model_label(model)
        label = label if label not in labels else f"{label}_{len(labels) + 1}"  # the same model twice
        labels.append(label)
        seg_out = out.with_name(f"{out.stem}_{label}")
        argv = ["segment", *map(str, images), "--model", str(model), "--profile", profile, "--out", str(seg_out),
                "--threads", str(threads), "--quiet"]
        cli_main(argv + (["--pixel-size", str(pixel_size)] if pixel_size else []))
        row = [_label_tile(label, tile_height)]
        for image in images:
            overlay = seg_out / f"{image.stem}_overlay.png"
            if not overlay.exists():
                raise RuntimeError(f"{label} did not segment {image.name}")
            row.append(_scaled_tile(overlay, tile_height))
        lines.append(np.concatenate([np.pad(t, ((0, 0), (0, 4), (0, 0)), constant_values=32) for t in row], axis=1))
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(montage(lines, 1)).save(out)
    return out


def cmd_compare(args: argparse.Namespace) -> int:
    """``nanoseg models compare``.

    Parameters
    ----------
    args : argparse.Namespace
        ``images``, ``models``, ``out``, ``profile``, ``pixel_size``, ``tile_height``, ``threads``.

    Returns
    -------
    int
        0, or 1 when a model could not segment an image (named on standard error).
    """
    try:
        out = compare([Path(m) for m in args.models], [Path(i) for i in args.images], Path(args.out), args.profile,
                      args.pixel_size, args.tile_height, args.threads)
    except RuntimeError as err:
        print(f"nanoseg models compare: error: {err}", file=sys.stderr)
        return 1
    print(f"wrote {out}")
    return 0
