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
    """A wire's columns inside its bounding box ``box`` = (y0, y1, x0, x1)."""

    box: tuple[int, int, int, int]
    s: np.ndarray  # distance along the axis, px (float64, box-shaped)
    bottom_offset: np.ndarray  # z of the local bottom above the cross-section's lowest point
    thickness: np.ndarray  # continuous z extent of the column, voxels (0 outside)
    occupied: np.ndarray  # thickness > 0 (bool, box-shaped)

    def bottom(self, z0: float, tilt_deg: float) -> np.ndarray:
        """z of the occupied columns' bottoms (1-D, in ``occupied`` order) at rest at ``z0``, voxels."""
        occ = self.occupied
        return z0 + self.s[occ] * math.tan(math.radians(tilt_deg)) + self.bottom_offset[occ]

    def voxel_runs(self, z0: float, tilt_deg: float) -> tuple[np.ndarray, np.ndarray]:
        """Per column (box-shaped int32): the count of voxels whose centre k + 0.5 lies in
        [bottom, bottom + thickness), and the index of the lowest of them (0 where the count is 0).
        """
        zb = self.bottom(z0, tilt_deg)
        low = np.ceil(zb - 0.5)
        counts = np.zeros(self.occupied.shape, np.int32)
        lowest = np.zeros(self.occupied.shape, np.int32)
        counts[self.occupied] = np.maximum(np.ceil(zb + self.thickness[self.occupied] - 0.5) - low, 0)
        lowest[self.occupied] = low
        lowest[counts == 0] = 0
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


def rasterise(g: WireGeometry, shape: tuple[int, int]) -> WireColumns | None:
    """The wire's continuous column thickness inside its bounding box; None if it misses the field."""
    box = g.bounding_box(shape)
    if box is None:
        return None
    y0, y1, x0, x1 = box
    ys = (np.arange(y0, y1, dtype=np.float64) + 0.5)[:, None]
    xs = (np.arange(x0, x1, dtype=np.float64) + 0.5)[None, :]
    s, u = local_coordinates(g, ys, xs)
    # The profile is computed only where material can be: along the axis and within the widest
    # half width (a long diagonal wire covers a small part of its box). The values there are the
    # same, element by element, as over the whole box; outside, thickness and offset are 0.
    reach = g.max_half_width() * (1.0 + 1e-9) + 1e-9
    near = (s >= 0.0) & (s <= g.length) & (np.abs(u) <= reach)
    thick = np.zeros_like(s)
    offset = np.zeros_like(s)
    hw = half_width_along(g, s[near])
    thick[near], offset[near] = profile(g, u[near], hw)
    return WireColumns(box=box, s=s, bottom_offset=offset, thickness=thick, occupied=thick > 0)


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
