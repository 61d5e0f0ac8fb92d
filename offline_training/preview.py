"""Montage of a COCO data set (or predictions): images with coloured mask outlines."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from nanoseg.masks import decode_rle

PALETTE = np.array([
    [230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48], [145, 30, 180],
    [70, 240, 240], [240, 50, 230], [210, 245, 60], [250, 190, 212], [0, 128, 128], [220, 190, 255],
    [170, 110, 40], [255, 250, 200], [128, 0, 0], [170, 255, 195], [128, 128, 0], [255, 215, 180],
], dtype=np.uint8)


def outline_overlay(gray: np.ndarray, masks: list[np.ndarray], thickness: int = 1) -> np.ndarray:
    """RGB image: ``gray`` with each mask's boundary drawn in its own colour."""
    rgb = np.repeat(gray[..., None], 3, axis=2).astype(np.uint8)
    for k, m in enumerate(masks):
        edge = m & ~ndimage.binary_erosion(m, iterations=thickness)
        rgb[edge] = PALETTE[k % len(PALETTE)]
    return rgb


def montage(tiles: list[np.ndarray], columns: int) -> np.ndarray:
    h = max(t.shape[0] for t in tiles)
    w = max(t.shape[1] for t in tiles)
    rows = (len(tiles) + columns - 1) // columns
    canvas = np.full((rows * (h + 4), columns * (w + 4), 3), 32, dtype=np.uint8)
    for i, t in enumerate(tiles):
        r, c = divmod(i, columns)
        canvas[r * (h + 4): r * (h + 4) + t.shape[0], c * (w + 4): c * (w + 4) + t.shape[1]] = t
    return canvas


def preview_dataset(dataset: Path, out: Path, max_images: int = 16, columns: int = 4) -> Path:
    """Write a montage PNG of the first ``max_images`` images of ``dataset`` to ``out``."""
    coco = json.loads((dataset / "annotations.json").read_text())
    by_image: dict[int, list[dict]] = {}
    for a in coco["annotations"]:
        by_image.setdefault(a["image_id"], []).append(a)
    tiles = []
    for img in coco["images"][:max_images]:
        gray = np.asarray(Image.open(dataset / img["file_name"]).convert("L"))
        masks = [decode_rle(a["segmentation"]) for a in by_image.get(img["id"], [])]
        tiles.append(outline_overlay(gray, masks))
    if not tiles:
        raise ValueError(f"{dataset}: data set has no images")
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(montage(tiles, min(columns, len(tiles)))).save(out)
    return out


def cmd_preview(args: argparse.Namespace) -> int:
    """``nanoseg preview DATASET``: a montage of the data set with mask outlines."""
    out = Path(args.out) if args.out else Path(args.dataset) / "preview.png"
    preview_dataset(Path(args.dataset), out, args.max_images, args.columns)
    print(f"wrote {out}")
    return 0
