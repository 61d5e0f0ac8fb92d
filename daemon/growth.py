"""Growth monitoring: per run, the time series of frame summaries, their EWMA and rate of change,
and threshold rules that raise and clear alarms.

Pure logic first (``Ewma``, ``GrowthSeries``, ``AlarmRule``/``RuleState``), then the part the
service calls (``GrowthMonitor.observe``): it updates the run's series (the Prometheus gauges read
the latest frame's point when scraped) and returns the alarm documents to publish on the analysis run's ``alarms`` stream.

Quantities (``QUANTITIES``), one value per frame: ``length_nm`` and ``width_nm`` (mean over the
frame's particles under the summary's counting rule, nm; NaN without particles or pixel size),
``length_px``, ``width_px`` (px), ``count`` (particles) and ``coverage_fraction`` (share of the
frame covered, 0..1); ``length_nm_lo``/``length_nm_hi`` and ``width_nm_lo``/``width_nm_hi``: the
95 % bootstrap interval of the frame's mean (NaN below two particles). A rule on ``length_nm_lo``
``above`` a target fires only when the mean is significantly above it, not on noise;
``GrowthPoint.changed_significantly`` compares two frames' intervals.
Statistics a rule can watch: ``value`` (the frame's), ``ewma`` (exponentially weighted moving
average, ``e_k = alpha * x_k + (1 - alpha) * e_(k-1)``, started at the first finite value; a NaN
frame leaves it unchanged), ``rate_per_frame`` (the EWMA's change since the last frame with a
value, divided by the frames since: units per frame) and ``rate_per_s`` (the EWMA's change since
the latest earlier frame acquired at least ``rate_window_s`` before, divided by the time between
them: units per second; NaN until there is one, so frames read microseconds apart, as the frames
of one stream datum are, give no rate of millions per second). Both rates are NaN for a frame
without a finite value (the EWMA holds, but that is no information about growth, so a rule on a
rate neither fires nor clears).
"""

from __future__ import annotations

import functools
import math
import time
from collections import OrderedDict, deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, model_validator

from nanoseg.config_io import StrictModel
from nanoseg.particle_stats import FrameSummary
from nanoseg_daemon.logs import log

if TYPE_CHECKING:
    from event_model import ComposeDescriptor

    from nanoseg_daemon.contracts import FrameResult
    from nanoseg_daemon.metrics import DaemonMetrics

Quantity = Literal["length_nm", "width_nm", "length_px", "width_px", "count", "coverage_fraction",
                   "length_nm_lo", "length_nm_hi", "width_nm_lo", "width_nm_hi"]
Statistic = Literal["value", "ewma", "rate_per_frame", "rate_per_s"]
QUANTITIES: tuple[Quantity, ...] = ("length_nm", "width_nm", "length_px", "width_px", "count", "coverage_fraction",
                                    "length_nm_lo", "length_nm_hi", "width_nm_lo", "width_nm_hi")
ALARM_STREAM = "alarms"


def frame_values(summary: FrameSummary) -> dict[str, float]:
    """The watched quantities of one frame (NaN where the frame cannot say)."""

    def mean(column: str, which: str = "mean") -> float:
        s = summary.stats.get(column)
        v = None if s is None else getattr(s, which)
        return math.nan if v is None else float(v)

    return {
        "length_nm": mean("length_nm"), "width_nm": mean("width_nm"),
        "length_px": mean("length_px"), "width_px": mean("width_px"),
        "count": float(summary.count), "coverage_fraction": float(summary.coverage_fraction),
        "length_nm_lo": mean("length_nm", "mean_lo"), "length_nm_hi": mean("length_nm", "mean_hi"),
        "width_nm_lo": mean("width_nm", "mean_lo"), "width_nm_hi": mean("width_nm", "mean_hi"),
    }  # fmt: skip


class Ewma:
    """Exponentially weighted moving average; NaN inputs are skipped (the average holds)."""

    def __init__(self, alpha: float) -> None:
        if not 0 < alpha <= 1:
            raise ValueError(f"alpha must be in (0, 1], got {alpha}")
        self.alpha = alpha
        self.value = math.nan

    def update(self, x: float) -> float:
        if math.isfinite(x):
            self.value = x if math.isnan(self.value) else self.alpha * x + (1 - self.alpha) * self.value
        return self.value


@dataclass(frozen=True)
class GrowthPoint:
    """One frame of a run's series: the frame's values, their EWMA and its rates of change."""

    seq_num: int
    timestamp: float
    value: Mapping[str, float]
    ewma: Mapping[str, float]
    rate_per_frame: Mapping[str, float]  # NaN until two finite EWMA values, and for a frame without a value
    rate_per_s: Mapping[str, float]  # NaN also until a frame rate_window_s older is kept

    def get(self, statistic: Statistic, quantity: str) -> float:
        return float(getattr(self, statistic)[quantity])

    def changed_significantly(self, earlier: GrowthPoint, quantity: Literal["length_nm", "width_nm"]) -> bool | None:
        """Whether the 95 % intervals of ``quantity``'s mean in the two frames are disjoint (a
        change beyond the particle-sampling noise); None when either frame has no interval."""
        lo, hi = self.value.get(f"{quantity}_lo", math.nan), self.value.get(f"{quantity}_hi", math.nan)
        lo0, hi0 = earlier.value.get(f"{quantity}_lo", math.nan), earlier.value.get(f"{quantity}_hi", math.nan)
        if not all(math.isfinite(v) for v in (lo, hi, lo0, hi0)):
            return None
        return lo > hi0 or hi < lo0


class GrowthSeries:
    """A run's time series (the last ``max_points`` frames are kept; the EWMA covers them all)."""

    def __init__(self, alpha: float, max_points: int = 1_000, rate_window_s: float = 1.0) -> None:
        self._ewma = {q: Ewma(alpha) for q in QUANTITIES}
        self.points: deque[GrowthPoint] = deque(maxlen=max_points)
        self.frames = 0
        self.rate_window_s = rate_window_s
        self._last: dict[str, tuple[int, float]] = {}  # quantity -> (frame index, EWMA) at its last value
        # the points a per-second rate may start from: one per ~rate_window_s / 8 of acquisition
        # time (every point of a slower series), so that finding the start reads a few dozen at most
        self._anchors: deque[GrowthPoint] = deque(maxlen=64)

    def observe(self, seq_num: int, timestamp: float, values: Mapping[str, float]) -> GrowthPoint:
        """Add the frame ``seq_num`` acquired at ``timestamp`` (s) with ``values`` (quantity ->
        value in its unit; NaN or absent: none); returns its point with the EWMA and the rates."""
        ewma: dict[str, float] = {}
        per_frame: dict[str, float] = {}
        per_s: dict[str, float] = {}
        for q in QUANTITIES:
            x = float(values.get(q, math.nan))
            ewma[q] = self._ewma[q].update(x)
            per_frame[q] = per_s[q] = math.nan  # a frame without a value: its held EWMA is no "no change"
            if not math.isfinite(x):
                continue
            last = self._last.get(q)
            if last is not None:
                per_frame[q] = (ewma[q] - last[1]) / (self.frames - last[0])
            self._last[q] = (self.frames, ewma[q])
            base = self._rate_base(timestamp, q)
            if base is not None:
                per_s[q] = (ewma[q] - base.ewma[q]) / (timestamp - base.timestamp)
        point = GrowthPoint(seq_num, timestamp, dict(values), ewma, per_frame, per_s)
        self.points.append(point)
        if not self._anchors or not timestamp - self._anchors[-1].timestamp < self.rate_window_s / 8:
            self._anchors.append(point)
        self.frames += 1
        return point

    def _rate_base(self, timestamp: float, quantity: str) -> GrowthPoint | None:
        """The latest anchor point with a value of ``quantity`` acquired at least ``rate_window_s``
        before ``timestamp`` (s; at most ~1/8 of the window more where frames come faster); None
        when none is kept or the time is not finite."""
        if not math.isfinite(timestamp):
            return None
        for point in reversed(self._anchors):
            if timestamp - point.timestamp >= self.rate_window_s and math.isfinite(point.value.get(quantity, math.nan)):
                return point
        return None


class AlarmRule(StrictModel):
    """Raise an alarm when ``statistic`` of ``quantity`` is above (or below) a threshold for
    ``for_frames`` consecutive frames; clear it at the first frame where it is not.

    Frames where the statistic is NaN neither raise nor clear. The first ``after_frames`` frames
    of a run are ignored (the EWMA and the rates need a few frames to mean something).
    """

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$", description="Alarm name, a metric label.")
    quantity: Quantity = Field(description="What is watched (see daemon/growth.py).")
    statistic: Statistic = Field("ewma", description="value, ewma, rate_per_frame or rate_per_s.")
    above: float | None = Field(None, allow_inf_nan=False, description="Alarm while the statistic is > this.")
    below: float | None = Field(None, allow_inf_nan=False, description="Alarm while the statistic is < this.")
    for_frames: int = Field(1, ge=1, description="Consecutive frames the condition must hold.")
    after_frames: int = Field(0, ge=0, description="Frames of a run ignored at its start.")

    @model_validator(mode="after")
    def _one_threshold(self) -> AlarmRule:
        if (self.above is None) == (self.below is None):
            raise ValueError("set exactly one of above, below")
        return self

    @property
    def threshold(self) -> float:
        return float(self.above if self.above is not None else self.below)  # type: ignore[arg-type]

    def holds(self, x: float) -> bool | None:
        """True/False; None when ``x`` is NaN (no information)."""
        if not math.isfinite(x):
            return None
        return x > self.threshold if self.above is not None else x < self.threshold


class GrowthConfig(StrictModel):
    """``growth``: per-run growth series and alarms (daemon/growth.py)."""

    enabled: bool = Field(True, description="Track growth series and evaluate the rules.")
    ewma_alpha: float = Field(0.3, gt=0, le=1, description="EWMA weight of the newest frame.")
    max_points: int = Field(1_000, ge=1, description="Frames of a run's series kept in memory (~2 kB each, for every one of max_runs runs).")
    max_runs: int = Field(16, ge=1, description="Runs tracked at once; the least recent is forgotten.")
    rate_window_s: float = Field(1.0, gt=0, allow_inf_nan=False,
                                 description="Shortest acquisition time a per-second rate is taken over, s.")
    rules: list[AlarmRule] = Field(default_factory=list, description="Alarm rules; none by default.")

    @model_validator(mode="after")
    def _unique_names(self) -> GrowthConfig:
        names = [r.name for r in self.rules]
        if len(names) != len(set(names)):
            raise ValueError("rule names must be unique")
        return self


@dataclass(frozen=True)
class Alarm:
    """A rule's transition: ``state`` raised or cleared at frame ``seq_num``."""

    rule: str
    state: Literal["raised", "cleared"]
    quantity: str
    statistic: str
    value: float
    threshold: float
    seq_num: int
    message: str


@dataclass
class RuleState:
    rule: AlarmRule
    streak: int = 0
    active: bool = False

    def evaluate(self, point: GrowthPoint, frames_seen: int) -> Alarm | None:
        """The transition this frame causes, if any."""
        if frames_seen <= self.rule.after_frames:
            return None
        x = point.get(self.rule.statistic, self.rule.quantity)
        holds = self.rule.holds(x)
        if holds is None:
            return None
        self.streak = self.streak + 1 if holds else 0
        r = self.rule
        what = f"{r.statistic} of {r.quantity} = {x:.4g}"
        side = "above" if r.above is not None else "below"
        if holds and not self.active and self.streak >= r.for_frames:
            self.active = True
            msg = f"{r.name}: {what}, {side} {r.threshold:g} for {self.streak} frames"
            return Alarm(r.name, "raised", r.quantity, r.statistic, x, r.threshold, point.seq_num, msg)
        if not holds and self.active:
            self.active = False
            msg = f"{r.name} cleared: {what}, no longer {side} {r.threshold:g}"
            return Alarm(r.name, "cleared", r.quantity, r.statistic, x, r.threshold, point.seq_num, msg)
        return None


@dataclass
class RunGrowth:
    """One run: its series, its rules' states and (once an alarm happened) its alarm stream."""

    series: GrowthSeries
    rules: list[RuleState]
    compose_event: Any = None

    def observe(self, seq_num: int, timestamp: float, values: Mapping[str, float]) -> tuple[GrowthPoint, list[Alarm]]:
        point = self.series.observe(seq_num, timestamp, values)
        alarms = [a for s in self.rules if (a := s.evaluate(point, self.series.frames)) is not None]
        return point, alarms


def _key(dtype: str, units: str | None = None) -> dict[str, Any]:
    key: dict[str, Any] = {"dtype": dtype, "shape": [], "source": "nanoseg.growth", "object_name": "nanoseg_growth"}
    if units is not None:
        key["units"] = units
    return key


ALARM_DATA_KEYS: dict[str, dict[str, Any]] = {
    "rule": _key("string"), "state": _key("string"), "quantity": _key("string"),
    "statistic": _key("string"), "value": _key("number"), "threshold": _key("number"),
    "frame_uid": _key("string"), "raw_seq_num": _key("integer"), "message": _key("string"),
}
"""The ``alarms`` stream's data keys: one event per raised or cleared alarm."""


class GrowthMonitor:
    """What the service calls for every published frame result.

    ``observe`` returns the documents to publish (an ``alarms`` descriptor before the run's first
    alarm, then one event per transition), composed with the ``compose_descriptor`` of the analysis
    run's ``compose_run`` bundle, so that the run's stop counts the alarms stream too. Runs are forgotten least-recent first beyond ``max_runs`` (no hook at run stop
    is needed, and a late frame of a forgotten run simply starts a new series).
    """

    def __init__(self, cfg: GrowthConfig, metrics: DaemonMetrics | None = None) -> None:
        self.cfg = cfg
        self.metrics = metrics
        self._runs: OrderedDict[str, RunGrowth] = OrderedDict()
        self._latest: GrowthPoint | None = None  # the latest frame's point, whichever run
        if metrics is not None:  # the gauges read the latest point when scraped, not at every frame
            for q in QUANTITIES:
                gauges: tuple[tuple[Any, Statistic], ...] = (
                    (metrics.growth_ewma, "ewma"), (metrics.growth_rate_per_frame, "rate_per_frame"),
                    (metrics.growth_rate_per_second, "rate_per_s"))
                for gauge, statistic in gauges:
                    gauge.labels(q).set_function(functools.partial(self._latest_value, statistic, q))

    def _latest_value(self, statistic: Statistic, quantity: str) -> float:
        """``statistic`` of ``quantity`` at the latest frame (NaN before any)."""
        point = self._latest
        return math.nan if point is None else point.get(statistic, quantity)

    def run(self, run_uid: str) -> RunGrowth | None:
        return self._runs.get(run_uid)

    def _run(self, run_uid: str) -> RunGrowth:
        run = self._runs.get(run_uid)
        if run is None:
            run = RunGrowth(GrowthSeries(self.cfg.ewma_alpha, self.cfg.max_points, self.cfg.rate_window_s),
                            [RuleState(r) for r in self.cfg.rules])
            self._runs[run_uid] = run
            while len(self._runs) > self.cfg.max_runs:
                self._runs.popitem(last=False)
        self._runs.move_to_end(run_uid)
        return run

    def observe(self, result: FrameResult, compose_descriptor: ComposeDescriptor) -> list[tuple[str, dict[str, Any]]]:
        """The alarm documents of one frame result; ``compose_descriptor``: the analysis run's
        (``AnalysisRun.compose_descriptor``, from its ``compose_run`` bundle)."""
        if not self.cfg.enabled:
            return []
        run = self._run(result.run_uid)
        point, alarms = run.observe(result.seq_num, result.timestamp, frame_values(result.summary))
        self._export(point, alarms)
        docs: list[tuple[str, dict[str, Any]]] = []
        for alarm in alarms:
            log("growth_alarm", 30 if alarm.state == "raised" else 20, run=result.run_uid, rule=alarm.rule,
                state=alarm.state, value=alarm.value, threshold=alarm.threshold, seq_num=alarm.seq_num)
            if run.compose_event is None:
                bundle = compose_descriptor(
                    name=ALARM_STREAM, data_keys=dict(ALARM_DATA_KEYS),
                    object_keys={"nanoseg_growth": list(ALARM_DATA_KEYS)},
                    hints={"nanoseg_growth": {"fields": ["rule", "state", "value"]}},
                )
                run.compose_event = bundle.compose_event
                docs.append(("descriptor", dict(bundle.descriptor_doc)))
            data = {"rule": alarm.rule, "state": alarm.state, "quantity": alarm.quantity,
                    "statistic": alarm.statistic, "value": alarm.value, "threshold": alarm.threshold,
                    "frame_uid": result.frame_uid, "raw_seq_num": int(result.seq_num), "message": alarm.message}
            event = run.compose_event(data=data, timestamps=dict.fromkeys(data, result.timestamp), time=time.time())
            docs.append(("event", dict(event)))
        return docs

    def _export(self, point: GrowthPoint, alarms: list[Alarm]) -> None:
        self._latest = point
        m = self.metrics
        if m is None:
            return
        for a in alarms:
            m.growth_alarm_active.labels(a.rule).set(1 if a.state == "raised" else 0)
            if a.state == "raised":
                m.growth_alarms.labels(a.rule).inc()
