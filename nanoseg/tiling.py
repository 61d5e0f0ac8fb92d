"""Square tiles over a frame, and instances of the tiles merged back into frame instances.

All coordinates are px of the frame being tiled (the frame at the model's scale), y down.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

from nanoseg.instances import BoxMasks, Instances, mask_iou
from nanoseg.summary_stats import median_all


@dataclass(frozen=True)
class Tile:
    """A ``size`` x ``size`` window with its top-left at frame pixel (``x0``, ``y0``).

    Only ``valid_height`` x ``valid_width`` px of it lie in the frame (a frame smaller than the
    tile is padded at the bottom and right).
    """

    y0: int
    x0: int
    size: int
    valid_height: int
    valid_width: int

    @property
    def frame_slices(self) -> tuple[slice, slice]:
        """The frame pixels the tile covers."""
        return slice(self.y0, self.y0 + self.valid_height), slice(self.x0, self.x0 + self.valid_width)


def _starts(n: int, tile: int, overlap: int) -> list[int]:
    if n <= tile:
        return [0]
    count = math.ceil((n - overlap) / (tile - overlap))
    # Evenly spread, the last tile flush with the frame's end: overlaps are >= ``overlap``.
    return [round(i * (n - tile) / (count - 1)) for i in range(count)]


def plan_tiles(shape: tuple[int, int], tile: int, overlap: int) -> list[Tile]:
    """Square tiles covering a frame, neighbours overlapping by at least ``overlap``.

    Parameters
    ----------
    shape : (int, int)
        Frame (H, W) in px.
    tile : int
        Tile side in px.
    overlap : int
        Minimum overlap of neighbouring tiles in px, in [0, tile).

    Returns
    -------
    list of Tile
        Row-major. Tiles are spread evenly, the last one flush with the frame's end; along an axis
        shorter than ``tile`` there is one tile, padded at the bottom or right.

    Raises
    ------
    ValueError
        If ``overlap`` is outside [0, tile).
    """
    if not 0 <= overlap < tile:
        raise ValueError(f"overlap must be in [0, tile), got overlap={overlap}, tile={tile}")
    h, w = shape
    return [
        Tile(y0, x0, tile, min(tile, h - y0), min(tile, w - x0))
        for y0 in _starts(h, tile, overlap)
        for x0 in _starts(w, tile, overlap)
    ]


def extract_tiles(image: np.ndarray, tiles: Sequence[Tile], fill: float) -> np.ndarray:
    """The tiles' pixels, stacked.

    Parameters
    ----------
    image : ndarray, shape (H, W)
        The frame the tiles were planned on.
    tiles : sequence of Tile
        From :func:`plan_tiles` (one size).
    fill : float
        Value of the padding outside the frame.

    Returns
    -------
    ndarray, shape (T, size, size), float32
    """
    size = tiles[0].size
    out = np.empty((len(tiles), size, size), dtype=np.float32)
    for k, t in enumerate(tiles):
        _write(image, t, fill, out[k])
    return out


def _write(image: np.ndarray, tile: Tile, fill: float, out: np.ndarray) -> None:
    """Tile ``tile`` of ``image`` cut to ``out``'s (rows, cols), rows and cols <= its size, at
    ``out``: each pixel written once, the frame's or ``fill`` beyond it."""
    rows, cols = out.shape
    h, w = min(tile.valid_height, rows), min(tile.valid_width, cols)
    out[:h, :w] = image[tile.y0: tile.y0 + h, tile.x0: tile.x0 + w]
    if h < rows:
        out[h:, :] = fill
    if w < cols:
        out[:h, w:] = fill


@dataclass(frozen=True, eq=False)
class FrameTiles:
    """One frame's model inputs, (T, size, size) float32, before they are made: its image at the
    model's scale (0-255 gray) cut by a tile plan, padded beyond the image with the image's median.

    Nothing is copied until asked: ``write_tile`` puts a tile straight into a caller's buffer (the
    engine's batch; a 128 px frame for a 512 px model writes 16x its size), ``array`` stacks them
    once. A frame that is exactly one tile is its image (``array`` is a view of a float32 image,
    as ``prepare_frame`` makes). The padding's value (``fill``) is found when the description is
    made, in the preparing thread, so that the engine's thread only copies.
    """

    image: np.ndarray
    plan: tuple[Tile, ...]
    fill: float = field(init=False)
    """The padding's value: the image's median (``median_all``), in its units (0-255 gray); 0.0
    when no tile is padded."""

    def __post_init__(self) -> None:
        padded = any(t.valid_height < t.size or t.valid_width < t.size for t in self.plan)
        object.__setattr__(self, "fill", median_all(self.image) if padded else 0.0)

    def __len__(self) -> int:
        return len(self.plan)

    @property
    def shape(self) -> tuple[int, int, int]:
        """(T, size, size), as ``array``'s."""
        size = self.plan[0].size
        return len(self.plan), size, size

    @property
    def whole(self) -> bool:
        """The image is the one tile, unpadded: ``array`` is a view of it."""
        return len(self.plan) == 1 and self.image.shape == self.shape[1:]

    @cached_property
    def array(self) -> np.ndarray:
        """The tiles, made on first use and kept (``extract_tiles``).

        Returns
        -------
        ndarray, shape (T, size, size), float32
            0-255 gray; a view of ``image`` when ``whole``.
        """
        made = self.made()
        return made if made is not None else extract_tiles(self.image, self.plan, self.fill)

    def made(self) -> np.ndarray | None:
        """The tiles when they cost no copy: ``array`` made already, or a view of the image
        (``whole``).

        Returns
        -------
        ndarray (T, size, size) float32, or None
            None when the tiles would have to be made.
        """
        if "array" in self.__dict__:
            return self.array
        return np.asarray(self.image[None], np.float32) if self.whole else None

    def write_tile(self, t: int, out: np.ndarray) -> None:
        """Tile ``t``'s top-left corner into ``out``: the same pixels as ``array[t, :rows, :cols]``,
        without making ``array``.

        Parameters
        ----------
        t : int
            The tile, an index into ``plan``.
        out : ndarray, shape (rows, cols), float32
            Where it goes (rows, cols <= size px): a slot of an engine's batch, or a mosaic's cell.
        """
        made = self.made()
        if made is not None:
            out[...] = made[t, : out.shape[0], : out.shape[1]]
        else:
            _write(self.image, self.plan[t], self.fill, out)


TileStack = np.ndarray | FrameTiles
"""One frame's model inputs: (T, size, size) tiles made already, or described (``FrameTiles``)."""


def write_tile(tiles: TileStack, t: int, out: np.ndarray) -> None:
    """One tile's top-left corner into a buffer, from tiles made or described.

    Parameters
    ----------
    tiles : ndarray (T, size, size) or FrameTiles
        One frame's tiles.
    t : int
        The tile, 0 to T - 1.
    out : ndarray, shape (rows, cols), float32
        Where it goes, rows and cols <= size px.
    """
    if isinstance(tiles, FrameTiles):
        tiles.write_tile(t, out)
    else:
        out[...] = tiles[t, : out.shape[0], : out.shape[1]]


def made_tiles(tiles: TileStack) -> np.ndarray | None:
    """A frame's tiles as an array, when that costs no copy.

    Parameters
    ----------
    tiles : ndarray (T, size, size) or FrameTiles
        One frame's tiles.

    Returns
    -------
    ndarray or None
        ``tiles`` itself, or a ``FrameTiles``' array when it was made already or is a view of
        its image (one unpadded tile); None when it would have to be made.
    """
    return tiles if isinstance(tiles, np.ndarray) else tiles.made()


def _intersect(
    a: tuple[int, int, int, int], b: tuple[int, int, int, int]
) -> tuple[int, int, int, int] | None:
    """Intersection of two (y0, y1, x0, x1) rectangles, None if empty."""
    y0, y1, x0, x1 = max(a[0], b[0]), min(a[1], b[1]), max(a[2], b[2]), min(a[3], b[3])
    return (y0, y1, x0, x1) if y0 < y1 and x0 < x1 else None


def _tile_rect(t: Tile) -> tuple[int, int, int, int]:
    return t.y0, t.y0 + t.valid_height, t.x0, t.x0 + t.valid_width


@dataclass(frozen=True, eq=False)
class _Piece:
    """One tile instance cut to its bounding box, placed on the frame."""

    rect: tuple[int, int, int, int]  # (y0, y1, x0, x1) on the frame
    mask: np.ndarray  # bool, rect-shaped
    box: np.ndarray  # (4,) xyxy on the frame, the engine's box
    score: float

    def within(self, region: tuple[int, int, int, int]) -> np.ndarray:
        """The mask over ``region`` (zeros outside the piece)."""
        out = np.zeros((region[1] - region[0], region[3] - region[2]), bool)
        common = _intersect(self.rect, region)
        if common is not None:
            y0, y1, x0, x1 = common
            out[y0 - region[0] : y1 - region[0], x0 - region[2] : x1 - region[2]] = self.mask[
                y0 - self.rect[0] : y1 - self.rect[0], x0 - self.rect[2] : x1 - self.rect[2]
            ]
        return out


def _pieces(inst: Instances, t: Tile) -> list[_Piece]:
    bm = inst.box_masks
    offset = np.array([t.x0, t.y0, t.x0, t.y0], np.float32)
    out = []
    for j in range(len(bm)):
        (r, c), crop = bm.offsets[j], bm.crops[j]
        crop = crop[: max(t.valid_height - r, 0), : max(t.valid_width - c, 0)]  # the tile's part in the frame
        rows, cols = np.flatnonzero(crop.any(axis=1)), np.flatnonzero(crop.any(axis=0))
        if rows.size == 0:
            continue
        r0, r1, c0, c1 = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
        rect = (t.y0 + int(r) + r0, t.y0 + int(r) + r1, t.x0 + int(c) + c0, t.x0 + int(c) + c1)
        out.append(_Piece(rect, crop[r0:r1, c0:c1], inst.boxes[j] + offset, float(inst.scores[j])))
    return out


def _find(parent: list[int], i: int) -> int:
    while parent[i] != i:
        parent[i] = parent[parent[i]]
        i = parent[i]
    return i


def merge_tiled_instances(
    per_tile: Sequence[Instances],
    tiles: Sequence[Tile],
    frame_shape: tuple[int, int],
    iou_threshold: float = 0.5,
    max_instances: int | None = None,
) -> Instances:
    """Frame instances from per-tile instances.

    Masks are cut to the part of their tile inside the frame. Two instances of different tiles
    are the same object when the IoU of their masks *restricted to the two tiles' overlap* is
    at least ``iou_threshold`` (an object crossing a border is cut differently by each tile, so
    only the shared region can be compared). Merging is transitive (a wire across three tiles
    is one instance): the merged mask is the union, the score the maximum, the box the union of
    the boxes, clipped to the frame.

    Parameters
    ----------
    per_tile : sequence of Instances
        One per tile, boxes and masks in that tile's px (tile size).
    tiles : sequence of Tile
        The tiles, in the same order.
    frame_shape : (int, int)
        Frame (H, W) in px.
    iou_threshold : float, optional
        Overlap-restricted mask IoU at or above which two pieces are merged.
    max_instances : int, optional
        Keep only the best-scored merged instances (e.g. the detections per image COCOeval
        counts); None keeps all.

    Returns
    -------
    Instances
        On the frame, in frame px (pixel-edge coordinates, y down), sorted by descending score.

    Raises
    ------
    ValueError
        If ``per_tile`` and ``tiles`` differ in length.
    """
    if len(per_tile) != len(tiles):
        raise ValueError(f"{len(per_tile)} instance sets for {len(tiles)} tiles")
    h, w = frame_shape
    pieces: list[_Piece] = []
    members: list[list[int]] = []  # piece indices of each tile
    for inst, t in zip(per_tile, tiles):
        found = _pieces(inst, t)
        members.append(list(range(len(pieces), len(pieces) + len(found))))
        pieces.extend(found)

    parent = list(range(len(pieces)))
    for a in range(len(tiles)):
        for b in range(a + 1, len(tiles)):
            region = _intersect(_tile_rect(tiles[a]), _tile_rect(tiles[b]))
            if region is None:
                continue
            ia = [i for i in members[a] if _intersect(pieces[i].rect, region)]
            ib = [i for i in members[b] if _intersect(pieces[i].rect, region)]
            if not ia or not ib:
                continue
            iou = mask_iou(np.stack([pieces[i].within(region) for i in ia]),
                           np.stack([pieces[i].within(region) for i in ib]))
            for i, j in zip(*np.nonzero(iou >= iou_threshold)):
                parent[_find(parent, ib[j])] = _find(parent, ia[i])

    groups: dict[int, list[int]] = {}
    for i in range(len(pieces)):
        groups.setdefault(_find(parent, i), []).append(i)
    # Highest score first; ordered before the masks are filled so the stack is never copied.
    ordered = sorted(groups.values(), key=lambda idx: -max(pieces[i].score for i in idx))[:max_instances]
    if not ordered:
        return Instances.empty(h, w)
    offsets: list[tuple[int, int]] = []
    crops: list[np.ndarray] = []
    out_boxes = np.zeros((len(ordered), 4), np.float32)
    out_scores = np.zeros(len(ordered), np.float32)
    for g, idx in enumerate(ordered):  # box-local: memory grows with the boxes, not the frame
        rects = np.array([pieces[i].rect for i in idx])
        y0, x0 = int(rects[:, 0].min()), int(rects[:, 2].min())
        crop = np.zeros((int(rects[:, 1].max()) - y0, int(rects[:, 3].max()) - x0), dtype=bool)
        for i in idx:
            py0, py1, px0, px1 = pieces[i].rect
            crop[py0 - y0:py1 - y0, px0 - x0:px1 - x0] |= pieces[i].mask
        offsets.append((y0, x0))
        crops.append(crop)
        stacked = np.stack([pieces[i].box for i in idx])
        out_boxes[g] = (*stacked[:, :2].min(0), *stacked[:, 2:].max(0))
        out_scores[g] = max(pieces[i].score for i in idx)
    out_boxes = np.clip(out_boxes, 0, [w, h, w, h]).astype(np.float32)
    return Instances(out_boxes, out_scores, BoxMasks((h, w), offsets, crops))
