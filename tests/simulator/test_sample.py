"""simulator/sample.py: growth and raster samples, the camera's physics, the ground truth."""

from __future__ import annotations

import math

import numpy as np
import pytest

from nanoseg.config_io import load_yaml
from nanoseg.paths import resolve_config
from nanoseg_sim.config import DetectorSection, GrowthSection, RasterSection
from nanoseg_sim.sample import (
    GrowthSample,
    RasterSample,
    field_config,
    frame_truth,
    i0_counts,
    transmission_frame,
)
from nanoseg_training.scene import deposit
from nanoseg_training.synthetic_config import Range, SceneConfig
from nanoseg_training.wire_geometry import WireGeometry


@pytest.fixture(scope="module")
def scene_cfg() -> SceneConfig:
    return field_config(load_yaml(resolve_config("paper", "synthetic"), SceneConfig), 192)


def growth(**kw: object) -> GrowthSection:
    base = {"initial_wires": 3, "nucleation_per_min": 2.0, "nucleation_until_s": 300.0, "initial_length_nm": 160.0,
            "growth_rate_nm_per_s": Range(low=2.0, high=2.0), "final_length_nm": Range(low=800, high=800),
            "width_nm": Range(low=120, high=120), "margin_px": 40}
    return GrowthSection(**{**base, **kw})  # type: ignore[arg-type]


def test_wires_nucleate_grow_at_their_rate_and_stop_at_their_final_length(scene_cfg: SceneConfig) -> None:
    s = GrowthSample(scene_cfg, growth(), seed=1, horizon_s=1000)
    times = [w.nucleated_s for w in s.wires]
    assert times[:3] == [0.0, 0.0, 0.0] and times == sorted(times)
    assert all(t <= 300 for t in times) and len(times) > 3  # ~10 expected by 300 s at 2/min
    w = s.wires[0]
    nm = scene_cfg.pixel_size_nm
    assert w.length_at(-1.0) is None
    assert w.length_at(0.0) == pytest.approx(160 / nm)
    assert w.length_at(100.0) == pytest.approx((160 + 200) / nm)  # 2 nm/s
    assert w.length_at(10_000.0) == pytest.approx(800 / nm)  # stopped at the final length
    # the seed stays where the wire nucleated, whichever way it grows
    for wire in s.wires:
        g0, g1 = wire.geometry_at(wire.nucleated_s), wire.geometry_at(wire.nucleated_s + 200)
        assert g0 is not None and g1 is not None
        ends0 = {tuple(np.round(g0.start, 6)), tuple(np.round(g0.end, 6))}
        ends1 = {tuple(np.round(g1.start, 6)), tuple(np.round(g1.end, 6))}
        assert ends0 & ends1 and 0 <= g1.angle_deg < 180


def test_growth_scenes_gain_wires_and_length_over_time(scene_cfg: SceneConfig) -> None:
    s = GrowthSample(scene_cfg, growth(), seed=2, horizon_s=1000)
    truths = [frame_truth(s.scene_at(0, 0, t), scene_cfg.pixel_size_nm) for t in (0, 120, 240, 400)]
    counts = [t.count for t in truths]
    lengths = [t.length_nm_mean for t in truths]
    assert counts[0] == 3 and counts == sorted(counts) and counts[-1] > 3
    assert lengths[0] == pytest.approx(160) and lengths[-1] > lengths[0]
    assert s.scene_at(0, 0, 240).thickness.sum() > s.scene_at(0, 0, 120).thickness.sum()
    same = GrowthSample(scene_cfg, growth(), seed=2, horizon_s=1000)
    np.testing.assert_array_equal(same.scene_at(5, 5, 240).thickness, s.scene_at(0, 0, 240).thickness)


def test_raster_fields_are_distinct_scenes_at_grid_positions(scene_cfg: SceneConfig) -> None:
    r = RasterSample(scene_cfg, RasterSection(nx=3, ny=2, step_um=10.0), seed=4)
    pos = r.positions()
    assert pos[0] == (-10.0, -5.0) and pos[-1] == (10.0, 5.0) and len(pos) == 6
    assert [r.index_at(x, y) for x, y in pos] == list(range(6))
    assert r.index_at(99.0, -99.0) == 2  # clamped to the grid's corner
    a, b = r.scene_at(*pos[0], 0.0), r.scene_at(*pos[1], 0.0)
    assert not np.array_equal(a.thickness, b.thickness)
    np.testing.assert_array_equal(r.scene_at(-9.0, -4.0, 123.0).thickness, a.thickness)  # time-independent


def test_transmission_counts_follow_beer_lambert(scene_cfg: SceneConfig) -> None:
    det = DetectorSection(dose_rate=50_000, exposure_s=0.1, dark_counts=100, read_noise=2.0, od_per_voxel=0.01,
                          blur_sigma_px=0.0)
    g = WireGeometry(start=(20.0, 96.0), angle_deg=0.0, length=150.0, width=30.0, thickness=40.0)
    scene = deposit(scene_cfg, [g])
    frame = transmission_frame(scene, det, 0.1, np.random.default_rng(0))
    assert frame.dtype == np.uint16 and frame.shape == (192, 192)
    empty = frame[:40].astype(float)
    assert empty.mean() == pytest.approx(i0_counts(det, 0.1), rel=0.005)  # 5000 + 100
    assert empty.std() == pytest.approx(math.sqrt(5000 + 4), rel=0.1)  # Poisson + read noise
    core = frame[90:102, 60:120].astype(float) - det.dark_counts
    assert -np.log(core.mean() / 5000) == pytest.approx(0.40, abs=0.02)  # 40 voxels x 0.01


def test_frame_truth_measures_footprints_like_the_daemon(scene_cfg: SceneConfig) -> None:
    inside = WireGeometry(start=(20.0, 40.0), angle_deg=0.0, length=100.0, width=10.0, thickness=10.0)
    cut = WireGeometry(start=(150.0, 150.0), angle_deg=0.0, length=100.0, width=10.0, thickness=10.0)
    t = frame_truth(deposit(scene_cfg, [inside, cut]), 8.0)
    assert t.count == 2
    assert t.length_px_mean == pytest.approx(100.0)  # drawn lengths
    assert t.visible_length_px_mean == pytest.approx((100 + 42) / 2, abs=1.0)  # 192 - 150 = 42 px in the field
    assert t.visible_width_px_mean == pytest.approx(10.0, abs=0.5)
    assert t.to_dict()["visible_length_nm_mean"] == pytest.approx(8 * t.visible_length_px_mean)
    empty = frame_truth(deposit(scene_cfg, []), 8.0)
    assert empty.count == 0 and empty.to_dict()["length_nm_mean"] is None
