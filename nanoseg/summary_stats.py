"""Summary statistics of particle columns: counting rules for edge particles, weighted statistics
with bootstrap intervals, axial statistics of orientations and fixed-bin histograms.

Counting rules (``EdgeRule``), for particles whose mask touches the frame's border:

- ``include``: every particle counts with weight 1 (cut wires count with their visible length).
- ``exclude``: particles touching the border are left out. Simple, but a field of view sees a
  long wire whole less often than a short one, so the lengths are biased short.
- ``miles_lantuejoul``: border particles are left out and every other particle is weighted by
  (W H) / ((W - w) (H - h)), its bounding box w x h in a W x H frame: the inverse of the share
  of positions at which a particle of that box would lie entirely in the frame (Miles 1978,
  Lantuejoul 1980). Unbiased for the distribution of whole particles; a particle whose box is
  as large as the frame cannot be counted (weight 0).

Intervals: a percentile bootstrap over particles (resampled with replacement, ``resamples``
draws from a seeded generator, so the same frame always gives the same interval), 95 %.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from pydantic import Field

from nanoseg.config_io import StrictModel

EdgeRule = Literal["include", "exclude", "miles_lantuejoul"]
EDGE_RULES: tuple[EdgeRule, ...] = ("include", "exclude", "miles_lantuejoul")
CONFIDENCE = 0.95


class StatisticsConfig(StrictModel):
    """How a frame's particles are summarised (``particle_stats.frame_summary``): the daemon's
    ``statistics`` section, ``nanoseg segment --edge-rule``."""

    edge_rule: EdgeRule = Field("include", description="Counting rule for particles touching the frame's "
                                "border: include, exclude or miles_lantuejoul (stated in every summary).")
    bootstrap_resamples: int = Field(1000, ge=0, le=100_000, description="Bootstrap resamples for the 95 % "
                                     "intervals (0: no intervals).")
    target_precision: float = Field(0.05, gt=0, lt=1, description="Relative half width of the median's "
                                    "interval that n_for_target aims at.")


def edge_weights(
    rule: EdgeRule, touches_edge: np.ndarray, box_w: np.ndarray, box_h: np.ndarray, frame_shape: tuple[int, int]
) -> np.ndarray:
    """Each particle's weight (N,) under ``rule``; box sizes and frame shape in px."""
    n = touches_edge.shape[0]
    if rule == "include":
        return np.ones(n)
    keep = ~touches_edge.astype(bool)
    if rule == "exclude":
        return keep.astype(np.float64)
    if rule != "miles_lantuejoul":
        raise ValueError(f"edge rule must be one of {', '.join(EDGE_RULES)}, got {rule!r}")
    h, w = frame_shape
    free = (w - np.nan_to_num(box_w, nan=w)) * (h - np.nan_to_num(box_h, nan=h))
    with np.errstate(divide="ignore", invalid="ignore"):
        weight = np.where(keep & (free > 0), (w * h) / free, 0.0)
    return weight


def _weighted_median(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Weighted median along the last axis, positive weights; equals ``np.median`` for unit weights.

    Midpoint rule: value k sits at cumulative weight (W_k - w_k / 2) / W; the median is read off
    at 0.5 by linear interpolation between neighbours.
    """
    order = np.argsort(x, axis=-1)
    xs = np.take_along_axis(x, order, axis=-1)
    ws = np.take_along_axis(w, order, axis=-1)
    c = (np.cumsum(ws, axis=-1) - 0.5 * ws) / ws.sum(axis=-1, keepdims=True)
    n = x.shape[-1]
    k = np.clip((c < 0.5).sum(axis=-1, keepdims=True), 1, max(n - 1, 1))
    lo_c, hi_c = np.take_along_axis(c, k - 1, -1), np.take_along_axis(c, min(n - 1, 1) * k, -1)
    lo_x, hi_x = np.take_along_axis(xs, k - 1, -1), np.take_along_axis(xs, min(n - 1, 1) * k, -1)
    with np.errstate(divide="ignore", invalid="ignore"):
        frac = np.clip(np.where(hi_c > lo_c, (0.5 - lo_c) / (hi_c - lo_c), 0.0), 0.0, 1.0)
    return (lo_x + frac * (hi_x - lo_x))[..., 0]


def weighted_stats(x: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mean, median, population std) along the last axis, weights ``w``; NaN where no weight."""
    total = w.sum(axis=-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        mean = (w * x).sum(axis=-1) / total
        var = (w * (x - mean[..., None]) ** 2).sum(axis=-1) / total
    equal = bool(np.all(w == w.flat[0])) if w.size else True  # include, exclude: a plain median
    median = median_last(x) if equal and x.shape[-1] else _weighted_median(x, w)
    return mean, median, np.sqrt(np.maximum(var, 0.0))


_SORT_MEDIAN_MAX = 1 << 16


def median_all(a: np.ndarray) -> float:
    """``np.median(a)`` over the whole array, the same value to the last bit, by one sort or
    partition (numpy's median partitions at three places at once for floats, several times
    slower on the images it is used on).

    Parameters
    ----------
    a : np.ndarray
        Any shape, an integer or real dtype, not empty; NaN gives NaN, as ``np.median``.

    Returns
    -------
    float
        The median, in the units of ``a``.
    """
    flat = np.asarray(a).ravel()
    if flat.size == 0:
        raise ValueError("median_all needs at least one value")
    if flat.dtype.kind == "f" and bool(np.isnan(flat).any()):
        return float("nan")
    half = flat.size // 2
    # Up to 64 kpx a sort (vectorised) is faster than a partition, and stays fast where the
    # partition slows 4-8x: an image half of one value (a flat background, zeros, a padding).
    if flat.size <= _SORT_MEDIAN_MAX:
        part = np.sort(flat)
        below = part[half - 1] if half else part[0]
    else:
        part = np.partition(flat, half)
        below = part[:half].max()
    if flat.size % 2:
        return float(part[half])
    return _mean_of_two(below, part[half])


def _mean_of_two(a: Any, b: Any) -> float:
    """``np.mean`` of the two numpy scalars (of one dtype), bit for bit, by scalar arithmetic: float32
    and float64 summed and halved in their own precision, integers in float64."""
    if a.dtype.kind == "f" and a.dtype.itemsize >= 4:
        return float((a + b) / 2)
    if a.dtype.kind in "ui":
        return (float(a) + float(b)) / 2
    return float(np.mean(np.array([a, b], dtype=a.dtype)))


def median_last(x: np.ndarray) -> np.ndarray:
    """``np.median(x, axis=-1)``, the same values, by one sort along the last axis (for many short
    rows, e.g. bootstrap resamples, several times faster than its partition).

    Parameters
    ----------
    x : np.ndarray
        Finite values, the last axis not empty.

    Returns
    -------
    np.ndarray
        The medians, ``x``'s shape without its last axis.
    """
    n = x.shape[-1]
    s = np.sort(x, axis=-1)
    k = n // 2
    return s[..., k] if n % 2 else (s[..., k - 1] + s[..., k]) / 2


@dataclass(frozen=True)
class Stat:
    """Mean, median and population standard deviation of the counted finite values (None if none).

    ``*_lo``, ``*_hi``: 95 % bootstrap interval of the mean and the median (None without
    bootstrap or below two values). ``n_for_target``: particles needed for the median's 95 %
    interval to be within +-``target_precision`` of the median (FrameSummary's), from the
    interval's width, which shrinks as 1 / sqrt(n); None without an interval.
    """

    mean: float | None
    median: float | None
    std: float | None
    mean_lo: float | None = None
    mean_hi: float | None = None
    median_lo: float | None = None
    median_hi: float | None = None
    n_for_target: int | None = None

    def scaled(self, factor: float) -> Stat:
        """The statistics of the values times ``factor`` > 0 (px -> nm)."""

        def f(v: float | None) -> float | None:
            return None if v is None else v * factor

        return Stat(f(self.mean), f(self.median), f(self.std), f(self.mean_lo), f(self.mean_hi),
                    f(self.median_lo), f(self.median_hi), self.n_for_target)  # fmt: skip

    def to_dict(self) -> dict[str, float | int | None]:
        return {
            "mean": self.mean, "median": self.median, "std": self.std,
            "mean_lo": self.mean_lo, "mean_hi": self.mean_hi,
            "median_lo": self.median_lo, "median_hi": self.median_hi, "n_for_target": self.n_for_target,
        }  # fmt: skip


def _opt(v: float) -> float | None:
    return float(v) if math.isfinite(v) else None


def stat_with_interval(
    values: np.ndarray,
    weights: np.ndarray,
    resamples: int,
    rng: np.random.Generator | None,
    target_precision: float,
) -> Stat:
    """``Stat`` of ``values`` (N,) with weights (N,); the bootstrap draws from ``rng``."""
    ok = np.isfinite(values) & (weights > 0)
    x, w = values[ok].astype(np.float64), weights[ok].astype(np.float64)
    draws = rng.integers(0, x.size, size=(resamples, x.size)) if rng is not None and resamples > 0 and x.size >= 2 else None
    return _row_stats(x[None], w, draws, np.ones(1, bool), target_precision)[0]


def column_stats(
    values: np.ndarray,
    weights: np.ndarray,
    resamples: int,
    seed: int,
    target_precision: float,
    interval: np.ndarray,
) -> list[Stat]:
    """``stat_with_interval`` of each row of ``values`` (C, N), weights (N,), at once.

    Rows where ``interval`` (C,) is True get bootstrap intervals, each drawn from a generator
    seeded ``seed`` (as if each row had its own ``np.random.default_rng(seed)``); the others
    none. Rows with the same counted entries are computed together.
    """
    ok = np.isfinite(values) & (weights > 0)
    groups: dict[bytes, list[int]] = {}
    for i in range(values.shape[0]):
        groups.setdefault(ok[i].tobytes(), []).append(i)
    out: list[Stat] = [Stat(None, None, None)] * values.shape[0]
    for rows in groups.values():
        sel = ok[rows[0]]
        # C order: a reduction along rows of another layout sums in another order (other last bits)
        x = np.ascontiguousarray(values[rows][:, sel], dtype=np.float64)
        w = weights[sel].astype(np.float64)
        draws = None
        if resamples > 0 and x.shape[1] >= 2 and interval[rows].any():
            draws = np.random.default_rng(seed).integers(0, x.shape[1], size=(resamples, x.shape[1]))
        for i, st in zip(rows, _row_stats(x, w, draws, interval[rows], target_precision)):
            out[i] = st
    return out


def _row_stats(
    x: np.ndarray, w: np.ndarray, draws: np.ndarray | None, interval: np.ndarray, target_precision: float
) -> list[Stat]:
    """``Stat`` of each row of ``x`` (C, n), finite, weights ``w`` (n,) > 0; rows where
    ``interval`` get the percentile bootstrap over ``draws`` (R, n) indices (None: no intervals)."""
    if x.shape[1] == 0:
        return [Stat(None, None, None)] * x.shape[0]
    mean, median, std = weighted_stats(x, np.broadcast_to(w, x.shape))
    out = [Stat(float(m), float(d), float(s)) for m, d, s in zip(mean, median, std)]
    if draws is None or x.shape[1] < 2 or not interval.any():
        return out
    rows = np.flatnonzero(interval)
    bm, bmed = _bootstrap_mean_median(x[rows], w, draws)  # every row resampled with the same draws
    alpha = (1 - CONFIDENCE) / 2
    # finite: positive weights; both quantiles of both statistics in one call
    (m_lo, d_lo), (m_hi, d_hi) = np.quantile(np.stack([bm, bmed]), [alpha, 1 - alpha], axis=-1)
    for k, i in enumerate(rows):
        med = float(median[i])
        half = 0.5 * (d_hi[k] - d_lo[k])
        need = None
        if med != 0 and target_precision > 0:
            need = max(1, math.ceil(x.shape[1] * (half / (target_precision * abs(med))) ** 2))
        out[i] = Stat(out[i].mean, med, out[i].std, _opt(m_lo[k]), _opt(m_hi[k]), _opt(d_lo[k]), _opt(d_hi[k]), need)
    return out


def _bootstrap_mean_median(x: np.ndarray, w: np.ndarray, draws: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and median (B, R) of each row of ``x`` (B, n), weights ``w`` (n,), resampled by
    ``draws`` (R, n): ``weighted_stats``' values, without the spread (unused). Row by row, so that
    each row's resamples (R, n) stay in the cache."""
    wd = w[draws]
    drawn = np.bincount(draws.ravel(), minlength=w.size) > 0
    equal = bool(np.all(w[drawn] == wd.flat[0]))  # every drawn weight the same: a plain median
    unit = equal and wd.flat[0] == 1.0  # x * 1 is x, and n ones sum to n: the same values
    total = float(draws.shape[1]) if unit else wd.sum(axis=-1)
    mean, median = np.empty((len(x), len(draws))), np.empty((len(x), len(draws)))
    with np.errstate(divide="ignore", invalid="ignore"):
        for i, row in enumerate(x):
            xb = np.take(row, draws)  # (R, n), C order
            mean[i] = (xb if unit else wd * xb).sum(axis=-1) / total
            median[i] = median_last(xb) if equal else _weighted_median(xb, wd)
    return mean, median


def _log_edges(lo_exp: int, hi_exp: int, per_decade: int) -> tuple[float, ...]:
    n = (hi_exp - lo_exp) * per_decade
    return tuple(float(10 ** (lo_exp + k / per_decade)) for k in range(n + 1))


HISTOGRAM_EDGES: dict[str, tuple[float, ...]] = {
    "area_px": _log_edges(1, 6, 4),  # 10 px .. 1e6 px, 4 bins per decade
    "area_nm2": _log_edges(2, 8, 4),  # 100 nm^2 .. 1e8 nm^2 (100 µm^2)
    "length_px": _log_edges(0, 4, 5),  # 1 px .. 10^4 px, 5 bins per decade
    "length_nm": _log_edges(1, 5, 5),  # 10 nm .. 100 µm
    "width_px": _log_edges(0, 3, 5),  # 1 px .. 1000 px
    "width_nm": _log_edges(0, 4, 5),  # 1 nm .. 10 µm
    "aspect_ratio": _log_edges(0, 2, 10),  # 1 .. 100, 10 bins per decade
    "orientation_deg": tuple(float(a) for a in range(0, 181, 10)),  # 0 .. 180 deg, 10 deg bins
}
"""Fixed bin edges (bins [e_k, e_k+1), the last closed), so histograms of frames and runs add up."""


@dataclass(frozen=True)
class Histogram:
    """Counts in fixed bins; values outside the edges go to ``underflow`` / ``overflow``."""

    edges: tuple[float, ...]
    counts: tuple[int, ...]
    underflow: int
    overflow: int

    @classmethod
    def of(cls, values: np.ndarray, edges: tuple[float, ...]) -> Histogram:
        """The finite ``values`` counted in ``edges`` (``np.histogram``'s counts: bins [e_k, e_k+1),
        the last closed), found by one ``searchsorted``."""
        v = values[np.isfinite(values)]
        e = np.asarray(edges)
        below, above = v < e[0], v > e[-1]
        inside = v[~(below | above)]
        k = np.searchsorted(e, inside, side="right") - 1  # e_k <= x < e_k+1
        k[inside == e[-1]] = len(e) - 2  # the last bin is closed
        counts = np.bincount(k, minlength=len(e) - 1)
        return cls(edges, tuple(counts.tolist()), int(below.sum()), int(above.sum()))

    def merge(self, other: Histogram) -> Histogram:
        """Sum of two histograms with the same edges (e.g. frames of one run)."""
        if self.edges != other.edges:
            raise ValueError("histograms with different edges cannot be merged")
        counts = tuple(a + b for a, b in zip(self.counts, other.counts))
        return Histogram(self.edges, counts, self.underflow + other.underflow, self.overflow + other.overflow)

    def to_dict(self) -> dict[str, object]:
        return {
            "edges": list(self.edges),
            "counts": list(self.counts),
            "underflow": self.underflow,
            "overflow": self.overflow,
        }


def axial_stat(deg: np.ndarray) -> tuple[Stat, float | None]:
    """Statistics of axial angles (0 == 180 deg) and the order parameter |<exp(2i theta)>|.

    Mean: the axial circular mean, [0, 180). Median: of the angles unwrapped to within 90 deg of
    the mean. Std: circular, sqrt(-2 ln R) / 2 in degrees. Order parameter R: 0 for isotropic
    orientations, 1 when all particles are parallel.
    """
    v = deg[np.isfinite(deg)]
    if v.size == 0:
        return Stat(None, None, None), None
    z = np.exp(2j * np.radians(v)).mean()
    r = float(abs(z))
    mean = math.degrees(math.atan2(z.imag, z.real)) / 2 % 180.0
    unwrapped = (v - mean + 90.0) % 180.0 - 90.0
    median = (mean + float(median_last(unwrapped))) % 180.0
    std = math.degrees(math.sqrt(-2 * math.log(max(r, 1e-300))) / 2)
    return Stat(mean, median, std), r
