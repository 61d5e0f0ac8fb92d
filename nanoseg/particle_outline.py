"""Outline of one particle mask: perimeter and the convex hull of its pixel centres.

Conventions: positions in px, (x, y) with y down, pixel centres at integers + 0.5.

``perimeter_px`` is scikit-image's ``measure.perimeter`` (4-connected border, each border pixel
weighted by the pattern of its border neighbours), computed on the border pixels only: the same
pattern counts, so the same value to the last bit, without a convolution over the whole crop.
"""

from __future__ import annotations

import math

import numpy as np

_PATTERN_WEIGHTS = np.zeros(50, dtype=np.float64)
_PATTERN_WEIGHTS[[5, 7, 15, 17, 25, 27]] = 1
_PATTERN_WEIGHTS[[21, 33]] = math.sqrt(2)
_PATTERN_WEIGHTS[[13, 23]] = (1 + math.sqrt(2)) / 2
"""scikit-image's perimeter weights, by pattern code 1 + 2 (edge neighbours) + 10 (corner ones)."""


def padded(mask: np.ndarray, dtype: type = np.bool_) -> np.ndarray:
    """``mask`` with a one-pixel frame of zeros (``np.pad(mask, 1)`` without its overhead).

    Parameters
    ----------
    mask : np.ndarray
        (H, W) array.
    dtype : type, optional
        Of the result.

    Returns
    -------
    np.ndarray
        (H + 2, W + 2), C-contiguous.
    """
    out = np.zeros((mask.shape[0] + 2, mask.shape[1] + 2), dtype)
    out[1:-1, 1:-1] = mask
    return out


def perimeter_px(mask: np.ndarray, framed: np.ndarray | None = None) -> float:
    """scikit-image's ``perimeter`` of a mask (4-neighbourhood), the same value.

    A border pixel is a mask pixel with a 4-neighbour outside (beyond the array counts as
    outside); each adds the weight of its pattern of border neighbours (1 along a row or column,
    sqrt 2 on a diagonal, their mean at a bend).

    Parameters
    ----------
    mask : np.ndarray
        (H, W) bool.
    framed : np.ndarray, optional
        ``padded(mask)`` when the caller has it.

    Returns
    -------
    float
        Perimeter, px.
    """
    p = (padded(mask) if framed is None else framed).ravel()  # flat: neighbours at +-1, +-w
    w = mask.shape[1] + 2
    inner = slice(w, p.size - w)  # the frame's top and bottom rows cannot be border pixels
    eroded = p[w - 1:-w - 1] & p[w + 1:-w + 1] & p[:-2 * w] & p[2 * w:]
    border = np.zeros(p.size, np.uint8)
    np.greater(p[inner], eroded, out=border[inner])  # in the mask, not in its erosion
    at = np.flatnonzero(border)
    edge = border[at - 1] + border[at + 1] + border[at - w] + border[at + w]
    corner = border[at - w - 1] + border[at - w + 1] + border[at + w - 1] + border[at + w + 1]
    code = 1 + 2 * edge.astype(np.intp) + 10 * corner.astype(np.intp)
    # the same histogram (by pattern code) and dot product as scikit-image: the same last bits
    return float(np.bincount(code, minlength=50) @ _PATTERN_WEIGHTS)


OCTAGON_FROM = 48  # convex_hull: above this many points, those inside their octagon are dropped first


def row_ends(rr: np.ndarray, cc: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows of a mask that hold pixels, and each one's first and last column.

    Parameters
    ----------
    rr, cc : np.ndarray
        The mask's pixels in raster order (``np.nonzero``'s).

    Returns
    -------
    tuple of np.ndarray
        Rows (increasing), first and last column, each (R,) int.
    """
    if rr.size == 0:
        return rr, cc, cc
    new_row = np.flatnonzero(rr[1:] != rr[:-1]) + 1
    starts = np.concatenate([[0], new_row])
    ends = np.concatenate([new_row - 1, [rr.size - 1]])
    return rr[starts], cc[starts], cc[ends]


def hull_candidates(mask: np.ndarray, ends: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
                    max_passes: int = 64) -> np.ndarray:
    """Pixel centres of a mask that can be convex-hull vertices, top row's first pixel first.

    Each row's first and last pixel (every other pixel of a row lies between them), then only
    those where the left (right) chain of them, row by row, turns outwards: a point on or inside
    the segment joining its chain neighbours lies between that segment and the other end of its
    row, so it is no vertex. Every hull vertex is kept.

    Parameters
    ----------
    mask : np.ndarray
        (H, W) bool.
    ends : tuple of np.ndarray, optional
        ``row_ends`` of the mask when the caller has them.
    max_passes : int, optional
        Passes of the reduction; fewer leave more points, never fewer vertices (``convex_hull``
        of them is the same).

    Returns
    -------
    np.ndarray
        (M, 2) float64 x, y, px (pixel centres at integers + 0.5).
    """
    if ends is None:
        first = mask.argmax(axis=1)
        rows = np.flatnonzero(mask[np.arange(mask.shape[0]), first])
        first, last = first[rows], mask.shape[1] - 1 - mask[rows, ::-1].argmax(axis=1)
    else:
        rows, first, last = ends
    return _outward_chains(first, last, rows, max_passes).astype(np.float64) + 0.5


def _outward_chains(first: np.ndarray, last: np.ndarray, rows: np.ndarray, max_passes: int = 64) -> np.ndarray:
    """The left chain (``first``, ``rows``) and the right chain (``last``, ``rows``), each reduced
    to the points where it turns outwards (to smaller x on the left, larger on the right), as
    (M, 2) x, y, left chain first; each chain's ends are always kept.

    Each pass drops every point on or inside the segment of its current neighbours; a point so
    dropped is no hull vertex, so stopping after ``max_passes`` keeps every vertex too. Both
    chains go through the same passes (a chain that stopped changing stays as it is).
    """
    n = rows.size
    x = np.concatenate([first, last]).astype(np.int64)
    y = np.concatenate([rows, rows]).astype(np.int64)
    side = np.repeat(np.array([1, -1], np.int64), n)
    end = np.zeros(2 * n, bool)
    end[[0, n - 1, n, 2 * n - 1] if n else []] = True
    for _ in range(max_passes):
        if len(x) < 3:
            break
        dx, dy = x[2:] - x[:-2], y[2:] - y[:-2]
        outward = side[1:-1] * ((x[1:-1] - x[:-2]) * dy - dx * (y[1:-1] - y[:-2])) < 0  # beyond the segment
        keep = end.copy()
        keep[1:-1] |= outward
        if keep.all():
            break
        x, y, side, end = x[keep], y[keep], side[keep], end[keep]
    return np.stack([x, y], axis=1)


def _unique_rows(points: np.ndarray) -> np.ndarray:
    """``np.unique(points, axis=0)``: distinct rows sorted by x, then y."""
    p = points[np.lexsort((points[:, 1], points[:, 0]))]
    if len(p) < 2:
        return p
    return p[np.concatenate([[True], (p[1:] != p[:-1]).any(axis=1)])]


def convex_hull(points: np.ndarray) -> np.ndarray | None:
    """The convex hull of points, collinear points dropped.

    Of many points, those inside the octagon of the extreme points in 8 directions cannot be
    vertices and are dropped first; the rest go through Andrew's monotone chain.

    Parameters
    ----------
    points : np.ndarray
        (M, 2) float x, y.

    Returns
    -------
    np.ndarray or None
        (K, 2) vertices in order around the hull from the smallest (x, y); None when the points
        are collinear or fewer than 3.
    """
    if len(points) < 3:
        return None
    if len(points) <= OCTAGON_FROM:
        return _monotone_chain(_unique_rows(points))
    x, y = points[:, 0], points[:, 1]
    sums = (x, x + y, y, y - x)
    octagon = points[[int(np.argmin(v)) for v in sums] + [int(np.argmax(v)) for v in sums]]
    octagon = _unique_rows(octagon)
    if len(octagon) >= 3:
        inner = _monotone_chain(octagon)
        if inner is not None and len(inner) >= 3:
            e = np.roll(inner, -1, axis=0) - inner
            rel = points[:, None, :] - inner[None, :, :]
            cross = e[None, :, 0] * rel[..., 1] - e[None, :, 1] * rel[..., 0]
            points = points[~np.all(cross > 0, axis=1)]  # strictly inside every edge: not a vertex
    return _monotone_chain(_unique_rows(points))


def _monotone_chain(pts: np.ndarray) -> np.ndarray | None:
    """Convex hull (Andrew's algorithm) of distinct points already sorted by x then y
    (``_unique_rows``'), collinear points dropped."""
    if len(pts) < 3:
        return None

    def half(seq: list[list[float]]) -> list[tuple[float, float]]:
        out: list[tuple[float, float]] = []
        for px, py in seq:
            while len(out) >= 2:
                (ax, ay), (bx, by) = out[-2], out[-1]
                if (bx - ax) * (py - ay) - (by - ay) * (px - ax) > 0:
                    break
                out.pop()
            out.append((px, py))
        return out

    seq = pts.tolist()
    lower, upper = half(seq), half(seq[::-1])
    hull = np.array(lower[:-1] + upper[:-1], dtype=np.float64)
    return hull if len(hull) >= 3 else None
