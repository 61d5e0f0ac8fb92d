"""Counting rules for edge particles and bootstrap intervals of the frame summaries."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from nanoseg.particle_stats import frame_summary, particle_table
from nanoseg.summary_stats import edge_weights, median_all, stat_with_interval, weighted_stats
from nanoseg_training.wire_geometry import WireGeometry, rasterise

FIELD = (256, 256)


def _field_of_view_wires(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Masks of straight wires, half 30 px and half 120 px long, centres uniform over a region that
    extends past the frame by more than a wire, so the frame cuts wires as a microscope does."""
    rng = np.random.default_rng(seed)
    masks, lengths = [], []
    for k in range(n):
        length = 30.0 if k % 2 else 120.0
        cx, cy = rng.uniform(-70, FIELD[1] + 70), rng.uniform(-70, FIELD[0] + 70)
        a = rng.uniform(0, 180)
        ux, uy = math.cos(math.radians(a)), -math.sin(math.radians(a))
        g = WireGeometry(start=(cx - length / 2 * ux, cy - length / 2 * uy), angle_deg=a, length=length,
                         width=8.0, thickness=8)
        cols = rasterise(g, FIELD)
        if cols is None or not (cols.thickness > 0).any():
            continue  # never seen by the microscope
        m = np.zeros(FIELD, bool)
        y0, y1, x0, x1 = cols.box
        m[y0:y1, x0:x1] = cols.thickness > 0
        masks.append(m)
        lengths.append(length)
    return np.stack(masks), np.array(lengths)


def test_miles_lantuejoul_corrects_the_edge_bias_of_mean_length() -> None:
    masks, _ = _field_of_view_wires(400, seed=3)
    t = particle_table(masks)
    assert t.touches_edge.sum() > 0.3 * len(t)
    true_mean = 75.0  # whole wires: half 30 px, half 120 px
    means = {}
    for rule in ("include", "exclude", "miles_lantuejoul"):
        w = edge_weights(rule, t.touches_edge, t.bbox_width_px, t.bbox_height_px, FIELD)
        ok = w > 0
        means[rule] = float(weighted_stats(t.length_px[ok], w[ok])[0])
    # cut wires count short, and long wires are whole in the field less often than short ones
    assert means["include"] < 0.85 * true_mean and means["exclude"] < 0.85 * true_mean
    assert means["miles_lantuejoul"] == pytest.approx(true_mean, rel=0.08)
    s = frame_summary(t, "miles_lantuejoul")
    assert s.edge_rule == "miles_lantuejoul" and s.counted == int((~t.touches_edge).sum())
    assert s.stats["length_px"].mean == pytest.approx(means["miles_lantuejoul"])
    assert s.to_dict()["edge_rule"] == "miles_lantuejoul"


def test_edge_weights_are_the_inverse_share_of_positions_where_the_box_fits() -> None:
    w = edge_weights("miles_lantuejoul", np.array([False, True, False]), np.array([10.0, 5.0, 100.0]),
                     np.array([20.0, 5.0, 50.0]), (100, 200))
    assert w[0] == pytest.approx(200 * 100 / (190 * 80)) and w[1] == 0.0 and w[2] == pytest.approx(200 * 100 / (100 * 50))
    assert edge_weights("exclude", np.array([True, False]), np.ones(2), np.ones(2), (9, 9)).tolist() == [0.0, 1.0]
    with pytest.raises(ValueError, match="edge rule"):
        edge_weights("guess", np.array([True]), np.ones(1), np.ones(1), (9, 9))  # type: ignore[arg-type]


def test_weighted_median_equals_numpy_for_unit_weights() -> None:
    rng = np.random.default_rng(0)
    for n in (1, 2, 5, 8):
        x = rng.normal(size=(7, n))
        _, med, std = weighted_stats(x, np.ones_like(x))
        np.testing.assert_allclose(med, np.median(x, axis=-1))
        np.testing.assert_allclose(std, x.std(axis=-1))


def test_bootstrap_interval_covers_the_median_is_seeded_and_sizes_the_sample() -> None:
    rng = np.random.default_rng(5)
    hits = 0
    for _ in range(40):  # a 95 % interval covers the true median (0) in most of 40 samples
        x = rng.normal(size=60)
        s = stat_with_interval(x + 100.0, np.ones(60), 400, np.random.default_rng(1), 0.01)
        assert s.median_lo is not None and s.median_hi is not None
        hits += s.median_lo <= 100.0 <= s.median_hi
    assert hits >= 34
    x = rng.lognormal(mean=5, sigma=0.4, size=50)
    a = stat_with_interval(x, np.ones(50), 1000, np.random.default_rng(7), 0.05)
    b = stat_with_interval(x, np.ones(50), 1000, np.random.default_rng(7), 0.05)
    assert a == b and a.mean_lo is not None and a.mean_lo < a.mean < (a.mean_hi or 0)
    # the median's relative standard error ~ 1.25 sigma / sqrt(n) = 0.071 at n = 50 (sigma = 0.4 in
    # log), half width 1.96 x that = 0.139: 50 (0.139 / 0.05)^2 ~ 390 particles for +-5 %
    assert a.n_for_target is not None and 250 < a.n_for_target < 600
    looser = stat_with_interval(x, np.ones(50), 1000, np.random.default_rng(7), 0.10)
    assert looser.n_for_target is not None and looser.n_for_target < a.n_for_target


def test_summary_intervals_in_nm_are_the_px_intervals_scaled() -> None:
    masks, _ = _field_of_view_wires(30, seed=4)
    s = frame_summary(particle_table(masks, pixel_size_nm=4.0))
    px, nm = s.stats["length_px"], s.stats["length_nm"]
    assert px.median_lo is not None and nm.median_lo == pytest.approx(4 * px.median_lo)
    assert s.stats["area_nm2"].mean_hi == pytest.approx(16 * (s.stats["area_px"].mean_hi or 0))
    assert s.stats["solidity"].median_lo is None  # intervals only where they are reported
    json.dumps(s.to_dict(), allow_nan=False)
    assert frame_summary(particle_table(masks, pixel_size_nm=4.0)).to_dict() == s.to_dict()


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.uint16, np.int32])
@pytest.mark.parametrize("shape", [(1,), (2,), (7, 5), (128, 128), (129, 131), (3, 4, 5), (300, 301), (300, 300)])
def test_median_all_is_numpys_median_to_the_last_bit(dtype: type, shape: tuple[int, ...]) -> None:
    rng = np.random.default_rng(sum(shape))
    a = (rng.normal(1000.0, 300.0, shape) if np.dtype(dtype).kind == "f" else rng.integers(0, 4000, shape)).astype(dtype)
    a.flat[: a.size // 3] = a.flat[0]  # ties, as in a padded or saturated image
    got, want = median_all(a), float(np.median(a))
    assert got == want and type(got) is float


def test_median_all_propagates_nan_and_refuses_empty() -> None:
    a = np.arange(10, dtype=np.float32)
    a[3] = np.nan
    assert math.isnan(median_all(a)) and math.isnan(float(np.median(a)))
    with pytest.raises(ValueError, match="at least one value"):
        median_all(np.zeros((0, 4), np.float32))
