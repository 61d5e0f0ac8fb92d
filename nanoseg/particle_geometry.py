"""Wire geometry of one particle mask: centreline length, width profile, Feret diameters.

Conventions: lengths in px; positions in continuous pixel-edge coordinates, y down (pixel (c, r)
covers [c, c+1) x [r, r+1), its centre is (c + 0.5, r + 0.5)); angles in degrees [0, 180),
counter-clockwise from the image x axis as seen on screen (y down).

Centreline: the longest geodesic path through the skeleton (scikit-image ``skeletonize``) of the
mask's box crop, found on a grid of blocks of about a sixth of the half width for wires wider
than 12 px; the spurs that run into the end corners are cut back by 1.5 local half widths, the
rest is sampled every few px (a chord polyline, so the 8-connected staircase does not count) and
extended along its end tangents to where the mask, interpolated between pixel centres, falls to
one half. Its length follows bends; for a straight prism it is the axis length within about 1 px.

Width: twice the distance from each centreline sample to the nearest background pixel centre
gives the width profile's shape; it is offset by one constant so that its mean equals area /
centreline length, the mean width of any strip (bent or tapered) and unbiased on a digitised
mask, whereas distances to pixel centres are quantised to the grid.

Feret: calipers of the convex hull of the pixel centres. The smallest adds the expected gap
between the outermost centres and the true edge (half a lattice-row spacing on each side for an
edge along a lattice direction, less as the edge crosses rows, ``_pixel_extent``); the largest adds
half a pixel for its two corners. ``feret_px`` is the largest caliper, ``min_feret_px`` the
smallest (for a wire: its width; ImageJ's MinFeret), ``feret_angle_deg`` the direction of the
largest.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree
from skimage.morphology import skeletonize

from nanoseg.particle_outline import convex_hull, hull_candidates
from nanoseg.particle_outline import padded as _padded
from nanoseg.particle_skeleton import edt_at, longest_path, raster_pixels
from nanoseg.summary_stats import median_last

SKELETON_PX_PER_BLOCK = 6  # skeleton grid: one block per 6 px of half width (1 px up to 12 px wide)
SPUR_CUT = 1.5  # corner spurs cut back by this many local half widths (measured best, 1.0-2.5 tried)
EDT_WHOLE_UP_TO = 2500  # px of the skeleton's grid: up to this size the whole distance transform is cheaper
FERET_CORNER_PX = 0.5  # extreme corner centres sit ~a quarter pixel inside each true corner (measured 0.55)
_LATTICE = ((1, 0), (1, 1), (2, 1), (1, 2))  # lattice directions (p, q) whose rows of centres matter


@dataclass(frozen=True)
class Centreline:
    """A particle's centreline in its box crop's frame (add the box origin for the field's).

    ``points``: (K, 2) samples (x, y), px, pixel-edge coordinates, first to last end, including
    the two boundary end points. ``width_px``: (K,) local width at each sample, px.
    ``length_px``: polyline length, px. ``chord_px``: distance between the two ends, px.
    """

    points: np.ndarray
    width_px: np.ndarray
    length_px: float
    chord_px: float

    @property
    def tortuosity(self) -> float:
        """Centreline length / end-to-end distance (1 for a straight wire, > 1 when bent; never
        below 1, which rounding of a straight one's could give)."""
        return max(self.length_px / self.chord_px, 1.0) if self.chord_px > 0 else math.nan

    def max_deviation_px(self) -> float:
        """Largest distance of the centreline from the straight line joining its ends, px."""
        a, b = self.points[0], self.points[-1]
        d = b - a
        norm = float(np.hypot(*d))
        if norm == 0:
            return 0.0
        rel = self.points - a
        return float(np.max(np.abs(rel[:, 0] * d[1] - rel[:, 1] * d[0])) / norm)


def _arc(points: np.ndarray) -> np.ndarray:
    """Cumulative length (K,) along the polyline ``points`` (K, 2), px, from 0 ([0] for no points)."""
    out = np.zeros(max(len(points), 1))
    if len(points) > 1:
        d = points[1:] - points[:-1]
        np.cumsum(np.hypot(d[:, 0], d[:, 1]), out=out[1:])
    return out


def _ray_samples(shape: tuple[int, ...], reach: float, step: float = 0.25) -> int:
    """Samples along a ray of ``_ray_exits`` with ``reach`` (px) in a mask of ``shape``."""
    return int(min(2 * (shape[0] + shape[1]), reach) / step) + 2


def _ray_exits(mask: np.ndarray, rays: list[tuple[np.ndarray, np.ndarray]], n: int,
               step: float = 0.25) -> list[tuple[float, bool]]:
    """For each ray (start (x, y) px, unit direction): the distance to the mask's boundary over
    ``n`` samples ``step`` px apart, px, and whether it was decided within them (the boundary or
    the frame's border met: more samples would give the same distance). ``mask`` as float32.

    The boundary is where the mask, bilinearly interpolated between pixel centres, falls to 0.5:
    on a pixel edge for an axis-aligned end, between the steps of a staircase for an oblique one.
    Each sample is interpolated on its own, so all rays' samples go through one call.
    """
    h, w = mask.shape
    t = np.arange(0, n) * step
    starts = np.array([start for start, _ in rays])
    directions = np.array([direction for _, direction in rays])
    xs = starts[:, :1] + t * directions[:, :1]  # (rays, n): start + t * direction, sample by sample
    ys = starts[:, 1:] + t * directions[:, 1:]
    inside = (xs >= 0) & (xs < w) & (ys >= 0) & (ys < h)
    lasts = np.where(inside.all(axis=1), n, np.argmin(inside, axis=1)).tolist()
    ys_all = [row[:last] - 0.5 for row, last in zip(ys, lasts)]
    xs_all = [row[:last] - 0.5 for row, last in zip(xs, lasts)]
    values = ndimage.map_coordinates(mask, [np.concatenate(ys_all), np.concatenate(xs_all)], order=1, cval=0.0)
    out: list[tuple[float, bool]] = []
    at = 0
    for last in lasts:
        v = values[at:at + last]
        at += last
        below = np.flatnonzero(v < 0.5)
        decided = below.size > 0 or last < n
        k = int(below[0]) if below.size else last - 1
        if k == 0:
            out.append((0.0, decided))
            continue
        v0, v1 = float(v[k - 1]), float(v[k]) if below.size else 0.0
        frac = (v0 - 0.5) / (v0 - v1) if v0 != v1 else 0.5
        out.append((float((k - 1 + frac) * step), decided))
    return out


def centreline(mask: np.ndarray, width_hint_px: float | None = None, *,
               framed: np.ndarray | None = None) -> Centreline | None:
    """Centreline and width profile of one particle ``mask`` (H, W) bool, ideally its box crop.

    ``width_hint_px``: a rough width (e.g. from the second moments) that sets the skeleton's grid;
    estimated from the moments when not given. ``framed``: the mask with a one-pixel frame of
    background (``particle_outline.padded``) when the caller has it. Returns None for an empty
    mask. Lengths in px, points in the crop's pixel-edge coordinates.
    """
    area = int(np.count_nonzero(mask))
    if area == 0:
        return None
    padded = _padded(mask) if framed is None else framed
    if width_hint_px is None:
        width_hint_px = moment_width_hint(padded)
    # a wide wire's skeleton is found on a coarser grid (blocks of s x s px, majority vote): the
    # centreline is sampled every ~half width anyway, and thinning and the distance transform
    # cost ~ area (x half width)
    s = max(1, int(0.5 * width_hint_px // SKELETON_PX_PER_BLOCK))
    coarse = _majority_blocks(padded, s) if s > 1 else padded
    path = longest_path(skeletonize(coarse))
    # the distance transform (px, on the skeleton's grid) is needed along the path, and its largest
    # value only where the end rays below need it; a small grid's whole transform costs less
    at_path = edt_at(coarse, path[:, 0], path[:, 1]) if coarse.size > EDT_WHOLE_UP_TO else None
    edt: np.ndarray | None = None
    if at_path is None:
        edt = np.asarray(ndimage.distance_transform_edt(coarse)) * s
        half = edt[path[:, 0], path[:, 1]]
    else:
        half = at_path * s
    xy = path[:, ::-1].astype(np.float64) * s + 0.5 * s  # (x, y) block centres in the padded frame, px
    arc = _arc(xy)
    total = arc[-1]
    # cut the corner spurs: the last ~half width at each end is the skeleton's fork into corners
    half_median = float(median_last(half))
    cut = min(SPUR_CUT * half_median, 0.3 * total)
    keep = (arc >= cut) & (arc <= total - cut)
    if keep.sum() < 2:
        keep = np.ones_like(keep)
        keep[1:-1] = False if len(keep) > 2 else keep[1:-1]
    core, core_arc = xy[keep], arc[keep]
    step = max(2.0 * s, min(half_median, 0.1 * (core_arc[-1] - core_arc[0]) + 1.0))
    targets = np.arange(core_arc[0], core_arc[-1], step)
    idx = np.concatenate([np.searchsorted(core_arc, targets), [len(core) - 1]])  # non-decreasing
    idx = idx[np.concatenate([[True], idx[1:] != idx[:-1]])]
    idx = idx[idx < len(core)]
    samples = core[idx]
    # on the pixel grid the samples are pixel centres, where the distance transform already is
    # the distance to the nearest pixel outside (_distance_to_outside's, to the last bit)
    sample_half = half[keep][idx] if s == 1 else None
    if len(samples) == 1 or _close(samples[0], samples[-1]):
        samples, sample_half = _degenerate_axis(padded, samples[0]), None
    span = max(2.0 * step, 1.0)
    fmask = padded.astype(np.float32)
    rays = []
    first, last = _indices_at(samples, span)
    for end, inner_dir in ((samples[0], samples[first]), (samples[-1], samples[len(samples) - 1 - last])):
        d = end - inner_dir
        norm = float(np.hypot(*d))
        rays.append((end, d / norm if norm > 0 else np.array([1.0, 0.0])))
    # the rays reach 4 x the largest distance-transform value (+ 8 + 2 s px); a ray that ends
    # within the reach of the path's largest value ends there for any larger reach too
    top = half.max() if edt is None else edt.max()
    n = _ray_samples(fmask.shape, 4.0 * float(top) + 8.0 + 2 * s)
    exits = _ray_exits(fmask, rays, n)
    if not all(decided for _, decided in exits):
        if edt is None:
            edt = np.asarray(ndimage.distance_transform_edt(coarse)) * s
        full = _ray_samples(fmask.shape, 4.0 * float(edt.max()) + 8.0 + 2 * s)
        exits = _ray_exits(fmask, rays, full) if full != n else exits
    ends = [end + d * out for (end, d), (out, _) in zip(rays, exits)]
    pts = np.vstack([ends[0], samples, ends[1]])
    length = float(_arc(pts)[-1])
    profile = 2.0 * (_distance_to_outside(padded, samples) if sample_half is None else sample_half)
    profile = np.concatenate([profile[:1], profile, profile[-1:]])  # the end points keep their neighbour's
    mean_width = float(area) / length if length > 0 else math.nan
    profile = profile + (mean_width - float(profile.mean()))
    chord = float(np.hypot(*(pts[-1] - pts[0])))
    return Centreline(points=pts - 1.0, width_px=profile, length_px=length, chord_px=chord)


def _close(a: np.ndarray, b: np.ndarray) -> bool:
    """``np.allclose(a, b)`` of two points (x, y): the same test, written out."""
    return all(abs(p - q) <= 1e-8 + 1e-5 * abs(q) for p, q in zip(a.tolist(), b.tolist()))


def moment_width_hint(mask: np.ndarray) -> float:
    """A wire's width from its second moments, px: the smaller of the moment rectangle's width and
    area / its length (both overestimate a bent wire's width, neither underestimates it much)."""
    rr, cc = raster_pixels(mask)
    if rr.size < 2:
        return 1.0
    evals = np.linalg.eigvalsh(np.cov(np.stack([cc, rr]).astype(np.float64), bias=True))
    return float(min(math.sqrt(12 * max(evals[0], 0.0) + 1), rr.size / math.sqrt(12 * max(evals[1], 0.0) + 1)))


def _distance_to_outside(mask: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Distance (px) from ``points`` (x, y) to the nearest pixel centre outside ``mask``: the
    distance transform at those points, from the background pixels along the mask's border."""
    p = _padded(mask)
    grown = p[1:-1, 1:-1] | p[:-2, 1:-1] | p[2:, 1:-1] | p[1:-1, :-2] | p[1:-1, 2:]
    rr, cc = raster_pixels(grown & ~mask)
    if rr.size == 0:
        return np.zeros(len(points))
    d, _ = cKDTree(np.stack([cc, rr], axis=1) + 0.5, balanced_tree=False, compact_nodes=False).query(points)
    return np.asarray(d, dtype=np.float64)


def _indices_at(points: np.ndarray, distance: float) -> tuple[int, int]:
    """Index of the first point at least ``distance`` along ``points`` from the first, and that
    of the reversed points from the last (each at most the last index)."""
    end = len(points) - 1
    return (min(int(np.searchsorted(_arc(points), distance)), end),
            min(int(np.searchsorted(_arc(points[::-1]), distance)), end))


def _majority_blocks(mask: np.ndarray, s: int) -> np.ndarray:
    """The grid of s x s blocks of ``mask`` (zero-padded at the end), True where at least half the
    block is (the mean >= 0.5, exactly: 2 count >= s^2), or where any of it is when no block is."""
    h, w = mask.shape
    grid = np.zeros((h + -h % s, w + -w % s), np.uint16)
    grid[:h, :w] = mask
    counts = grid.reshape(grid.shape[0] // s, s, grid.shape[1] // s, s).sum(axis=3).sum(axis=1)
    coarse = 2 * counts >= s * s
    return coarse if coarse.any() else counts > 0


def _degenerate_axis(mask: np.ndarray, centre: np.ndarray) -> np.ndarray:
    """Two points on the major axis through ``centre`` for a blob whose skeleton is a point."""
    rr, cc = raster_pixels(mask)
    cov = np.cov(np.stack([cc, rr]).astype(np.float64)) if rr.size > 1 else np.eye(2)
    evals, evecs = np.linalg.eigh(np.atleast_2d(cov))
    axis = evecs[:, int(np.argmax(evals))]
    return np.stack([centre - 0.01 * axis, centre + 0.01 * axis])


@dataclass(frozen=True)
class Feret:
    """Caliper diameters of a particle, px; angle of the largest, degrees [0, 180), CCW from x."""

    max_px: float
    min_px: float
    angle_deg: float


def feret(mask: np.ndarray, hull: np.ndarray | None = None) -> Feret:
    """Feret (largest caliper), MinFeret (smallest) and Feret angle of ``mask`` (H, W) bool.

    ``hull``: the convex hull of the mask's pixel centres when the caller has it.
    """
    if hull is None:
        hull = convex_hull(hull_candidates(mask))
    if hull is None:  # at most two pixels, or one straight line of pixels
        pts = hull_candidates(mask)
        if len(pts) == 0:
            return Feret(math.nan, math.nan, math.nan)
        d = pts - pts[0]
        far = int(np.argmax(np.hypot(*d.T)))
        return Feret(float(np.hypot(*d[far])) + 1.0, 1.0, _angle(d[far]) if far else 0.0)
    diff = hull[:, None, :] - hull[None, :, :]
    dist = np.hypot(diff[..., 0], diff[..., 1])
    i, j = np.unravel_index(int(np.argmax(dist)), dist.shape)
    edges = np.concatenate([hull[1:], hull[:1]]) - hull  # to the next vertex
    normals = np.stack([-edges[:, 1], edges[:, 0]], axis=1) / np.hypot(*edges.T)[:, None]
    across = hull @ normals.T
    widths = across.max(axis=0) - across.min(axis=0)
    k = int(np.argmin(widths))
    min_px = float(widths[k]) + _pixel_extent(normals[k], float(dist[i, j]))
    # the object spans at least its pixel centres' extent + 1 px along x and along y (its
    # bounding box), and no caliper is wider than the largest: where the corner estimate
    # falls short of either (short axis-aligned shapes: a 2 x 10 px bar), those stand
    span_x, span_y = np.ptp(hull, axis=0).tolist()
    return Feret(
        max_px=max(float(dist[i, j]) + FERET_CORNER_PX, span_x + 1.0, span_y + 1.0, min_px),
        min_px=min_px,
        angle_deg=_angle(hull[j] - hull[i]),
    )


def _pixel_extent(normal: np.ndarray, edge_length: float) -> float:
    """Expected gap (px) between a caliper through pixel centres and the digitised edge it spans.

    Pixel centres lie on lattice lines; along an edge parallel to a lattice direction of line
    spacing d (1 px for rows and columns, 0.71 px for diagonals, 0.45 px for 1:2 slopes) the
    outermost centres sit on average d / 2 inside each side. An edge tilted by a small angle a
    from that direction over ``edge_length`` px crosses lattice lines, so the gap shrinks as
    max(0, d - edge_length * sin a) for the two sides together.
    """
    n = normal / max(float(np.hypot(*normal)), 1e-12)
    gap = 0.0
    for p, q in _LATTICE:
        d = 1.0 / math.hypot(p, q)
        for u in ((p * d, q * d), (q * d, -p * d)):  # the lattice normal and its mirror
            sin_a = abs(n[0] * u[1] - n[1] * u[0])
            gap = max(gap, d - edge_length * sin_a)
    return gap


def _angle(d: np.ndarray) -> float:
    """Direction (dx, dy) with y down -> degrees [0, 180), counter-clockwise from +x on screen."""
    return math.degrees(math.atan2(-float(d[1]), float(d[0]))) % 180.0
