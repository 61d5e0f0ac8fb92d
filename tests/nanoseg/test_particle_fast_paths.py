"""The statistics' fast paths equal the library computations they stand in for, on random masks
(blobs, thin curves, rings, touching rows): perimeter, distance transform at chosen pixels,
the skeleton's longest path, the convex hull."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import dijkstra
from skimage.measure import perimeter
from skimage.morphology import skeletonize

from nanoseg.particle_outline import convex_hull, hull_candidates, perimeter_px
from nanoseg.particle_skeleton import edt_at, longest_path


def _masks(n: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    out = []
    for k in range(n):
        h, w = rng.integers(3, 40, 2)
        kind = k % 3
        if kind == 0:  # smoothed noise: blobs, holes, several pieces
            m = ndimage.gaussian_filter(rng.random((h, w)), rng.uniform(0.5, 3)) > rng.uniform(0.45, 0.55)
        elif kind == 1:  # a thick bent curve
            t = np.linspace(0, 1, 200)
            y = (h - 1) * t
            x = (w - 1) / 2 + rng.uniform(-0.4, 0.4) * w * np.sin(rng.uniform(1, 6) * t)
            m = np.zeros((h, w), bool)
            m[np.clip(y.round().astype(int), 0, h - 1), np.clip(x.round().astype(int), 0, w - 1)] = True
            m = ndimage.binary_dilation(m, iterations=int(rng.integers(0, 3)))
        else:  # a ring
            yy, xx = np.mgrid[:h, :w]
            r = np.hypot(yy - h / 2, xx - w / 2)
            m = (r < min(h, w) / 2) & (r > min(h, w) / 5)
        if m.any():
            out.append(np.ascontiguousarray(m))
    return out


MASKS = _masks(240, 3)


def test_perimeter_equals_skimage() -> None:
    for m in MASKS:
        assert perimeter_px(m) == perimeter(m)


def test_distance_at_pixels_equals_the_whole_transform() -> None:
    for m in MASKS:
        framed = np.pad(m, 1)  # a background everywhere around
        rr, cc = np.nonzero(framed)
        got = edt_at(framed, rr, cc)
        assert got is not None
        np.testing.assert_array_equal(got, ndimage.distance_transform_edt(framed)[rr, cc])
    assert edt_at(np.ones((4, 5), bool), np.array([1]), np.array([1])) is None


_OFFSETS = np.array([(dr, dc) for dr in (-1, 0, 1) for dc in (-1, 0, 1) if dr or dc])


def _two_sweeps(skel: np.ndarray) -> np.ndarray:
    """The reference: Dijkstra from the first pixel (raster order) to the farthest, ``a``, then
    from ``a`` to its farthest, ``b``; the path a -> b (the geodesic diameter of a tree-shaped
    skeleton; a skeleton with a loop gets this path too)."""
    rr, cc = np.nonzero(skel)
    n = rr.size
    index = np.full((skel.shape[0] + 2, skel.shape[1] + 2), -1)
    index[rr + 1, cc + 1] = np.arange(n)
    nbr = index[rr[:, None] + 1 + _OFFSETS[:, 0], cc[:, None] + 1 + _OFFSETS[:, 1]]
    linked = nbr >= 0
    steps = np.broadcast_to(np.hypot(_OFFSETS[:, 0], _OFFSETS[:, 1]), nbr.shape)
    graph = csr_matrix((steps[linked], nbr[linked], np.concatenate([[0], np.cumsum(linked.sum(1))])), shape=(n, n))
    d0 = dijkstra(graph, indices=0)
    a = int(np.argmax(np.where(np.isfinite(d0), d0, -1)))
    da, pred = dijkstra(graph, indices=a, return_predecessors=True)
    b = int(np.argmax(np.where(np.isfinite(da), da, -1)))
    ids = [b]
    while ids[-1] != a:
        ids.append(int(pred[ids[-1]]))
    ids = ids[::-1]
    return np.stack([rr[ids], cc[ids]], axis=1)


def test_longest_path_equals_the_two_dijkstra_sweeps() -> None:
    checked = 0
    for m in MASKS:
        if ndimage.label(m)[1] != 1:
            continue
        skel = np.ascontiguousarray(skeletonize(m))
        if skel.sum() < 2:
            continue
        np.testing.assert_array_equal(longest_path(skel), _two_sweeps(skel))
        checked += 1
    assert checked > 100


def test_hull_of_candidates_is_the_hull_of_all_pixels() -> None:
    from scipy.spatial import ConvexHull

    for m in MASKS:
        pts = np.argwhere(m)[:, ::-1].astype(np.float64) + 0.5
        hull = convex_hull(hull_candidates(m))
        if hull is None:
            continue
        ref = ConvexHull(pts)
        assert hull.shape[0] == len(ref.vertices)
        assert ConvexHull(hull).volume == pytest.approx(ref.volume, rel=1e-12)
