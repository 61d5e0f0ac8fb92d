"""bluesky plans that act on the daemon's analysis, read through ``NanosegStats``.

Both plans acquire one frame per step in the ``primary`` stream, then wait for the daemon's
analysis of exactly that frame (``stats.expect_run_uid``/``expect_seq_num``: the daemon numbers the
frames of a raw run 1, 2, ... in event order) and read it into the ``nanoseg`` stream, so the
plan's own documents hold every value its decisions were made on. A frame the daemon drops makes
the stats Status time out (``stats.timeout_s``) and the plan fail, instead of deciding on stale
numbers.

The decisions themselves are pure objects (``GrowthStop``, ``next_exposure``), testable alone.

Arguments out of range are refused when the plan is made, before the RunEngine starts, with a
``ValueError`` naming the argument (``check_number``). When the stats Status times out, the plan
raises ``NanosegStatsTimeout``, whose message (the address, the wait, what was received) is also
the ``reason`` of the run's stop document (``exit_status`` "fail").
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Generator, Sequence
from dataclasses import dataclass, field
from typing import Any

import bluesky.plan_stubs as bps
import bluesky.preprocessors as bpp
import numpy as np
from bluesky.utils import FailedStatus

from nanoseg_daemon.growth import Ewma
from nanoseg_daemon.ophyd_stats import NanosegStatsTimeout

STATS_STREAM = "nanoseg"
Plan = Generator[Any, Any, Any]


@dataclass
class GrowthStop:
    """When to stop a growth series, fed one mean length (nm) per frame.

    The lengths are smoothed by an EWMA (weight ``smoothing`` for the newest); ``target_reached``
    once the smoothed length is >= ``target_nm`` and, with ``significant``, the lower end of the
    frame's 95 % interval of the mean (``low_nm``) is too (the target is reached beyond the
    particle-sampling noise); ``stalled`` once its change per frame has been below
    ``stall_rate_nm_per_frame`` for ``stall_frames`` frames in a row. A NaN length (no particles
    found) changes nothing.
    """

    target_nm: float
    stall_rate_nm_per_frame: float
    stall_frames: int
    smoothing: float = 0.5
    significant: bool = False
    stalled: int = 0
    smoothed: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        check_number("target_nm", self.target_nm, gt=0)
        check_number("stall_rate_nm_per_frame", self.stall_rate_nm_per_frame, ge=0)
        check_number("stall_frames", self.stall_frames, ge=1, integer=True)
        check_number("smoothing", self.smoothing, gt=0, le=1)
        self._ewma = Ewma(self.smoothing)

    def update(self, length_nm: float, low_nm: float = math.nan) -> str | None:
        before = self._ewma.value
        now = self._ewma.update(float(length_nm))
        self.smoothed.append(now)
        if not math.isfinite(now) or not math.isfinite(float(length_nm)):
            return None
        if now >= self.target_nm and (not self.significant or float(low_nm) >= self.target_nm):
            return "target_reached"
        if math.isfinite(before):
            self.stalled = self.stalled + 1 if now - before < self.stall_rate_nm_per_frame else 0
            if self.stalled >= self.stall_frames:
                return "stalled"
        return None


def check_number(name: str, value: Any, *, gt: float | None = None, ge: float | None = None,
                 le: float | None = None, integer: bool = False) -> None:
    """Refuse a plan argument out of range: ``ValueError`` naming ``name``, its value and the range."""
    # numpy scalars count (np.int64, np.float32: a session's np.arange), bools do not
    bad = (isinstance(value, bool | np.bool_) or not isinstance(value, numbers.Real)
           or (integer and not isinstance(value, numbers.Integral)))
    x = math.nan if bad else float(value)
    if (bad or not math.isfinite(x) or (gt is not None and not x > gt) or (ge is not None and not x >= ge)
            or (le is not None and not x <= le)):
        rng = " and ".join(f"{op} {b:g}" for op, b in ((">", gt), (">=", ge), ("<=", le)) if b is not None)
        kind = "an integer" if integer else "a finite number"
        raise ValueError(f"{name} must be {kind}{' ' + rng if rng else ''}, got {value!r}")


def _check_stats(stats: Any) -> None:
    timeout = stats.timeout_s.get()
    check_number(f"{getattr(stats, 'name', 'stats')}.timeout_s", timeout, gt=0)


def _analysed(stats: Any, run_uid: str, seq_num: int, extra: Sequence[Any] = ()) -> Plan:
    """Wait for the analysis of frame ``seq_num`` of ``run_uid`` and read it (and ``extra``) into
    the stats stream; ``NanosegStatsTimeout`` when it does not come within ``stats.timeout_s``."""
    yield from bps.mv(stats.expect_run_uid, run_uid, stats.expect_seq_num, seq_num)
    try:
        reading = yield from bps.trigger_and_read([stats, *extra], name=STATS_STREAM)
    except FailedStatus as err:
        if isinstance(err.__cause__, NanosegStatsTimeout):  # its message, not the Status's repr
            raise NanosegStatsTimeout(str(err.__cause__)) from err
        raise
    return reading


def _forget_expectation(stats: Any) -> Plan:
    yield from bps.mv(stats.expect_seq_num, 0, stats.expect_run_uid, "")


def monitor_growth(detector: Any, stats: Any, target_mean_length_nm: float, stall_rate_nm_per_frame: float,
                   stall_frames: int, max_frames: int, *, clock: Any = None, interval_s: float = 1.0,
                   smoothing: float = 0.5, significant: bool = False, extra_detectors: Sequence[Any] = (),
                   md: dict[str, Any] | None = None) -> Plan:
    """Acquire until the mean particle length reaches a target or growth stalls, then stop cleanly.

    Each step: move ``clock`` (if given) by ``interval_s``, trigger and read ``detector`` (and
    ``extra_detectors``), wait for the daemon's analysis of that frame and read ``stats``; then
    ``GrowthStop`` decides (``significant``: the target counts only once the lower end of the
    frame's 95 % interval of the mean length, ``stats.length_nm_mean_lo``, reaches it). The run's stop document says why it ended (``reason``:
    ``target_reached``, ``stalled`` or ``max_frames``), which is also the plan's return value.

    Refused before the RunEngine starts (``ValueError`` naming the argument): ``target_mean_length_nm``
    <= 0, ``stall_rate_nm_per_frame`` < 0, ``stall_frames`` or ``max_frames`` < 1, ``interval_s`` < 0,
    ``smoothing`` outside (0, 1], ``stats.timeout_s`` <= 0, any of them not finite.
    """
    check_number("target_mean_length_nm", target_mean_length_nm, gt=0)
    check_number("stall_rate_nm_per_frame", stall_rate_nm_per_frame, ge=0)
    check_number("stall_frames", stall_frames, ge=1, integer=True)
    check_number("max_frames", max_frames, ge=1, integer=True)
    check_number("interval_s", interval_s, ge=0)
    check_number("smoothing", smoothing, gt=0, le=1)
    _check_stats(stats)
    decide = GrowthStop(target_mean_length_nm, stall_rate_nm_per_frame, stall_frames, smoothing, significant)
    _md = {"plan_name": "monitor_growth",
           "plan_args": {"detector": repr(detector), "stats": repr(stats),
                         "target_mean_length_nm": target_mean_length_nm,
                         "stall_rate_nm_per_frame": stall_rate_nm_per_frame, "stall_frames": stall_frames,
                         "max_frames": max_frames, "interval_s": interval_s, "smoothing": smoothing,
                         "significant": significant},
           **(md or {})}
    readers = [detector, *extra_detectors, *([clock] if clock is not None else [])]

    @bpp.stage_decorator([detector, stats])
    @bpp.finalize_decorator(lambda: _forget_expectation(stats))
    def inner() -> Plan:
        run_uid = yield from bps.open_run(md=_md)
        reason = "max_frames"
        t0 = float(clock.position) if clock is not None else 0.0
        for n in range(1, max_frames + 1):
            if clock is not None:
                yield from bps.mv(clock, t0 + (n - 1) * interval_s)
            yield from bps.trigger_and_read(readers)
            reading = yield from _analysed(stats, run_uid, n)
            low = reading[stats.length_nm_mean_lo.name]["value"] if significant else math.nan
            verdict = decide.update(reading[stats.length_nm_mean.name]["value"], low)
            if verdict is not None:
                reason = verdict
                break
        yield from bps.close_run(exit_status="success", reason=reason)
        return reason

    return inner()


def next_exposure(counts: Sequence[int], exposure_s: float, *, min_count: int, stable_frames: int = 2,
                  tolerance: int = 1, limits: tuple[float, float] = (0.005, 1.0), factor: float = 2.0) -> float:
    """The exposure for the next frame, from the particle counts so far (newest last).

    Fewer than ``min_count`` particles in the newest frame: the signal is too low to see the thin
    wires, so multiply the exposure by ``factor``. The last ``stable_frames`` counts within
    ``tolerance`` of each other (and at least ``min_count``): the sample is seen well, so divide it
    by ``factor`` to save dose. Otherwise keep it. Always within ``limits`` (s).
    """
    lo, hi = limits
    if counts and counts[-1] < min_count:
        return min(hi, exposure_s * factor)
    recent = counts[-stable_frames:]
    if len(recent) == stable_frames and max(recent) - min(recent) <= tolerance:
        return max(lo, exposure_s / factor)
    return min(hi, max(lo, exposure_s))


def adaptive_exposure(detector: Any, stats: Any, num: int, *, min_count: int = 3, stable_frames: int = 2,
                      tolerance: int = 1, limits: tuple[float, float] = (0.005, 1.0), factor: float = 2.0,
                      md: dict[str, Any] | None = None) -> Plan:
    """An example of feedback on the count: ``num`` frames, the exposure set by ``next_exposure``.

    ``detector.exposure_time`` of each frame is read into its ``nanoseg`` event, beside the count it
    led to (configuration is recorded only once per run, and here it changes; a child signal read
    with its parent would be dropped by bluesky). Since the dose changes, do not give a fixed ``i0``
    in ``md``: the daemon then estimates I0 from each frame's substrate (profile policy background).

    Refused before the RunEngine starts (``ValueError`` naming the argument): ``num`` or
    ``stable_frames`` < 1, ``min_count`` or ``tolerance`` < 0, ``factor`` <= 1, ``limits`` not
    0 < low <= high, ``stats.timeout_s`` <= 0.
    """
    check_number("num", num, ge=1, integer=True)
    check_number("min_count", min_count, ge=0, integer=True)
    check_number("stable_frames", stable_frames, ge=1, integer=True)
    check_number("tolerance", tolerance, ge=0)
    check_number("factor", factor, gt=1)
    if len(limits) != 2:
        raise ValueError(f"limits must be (low, high) in s, got {limits!r}")
    check_number("limits[0]", limits[0], gt=0)
    check_number("limits[1]", limits[1], ge=limits[0])
    _check_stats(stats)
    _md = {"plan_name": "adaptive_exposure",
           "plan_args": {"detector": repr(detector), "stats": repr(stats), "num": num, "min_count": min_count,
                         "stable_frames": stable_frames, "tolerance": tolerance, "limits": list(limits),
                         "factor": factor},
           **(md or {})}

    @bpp.stage_decorator([detector, stats])
    @bpp.finalize_decorator(lambda: _forget_expectation(stats))
    def inner() -> Plan:
        run_uid = yield from bps.open_run(md=_md)
        counts: list[int] = []
        for n in range(1, num + 1):
            yield from bps.trigger_and_read([detector])
            reading = yield from _analysed(stats, run_uid, n, [detector.exposure_time])
            counts.append(int(reading[stats.count.name]["value"]))
            exposure = next_exposure(counts, float(detector.exposure_time.get()), min_count=min_count,
                                     stable_frames=stable_frames, tolerance=tolerance, limits=limits, factor=factor)
            yield from bps.mv(detector.exposure_time, exposure)
        yield from bps.close_run()
        return counts

    return inner()
