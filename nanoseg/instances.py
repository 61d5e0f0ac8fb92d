"""Detected instances of one image: the contract between engines, tiling and statistics."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, eq=False)
class Instances:
    """N instances on an H x W image.

    Coordinates are continuous pixel-edge coordinates, y down: pixel (column c, row r) covers
    [c, c + 1) x [r, r + 1), so a box around that single pixel is (c, r, c + 1, r + 1).

    - ``boxes``: (N, 4) float32, (x0, y0, x1, y1) in px.
    - ``scores``: (N,) float32, detection confidence in [0, 1].
    - ``masks``: (N, H, W) bool, the full footprint of each instance (masks of overlapping
      instances overlap).
    """

    boxes: np.ndarray
    scores: np.ndarray
    masks: np.ndarray

    def __post_init__(self) -> None:
        boxes = np.asarray(self.boxes, dtype=np.float32)
        scores = np.asarray(self.scores, dtype=np.float32)
        if self.masks.ndim != 3 or self.masks.dtype != np.bool_:
            raise ValueError(f"masks must be (N, H, W) bool, got {self.masks.shape} {self.masks.dtype}")
        n = self.masks.shape[0]
        if boxes.shape != (n, 4):
            raise ValueError(f"boxes must be ({n}, 4), got {boxes.shape}")
        if scores.shape != (n,):
            raise ValueError(f"scores must be ({n},), got {scores.shape}")
        object.__setattr__(self, "boxes", boxes)
        object.__setattr__(self, "scores", scores)

    def __len__(self) -> int:
        return int(self.masks.shape[0])

    @property
    def image_shape(self) -> tuple[int, int]:
        """(H, W) of the image the masks live on."""
        return int(self.masks.shape[1]), int(self.masks.shape[2])

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
        return Instances(self.boxes[idx], self.scores[idx], self.masks[idx])

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
            N = 0, masks of shape (0, height, width).
        """
        return cls(
            np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros((0, height, width), bool)
        )


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


def mask_boxes(masks: np.ndarray) -> np.ndarray:
    """Tight boxes of masks, in pixel-edge coordinates.

    Parameters
    ----------
    masks : ndarray, shape (N, H, W), bool

    Returns
    -------
    ndarray, shape (N, 4), float32
        (x0, y0, x1, y1) in px, y down; a mask covering only pixel (c, r) gets (c, r, c + 1, r + 1);
        an empty mask gets (0, 0, 0, 0).
    """
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
