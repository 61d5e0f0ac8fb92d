"""Per-particle statistics against the synthetic generator's ground-truth geometry."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from nanoseg.config_io import parse_config
from nanoseg.instances import BoxMasks
from nanoseg.particle_stats import (
    HISTOGRAM_EDGES,
    BoxValues,
    Histogram,
    frame_summary,
    orientation_from_skimage,
    particle_table,
)
from nanoseg_training.scene import DepositedWire, generate_scene
from nanoseg_training.synthetic_config import SceneConfig
from nanoseg_training.wire_geometry import WireGeometry, rasterise

SHAPE = (256, 256)


def _isolated_wires(width: tuple[float, float], n: int, seed: int) -> list[DepositedWire]:
    """n generated single-wire scenes whose wire lies entirely inside the field."""
    cfg = parse_config(
        {
            "domain": {"width": SHAPE[1], "depth": SHAPE[0], "height": 100},
            "wires": {
                "count": {"low": 1, "high": 1},
                "length": {"low": 60, "high": 220},
                "width": {"low": width[0], "high": width[1]},
                "field_margin": 0.0,
            },
        },
        SceneConfig,
    )
    rng = np.random.default_rng(seed)
    wires: list[DepositedWire] = []
    while len(wires) < n:
        scene = generate_scene(cfg, rng)
        if scene.wires and not scene.wires[0].truncated:
            wires.append(scene.wires[0])
    return wires


def _wire_mask(angle: float, length: float, width: float, centre: tuple[float, float] = (128, 128)) -> np.ndarray:
    a = math.radians(angle)
    ux, uy = math.cos(a), -math.sin(a)
    start = (centre[0] - length / 2 * ux, centre[1] - length / 2 * uy)
    g = WireGeometry(start=start, angle_deg=angle, length=length, width=width, thickness=10)
    cols = rasterise(g, SHAPE)
    assert cols is not None
    return cols.footprint(SHAPE)


def _angle_diff(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.abs((a - b + 90.0) % 180.0 - 90.0)


def test_isolated_generated_wires_match_ground_truth_geometry() -> None:
    wires = _isolated_wires(width=(16, 50), n=30, seed=7)
    masks = np.stack([w.full_mask(SHAPE) for w in wires])
    t = particle_table(masks, None, None)
    g_len = np.array([w.geometry.length for w in wires])
    g_wid = np.array([w.geometry.width for w in wires])
    g_ang = np.array([w.geometry.angle_deg for w in wires])
    assert np.all(np.abs(t.length_px / g_len - 1) < 0.05)
    assert np.all(np.abs(t.width_px / g_wid - 1) < 0.05)
    assert np.all(_angle_diff(t.orientation_deg, g_ang) < 2.0)
    centres = np.array([w.geometry.centre for w in wires])
    assert np.all(np.hypot(t.centroid_x - centres[:, 0], t.centroid_y - centres[:, 1]) < 0.75)
    np.testing.assert_array_equal(t.area_px, [w.area for w in wires])
    np.testing.assert_allclose(t.aspect_ratio, t.length_px / t.width_px)
    assert np.all((t.orientation_deg >= 0) & (t.orientation_deg < 180))
    # a digitised rectangle: its convex hull (of pixel corners) adds the staircase edges
    assert np.all(t.solidity > 0.9)
    assert np.all(np.abs(t.perimeter_px / (2 * (g_len + g_wid)) - 1) < 0.1)
    assert np.all(t.eccentricity > 0.5)


def test_thin_wire_width_is_within_digitisation_limit() -> None:
    wires = _isolated_wires(width=(6, 16), n=20, seed=11)
    t = particle_table(np.stack([w.full_mask(SHAPE) for w in wires]), None, None)
    # an edge at 45 deg is only known to ~ +-0.7 px; the relative error grows as wires thin
    assert np.all(np.abs(t.width_px - [w.geometry.width for w in wires]) < 0.75)
    assert np.all(_angle_diff(t.orientation_deg, np.array([w.geometry.angle_deg for w in wires])) < 2.0)


@pytest.mark.parametrize("angle", [0.0, 30.0, 90.0, 150.0, 179.0])
def test_orientation_is_ccw_from_x_with_y_down(angle: float) -> None:
    t = particle_table(_wire_mask(angle, 120, 12)[None], None, None)
    assert _angle_diff(t.orientation_deg, np.array([angle]))[0] < 1.0


def test_skimage_orientation_conversion() -> None:
    assert orientation_from_skimage(math.pi / 2) == pytest.approx(0.0)  # along columns: horizontal
    assert orientation_from_skimage(0.0) == pytest.approx(90.0)  # along rows: vertical
    assert orientation_from_skimage(-math.pi / 3) == pytest.approx(30.0)
    assert orientation_from_skimage(math.pi / 4) == pytest.approx(135.0)


def test_overlap_coverage_mean_od_and_physical_units() -> None:
    a = _wire_mask(0.0, 150, 20)
    b = _wire_mask(90.0, 150, 10)
    c = _wire_mask(45.0, 40, 10, centre=(30, 220))
    masks = np.stack([a, b, c])
    od = 0.1 * a + 0.2 * b + 0.05 * c
    t = particle_table(masks, od.astype(np.float32), pixel_size_nm=8.0)
    both = np.count_nonzero(a & b)
    assert both > 0
    np.testing.assert_allclose(t.overlap_fraction, [both / a.sum(), both / b.sum(), 0.0])
    assert t.covered_px == np.count_nonzero(a | b | c)
    assert t.mean_od is not None
    assert t.mean_od[0] == pytest.approx(0.1 + 0.2 * both / a.sum(), rel=1e-5)
    assert t.mean_od[2] == pytest.approx(0.05, rel=1e-5)
    assert t.area_nm2 is not None and t.length_nm is not None and t.width_nm is not None
    np.testing.assert_allclose(t.area_nm2, t.area_px * 64.0)
    np.testing.assert_allclose(t.length_nm, t.length_px * 8.0)
    assert t.width_nm[1] == pytest.approx(80.0, rel=0.05)
    bare = particle_table(masks, None, None)
    assert bare.area_nm2 is None and bare.mean_od is None and "area_nm2" not in bare.columns()


def test_the_od_cut_to_the_boxes_gives_the_same_table() -> None:
    """``BoxValues.of(od, masks)`` (what a statistics worker is handed) for the whole OD image:
    the same table to the last bit, dense or box-local masks, an empty mask among them."""
    a = _wire_mask(0.0, 150, 20)
    b = _wire_mask(90.0, 150, 10)
    masks = np.stack([a, np.zeros_like(a), b])
    od = np.random.default_rng(0).random(SHAPE, dtype=np.float32) + 0.1 * a
    for m in (masks, BoxMasks.from_dense(masks)):
        cut = BoxValues.of(od, m)
        assert cut.shape == SHAPE and sum(c.size for c in cut.crops) < od.size / 2
        whole, boxed = particle_table(m, od, 8.0), particle_table(m, cut, 8.0)
        assert whole.mean_od is not None and boxed.mean_od is not None
        assert np.array_equal(whole.mean_od, boxed.mean_od, equal_nan=True)
        assert json.dumps(whole.to_dict()) == json.dumps(boxed.to_dict())
    with pytest.raises(ValueError, match="od shape"):
        particle_table(masks, BoxValues.of(od[:100], masks[:, :100]), None)


def test_empty_mask_row_is_kept_and_serialises_as_null() -> None:
    masks = np.stack([_wire_mask(10.0, 80, 12), np.zeros(SHAPE, bool)])
    t = particle_table(masks, None, 5.0)
    assert len(t) == 2 and t.area_px[1] == 0 and math.isnan(t.length_px[1])
    rec = t.to_records()
    assert rec[1]["length_px"] is None and rec[1]["area_px"] == 0 and rec[0]["area_px"] == t.area_px[0]
    json.dumps(t.to_dict(), allow_nan=False)
    json.dumps(rec, allow_nan=False)
    s = frame_summary(t)
    assert s.stats["length_px"].mean == pytest.approx(t.length_px[0])


def test_an_empty_mask_counts_in_no_summary() -> None:
    """Under every edge rule a frame of one wire and one empty mask summarises as the wire alone."""
    wire = _wire_mask(10.0, 80, 12)
    with_empty = particle_table(np.stack([wire, np.zeros(SHAPE, bool)]), None, 5.0)
    alone = particle_table(wire[None], None, 5.0)
    for rule in ("include", "exclude", "miles_lantuejoul"):
        got, want = frame_summary(with_empty, rule), frame_summary(alone, rule)
        assert (got.count, got.counted) == (2, want.counted)
        assert got.stats["area_px"].mean == want.stats["area_px"].mean
        assert got.histograms == want.histograms


def _segment(a: tuple[float, float], b: tuple[float, float], width: float) -> np.ndarray:
    """A stroke of ``width`` px from a to b (x, y px): pixels whose centre is within width / 2."""
    yy, xx = np.mgrid[: SHAPE[0], : SHAPE[1]] + 0.5
    (ax, ay), (bx, by) = a, b
    dx, dy = bx - ax, by - ay
    t = np.clip(((xx - ax) * dx + (yy - ay) * dy) / (dx * dx + dy * dy), 0, 1)
    return np.hypot(xx - ax - t * dx, yy - ay - t * dy) <= width / 2


@pytest.mark.parametrize(("name", "arms", "width"), [
    ("L", (((30, 30), (30, 130)), ((30, 130), (130, 130))), 6.0),
    ("V", (((60, 200), (140, 200)), ((140, 200), (100, 130.7))), 8.0),
])
def test_a_sharply_bent_wire_keeps_its_centreline_length(name: str, arms: tuple, width: float) -> None:
    """An L or a V has a low moment aspect ratio (like a stubby rod) but a long centreline: its
    length follows the bend, its width is the stroke's and its tortuosity is well above 1."""
    mask = _segment(arms[0][0], arms[0][1], width) | _segment(arms[1][0], arms[1][1], width)
    truth = sum(math.dist(a, b) for a, b in arms)
    t = particle_table(mask[None])
    assert t.major_px[0] < 2.5 * t.minor_px[0]  # stubby by its moments
    assert t.length_px[0] == pytest.approx(truth, rel=0.03)
    assert t.width_px[0] == pytest.approx(width, abs=0.6)
    assert t.tortuosity[0] == pytest.approx(truth / math.dist(arms[0][0], arms[1][1]), rel=0.05)


@pytest.mark.parametrize("n", [10, 11, 40])
def test_a_one_pixel_diagonal_wire_is_one_piece(n: int) -> None:
    """Pixels touching at their corners are one wire (8-connected), not n one-pixel pieces."""
    mask = np.zeros(SHAPE, bool)
    mask[np.arange(n) + 20, np.arange(n) + 20] = True
    t = particle_table(mask[None])
    assert t.length_px[0] == pytest.approx(n * math.sqrt(2), rel=0.05)
    assert t.width_px[0] == pytest.approx(1 / math.sqrt(2), rel=0.05)


@pytest.mark.parametrize("shape", ["square", "disk", "stubby rod"])
def test_a_stubby_particle_centreline_is_consistent(shape: str) -> None:
    """A stubby particle's centreline is scaled to its length: the polyline is that long, its
    tortuosity >= 1, and its length is never below its mean width (a disk: aspect ratio 1)."""
    yy, xx = np.mgrid[: SHAPE[0], : SHAPE[1]] + 0.5
    mask = {"square": (abs(xx - 100) < 10) & (abs(yy - 100) < 10),
            "disk": np.hypot(xx - 100, yy - 100) <= 30,
            "stubby rod": _wire_mask(30.0, 40, 20)}[shape]
    t = particle_table(mask[None])
    cl = t.centrelines[0]
    assert cl is not None
    assert float(np.sum(np.hypot(*np.diff(cl.points, axis=0).T))) == pytest.approx(t.length_px[0], rel=1e-9)
    assert t.tortuosity[0] >= 1.0 and t.aspect_ratio[0] >= 1.0
    assert t.length_px[0] >= t.width_px[0]
    if shape == "disk":
        assert t.aspect_ratio[0] == 1.0 and t.length_px[0] == pytest.approx(math.sqrt(t.area_px[0]))
    if shape == "square":
        assert t.length_px[0] == pytest.approx(20.0)


def test_frame_summary_statistics_and_fixed_histograms() -> None:
    masks = np.stack(
        [
            _wire_mask(5.0, 200, 12),
            _wire_mask(175.0, 100, 12, centre=(128, 60)),
            _wire_mask(15.0, 50, 10, centre=(60, 200)),
        ]
    )
    t = particle_table(masks, None, 8.0)
    s = frame_summary(t)
    assert s.count == 3
    assert s.coverage_fraction == pytest.approx(np.count_nonzero(masks.any(0)) / masks[0].size)
    st = s.stats["length_px"]
    assert (st.mean, st.median, st.std) == pytest.approx(
        (t.length_px.mean(), np.median(t.length_px), t.length_px.std())
    )
    # axial statistics: 5 and 175 deg are 10 deg apart, their mean is ~0/180, not 90
    o = s.stats["orientation_deg"]
    assert o.mean is not None and min(o.mean, 180 - o.mean) < 6.0
    assert s.orientation_order is not None and s.orientation_order > 0.9
    hist = s.histograms["orientation_deg"]
    assert hist.edges == tuple(range(0, 181, 10))
    assert (hist.counts[0], hist.counts[1], hist.counts[17]) == (1, 1, 1)
    for name, h in s.histograms.items():
        assert h.edges == HISTOGRAM_EDGES[name]
        assert sum(h.counts) + h.underflow + h.overflow == 3
    assert set(s.histograms) >= {"area_px", "length_px", "width_px", "aspect_ratio", "area_nm2", "length_nm"}
    d = s.to_dict()
    json.dumps(d, allow_nan=False)
    assert d["count"] == 3 and d["histograms"]["orientation_deg"]["counts"][0] == 1


def test_histograms_of_frames_merge() -> None:
    edges = HISTOGRAM_EDGES["aspect_ratio"]
    a = Histogram.of(np.array([0.5, 2.0, 3.0]), edges)
    b = Histogram.of(np.array([2.1, 500.0, np.nan]), edges)
    m = a.merge(b)
    assert (m.underflow, m.overflow, sum(m.counts)) == (1, 1, 3)
    with pytest.raises(ValueError):
        a.merge(Histogram.of(np.array([1.0]), HISTOGRAM_EDGES["orientation_deg"]))


def test_empty_table_summary() -> None:
    s = frame_summary(particle_table(np.zeros((0, 8, 8), bool), None, None))
    assert s.count == 0 and s.coverage_fraction == 0.0 and s.stats["area_px"].mean is None
    json.dumps(s.to_dict(), allow_nan=False)


def test_rounding_follows_the_unit_in_the_column_name() -> None:
    from nanoseg.particle_stats import round_value

    assert round_value("length_px", 123.456789) == 123.46 and round_value("length_nm", 987.654321) == 987.7
    assert round_value("area_nm2", 12345.6) == 12346.0 and round_value("orientation_deg", 12.3456) == 12.35
    assert round_value("length_nm_median_lo", 1.26) == 1.3 and round_value("solidity", 0.987654) == 0.9877
    assert round_value("area_px", 12) == 12 and round_value("touches_edge", True) is True
    t = particle_table(_wire_mask(30.0, 100, 10)[None], None, 8.0)
    rec = t.to_records(rounded=True)[0]
    assert rec["length_nm"] == round(float(t.length_nm[0]), 1) and rec["width_px"] == round(float(t.width_px[0]), 2)  # type: ignore[index]


@pytest.mark.parametrize("pixel_size_nm, with_od", [(None, False), (8.0, True)])
def test_a_frame_without_particles_gets_the_table_the_measurements_give(pixel_size_nm: float | None,
                                                                          with_od: bool) -> None:
    """No masks: the table made once (frames without particles are common in a live stream) is
    the one the measuring path makes: every column's dtype and emptiness, the frame's shape, no
    coverage; and stored or published it is the same, whichever box-local or stacked masks came."""
    from nanoseg.instances import BoxMasks
    from nanoseg.particle_stats import _table

    od = np.zeros((6, 9), np.float32) if with_od else None
    got = particle_table(np.zeros((0, 6, 9), bool), od, pixel_size_nm)
    want = _table(np.zeros((0, 6, 9), bool), od, pixel_size_nm)
    boxed = particle_table(BoxMasks.from_dense(np.zeros((0, 6, 9), bool)), od, pixel_size_nm)
    for name in ("frame_shape", "covered_px", "pixel_size_nm", "centrelines"):
        assert getattr(got, name) == getattr(want, name) == getattr(boxed, name)
    assert got.frame_shape == (6, 9) and got.covered_px == 0 and len(got) == 0
    for name, col in want.columns().items():
        assert got.columns()[name].dtype == col.dtype and got.columns()[name].shape == (0,), name
    assert got.columns().keys() == want.columns().keys()
    assert (got.mean_od is None) == (not with_od) and (got.area_nm2 is None) == (pixel_size_nm is None)
    assert got.to_dict() == want.to_dict() and frame_summary(got).to_dict() == frame_summary(want).to_dict()
    if pixel_size_nm is not None:  # an int pixel size is not the float one's cached table
        as_int = particle_table(np.zeros((0, 6, 9), bool), od, int(pixel_size_nm))
        assert as_int.area_nm2 is not None and as_int.pixel_size_nm == 8 and type(as_int.pixel_size_nm) is int
        assert as_int.area_nm2.dtype == _table(np.zeros((0, 6, 9), bool), od, int(pixel_size_nm)).area_nm2.dtype
