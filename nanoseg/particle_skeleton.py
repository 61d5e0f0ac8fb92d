"""The skeleton's longest path and the distance transform at chosen pixels, for the centreline.

Conventions: pixels as (row, col) of the array given, distances in px between pixel centres.

``longest_path`` is the skeleton's geodesic diameter on the 8-neighbourhood graph (steps of 1
and sqrt 2) as two sweeps of Dijkstra find it: from the first pixel in raster order to the
farthest one ``a``, then from ``a`` to the farthest ``b``. A wire's skeleton is mostly a simple
path (no pixel with more than two neighbours); that one is ordered by walking it from an end, and
the sweeps' choice of ``a`` among its two ends is made with the same distances, summed in the same
order, so the result is the same to the last bit. Branched skeletons go through Dijkstra.
"""

from __future__ import annotations

import numpy as np
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import dijkstra
from scipy.spatial import cKDTree

_OFFSETS = np.array([(dr, dc) for dr in (-1, 0, 1) for dc in (-1, 0, 1) if dr or dc])  # 8-neighbourhood
_STEPS = np.hypot(_OFFSETS[:, 0], _OFFSETS[:, 1])
_DIAGONAL = float(np.hypot(1, 1))


def raster_pixels(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``np.nonzero(image)`` from the flat indices: the same arrays, at a fraction of the cost of
    the 2-D ``nonzero``.

    Parameters
    ----------
    image : np.ndarray
        2-D array, C-contiguous.

    Returns
    -------
    tuple of np.ndarray
        Rows and columns (int64) of its non-zero pixels, in raster order.
    """
    return np.divmod(np.flatnonzero(image), image.shape[1])


def longest_path(skel: np.ndarray) -> np.ndarray:
    """The skeleton's geodesic diameter, from ``a`` to ``b`` (module docstring).

    Parameters
    ----------
    skel : np.ndarray
        (H, W) bool skeleton, C-contiguous.

    Returns
    -------
    np.ndarray
        (M, 2) int64 row, col of the path's pixels in order (one pixel, or none, for such a skeleton).
    """
    rr, cc = raster_pixels(skel)
    n = rr.size
    if n <= 1:
        return np.stack([rr, cc], axis=1)
    width = skel.shape[1] + 2
    at = (rr + 1) * width + (cc + 1)  # flat positions in the skeleton framed by one pixel
    index = np.full((skel.shape[0] + 2) * width, -1, dtype=np.int32)
    index[at] = np.arange(n)
    nbr = index[at[:, None] + (_OFFSETS[:, 0] * width + _OFFSETS[:, 1])]  # (n, 8)
    linked = nbr >= 0
    ids = _simple_path(nbr, linked, rr, cc)
    if ids is None:
        ids = _dijkstra_path(nbr, linked)
    return np.stack([rr[ids], cc[ids]], axis=1)


def _dijkstra_path(nbr: np.ndarray, linked: np.ndarray) -> np.ndarray:
    """Node ids from ``a`` to ``b`` by two sweeps of Dijkstra on the graph of ``nbr`` (n, 8)."""
    n = nbr.shape[0]
    indptr = np.concatenate([[0], np.cumsum(linked.sum(axis=1))])
    graph = csr_matrix((np.broadcast_to(_STEPS, nbr.shape)[linked], nbr[linked], indptr), shape=(n, n))
    dist0 = dijkstra(graph, indices=0)  # the graph holds both directions of every edge
    a = int(np.argmax(np.where(np.isfinite(dist0), dist0, -1)))
    dist_a, pred = dijkstra(graph, indices=a, return_predecessors=True)
    b = int(np.argmax(np.where(np.isfinite(dist_a), dist_a, -1)))
    before = pred.tolist()  # walked as Python ints: one numpy scalar per step cost more than Dijkstra
    path = [b]
    while path[-1] != a:
        path.append(before[path[-1]])
    return np.asarray(path[::-1])


def _simple_path(nbr: np.ndarray, linked: np.ndarray, rr: np.ndarray, cc: np.ndarray) -> np.ndarray | None:
    """Node ids from ``a`` to ``b`` when the graph is one simple path, else None.

    Dijkstra's distance from node 0 to each end of a path is the sum of the steps between them,
    added one step after the other from node 0 outwards (``np.cumsum`` adds in that order); its
    ``argmax`` takes the farther end, the one with the lower id on a tie, and the second sweep
    runs to the other end.
    """
    n = nbr.shape[0]
    degree = linked.sum(axis=1)
    if degree.max() > 2 or int(degree.sum()) != 2 * (n - 1):
        return None
    ends = np.flatnonzero(degree == 1)
    if ends.size != 2:
        return None
    pair = np.sort(nbr, axis=1)[:, -2:]  # each node's (up to) two neighbours, -1 where none
    lo, hi = pair[:, 0].tolist(), pair[:, 1].tolist()
    prev, cur = -1, int(ends[0])
    order = [cur]
    for _ in range(n - 1):
        nxt = hi[cur] if hi[cur] != prev else lo[cur]
        if nxt < 0:  # the other end before every pixel was reached: more than one piece
            return None
        prev, cur = cur, nxt
        order.append(cur)
    ids = np.asarray(order)
    diagonal = (rr[ids[1:]] != rr[ids[:-1]]) & (cc[ids[1:]] != cc[ids[:-1]])
    steps = np.where(diagonal, _DIAGONAL, 1.0)
    origin = order.index(0)
    if origin == 0:  # node 0 is the first end: ``a`` is the last
        return ids[::-1]
    if origin == n - 1:
        return ids
    to_first = float(np.cumsum(steps[:origin][::-1])[-1])
    to_last = float(np.cumsum(steps[origin:])[-1])
    if to_first > to_last or (to_first == to_last and order[0] < order[-1]):
        return ids  # ``a`` is the first end
    return ids[::-1]


def edt_at(image: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray | None:
    """``scipy.ndimage.distance_transform_edt(image)[rows, cols]`` to the last bit, without the
    transform of the whole array.

    The nearest background pixel of a foreground one has a foreground 4-neighbour (one step
    from it towards the pixel is nearer, so foreground); the distances between integer
    coordinates are the square roots of the same integers.

    Parameters
    ----------
    image : np.ndarray
        (H, W) bool, C-contiguous.
    rows, cols : np.ndarray
        Pixels (int) where the transform is wanted.

    Returns
    -------
    np.ndarray or None
        Distance (float64, px) from each pixel's centre to the nearest background pixel's centre
        (0 on the background); None when ``image`` has no background pixel.
    """
    h, w = image.shape
    width = w + 2
    p = np.zeros((h + 2) * width, bool)  # framed and flat: 4-neighbours at +-1, +-width
    p.reshape(h + 2, width)[1:-1, 1:-1] = image
    inner = p[width:-width]
    outside = (p[width - 1:-width - 1] | p[width + 1:-width + 1] | p[:-2 * width] | p[2 * width:]) & ~inner
    outside.reshape(h, width)[:, [0, -1]] = False  # the frame's columns are not the image's
    br, bc = np.divmod(np.flatnonzero(outside), width)
    bc -= 1
    if br.size == 0:
        return None
    d, _ = cKDTree(np.stack([bc, br], axis=1).astype(np.float64), balanced_tree=False, compact_nodes=False).query(
        np.stack([cols, rows], axis=1).astype(np.float64))
    return np.asarray(d, dtype=np.float64) * np.asarray(image[rows, cols], dtype=np.float64)
