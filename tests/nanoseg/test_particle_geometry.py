"""Wire geometry (centreline, width profile, Feret) against the generator's true geometry."""

from __future__ import annotations

import math

import numpy as np
import pytest

from nanoseg.particle_geometry import centreline, feret
from nanoseg.particle_stats import particle_table
from nanoseg_training.wire_geometry import WireGeometry, centreline_length, mean_width, rasterise

SHAPE = (320, 320)


def _mask(length: float, width: float, angle: float, *, sagitta: float = 0.0, taper: float = 0.0,
          centre: tuple[float, float] = (160.3, 159.7)) -> tuple[np.ndarray, WireGeometry]:
    a = math.radians(angle)
    ux, uy = math.cos(a), -math.sin(a)
    g = WireGeometry(start=(centre[0] - length / 2 * ux, centre[1] - length / 2 * uy), angle_deg=angle,
                     length=length, width=width, thickness=10, sagitta=sagitta, taper=taper)
    cols = rasterise(g, SHAPE)
    assert cols is not None
    m = np.zeros(SHAPE, bool)
    y0, y1, x0, x1 = cols.box
    m[y0:y1, x0:x1] = cols.thickness > 0
    return m, g


def _random_wires(kind: str, n: int, seed: int) -> list[tuple[np.ndarray, WireGeometry]]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        length, width, angle = rng.uniform(80, 240), rng.uniform(6, 28), rng.uniform(0, 180)
        sag = rng.uniform(0.05, 0.15) * length * rng.choice([-1, 1]) if kind == "bent" else 0.0
        taper = rng.uniform(0.2, 0.5) if kind == "tapered" else 0.0
        out.append(_mask(length, width, angle, sagitta=sag, taper=taper))
    return out


@pytest.mark.parametrize("kind", ["straight", "bent", "tapered"])
def test_centreline_length_and_mean_width_match_truth(kind: str) -> None:
    wires = _random_wires(kind, 12, seed={"straight": 1, "bent": 2, "tapered": 3}[kind])
    t = particle_table(np.stack([m for m, _ in wires]))
    true_len = np.array([centreline_length(g) for _, g in wires])
    true_wid = np.array([mean_width(g) for _, g in wires])
    rel = np.abs(t.length_px / true_len - 1)
    assert np.median(rel) < 0.02 and rel.max() < 0.05
    assert np.median(np.abs(t.width_px - true_wid)) < 0.5
    if kind == "bent":  # the second-moment length of a bent wire is short; the centreline is not
        chord_len = np.sqrt(3) / 2 * t.major_px
        assert np.all(chord_len < true_len) and np.all(t.tortuosity > 1.005)
        sag = np.array([abs(g.sagitta) for _, g in wires])
        assert np.all(np.abs(t.bow_px - sag) < 0.15 * sag + 1.5)
    else:
        assert np.all(t.tortuosity < 1.02)


def test_tapered_width_profile_runs_from_full_to_narrow() -> None:
    m, _g = _mask(200, 24, 30.0, taper=0.5)
    cl = centreline(m)
    assert cl is not None
    assert cl.width_px.max() == pytest.approx(24, abs=2.0) and cl.width_px.min() == pytest.approx(12, abs=2.0)
    # the profile is ordered along the wire: one end wide, the other narrow
    ends = cl.width_px[:3].mean(), cl.width_px[-3:].mean()
    assert max(ends) - min(ends) > 6


@pytest.mark.parametrize("angle", [0.0, 17.0, 45.0, 90.0, 123.4, 160.0])
def test_min_feret_of_a_straight_prism_is_its_width(angle: float) -> None:
    m, _g = _mask(150, 14.6, angle)
    f = feret(m)
    assert f.min_px == pytest.approx(14.6, abs=0.5)
    assert f.max_px == pytest.approx(math.hypot(150, 14.6), abs=1.5)
    assert abs((f.angle_deg - angle + 90) % 180 - 90) < 6.0  # the diagonal, within atan(W / L)


def test_edge_touching_and_overlap_flags() -> None:
    inside, _ = _mask(100, 10, 0.0)
    cut, _ = _mask(100, 10, 0.0, centre=(20.0, 40.0))  # its left end leaves the frame
    crossing, _ = _mask(100, 10, 90.0)
    t = particle_table(np.stack([inside, cut, crossing]))
    assert t.touches_edge.tolist() == [False, True, False]
    assert t.overlapped.tolist() == [True, False, True]
    assert t.length_px[1] == pytest.approx(70, abs=1.5)  # only the visible part is measured
    assert t.bbox_width_px.tolist()[1] == 70 and t.bbox_height_px[0] == 10


def test_a_wire_seen_in_two_pieces_adds_their_lengths() -> None:
    m, _ = _mask(120, 12, 0.0)
    cols = np.flatnonzero(m.any(axis=0))
    m[:, cols[0] + 55 : cols[0] + 65] = False  # a crossing wire hides 10 px of it
    t = particle_table(m[None])
    assert t.length_px[0] == pytest.approx(110, abs=2.0) and t.width_px[0] == pytest.approx(12, abs=0.5)
    assert t.tortuosity[0] == pytest.approx(1.0, abs=0.02)


@pytest.mark.parametrize(("h", "w"), [(2, 2), (2, 10), (3, 10), (10, 150), (1, 10)])
def test_feret_spans_the_bounding_box_and_the_min_feret(h: int, w: int) -> None:
    """No caliper is wider than the largest, and the largest spans the pixels' box (short
    axis-aligned bars, where the corner estimate alone fell short of both)."""
    mask = np.zeros((h + 4, w + 4), bool)
    mask[2:2 + h, 2:2 + w] = True
    f = feret(mask)
    assert f.max_px >= max(h, w) and f.max_px >= f.min_px
    assert f.max_px <= math.hypot(h, w) + 1e-9
