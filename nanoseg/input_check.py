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

    A frame without contrast (1 % and 99 % percentiles equal) counts as a dark background
    (position 0): it has no objects to show either way.
    """
    img: np.ndarray = np.asarray(frame, dtype=np.float64)
    if img.size and img.min() >= 0 and img.max() <= np.iinfo(np.uint16).max:
        counts = img.astype(np.uint16)
        if np.array_equal(counts, img):  # detector counts: the same values, sorted twice as fast as integers
            img = counts
    lo, hi = np.percentile(img, _RANGE_PERCENTILES)
    if hi <= lo:
        return InputCheck("optical_density", 0.0, expected)
    inside = img[(img >= lo) & (img <= hi)]
    position = float(np.clip((densest_mode(inside) - lo) / (hi - lo), 0.0, 1.0))
    return InputCheck("transmission" if position >= 0.5 else "optical_density", position, expected)


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
