"""Analytic rasterisation of one nanowire prism into voxel columns.

Coordinates: pixel (column x, row y) has its centre at (x + 0.5, y + 0.5); voxel layer k has its
centre at z = k + 0.5 above the substrate (z = 0). The wire axis starts at ``start`` and runs
``length`` px in direction ``angle_deg`` counter-clockwise from the image x axis (y down, so the
direction vector is (cos a, -sin a)).

A wire is a sheared prism: its cross-section in the (u, z) plane, u across the axis, is a
rectangle or a hexagon lying on a face, extruded along the axis; the bottom rises by
``tan(tilt)`` per px along the axis. A column (x, y) of the wire therefore holds every voxel whose
centre lies in [z_bottom, z_bottom + thickness) — the count of such voxels is computed in closed
form, so the result equals a brute-force voxelisation exactly (see the tests).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np

CrossSection = Literal["rectangle", "hexagon"]
EndCap = Literal["flat", "round", "faceted"]


@dataclass(frozen=True)
class WireGeometry:
    """Shape and placement of one wire, all lengths in px (= voxels)."""

    start: tuple[float, float]  # (x, y) of the axis start, px
    angle_deg: float  # in-plane, CCW from image x axis, [0, 180)
    length: float  # along the axis, in-plane
    width: float  # full width at the start, px
    thickness: float  # z extent of the cross-section at the start, voxels
    cross_section: CrossSection = "rectangle"
    tilt_deg: float = 0.0  # bottom rises by tan(tilt) per px along the axis
    taper: float = 0.0  # width at the end = (1 - taper) * width
    sagitta: float = 0.0  # sideways bow of the axis at mid-length (parabolic), px
    rough_coeffs: tuple[float, ...] = ()  # amplitudes of sin(2 pi k s / L + phase), k = 1..
    rough_phases: tuple[float, ...] = ()
    z0: float = 0.0  # height of the bottom at s = 0 on the axis, voxels (set by deposition)
    end_cap: EndCap = "flat"  # ends cut from the length: round (hemispheres) or faceted (45 deg)

    @property
    def direction(self) -> tuple[float, float]:
        a = math.radians(self.angle_deg)
        return math.cos(a), -math.sin(a)

    @property
    def end(self) -> tuple[float, float]:
        ux, uy = self.direction
        return self.start[0] + self.length * ux, self.start[1] + self.length * uy

    @property
    def centre(self) -> tuple[float, float]:
        ux, uy = self.direction
        half = 0.5 * self.length
        return self.start[0] + half * ux, self.start[1] + half * uy

    def max_half_width(self) -> float:
        rough = 1.0 + float(np.sum(np.abs(self.rough_coeffs))) if self.rough_coeffs else 1.0
        return 0.5 * self.width * rough

    def bounding_box(self, shape: tuple[int, int]) -> tuple[int, int, int, int] | None:
        """(y0, y1, x0, x1) of the pixels the wire can touch, clipped to ``shape``; None if outside."""
        (x_a, y_a), (x_b, y_b) = self.start, self.end
        pad = self.max_half_width() + abs(self.sagitta) + 2.0
        x0 = max(math.floor(min(x_a, x_b) - pad), 0)
        x1 = min(math.ceil(max(x_a, x_b) + pad), shape[1])
        y0 = max(math.floor(min(y_a, y_b) - pad), 0)
        y1 = min(math.ceil(max(y_a, y_b) + pad), shape[0])
        if x0 >= x1 or y0 >= y1:
            return None
        return y0, y1, x0, x1


@dataclass(frozen=True)
class WireColumns:
    """The columns holding a wire's material, inside its bounding box ``box`` = (y0, y1, x0, x1).

    One entry per column with material, in row-major order: its row and column in the box and
    the column's geometry. Only those columns are ever computed (they are a fifth of the box on
    average), so the box-shaped maps (``thickness``, ``occupied``) are built on request.
    """

    box: tuple[int, int, int, int]
    rows: np.ndarray  # row of each material column in the box (intp)
    cols: np.ndarray  # its column in the box (intp)
    s: np.ndarray  # its distance along the axis, px (float64)
    bottom_offset: np.ndarray  # z of its bottom above the cross-section's lowest point, voxels
    extent: np.ndarray  # its continuous z extent, voxels (> 0)

    @property
    def shape(self) -> tuple[int, int]:
        y0, y1, x0, x1 = self.box
        return y1 - y0, x1 - x0

    def box_map(self, values: np.ndarray | bool, dtype: type = np.float64) -> np.ndarray:
        """``values`` (one per material column, or one for all) on the box, 0 elsewhere."""
        out: np.ndarray = np.zeros(self.shape, dtype)
        out[self.rows, self.cols] = values
        return out

    @property
    def thickness(self) -> np.ndarray:
        """Continuous z extent of every column of the box, voxels (0 outside the wire)."""
        return self.box_map(self.extent)

    @property
    def occupied(self) -> np.ndarray:
        """The box's columns holding material (bool)."""
        return self.box_map(True, bool)

    def bottom(self, z0: float, tilt_deg: float) -> np.ndarray:
        """z of the material columns' bottoms, in order, for a wire resting at ``z0``, voxels."""
        return z0 + self.s * math.tan(math.radians(tilt_deg)) + self.bottom_offset

    def voxel_runs(self, z0: float, tilt_deg: float) -> tuple[np.ndarray, np.ndarray]:
        """Per material column (1-D int32): the count of voxels whose centre k + 0.5 lies in
        [bottom, bottom + extent), and the index of the lowest of them (0 where the count is 0).
        """
        zb = self.bottom(z0, tilt_deg)
        low = np.ceil(zb - 0.5)
        counts = np.maximum(np.ceil(zb + self.extent - 0.5) - low, 0).astype(np.int32)
        lowest = np.where(counts > 0, low, 0).astype(np.int32)
        return counts, lowest

    def footprint(self, shape: tuple[int, int]) -> np.ndarray:
        """The columns holding material, as a boolean mask of the full field ``shape`` (H, W)."""
        m = np.zeros(shape, dtype=bool)
        y0, y1, x0, x1 = self.box
        m[y0:y1, x0:x1] = self.occupied
        return m


def half_width_along(g: WireGeometry, s: np.ndarray) -> np.ndarray:
    """Half width (px) at axis position s, with taper, edge roughness and the end caps.

    A round cap is a half disc of the end's half width r, inside the length: at a distance
    d < r from the end the half width is at most sqrt(r^2 - (r - d)^2). A faceted cap cuts the
    corners at 45 degrees over the last r / 2: at most r / 2 + d there.
    """
    frac = np.clip(s / max(g.length, 1e-6), 0.0, 1.0)
    hw = 0.5 * g.width * (1.0 - g.taper * frac)
    if g.rough_coeffs:
        mod = np.ones_like(s)
        for k, (amp, ph) in enumerate(zip(g.rough_coeffs, g.rough_phases), start=1):
            mod = mod + amp * np.sin(2.0 * math.pi * k * frac + ph)
        hw = hw * mod
    if g.end_cap != "flat":
        for d, r in ((s, 0.5 * g.width), (g.length - s, 0.5 * g.width * (1.0 - g.taper))):
            dd = np.clip(d, 0.0, None)
            if g.end_cap == "round":
                cap = np.sqrt(np.clip(r * r - (r - np.minimum(dd, r)) ** 2, 0.0, None))
            else:
                cap = 0.5 * r + dd
            hw = np.minimum(hw, cap)
    return hw


def axis_offset(g: WireGeometry, s: np.ndarray) -> np.ndarray:
    """Sideways displacement of the (bent) axis at s, px: a parabola with ``sagitta`` at mid-length."""
    if g.sagitta == 0.0:
        return np.zeros_like(s)
    L = max(g.length, 1e-6)
    return 4.0 * g.sagitta * s * (L - s) / (L * L)


def local_coordinates(
    g: WireGeometry, ys: np.ndarray, xs: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(s, u) of points (x, y): s along the axis from the start, u across it (left of the axis > 0)."""
    ux, uy = g.direction
    dx = xs - g.start[0]
    dy = ys - g.start[1]
    s = dx * ux + dy * uy
    u = -dx * uy + dy * ux
    return s, u - axis_offset(g, s)


def profile(g: WireGeometry, u: np.ndarray, hw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Thickness and bottom offset across the wire for half width ``hw`` (both voxels).

    The cross-section scales with the local width (a tapered wire thins as it narrows). A hexagon
    lies on a face: flat bottom and top of width hw, side vertices at mid-height at |u| = hw.
    """
    t_local = g.thickness * (hw / max(0.5 * g.width, 1e-6))
    au = np.abs(u)
    if g.cross_section == "rectangle":
        thick = np.where(au <= hw, t_local, 0.0)
    else:
        frac = np.clip((hw - au) / np.maximum(0.5 * hw, 1e-6), 0.0, 1.0)
        thick = t_local * frac
    return thick, 0.5 * (t_local - thick)


def band_pixels(g: WireGeometry, box: tuple[int, int, int, int], reach: float) -> tuple[np.ndarray, np.ndarray]:
    """(row, column) in ``box`` of the pixels whose centre lies within ``reach`` + |sagitta| + 1 px
    of the straight axis and between 1 px before its start and 1 px after its end, row-major.

    Each row of the box meets this band in one run of columns (two slabs, linear in x), so the
    pixels are listed without visiting the rest of the box; the margin of 1 px keeps every pixel
    the exact test in ``rasterise`` can accept.
    """
    y0, y1, x0, x1 = box
    ux, uy = g.direction
    dy = np.arange(y0, y1, dtype=np.float64) + 0.5 - g.start[1]
    lo = np.full(dy.shape, -np.inf)  # bounds on dx = x centre - start x, per row
    hi = np.full(dy.shape, np.inf)
    across = reach + abs(g.sagitta) + 1.0
    # along the axis s = dx ux + dy uy, across it u = -dx uy + dy ux
    for slope, offset, low, high in ((ux, dy * uy, -1.0, g.length + 1.0), (-uy, dy * ux, -across, across)):
        if abs(slope) > 1e-9:
            a, b = (low - offset) / slope, (high - offset) / slope
            lo = np.maximum(lo, np.minimum(a, b))
            hi = np.minimum(hi, np.maximum(a, b))
        else:  # the slab does not depend on x (the margin covers the slope's effect)
            hi = np.where((offset < low) | (offset > high), -np.inf, hi)
    first = np.clip(np.ceil(lo + g.start[0] - 0.5), x0, x1).astype(np.intp) - x0
    last = np.clip(np.floor(hi + g.start[0] - 0.5), x0 - 1, x1 - 1).astype(np.intp) - x0
    run = np.maximum(last - first + 1, 0)
    rows = np.repeat(np.arange(y1 - y0), run)
    cols = np.repeat(first - np.cumsum(run) + run, run) + np.arange(int(run.sum()))
    return rows, cols


def rasterise(g: WireGeometry, shape: tuple[int, int]) -> WireColumns | None:
    """The wire's material columns inside its bounding box; None if it misses the field.

    Only pixels near the axis are visited (``band_pixels``); each one's geometry is computed
    element by element as over the whole box, so the columns and their values do not depend on
    which other pixels were visited.
    """
    box = g.bounding_box(shape)
    if box is None:
        return None
    y0, _, x0, _ = box
    reach = g.max_half_width() * (1.0 + 1e-9) + 1e-9
    rows, cols = band_pixels(g, box, reach)
    s, u = local_coordinates(g, rows + (y0 + 0.5), cols + (x0 + 0.5))
    near = (s >= 0.0) & (s <= g.length) & (np.abs(u) <= reach)
    rows, cols, s, u = rows[near], cols[near], s[near], u[near]
    thick, offset = profile(g, u, half_width_along(g, s))
    m = thick > 0
    return WireColumns(box, rows[m], cols[m], s[m], offset[m], thick[m])


def centreline_length(g: WireGeometry, samples: int = 2001) -> float:
    """True length of the wire's (bent) axis, px: the arc length of the parabola of ``sagitta``."""
    if g.sagitta == 0.0:
        return float(g.length)
    s = np.linspace(0.0, g.length, samples)
    slope = 4.0 * g.sagitta * (g.length - 2.0 * s) / (g.length * g.length)
    return float(np.trapezoid(np.sqrt(1.0 + slope * slope), s))


def mean_width(g: WireGeometry) -> float:
    """True mean width across the axis, px: footprint area / centreline length.

    The footprint is |u - offset(s)| <= half width for s in [0, length] (a shear of the straight
    strip, same area), so its area is the integral of the width along s; roughness is left out.
    For a bent wire this is the width perpendicular to the local axis, averaged along it.
    """
    area = g.width * g.length * (1.0 - 0.5 * g.taper)
    return float(area / centreline_length(g))
