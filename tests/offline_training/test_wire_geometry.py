"""The analytic per-column voxel count of a prism equals a brute-force voxelisation.

The brute force below shares no code with ``wire_geometry``: it tests every voxel centre
(x + .5, y + .5, k + .5) for membership in the wire's cross-section polygon (rectangle, or a
hexagon lying on a face: flat bottom and top of width w/2, side vertices at mid-height at
|u| = w/2) placed in the (u, z - z0 - s tan(tilt)) plane, with 0 <= s <= length.

Boundary convention (the generator's): the sides and the bottom belong to the wire, the top
edges do not, so a column holds the voxels whose centres lie in [bottom, bottom + thickness).
With that convention the two agree voxel for voxel on every wire tried, so the comparisons are
exact, not "within one voxel".
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from nanoseg.config_io import load_yaml
from nanoseg.paths import resolve_config
from nanoseg_training.scene import generate_scene, voxelise
from nanoseg_training.synthetic_config import SceneConfig
from nanoseg_training.wire_geometry import (
    WireGeometry,
    half_width_along,
    local_coordinates,
    profile,
    rasterise,
)

SHAPE = (64, 64)
HEIGHT = 60


def cross_section(kind: str, hw: np.ndarray, t: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """Vertices (u, z) counter-clockwise; ``hw`` half width and ``t`` thickness (arrays)."""
    zero = np.zeros_like(t)
    if kind == "rectangle":
        return [(-hw, zero), (hw, zero), (hw, t), (-hw, t)]
    return [(-hw / 2, zero), (hw / 2, zero), (hw, t / 2), (hw / 2, t), (-hw / 2, t), (-hw, t / 2)]


def brute_force_voxels(g: WireGeometry, shape: tuple[int, int], height: int) -> np.ndarray:
    """Boolean volume (z, y, x): voxel centres inside the wire ``g`` resting at ``g.z0``."""
    y = (np.arange(shape[0]) + 0.5)[None, :, None]
    x = (np.arange(shape[1]) + 0.5)[None, None, :]
    z = (np.arange(height) + 0.5)[:, None, None]
    a = math.radians(g.angle_deg)
    ax, ay = math.cos(a), -math.sin(a)  # y points down: CCW on screen is -y
    px, py = x - g.start[0], y - g.start[1]
    s = px * ax + py * ay
    u = py * ax - px * ay  # across the axis; > 0 below an axis that points along +x
    L = g.length
    u = u - 4.0 * g.sagitta * s * (L - s) / (L * L)  # parabolic bow of the axis
    f = np.clip(s / L, 0.0, 1.0)
    scale = 1.0 - g.taper * f  # the whole cross-section shrinks with the width
    if g.rough_coeffs:  # and is modulated by 1 + a sum of sinusoids along the wire
        scale = scale * (1.0 + sum(
            amp * np.sin(2 * math.pi * k * f + ph)
            for k, (amp, ph) in enumerate(zip(g.rough_coeffs, g.rough_phases), start=1)
        ))
    hw = 0.5 * g.width * scale
    t = g.thickness * scale
    zr = z - g.z0 - s * math.tan(math.radians(g.tilt_deg))
    verts = cross_section(g.cross_section, hw, t)
    inside = (s >= 0) & (s <= L) & np.ones_like(zr, dtype=bool)
    for (u1, z1), (u2, z2) in zip(verts, verts[1:] + verts[:1]):
        cross = (u2 - u1) * (zr - z1) - (z2 - z1) * (u - u1)  # >= 0: left of the edge, inside
        facing_up = (u2 - u1) < 0  # top edges of a counter-clockwise polygon run towards -u
        inside &= np.where(facing_up, cross > 0, cross >= 0)
    return inside


def analytic_counts(g: WireGeometry) -> tuple[np.ndarray, np.ndarray]:
    """Per-column voxel count and lowest voxel over the whole field, from ``wire_geometry``."""
    counts = np.zeros(SHAPE, np.int32)
    lowest = np.zeros(SHAPE, np.int32)
    cols = rasterise(g, SHAPE)
    if cols is not None:
        y0, y1, x0, x1 = cols.box
        runs, low = cols.voxel_runs(g.z0, g.tilt_deg)
        counts[y0:y1, x0:x1], lowest[y0:y1, x0:x1] = cols.box_map(runs, np.int32), cols.box_map(low, np.int32)
    return counts, lowest


WIRES = {
    "rectangle flat": WireGeometry((8.3, 20.6), 17.0, 45.2, 9.7, 6.3, "rectangle", z0=0.0),
    "rectangle tilted, raised": WireGeometry(
        (5.1, 50.4), 38.0, 52.7, 7.3, 5.9, "rectangle", tilt_deg=8.5, z0=3.37
    ),
    "hexagon": WireGeometry((60.2, 40.9), 151.0, 48.3, 13.1, 10.4, "hexagon", z0=1.21),
    "hexagon tilted, tapered": WireGeometry(
        (12.7, 9.2), 292.0, 47.9, 12.3, 9.9, "hexagon", tilt_deg=6.0, taper=0.35, z0=0.6
    ),
    "rectangle tapered, bent, rough": WireGeometry(
        (4.4, 30.1), 3.0, 55.3, 10.9, 8.1, "rectangle", tilt_deg=2.0, taper=0.2, sagitta=4.3,
        rough_coeffs=(0.06, -0.03, 0.02, 0.01), rough_phases=(0.3, 2.1, 4.0, 1.1), z0=2.0,
    ),
    "hexagon bent, rough": WireGeometry(
        (30.6, 62.2), 101.0, 50.5, 11.7, 8.8, "hexagon", tilt_deg=3.0, sagitta=-3.1,
        rough_coeffs=(0.05, 0.04, -0.02, 0.01), rough_phases=(1.0, 0.2, 3.3, 5.0), z0=0.0,
    ),
    "leaving the field": WireGeometry((50.3, 10.8), 20.0, 40.1, 8.9, 7.2, "hexagon", tilt_deg=4.0),
}


@pytest.mark.parametrize("name", list(WIRES))
def test_column_counts_equal_brute_force_voxelisation(name: str) -> None:
    g = WIRES[name]
    vol = brute_force_voxels(g, SHAPE, HEIGHT)
    counts, lowest = analytic_counts(g)
    assert vol.sum() > 100  # the wire is in the field
    np.testing.assert_array_equal(counts, vol.sum(axis=0))
    # The column is one contiguous run starting at ``lowest`` (a convex cross-section).
    has = counts > 0
    np.testing.assert_array_equal(lowest[has], np.argmax(vol, axis=0)[has])


def test_hexagon_columns_thin_towards_the_vertices() -> None:
    g = WireGeometry((0.3, 32.0), 0.0, 64.0, 20.0, 12.0, "hexagon")
    counts, _ = analytic_counts(g)
    column = counts[:, 32]  # across the wire at x = 32.5; the axis is at y = 32, |u| = |31.5 - row|
    # Flat top over |u| <= w/4 = 5: full thickness 12, rows 27..36.
    assert column[27:37].tolist() == [12] * 10
    # |u| = 5.5: thickness 12 * (10 - 5.5) / 5 = 10.8 centred on the axis's mid-height, so it
    # spans [0.6, 11.4): voxel centres 1.5 .. 10.5, 10 voxels.
    assert column[26] == column[37] == 10
    # |u| = 9.5: thickness 1.2 spanning [5.4, 6.6): centres 5.5 and 6.5.
    assert column[22] == column[41] == 2
    assert column[:22].sum() == column[42:].sum() == 0  # |u| >= 10: beyond the vertices


def test_tilt_raises_the_bottom_along_the_axis() -> None:
    g = WireGeometry((0.5, 32.0), 0.0, 60.0, 8.0, 4.0, "rectangle", tilt_deg=5.0)
    _, lowest = analytic_counts(g)
    # Bottom at s: tan(5 deg) * s; lowest voxel = ceil(bottom - 0.5).
    s = np.arange(64)  # column centre x + 0.5 minus the start 0.5
    expected = np.ceil(np.tan(np.radians(5.0)) * s - 0.5).astype(int)
    assert lowest[32, :60].tolist() == expected[:60].tolist()
    assert lowest[32, 59] == 5


def test_geometry_endpoints_and_misses() -> None:
    g = WireGeometry((10.0, 50.0), 90.0, 30.0, 6.0, 3.0)
    assert g.end == pytest.approx((10.0, 20.0))  # 90 deg points up the image (y decreases)
    assert g.centre == pytest.approx((10.0, 35.0))
    assert rasterise(WireGeometry((-200.0, 10.0), 0.0, 50.0, 8.0, 4.0), SHAPE) is None


def test_generated_scenes_equal_brute_force_voxelisation(small_config) -> None:
    """Whole scenes (tilt, taper, bends, roughness, hexagons, stacking): label volume and
    thickness map identical to the brute force of each wire at its deposited height."""
    cfg = small_config()
    wires = 0
    for seed in range(30):
        scene = generate_scene(cfg, np.random.default_rng(seed))
        labels = voxelise(scene)
        expected = np.zeros_like(labels)
        for i, w in enumerate(scene.wires, start=1):
            expected[brute_force_voxels(w.geometry, SHAPE, HEIGHT)] = i
        np.testing.assert_array_equal(labels, expected, err_msg=f"seed {seed}")
        np.testing.assert_array_equal(scene.thickness, (expected > 0).sum(axis=0))
        wires += len(scene.wires)
    assert wires > 150


def test_paper_preset_wires_equal_brute_force_voxelisation() -> None:
    """The paper preset's wire sizes (12-50 px wide, up to 450 long, 200 voxels high) on a
    128 x 128 field, so the brute force stays affordable."""
    cfg = load_yaml(resolve_config("paper", "synthetic"), SceneConfig)
    cfg = cfg.model_copy(update={"domain": cfg.domain.model_copy(update={"width": 128, "depth": 128})})
    shape, height = (128, 128), cfg.domain.height
    checked = 0
    for seed in range(2):
        scene = generate_scene(cfg, np.random.default_rng(seed))
        labels = voxelise(scene)
        for i, w in enumerate(scene.wires, start=1):
            np.testing.assert_array_equal(labels == i, brute_force_voxels(w.geometry, shape, height))
            checked += 1
    assert checked >= 8


def whole_box_thickness(g: WireGeometry, shape: tuple[int, int]) -> tuple[tuple[int, int, int, int], np.ndarray]:
    """Column extents over the wire's whole bounding box, every pixel evaluated (no band)."""
    box = g.bounding_box(shape)
    assert box is not None
    y0, y1, x0, x1 = box
    ys = (np.arange(y0, y1, dtype=np.float64) + 0.5)[:, None]
    xs = (np.arange(x0, x1, dtype=np.float64) + 0.5)[None, :]
    s, u = local_coordinates(g, ys, xs)
    thick, _ = profile(g, u, half_width_along(g, s))
    return box, np.where((s >= 0.0) & (s <= g.length), thick, 0.0)


def test_rasterise_visits_every_pixel_of_the_wire() -> None:
    """Only the band around the axis is visited; evaluating the whole box finds the same columns
    with the same extents, for random wires (bent, tapered, rough, capped, any angle, partly
    outside the field) and the axis-parallel and diagonal angles where the band is degenerate."""
    rng = np.random.default_rng(5)
    shape = (160, 160)
    for i in range(300):
        angle = [0.0, 90.0, 45.0, 135.0, 1e-7, 179.9999][i % 6] if i % 3 == 0 else float(rng.uniform(0, 180))
        width, length = float(rng.uniform(2, 50)), float(rng.uniform(3, 200))
        rough = i % 2 == 0
        g = WireGeometry(
            (float(rng.uniform(-30, 190)), float(rng.uniform(-30, 190))), angle, length, width,
            width * float(rng.uniform(0.3, 1.0)), ("rectangle", "hexagon")[i % 2], taper=float(rng.uniform(0, 0.5)),
            sagitta=float(rng.uniform(-0.1, 0.1)) * length if i % 4 == 1 else 0.0,
            rough_coeffs=tuple(float(v) for v in rng.normal(0, 0.04, 4)) if rough else (),
            rough_phases=tuple(float(v) for v in rng.uniform(0, 6, 4)) if rough else (),
            end_cap=("flat", "round", "faceted")[i % 3],
        )
        cols = rasterise(g, shape)
        if cols is None:
            assert g.bounding_box(shape) is None
            continue
        box, expected = whole_box_thickness(g, shape)
        assert cols.box == box
        np.testing.assert_array_equal(cols.thickness, np.maximum(expected, 0.0), err_msg=f"wire {i}: {g}")
