"""Small frames packed into one model input, and the engine's detections split back per frame.

A frame much smaller than the model input (a 128 x 128 detector region against a 512 x 512
input) is otherwise padded to a whole input, so the network spends most of its work on padding.
``plan_mosaics`` lays such frames out on a k x k grid of cells of one input (a *mosaic*), each
frame's content at its cell's top-left with at least ``gap`` px of its own padding to the right
and below (what the network sees there is that frame's fill, as when it runs alone);
``pack_mosaic`` draws it; ``split_detections`` gives each frame the detections whose box centre
lies in its cell, moved to its own tile's coordinates, so everything after the engine runs as
for a frame alone. Coordinates are model px, x right, y down; boxes xyxy.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from nanoseg.engines import RawDetections
from nanoseg.tiling import FrameTiles, TileStack, write_tile


@dataclass(frozen=True)
class Mosaic:
    """Frames (by index into the caller's list) on a ``k`` x ``k`` grid of ``cell`` px cells of
    one ``size`` px model input, in row-major cell order."""

    frames: tuple[int, ...]
    k: int
    cell: int
    size: int

    def origin(self, slot: int) -> tuple[int, int]:
        """Where a cell starts.

        Parameters
        ----------
        slot : int
            The cell's place in row-major order (the ``slot``-th frame of ``frames``).

        Returns
        -------
        (int, int)
            (y0, x0) of the cell's top-left, model px.
        """
        return (slot // self.k) * self.cell, (slot % self.k) * self.cell


def plan_mosaics(shapes: Sequence[tuple[int, int] | None], size: int, gap: int) -> list[Mosaic]:
    """Group the frames that fit a cell into mosaics.

    Parameters
    ----------
    shapes : sequence of (int, int) or None
        Per frame, its content's (height, width) at model scale, px; None: not to be packed
        (e.g. a frame of several tiles).
    size : int
        Side of the model input, px.
    gap : int
        Padding kept right of and below each frame's content, px.

    Returns
    -------
    list of Mosaic
        In frame order; only grids of at least 2 x 2 cells and mosaics of at least 2 frames
        (the frames left out run alone).
    """
    sides = {i: max(s) for i, s in enumerate(shapes) if s is not None and max(s) + gap <= size // 2}
    fits = sorted(sides)
    if len(fits) < 2:
        return []
    side = max(sides.values())
    k = size // (side + gap)
    per = k * k
    groups = [fits[j: j + per] for j in range(0, len(fits), per)]
    return [Mosaic(tuple(g), k, size // k, size) for g in groups if len(g) >= 2]


def pack_mosaic(mosaic: Mosaic, tiles: Sequence[TileStack]) -> np.ndarray:
    """The mosaic's model input: each frame's one padded tile ((size, size), content at its
    top-left), cut to a cell, at its cell; the grid's leftover strip takes the first frame's fill.

    Parameters
    ----------
    mosaic : Mosaic
    tiles : sequence of ndarray (1, size, size) or FrameTiles
        Per frame of ``mosaic.frames``, in that order, its one padded tile (made or described:
        a described one's cell is written from its image, its padding never made).

    Returns
    -------
    ndarray, shape (size, size), float32
    """
    c, size, first = mosaic.cell, mosaic.size, tiles[0]
    fill = first.fill if isinstance(first, FrameTiles) else first[0, -1, -1]  # a padded tile's corner is its fill
    canvas = np.full((size, size), fill, np.float32)
    for slot, frame in enumerate(tiles):
        y0, x0 = mosaic.origin(slot)
        write_tile(frame, 0, canvas[y0: y0 + c, x0: x0 + c])
    return canvas


def split_detections(mosaic: Mosaic, raw: RawDetections) -> list[RawDetections]:
    """The mosaic's detections per frame: those whose box centre lies in its cell, with boxes
    moved to the frame's own tile (the cell's top-left at 0, 0). A box reaching past the cell
    keeps its extent (mask pasting clips to the tile, and the frame's merge to its content).

    Returns
    -------
    list of RawDetections
        One per frame of ``mosaic.frames``, in that order.
    """
    c = mosaic.cell
    boxes = np.asarray(raw.boxes, np.float32).reshape(-1, 4)
    col = np.floor((boxes[:, 0] + boxes[:, 2]) / 2 / c).astype(np.int64)
    row = np.floor((boxes[:, 1] + boxes[:, 3]) / 2 / c).astype(np.int64)
    out = []
    for slot in range(len(mosaic.frames)):
        y0, x0 = mosaic.origin(slot)
        sel = (row == slot // mosaic.k) & (col == slot % mosaic.k)
        moved = boxes[sel] - np.array([x0, y0, x0, y0], np.float32)  # outside the tile: pasting clips
        out.append(RawDetections(moved, np.asarray(raw.scores)[sel], np.asarray(raw.mask_probs)[sel]))
    return out
