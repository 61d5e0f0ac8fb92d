"""Per-particle statistics from instance masks, and per-frame summaries with fixed histogram bins.

Conventions (every geometric column): lengths in px (``*_nm`` when the pixel size is known);
positions in continuous pixel-edge coordinates, y down (pixel (c, r) covers [c, c+1) x [r, r+1));
angles in degrees [0, 180), counter-clockwise from the image x axis as seen on screen (y down).

Wire geometry (``nanoseg.particle_geometry``): ``length_px`` is the centreline length, which
follows bends; ``width_px`` the mean width along it (area / centreline length), ``width_min_px``
and ``width_max_px`` the extremes of its distance-transform profile; ``feret_px``,
``min_feret_px`` (for a wire: its width) and ``feret_angle_deg`` the calipers; ``tortuosity``
(centreline length / end-to-end distance) and ``bow_px`` (largest distance of the centreline
from its chord) say how bent it is.

Second moments (ImageJ's fitted ellipse): the mask's inertia eigenvalues l1 >= l2 (px^2, pixel
centres) plus 1/12 (the pixel's own inertia) give ``major_px`` = 4 sqrt(l1 + 1/12) and
``minor_px`` = 4 sqrt(l2 + 1/12), the axes of the ellipse with the mask's moments; the rectangle
with those moments (the length and width of earlier versions) is sqrt(3) / 2 of them.
``orientation_deg`` is the major axis's direction. For a stubby particle (major < 2.5 minor, and
a centreline under 5 mean widths long) the skeleton is mostly corner spurs, so its length is that
rectangle's, sqrt(12 l1 + 1), or sqrt(area) where that is longer (a disk: length = width), and its
centreline is scaled to that length about the centroid. Low moment aspect with a long centreline
is a bent wire (an L, a V, an arc): its centreline's length stands. A mask in several pieces
(8-connected; a wire seen in parts, e.g. under a crossing wire) has the sum of its pieces'
centreline lengths (the hidden gaps are not counted); its profile, tortuosity and bow are its
longest piece's. An empty mask has no statistics and counts in no summary.
"""

from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass, field, fields, replace
from typing import Any

import numpy as np
from scipy import ndimage

from nanoseg.instances import BoxMasks, mask_boxes
from nanoseg.particle_geometry import Centreline, centreline, feret
from nanoseg.particle_outline import convex_hull, hull_candidates, padded, perimeter_px, row_ends
from nanoseg.particle_skeleton import raster_pixels
from nanoseg.summary_stats import (
    HISTOGRAM_EDGES,
    EdgeRule,
    Histogram,
    Stat,
    StatisticsConfig,
    axial_stat,
    column_stats,
    edge_weights,
)

COLUMNS_PX = (
    "area_px", "length_px", "width_px", "width_min_px", "width_max_px", "aspect_ratio",
    "feret_px", "min_feret_px", "feret_angle_deg", "tortuosity", "bow_px", "major_px", "minor_px",
    "orientation_deg", "centroid_x", "centroid_y", "bbox_width_px", "bbox_height_px", "perimeter_px", "circularity", "solidity",
    "eccentricity", "overlap_fraction",
)  # fmt: skip
COLUMNS_FLAG = ("touches_edge", "overlapped")
COLUMNS_NM = (
    "area_nm2", "length_nm", "width_nm", "width_min_nm", "width_max_nm", "feret_nm", "min_feret_nm",
    "bow_nm", "major_nm", "minor_nm", "perimeter_nm",
)  # fmt: skip
"""The particle table's columns, in order: px geometry, flags (bool), then nm (with a pixel size)."""
MIN_PIECE_SHARE = 0.1
"""A mask in pieces: pieces below this share of its area are left out of the centreline length."""
HULL_PASSES = 2
"""Passes of the hull candidates' reduction before the monotone chain (measured fastest; the hull is the same)."""
STUBBY_ASPECT = 2.5
"""Below this moment aspect ratio (major / minor) length is the moment rectangle's, not the skeleton's
(unless the centreline is at least ``BENT_ASPECT`` mean widths long)."""
BENT_ASPECT = 5.0
"""A particle stubby by its moments whose centreline is at least this many mean widths long
(length^2 >= BENT_ASPECT x area) is a bent wire, not a stubby one: its centreline's length stands."""
_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


def orientation_from_vector(dx: float, dy: float) -> float:
    """Direction (dx, dy) in image coordinates (y down) -> degrees [0, 180), CCW from +x on screen."""
    return math.degrees(math.atan2(-dy, dx)) % 180.0


def orientation_from_skimage(orientation_rad: float) -> float:
    """scikit-image ``orientation`` -> our convention; the one place the conversion happens.

    scikit-image: angle between the row axis (axis 0) and the major axis, radians, (-pi/2, pi/2],
    positive towards +column. Ours: degrees [0, 180), counter-clockwise from +x with y down.
    A horizontal wire is pi/2 there and 0 here; a vertical one 0 there, 90 here.
    """
    return (math.degrees(orientation_rad) + 90.0) % 180.0


@dataclass(frozen=True, eq=False)
class ParticleTable:
    """Statistics of N particles, one numpy column per quantity (row i = mask i).

    Columns (float64 unless noted; NaN where a particle's mask is empty, whose area is 0), see
    the module for definitions: ``area_px`` (int64), ``length_px``, ``width_px``,
    ``width_min_px``, ``width_max_px``, ``aspect_ratio`` (length / width, >= 1), ``feret_px``,
    ``min_feret_px``, ``feret_angle_deg``, ``tortuosity``, ``bow_px``, ``major_px``,
    ``minor_px``, ``orientation_deg``, ``centroid_x``, ``centroid_y`` (px, pixel-edge
    coordinates), ``bbox_width_px``, ``bbox_height_px`` (bounding box), ``perimeter_px`` (scikit-image ``perimeter``), ``circularity``
    (4 pi area / perimeter^2, ImageJ's Circ.), ``solidity`` (area / area of the convex hull of
    the pixel corners), ``eccentricity`` (of the moment ellipse), ``overlap_fraction`` (share of
    the area also covered by another particle). Flags (bool): ``touches_edge`` (the mask reaches
    the frame's border: the particle may be cut), ``overlapped`` (it shares pixels with another
    particle; its own mask, amodal where the model predicts one, is what is measured).
    ``mean_od``: mean optical density over the mask (None without an OD image). The ``*_nm``
    columns (``COLUMNS_NM``): None without a pixel size. ``frame_shape`` (H, W) and
    ``covered_px`` (pixels covered by any particle) give coverage. ``centrelines``: each
    particle's centreline and width profile in frame coordinates (None for an empty mask).
    """

    area_px: np.ndarray
    length_px: np.ndarray
    width_px: np.ndarray
    width_min_px: np.ndarray
    width_max_px: np.ndarray
    aspect_ratio: np.ndarray
    feret_px: np.ndarray
    min_feret_px: np.ndarray
    feret_angle_deg: np.ndarray
    tortuosity: np.ndarray
    bow_px: np.ndarray
    major_px: np.ndarray
    minor_px: np.ndarray
    orientation_deg: np.ndarray
    centroid_x: np.ndarray
    centroid_y: np.ndarray
    bbox_width_px: np.ndarray
    bbox_height_px: np.ndarray
    perimeter_px: np.ndarray
    circularity: np.ndarray
    solidity: np.ndarray
    eccentricity: np.ndarray
    overlap_fraction: np.ndarray
    touches_edge: np.ndarray
    overlapped: np.ndarray
    mean_od: np.ndarray | None
    area_nm2: np.ndarray | None
    length_nm: np.ndarray | None
    width_nm: np.ndarray | None
    width_min_nm: np.ndarray | None
    width_max_nm: np.ndarray | None
    feret_nm: np.ndarray | None
    min_feret_nm: np.ndarray | None
    bow_nm: np.ndarray | None
    major_nm: np.ndarray | None
    minor_nm: np.ndarray | None
    perimeter_nm: np.ndarray | None
    pixel_size_nm: float | None
    frame_shape: tuple[int, int]
    covered_px: int
    centrelines: tuple[Centreline | None, ...] = field(default=(), repr=False)

    def __len__(self) -> int:
        return int(self.area_px.shape[0])

    def columns(self) -> dict[str, np.ndarray]:
        """The per-particle columns that are present, by name."""
        out: dict[str, np.ndarray] = {}
        for name in _TABLE_FIELDS:
            v = getattr(self, name)
            if isinstance(v, np.ndarray):
                out[name] = v
        return out

    def to_records(self, rounded: bool = False) -> list[dict[str, float | int | bool | None]]:
        """One JSON-serialisable dict per particle (NaN -> None); ``rounded``: by ``round_value``."""
        cols = {k: [_json_number(x) for x in v.tolist()] for k, v in self.columns().items()}
        if rounded:
            cols = {k: [round_value(k, x) for x in v] for k, v in cols.items()}
        return [{k: cols[k][i] for k in cols} for i in range(len(self))]

    def to_dict(self, arrays: bool = False) -> dict[str, object]:
        """JSON-serialisable, column-oriented (NaN -> None); ``arrays``: the columns as the arrays
        themselves (float64, int64 and bool, for ``codec.json_text(..., numpy=True)``), not lists."""
        cols = self.columns()
        return {
            "pixel_size_nm": self.pixel_size_nm,
            "frame_shape": list(self.frame_shape),
            "covered_px": self.covered_px,
            "columns": cols if arrays else {k: [_json_number(x) for x in v.tolist()] for k, v in cols.items()},
        }


_TABLE_FIELDS = tuple(f.name for f in fields(ParticleTable))
"""``ParticleTable``'s field names in order (``dataclasses.fields`` once, not per ``columns`` call)."""


def round_value(column: str, value: Any) -> Any:
    """``value`` rounded for a CSV cell by what ``column`` measures (units in the name).

    0.01 px, 0.1 nm, 1 nm^2, 0.01 deg, 0.1 ms (``*_s``: 4 decimals), 1 ms for epoch times,
    4 decimals (4 significant digits from 10^4) for ratios and fractions. Other types unchanged.
    """
    if not isinstance(value, float):
        return value
    if column.endswith("_nm2") or "_nm2_" in column:
        return float(round(value))
    for suffix, digits in (("_px", 2), ("_nm", 1), ("_deg", 2), ("_s", 4)):
        if column.endswith(suffix) or f"{suffix}_" in column:
            return round(value, digits)
    if column in ("timestamp", "stored_at"):
        return round(value, 3)
    if column in ("centroid_x", "centroid_y", "box_x0", "box_y0", "box_x1", "box_y1"):
        return round(value, 2)
    return float(f"{value:.4g}") if abs(value) >= 1e4 else round(value, 4)


def _json_number(x: float | int | bool) -> float | int | bool | None:
    return None if isinstance(x, float) and not math.isfinite(x) else x


def moment_figures(l1: float, l2: float, vx: float, vy: float) -> dict[str, float]:
    """The second-moment columns of one mask (module docstring), px and degrees.

    ``l1`` >= ``l2`` >= 0: eigenvalues of its pixel centres' covariance (px^2); (``vx``, ``vy``):
    the eigenvector of ``l1`` (any length or sign), x right, y down. Returns ``major_px``,
    ``minor_px``, ``orientation_deg`` and ``eccentricity``; the one definition for the numpy
    table and the device path (``nanoseg.device_postprocess``).
    """
    return {
        "major_px": 4 * math.sqrt(l1 + 1 / 12),
        "minor_px": 4 * math.sqrt(l2 + 1 / 12),
        "orientation_deg": orientation_from_vector(vx, vy),
        "eccentricity": math.sqrt(1 - l2 / l1) if l1 > 0 else 0.0,
    }


def _corner_hull_area(hull: np.ndarray) -> float:
    """Area (px^2) of the convex hull of the pixels' corners, from the hull of their centres.

    That hull is the centres' hull grown by a unit square (a Minkowski sum): its area is the
    polygon's plus, for each edge, its length times the square's half extent across it, plus 1.
    """
    x, y = hull[:, 0], hull[:, 1]
    area = 0.5 * abs(float(np.dot(x, np.concatenate([y[1:], y[:1]])) - np.dot(y, np.concatenate([x[1:], x[:1]]))))
    e = np.concatenate([hull[1:], hull[:1]]) - hull  # to the next vertex
    return area + 0.5 * float(np.sum(np.abs(e[:, 0]) + np.abs(e[:, 1]))) + 1.0


def _measure(crop: np.ndarray) -> tuple[dict[str, float], Centreline | None]:
    """Every px column of one non-empty mask crop (its bounding box); positions crop-relative."""
    rr, cc = raster_pixels(crop)
    area = rr.size
    centred = np.stack([cc, rr]).astype(np.float64)
    cx, cy = centred.mean(axis=1)  # integer-valued: the same sums as rr.mean(), cc.mean()
    # np.cov(..., bias=True) step by step (its own operations, so the same last bits), centred once
    centred -= np.array([cx, cy])[:, None]
    cov = np.dot(centred, centred.T.conj()) * np.true_divide(1, area) if area > 1 else np.zeros((2, 2))
    evals, evecs = np.linalg.eigh(cov)
    l2, l1 = max(float(evals[0]), 0.0), max(float(evals[1]), 0.0)
    moments = moment_figures(l1, l2, float(evecs[0, 1]), float(evecs[1, 1]))
    major, minor = moments["major_px"], moments["minor_px"]
    framed = padded(crop)
    per = perimeter_px(crop, framed)
    ends = row_ends(rr, cc)
    hull = convex_hull(hull_candidates(crop, ends, HULL_PASSES))
    hull_area = _corner_hull_area(hull) if hull is not None else float(area)
    f = feret(crop, hull)
    # 8-connected pieces: a thin oblique wire is a chain of pixels touching at their corners
    pieces, n = (None, 1) if _one_piece(rr, *ends) else ndimage.label(crop, _EIGHT_CONNECTED)
    if pieces is not None and n > 1:  # a wire seen in pieces (e.g. under a crossing one): their centrelines add up
        sizes = np.bincount(pieces.ravel())[1:]
        kept = sizes >= MIN_PIECE_SHARE * area
        kept[int(np.argmax(sizes))] = True  # the largest piece always (many small ones: dust around a speck)
        lines = [centreline(pieces == k + 1) for k in np.flatnonzero(kept)]
        found = [c for c in lines if c is not None]
        cl = max(found, key=lambda c: c.length_px) if found else None
        length = sum(c.length_px for c in found) if found else math.nan
    else:
        cl = centreline(crop, min(math.sqrt(12 * l2 + 1), area / math.sqrt(12 * l1 + 1)), framed=framed)
        if cl is not None and major < STUBBY_ASPECT * minor and cl.length_px**2 < BENT_ASPECT * area:
            # a stubby rod or blob: its skeleton is mostly end spurs; the moment rectangle is
            # exact for a straight prism and has no spurs to cut (sqrt(area) for a round blob,
            # whose rectangle is shorter than it is wide)
            cl = _rescaled(cl, max(math.sqrt(12 * l1 + 1), math.sqrt(area)), (cx + 0.5, cy + 0.5))
        length = cl.length_px if cl else math.nan
    width = float(area) / length if cl and length > 0 else math.nan
    row = {
        "area_px": float(area),
        "length_px": length,
        "width_px": width,
        "width_min_px": float(cl.width_px.min()) if cl else math.nan,
        "width_max_px": float(cl.width_px.max()) if cl else math.nan,
        "aspect_ratio": max(length / width, 1.0) if width > 0 else math.nan,  # >= 1 (round: 1, to the last bit)
        "feret_px": f.max_px,
        "min_feret_px": f.min_px,
        "feret_angle_deg": f.angle_deg,
        "tortuosity": cl.tortuosity if cl else math.nan,
        "bow_px": cl.max_deviation_px() if cl else math.nan,
        **moments,
        "centroid_x": cx + 0.5,
        "centroid_y": cy + 0.5,
        "perimeter_px": per,
        "circularity": min(4 * math.pi * area / per**2, 1.0) if per > 0 else math.nan,
        "solidity": min(area / hull_area, 1.0) if hull_area > 0 else 1.0,
    }
    return row, cl


def _one_piece(rr: np.ndarray, rows: np.ndarray, first: np.ndarray, last: np.ndarray) -> bool:
    """True when a mask is certainly one 4-connected piece: every row one run of pixels, the rows
    consecutive, each run sharing a column with the next (``ndimage.label`` then finds one)."""
    runs_whole = int(np.sum(last - first + 1)) == rr.size  # one run per row: no gaps
    consecutive = rows.size == 0 or int(rows[-1] - rows[0]) + 1 == rows.size
    return bool(runs_whole and consecutive and np.all((first[1:] <= last[:-1]) & (first[:-1] <= last[1:])))


@dataclass(frozen=True)
class BoxValues:
    """An (H, W) image's values in each mask's box only: all that the mean-OD column reads of a
    frame's optical density, at a fraction of its size (``of``). ``crops[i]``: the image under
    mask i's box (``mask_boxes``), float as the image."""

    shape: tuple[int, int]
    crops: tuple[np.ndarray, ...]

    @classmethod
    def of(cls, image: np.ndarray, masks: np.ndarray | BoxMasks) -> BoxValues:
        """``image`` (H, W) cut to the boxes of ``masks`` (N, H, W) bool or box-local."""
        boxes = mask_boxes(masks).astype(int)
        return cls((image.shape[0], image.shape[1]),
                   tuple(np.ascontiguousarray(image[y0:y1, x0:x1]) for x0, y0, x1, y1 in boxes))


def particle_table(
    masks: np.ndarray | BoxMasks, od: np.ndarray | BoxValues | None = None, pixel_size_nm: float | None = None
) -> ParticleTable:
    """Statistics of each mask of ``masks`` (N, H, W) bool or box-local; ``od`` (H, W) for the mean OD
    (or ``BoxValues.of`` it: the same table).

    Masks may overlap (each is a particle's full footprint). Each particle is measured on its
    bounding-box crop only (skeleton, distance transform and hulls included).
    """
    if masks.ndim != 3 or masks.dtype != np.bool_:
        raise ValueError(f"masks must be (N, H, W) bool, got {masks.shape} {masks.dtype}")
    n, h, w = masks.shape
    if od is not None and od.shape != (h, w):
        raise ValueError(f"od shape {od.shape} differs from the masks' {(h, w)}")
    if n == 0:
        return _empty_table(h, w, pixel_size_nm, od is not None)
    return _table(masks, od, pixel_size_nm)


@functools.lru_cache(maxsize=32, typed=True)  # typed: 8 and 8.0 make different tables (int or float nm)
def _empty_table(h: int, w: int, pixel_size_nm: float | None, with_od: bool) -> ParticleTable:
    """``particle_table`` of no masks on an (h, w) frame: the same table, made once (a live stream
    has many frames without particles; its arrays are empty, so nothing can change it)."""
    return _table(np.zeros((0, h, w), bool), np.zeros((h, w), np.float32) if with_od else None, pixel_size_nm)


def _table(masks: np.ndarray | BoxMasks, od: np.ndarray | BoxValues | None, pixel_size_nm: float | None
           ) -> ParticleTable:
    """``particle_table``'s measurements, its arguments checked."""
    n, h, w = masks.shape
    boxes = mask_boxes(masks).astype(int)
    # box-local masks are their crops already (mask_boxes gives their extents); a stack is cut
    crops = [masks.crops[i] if isinstance(masks, BoxMasks) else masks[i, y0:y1, x0:x1]
             for i, (x0, y0, x1, y1) in enumerate(boxes)]  # fmt: skip
    cover = np.zeros((h, w), np.int32)  # summed box by box: a frame-sized pass per mask is not needed
    for crop, (x0, y0, x1, y1) in zip(crops, boxes):
        cover[y0:y1, x0:x1] += crop
    cols = dict(zip(COLUMNS_PX, np.full((len(COLUMNS_PX), n), np.nan)))  # rows of one block
    touches = np.zeros(n, dtype=bool)
    mean_od = np.full(n, np.nan) if od is not None else None
    lines: list[Centreline | None] = []
    for i, (x0, y0, x1, y1) in enumerate(boxes):
        if x1 == x0:
            lines.append(None)
            continue
        crop = crops[i]
        row, cl = _measure(crop)
        row["centroid_x"] += x0
        row["centroid_y"] += y0
        row["bbox_width_px"], row["bbox_height_px"] = x1 - x0, y1 - y0
        row["overlap_fraction"] = np.count_nonzero(cover[y0:y1, x0:x1][crop] > 1) / row["area_px"]
        for k, v in row.items():
            cols[k][i] = v
        touches[i] = x0 == 0 or y0 == 0 or x1 == w or y1 == h
        lines.append(None if cl is None else _shifted(cl, x0, y0))
        if od is not None and mean_od is not None:
            under = od.crops[i] if isinstance(od, BoxValues) else od[y0:y1, x0:x1]
            mean_od[i] = float(under[crop].mean())
    area = np.where(np.isnan(cols["area_px"]), 0.0, cols["area_px"]).astype(np.int64)  # a count: never inf
    nm = pixel_size_nm
    scaled: dict[str, Any] = {
        c: (cols[c.removesuffix("_nm") + "_px"] * nm if nm else None) for c in COLUMNS_NM if c != "area_nm2"
    }
    return ParticleTable(
        area_px=area,
        **{k: v for k, v in cols.items() if k != "area_px"},
        touches_edge=touches,
        overlapped=cols["overlap_fraction"] > 0,  # NaN (no crop) is not > 0
        mean_od=mean_od,
        area_nm2=area * nm**2 if nm else None,
        **scaled,
        pixel_size_nm=nm,
        frame_shape=(h, w),
        covered_px=int(np.count_nonzero(cover)),
        centrelines=tuple(lines),
    )


def _rescaled(cl: Centreline, length: float, centre: tuple[float, float]) -> Centreline:
    """``cl`` scaled about ``centre`` (x, y px) to ``length`` px: its points, chord and length
    together (so its tortuosity stays, >= 1); the profile keeps its shape and its mean = area /
    length."""
    scale = cl.length_px / length if length > 0 else 1.0
    mean = float(cl.width_px.mean())
    c = np.array(centre, dtype=np.float64)
    points = c + (cl.points - c) / scale
    return Centreline(points, mean * scale + (cl.width_px - mean), length, cl.chord_px / scale)


def _shifted(cl: Centreline, x0: int, y0: int) -> Centreline:
    return Centreline(cl.points + np.array([x0, y0], dtype=np.float64), cl.width_px, cl.length_px, cl.chord_px)


INTERVAL_COLUMNS = ("area_px", "length_px", "width_px", "min_feret_px", "feret_px", "aspect_ratio")
"""Columns whose summaries carry bootstrap intervals (their ``*_nm`` versions too, scaled)."""


@dataclass(frozen=True)
class FrameSummary:
    """Per-frame aggregate of a ParticleTable.

    ``count``: particles detected. ``edge_rule``: how particles touching the frame's border enter
    ``stats`` (``nanoseg.summary_stats``); ``counted``: particles with a non-zero weight under it;
    ``touching_edge``, ``overlapped``: particles so flagged. ``stats``: per column (see
    ``ParticleTable``), weighted by the rule; orientation uses axial circular statistics of the
    counted particles; ``INTERVAL_COLUMNS`` and their nm versions carry 95 % bootstrap intervals
    and ``n_for_target`` for ``target_precision`` (relative) of the median.
    ``orientation_order``: |<exp(2i theta)>|, 0 isotropic .. 1 aligned. ``coverage_fraction``:
    share of the frame's pixels covered by any particle. ``histograms``: every particle,
    ``HISTOGRAM_EDGES``.
    """

    count: int
    frame_shape: tuple[int, int]
    coverage_fraction: float
    pixel_size_nm: float | None
    stats: dict[str, Stat]
    orientation_order: float | None
    histograms: dict[str, Histogram]
    edge_rule: EdgeRule = "include"
    counted: int = 0
    touching_edge: int = 0
    overlapped: int = 0
    target_precision: float = 0.05

    def to_dict(self) -> dict[str, object]:
        """JSON-serialisable."""
        return {
            "count": self.count,
            "counted": self.counted,
            "edge_rule": self.edge_rule,
            "touching_edge": self.touching_edge,
            "overlapped": self.overlapped,
            "target_precision": self.target_precision,
            "frame_shape": list(self.frame_shape),
            "coverage_fraction": self.coverage_fraction,
            "pixel_size_nm": self.pixel_size_nm,
            "stats": {k: s.to_dict() for k, s in self.stats.items()},
            "orientation_order": self.orientation_order,
            "histograms": {k: h.to_dict() for k, h in self.histograms.items()},
        }


def frame_summary(
    table: ParticleTable,
    edge_rule: EdgeRule = "include",
    *,
    resamples: int = 1000,
    seed: int = 0,
    target_precision: float = 0.05,
) -> FrameSummary:
    """Count, statistics with intervals, coverage and fixed-bin histograms of one frame's particles.

    Parameters
    ----------
    table : the frame's particles.
    edge_rule : counting rule for particles touching the frame's border (``EDGE_RULES``).
    resamples : bootstrap resamples for the 95 % intervals (0: no intervals).
    seed : seed of the bootstrap's generator (the same frame gives the same intervals).
    target_precision : relative half width of the median's interval that ``n_for_target`` aims at.

    Returns
    -------
    FrameSummary
    """
    if len(table) == 0:  # a frame with no particle: the same summary every time, but for its shape
        key = (edge_rule, resamples, seed, target_precision, bool(table.pixel_size_nm), *table.columns())
        empty = _EMPTY_SUMMARIES.get(key)
        if empty is None:
            empty = _EMPTY_SUMMARIES[key] = _frame_summary(table, edge_rule, resamples, seed, target_precision)
        return replace(empty, frame_shape=table.frame_shape, pixel_size_nm=table.pixel_size_nm)
    return _frame_summary(table, edge_rule, resamples, seed, target_precision)


_EMPTY_SUMMARIES: dict[tuple[object, ...], FrameSummary] = {}


@dataclass(frozen=True)
class FrameStatistics:
    """A frame's particle table and its summary, and the time they took (s, wall, where they ran)."""

    table: ParticleTable
    summary: FrameSummary
    seconds: float


def frame_statistics(masks: np.ndarray | BoxMasks, od: np.ndarray | BoxValues | None, pixel_size_nm: float | None,
                     statistics: StatisticsConfig | None = None) -> FrameStatistics:
    """Frame -> particles: the particle table of ``masks`` and its summary, as ``statistics`` says.

    The one function every caller measures a frame's particles with (``Segmenter.analyse``, a
    process of its own beside a service), so the table and summary are the same wherever it runs.

    Parameters
    ----------
    masks : (N, H, W) bool, or box-local masks (``BoxMasks``), the frame's particles.
    od : (H, W) optical density of the frame for the mean OD column, or ``BoxValues.of`` it (the
        same table; what a process of its own is handed); None: no such column.
    pixel_size_nm : size of one frame pixel, nm, for the ``*_nm`` columns; None: px only.
    statistics : edge rule, bootstrap resamples and target precision of the summary; None:
        ``StatisticsConfig()``.

    Returns
    -------
    FrameStatistics
        The table, the summary and the seconds both took.
    """
    t0 = time.perf_counter()
    st = statistics or StatisticsConfig()
    table = particle_table(masks, od, pixel_size_nm)
    summary = frame_summary(table, st.edge_rule, resamples=st.bootstrap_resamples,
                            target_precision=st.target_precision)
    return FrameStatistics(table, summary, time.perf_counter() - t0)


def _frame_summary(table: ParticleTable, edge_rule: EdgeRule, resamples: int, seed: int,
                   target_precision: float) -> FrameSummary:
    """``frame_summary``, computed."""
    particle = table.area_px > 0  # an empty mask is no particle: no weight, no histogram count
    weights = edge_weights(edge_rule, table.touches_edge, table.bbox_width_px, table.bbox_height_px,
                           table.frame_shape) * particle  # fmt: skip
    counted = weights > 0
    stats: dict[str, Stat] = {}
    order: float | None = None
    nm = table.pixel_size_nm
    columns = table.columns()
    plain = [k for k in columns if k not in COLUMNS_FLAG and k != "orientation_deg" and not (nm and k in COLUMNS_NM)]
    values = np.stack([columns[k].astype(np.float64) for k in plain]) if plain else np.zeros((0, len(table)))
    interval = np.array([k in INTERVAL_COLUMNS for k in plain], dtype=bool)
    plain_stats = dict(zip(plain, column_stats(values, weights, resamples, seed, target_precision, interval)))
    for name, values in columns.items():
        if name in COLUMNS_FLAG:
            continue
        if name == "orientation_deg":
            stats[name], order = axial_stat(values[counted])
        elif name in COLUMNS_NM and nm:  # the px statistics scaled: same draws, same intervals
            px = "area_px" if name == "area_nm2" else name.removesuffix("_nm") + "_px"
            stats[name] = stats[px].scaled(nm**2 if name == "area_nm2" else nm)
        else:
            stats[name] = plain_stats[name]
    histograms = {
        name: Histogram.of(values[particle].astype(np.float64), HISTOGRAM_EDGES[name])
        for name, values in table.columns().items()
        if name in HISTOGRAM_EDGES
    }
    h, w = table.frame_shape
    return FrameSummary(
        count=len(table),
        frame_shape=table.frame_shape,
        coverage_fraction=table.covered_px / (h * w) if h * w else 0.0,
        pixel_size_nm=table.pixel_size_nm,
        stats=stats,
        orientation_order=order,
        histograms=histograms,
        edge_rule=edge_rule,
        counted=int(counted.sum()),
        touching_edge=int(table.touches_edge.sum()),
        overlapped=int(table.overlapped.sum()),
        target_precision=target_precision,
    )
