"""daemon/plans.py: the pure decisions of the plans (the plans themselves run in
tests/simulator/test_beamline_loop.py against a real daemon)."""

from __future__ import annotations

import math

import pytest

from nanoseg_daemon.plans import GrowthStop, next_exposure


def test_growth_stop_on_target_uses_the_smoothed_length() -> None:
    stop = GrowthStop(target_nm=500, stall_rate_nm_per_frame=5, stall_frames=3, smoothing=0.5)
    verdicts = [stop.update(x) for x in (300, 400, 700, 600)]
    # smoothed: 300, 350, 525 -> the single 700 nm frame lifts the average over 500 only at frame 3
    assert verdicts == [None, None, "target_reached", "target_reached"]
    assert stop.smoothed[:3] == [300, 350, 525]


def test_growth_stop_with_significance_waits_for_the_interval() -> None:
    stop = GrowthStop(target_nm=500, stall_rate_nm_per_frame=5, stall_frames=9, smoothing=1.0, significant=True)
    # (mean, lower 95 % bound): the mean passes 500 at frame 2, its interval only at frame 3
    assert [stop.update(m, lo) for m, lo in ((450, 400), (520, 470), (560, 505))] == [None, None, "target_reached"]
    plain = GrowthStop(target_nm=500, stall_rate_nm_per_frame=5, stall_frames=9, smoothing=1.0)
    assert plain.update(520, 470) == "target_reached"


def test_growth_stop_on_stall_after_consecutive_slow_frames() -> None:
    stop = GrowthStop(target_nm=10_000, stall_rate_nm_per_frame=5, stall_frames=3, smoothing=1.0)
    lengths = [100, 200, 202, 300, 302, 303, 304]
    verdicts = [stop.update(x) for x in lengths]
    # rates: -, 100, 2 (1), 98 (reset), 2 (1), 1 (2), 1 (3) -> stalled at the 7th frame
    assert verdicts == [None] * 6 + ["stalled"]


def test_growth_stop_ignores_frames_without_particles() -> None:
    stop = GrowthStop(target_nm=1000, stall_rate_nm_per_frame=5, stall_frames=2, smoothing=1.0)
    assert [stop.update(x) for x in (100, math.nan, math.nan, 200, 201)] == [None] * 5
    assert stop.stalled == 1


@pytest.mark.parametrize(("counts", "exposure", "expected"), [
    ([0], 0.1, 0.2),  # too few particles: more signal
    ([5, 1], 0.8, 1.0),  # capped at the upper limit
    ([5, 6], 0.1, 0.05),  # stable within 1: save dose
    ([5, 6], 0.006, 0.005),  # floored at the lower limit
    ([3, 9], 0.1, 0.1),  # changing: keep
    ([7], 0.1, 0.1),  # one frame cannot be stable
])
def test_next_exposure(counts: list[int], exposure: float, expected: float) -> None:
    got = next_exposure(counts, exposure, min_count=3, stable_frames=2, tolerance=1, limits=(0.005, 1.0))
    assert got == pytest.approx(expected)


def test_plan_arguments_may_be_numpy_numbers_but_not_bools() -> None:
    """A session's ``np.arange`` gives np.int64 and np.float32: valid values pass the checks (they
    were refused as "not an integer"); a bool is still no number."""
    import numpy as np

    from nanoseg_daemon.plans import GrowthStop, check_number

    check_number("max_frames", np.int64(3), ge=1, integer=True)
    check_number("target_nm", np.float32(500.0), gt=0)
    GrowthStop(np.float32(500.0), np.float64(1.0), np.int64(3))
    for bad in (True, np.bool_(True)):
        with pytest.raises(ValueError, match="max_frames must be an integer"):
            check_number("max_frames", bad, ge=1, integer=True)
    with pytest.raises(ValueError, match="must be an integer"):
        check_number("max_frames", np.float64(3.0), ge=1, integer=True)
