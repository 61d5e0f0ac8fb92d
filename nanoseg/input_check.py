"""Does a frame look like the input a profile expects? And its background's slow variation.

A transmission frame (bright-field TEM, a ptychographic |T|^2) has a bright background and
darker objects; an optical-density map (or a secondary-electron image) has a dark background
and brighter objects. The background is the most populated brightness of a frame (its mode,
``optical_density.densest_mode``), so where the mode lies between the frame's dark and bright
ends says which kind a frame is, without a threshold chosen on any data set: above the middle
is a bright background.

Arrays are (H, W), row-major, y down; values in the frame's own units.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
from skimage.transform import resize

from nanoseg.optical_density import densest_mode

InputKind = Literal["transmission", "optical_density"]

_RANGE_PERCENTILES = (1.0, 99.0)
_SURFACE_GRID = 64
"""Side of the coarse grid the background surface is fitted on (px); the surface is smooth."""


@dataclass(frozen=True)
class InputCheck:
    """What a frame looks like, against what the profile expects.

    - ``looks_like``: ``transmission`` (background in the upper half of the frame's 1-99 %
      range) or ``optical_density`` (lower half).
    - ``background_position``: the background mode's place in that range, 0 (dark end) to 1.
    - ``expected``: the profile's ``input`` (``auto`` accepts either).
    """

    looks_like: InputKind
    background_position: float
    expected: InputKind | Literal["auto"]

    @property
    def mismatch(self) -> bool:
        """The profile expects the other kind of frame."""
        return self.expected != "auto" and self.expected != self.looks_like

    @property
    def used(self) -> InputKind:
        """How the frame is prepared: as expected, or as it looks when the profile says ``auto``."""
        return self.looks_like if self.expected == "auto" else self.expected

    def message(self) -> str:
        """One line for logs and reports."""
        bg = "bright" if self.looks_like == "transmission" else "dark"
        text = (f"frame looks like {self.looks_like} ({bg} background at "
                f"{self.background_position:.2f} of its range)")
        if self.mismatch:
            return f"{text}, the profile expects {self.expected}: check the profile"
        return text


def check_input(frame: np.ndarray, expected: InputKind | Literal["auto"] = "auto") -> InputCheck:
    """Classify a frame (finite values, any shape: a subsample will do) by where its background
    (mode) lies in its 1-99 % range.

    The values are sorted once (detector counts as uint16, by counting); the percentiles, the
    values inside the range and their mode come from that one sorted copy, with the values
    ``np.percentile`` and ``densest_mode`` give. A frame without contrast (1 % and 99 %
    percentiles equal) counts as a dark background (position 0): it has no objects to show
    either way.
    """
    x = _sorted(_as_counts(np.asarray(frame)).ravel())
    if x.size == 0:
        raise ValueError("check_input needs at least one value")
    lo, hi = sorted_percentiles(x, _RANGE_PERCENTILES)
    if hi <= lo:
        return InputCheck("optical_density", 0.0, expected)
    if x.dtype == np.uint16:  # x >= lo and x <= hi, on integers, without casting x to float
        first = int(np.searchsorted(x, np.uint16(math.ceil(lo)), "left"))
        end = int(np.searchsorted(x, np.uint16(math.floor(hi)), "right"))
    else:
        first, end = int(np.searchsorted(x, lo, "left")), int(np.searchsorted(x, hi, "right"))
    position = min(max((densest_mode(x[first:end], presorted=True) - lo) / (hi - lo), 0.0), 1.0)
    return InputCheck("transmission" if position >= 0.5 else "optical_density", position, expected)


def _sorted(x: np.ndarray) -> np.ndarray:
    """1-D ``x`` sorted ascending. uint16 values spanning at most 4x their number of counts are
    sorted by counting (a histogram of the span, then each count repeated): the same array as
    numpy's radix sort, ~3x faster on a 16 000-pixel detector sample."""
    if x.dtype == np.uint16 and x.size:
        lo, hi = int(x.min()), int(x.max())
        if hi - lo <= 4 * x.size:
            histogram = np.bincount(x - np.uint16(lo), minlength=hi - lo + 1)
            return np.repeat(np.arange(lo, hi + 1, dtype=np.uint16), histogram)
    return np.sort(x, kind="stable")


def _as_counts(values: np.ndarray) -> np.ndarray:
    """``values`` as uint16 when they are detector counts (integers in 0-65535, of any dtype),
    which sort several times faster (``_sorted``); else as float64."""
    if values.size and values.dtype.kind in "uif":
        if values.dtype in (np.uint8, np.uint16):
            return values.astype(np.uint16, copy=False)
        if values.min() >= 0 and values.max() <= np.iinfo(np.uint16).max:
            counts = values.astype(np.uint16)
            if values.dtype.kind in "ui" or np.array_equal(counts, values):
                return counts
    return values.astype(np.float64, copy=False)


def sorted_percentiles(x: np.ndarray, percentiles: tuple[float, ...]) -> tuple[float, ...]:
    """``np.percentile(x, percentiles)`` (linear interpolation, the same values to the last bit)
    of an already sorted 1-D array, without numpy's partition.

    Parameters
    ----------
    x : ndarray, shape (N,)
        Sorted ascending, N >= 1, no NaN.
    percentiles : tuple of float
        In percent, 0-100.

    Returns
    -------
    tuple of float
        One value per percentile, in the units of ``x``.
    """
    return tuple(_sorted_percentile(x, float(p)) for p in percentiles)


def _sorted_percentile(x: np.ndarray, percentile: float) -> float:
    """One of ``sorted_percentiles``, in scalars: numpy's array arithmetic step by step (x's own
    dtype for the difference, float64 from there), a few microseconds instead of a dozen small
    numpy calls."""
    virtual = (x.size - 1) * (percentile / 100)
    if virtual >= x.size - 1:
        i = j = -1
    elif virtual < 0:
        i = j = 0
    else:
        i = math.floor(virtual)
        j = i + 1
    gamma = np.float64(virtual - i)  # a float64 scalar: the products are float64 as in the arrays
    a, b = x[i], x[j]
    diff = b - a
    return float(b - diff * (1 - gamma)) if gamma >= 0.5 else float(a + diff * gamma)


def background_surface(image: np.ndarray, bright_background: bool, iterations: int = 6) -> np.ndarray:
    """(H, W) float64: the background's slow variation, a quadratic surface in x and y.

    Fitted on a coarse grid (``_SURFACE_GRID``) by least squares, then refitted ``iterations``
    times on the grid points on the background's side of the last fit (above it for a bright
    background, below for a dark one), so objects of any size pull it less and less: the fit
    converges to the background as long as the background is the larger part of the frame.
    """
    img = np.asarray(image, dtype=np.float64)
    h, w = img.shape
    gh, gw = min(h, _SURFACE_GRID), min(w, _SURFACE_GRID)
    small = resize(img, (gh, gw), order=1, anti_aliasing=True, preserve_range=True)
    yy, xx = np.mgrid[0:gh, 0:gw]
    y = (yy.ravel() + 0.5) / gh - 0.5
    x = (xx.ravel() + 0.5) / gw - 0.5
    design = np.stack([np.ones_like(x), x, y, x * x, x * y, y * y], axis=1)
    values = small.ravel()
    keep = np.ones(values.size, bool)
    coef = np.zeros(design.shape[1])
    for _ in range(iterations + 1):
        if keep.sum() < design.shape[1] * 4:
            break
        coef = np.linalg.lstsq(design[keep], values[keep], rcond=None)[0]
        fit = design @ coef
        keep = values >= fit if bright_background else values <= fit
    fy = (np.arange(h) + 0.5) / h - 0.5
    fx = (np.arange(w) + 0.5) / w - 0.5
    gy, gx = np.meshgrid(fy, fx, indexing="ij")
    c = coef
    return np.asarray(c[0] + c[1] * gx + c[2] * gy + c[3] * gx * gx + c[4] * gx * gy + c[5] * gy * gy)
