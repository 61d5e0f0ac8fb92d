"""Detected instances of one image: the contract between engines, tiling and statistics."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


class BoxMasks:
    """N boolean masks on an H x W image, each kept as its bounding-box crop.

    Memory grows with the instances' box areas, not with N x H x W, so a large frame with many
    instances stays small. ``offsets`` (N, 2) int64 are the crops' top-left (row, column) on the
    image, y down; ``crops[i]`` is a bool (h_i, w_i) array (an empty mask is a 0 x 0 crop).

    It answers the few array operations whole-image code asks of an (N, H, W) stack: ``shape``,
    ``ndim``, ``dtype``, ``len``, ``[i]`` (a full (H, W) mask), ``[i, rows, cols]`` (slices),
    ``[index array or bool vector]`` (a subset), ``sum(axis=0 | (1, 2))`` and ``np.asarray`` (the
    dense stack, for code that needs one; that costs N x H x W bytes).
    """

    ndim = 3
    dtype = np.dtype(bool)

    def __init__(self, image_shape: tuple[int, int], offsets: np.ndarray | Sequence[tuple[int, int]],
                 crops: Sequence[np.ndarray]) -> None:
        self.image_shape = (int(image_shape[0]), int(image_shape[1]))
        self.offsets = np.asarray(offsets, dtype=np.int64).reshape(len(crops), 2)
        self.crops = list(crops)

    @classmethod
    def from_dense(cls, masks: np.ndarray) -> BoxMasks:
        """Crops of an (N, H, W) bool stack."""
        boxes = mask_boxes(masks).astype(np.int64)
        crops = [masks[i, y0:y1, x0:x1] for i, (x0, y0, x1, y1) in enumerate(boxes)]
        return cls((masks.shape[1], masks.shape[2]), boxes[:, [1, 0]], crops)

    @classmethod
    def tight(cls, image_shape: tuple[int, int], offsets: Sequence[tuple[int, int]],
              crops: Sequence[np.ndarray]) -> BoxMasks:
        """Masks from crops that may have empty margins (cut to their foreground)."""
        out_offsets, out_crops = [], []
        for (y, x), crop in zip(offsets, crops):
            rows, cols = np.flatnonzero(crop.any(axis=1)), np.flatnonzero(crop.any(axis=0))
            if rows.size == 0:
                out_offsets.append((0, 0))
                out_crops.append(np.zeros((0, 0), bool))
                continue
            out_offsets.append((y + int(rows[0]), x + int(cols[0])))
            out_crops.append(np.ascontiguousarray(crop[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]))
        return cls(image_shape, out_offsets, out_crops)

    def __len__(self) -> int:
        return len(self.crops)

    @property
    def shape(self) -> tuple[int, int, int]:
        return (len(self), *self.image_shape)

    def boxes(self) -> np.ndarray:
        """(N, 4) float32 tight xyxy boxes, pixel-edge coordinates ((0, 0, 0, 0) when empty)."""
        out = np.zeros((len(self), 4), np.float32)
        for i, ((y, x), c) in enumerate(zip(self.offsets, self.crops)):
            if c.size:
                out[i] = (x, y, x + c.shape[1], y + c.shape[0])
        return out

    def areas(self) -> np.ndarray:
        """(N,) int64 foreground pixel counts."""
        return np.array([int(np.count_nonzero(c)) for c in self.crops], np.int64)

    def full(self, i: int) -> np.ndarray:
        """Mask ``i`` as a whole (H, W) bool image."""
        out = np.zeros(self.image_shape, bool)
        (y, x), c = self.offsets[i], self.crops[i]
        out[y:y + c.shape[0], x:x + c.shape[1]] = c
        return out

    def window(self, i: int, rows: slice, cols: slice) -> np.ndarray:
        """Mask ``i`` over image rows ``rows`` and columns ``cols`` (zeros outside its crop)."""
        r0, r1, _ = rows.indices(self.image_shape[0])
        c0, c1, _ = cols.indices(self.image_shape[1])
        out = np.zeros((max(r1 - r0, 0), max(c1 - c0, 0)), bool)
        (y, x), c = self.offsets[i], self.crops[i]
        y0, y1 = max(r0, y), min(r1, y + c.shape[0])
        x0, x1 = max(c0, x), min(c1, x + c.shape[1])
        if y0 < y1 and x0 < x1:
            out[y0 - r0:y1 - r0, x0 - c0:x1 - c0] = c[y0 - y:y1 - y, x0 - x:x1 - x]
        return out

    def cover(self, dtype: Any = np.int32) -> np.ndarray:
        """(H, W) count of the masks covering each pixel."""
        out = np.zeros(self.image_shape, dtype)
        for (y, x), c in zip(self.offsets, self.crops):
            out[y:y + c.shape[0], x:x + c.shape[1]] += c
        return out

    def select(self, idx: np.ndarray | Sequence[int] | slice) -> BoxMasks:
        """The masks at ``idx`` (integer indices, a boolean vector or a slice), in that order."""
        order = np.arange(len(self))[idx] if isinstance(idx, slice) else np.asarray(idx)
        if order.dtype == np.bool_:
            order = np.flatnonzero(order)
        order = order.astype(np.intp).reshape(-1)
        return BoxMasks(self.image_shape, self.offsets[order], [self.crops[i] for i in order])

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, tuple) and len(key) == 3 and isinstance(key[1], slice) and isinstance(key[2], slice):
            return self.window(int(key[0]), key[1], key[2])
        if isinstance(key, int | np.integer):
            return self.full(int(key))
        return self.select(key)

    def sum(self, axis: int | tuple[int, ...] | None = None, dtype: Any = None) -> Any:
        if axis == 0:
            return self.cover(dtype or np.int64)
        if axis in ((1, 2), (-2, -1)):
            return self.areas().astype(dtype or np.int64)
        if axis is None:
            return int(self.areas().sum())
        raise NotImplementedError(f"BoxMasks.sum(axis={axis})")

    def dense(self) -> np.ndarray:
        """The (N, H, W) bool stack."""
        out = np.zeros(self.shape, bool)
        for i, ((y, x), c) in enumerate(zip(self.offsets, self.crops)):
            out[i, y:y + c.shape[0], x:x + c.shape[1]] = c
        return out

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        out = self.dense()
        return out if dtype is None else out.astype(dtype)


class Instances:
    """N instances on an H x W image.

    Coordinates are continuous pixel-edge coordinates, y down: pixel (column c, row r) covers
    [c, c + 1) x [r, r + 1), so a box around that single pixel is (c, r, c + 1, r + 1).

    - ``boxes``: (N, 4) float32, (x0, y0, x1, y1) in px.
    - ``scores``: (N,) float32, detection confidence in [0, 1].
    - ``masks``: (N, H, W) bool, the full footprint of each instance (masks of overlapping
      instances overlap). Built from an array or from ``BoxMasks``; stored as given. ``box_masks``
      is the box-local form (what large frames should use: it never costs N x H x W); ``masks``
      the dense stack (made on first access when stored box-local, then kept).
    """

    __slots__ = ("_dense", "_masks", "boxes", "scores")

    def __init__(self, boxes: np.ndarray, scores: np.ndarray, masks: np.ndarray | BoxMasks) -> None:
        boxes = np.asarray(boxes, dtype=np.float32)
        scores = np.asarray(scores, dtype=np.float32)
        if masks.ndim != 3 or masks.dtype != np.bool_:
            raise ValueError(f"masks must be (N, H, W) bool, got {masks.shape} {masks.dtype}")
        n = masks.shape[0]
        if boxes.shape != (n, 4):
            raise ValueError(f"boxes must be ({n}, 4), got {boxes.shape}")
        if scores.shape != (n,):
            raise ValueError(f"scores must be ({n},), got {scores.shape}")
        self.boxes = boxes
        self.scores = scores
        self._masks = masks
        self._dense: np.ndarray | None = None

    @property
    def masks(self) -> np.ndarray:
        m = self._masks
        if not isinstance(m, BoxMasks):
            return m
        if self._dense is None:  # made once, on first use (whole-image code, small images)
            self._dense = m.dense()
        return self._dense

    @property
    def box_masks(self) -> BoxMasks:
        m = self._masks
        return m if isinstance(m, BoxMasks) else BoxMasks.from_dense(m)

    def __len__(self) -> int:
        return int(self._masks.shape[0])

    @property
    def image_shape(self) -> tuple[int, int]:
        """(H, W) of the image the masks live on."""
        return int(self._masks.shape[1]), int(self._masks.shape[2])

    def select(self, idx: np.ndarray | Sequence[int] | slice) -> Instances:
        """The instances at ``idx``, in that order.

        Parameters
        ----------
        idx : ndarray, sequence of int or slice
            Integer indices, a boolean vector of length N, or a slice.

        Returns
        -------
        Instances
            A new set on the same image (arrays indexed, not shared views for integer/boolean ``idx``).
        """
        if not isinstance(idx, slice):
            idx = np.asarray(idx)
            if idx.dtype != np.bool_:
                idx = idx.astype(np.intp)
        m = self._masks
        return Instances(self.boxes[idx], self.scores[idx], m.select(idx) if isinstance(m, BoxMasks) else m[idx])

    @classmethod
    def empty(cls, height: int, width: int) -> Instances:
        """No instances on an image of the given size.

        Parameters
        ----------
        height, width : int
            Image size in px.

        Returns
        -------
        Instances
            N = 0, box-local masks on a (height, width) image.
        """
        return cls(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), BoxMasks((height, width), [], []))


def mask_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise intersection over union of two sets of masks on one image.

    Parameters
    ----------
    a : ndarray, shape (N, H, W), bool
    b : ndarray, shape (M, H, W), bool

    Returns
    -------
    ndarray, shape (N, M), float64
        IoU in [0, 1]; 0 where both masks of a pair are empty. Pixel counts go through a float32
        product, exact below 2^24 px per mask.
    """
    if len(a) == 0 or len(b) == 0:
        return np.zeros((len(a), len(b)))
    fa = a.reshape(len(a), -1).astype(np.float32)
    fb = b.reshape(len(b), -1).astype(np.float32)
    inter = (fa @ fb.T).astype(np.float64)
    union = fa.sum(1, dtype=np.float64)[:, None] + fb.sum(1, dtype=np.float64)[None] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def mask_boxes(masks: np.ndarray | BoxMasks) -> np.ndarray:
    """Tight boxes of masks, in pixel-edge coordinates.

    Parameters
    ----------
    masks : ndarray, shape (N, H, W), bool, or BoxMasks

    Returns
    -------
    ndarray, shape (N, 4), float32
        (x0, y0, x1, y1) in px, y down; a mask covering only pixel (c, r) gets (c, r, c + 1, r + 1);
        an empty mask gets (0, 0, 0, 0).
    """
    if isinstance(masks, BoxMasks):
        return masks.boxes()
    n = masks.shape[0]
    boxes = np.zeros((n, 4), np.float32)
    rows = np.asarray(masks.any(axis=2))
    cols = np.asarray(masks.any(axis=1))
    for i in range(n):
        ys = np.flatnonzero(rows[i])
        xs = np.flatnonzero(cols[i])
        if ys.size:
            boxes[i] = (xs[0], ys[0], xs[-1] + 1, ys[-1] + 1)
    return boxes
