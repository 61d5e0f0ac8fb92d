"""daemon/growth.py: EWMA, rates of change, alarm rules, and the alarm documents."""

from __future__ import annotations

import math

import numpy as np
import pytest
from event_model import DocumentNames, compose_run, schema_validators

from nanoseg.config_io import ConfigError, parse_config
from nanoseg.instances import Instances
from nanoseg.particle_stats import frame_summary, particle_table
from nanoseg_daemon.contracts import FrameResult
from nanoseg_daemon.growth import (
    ALARM_STREAM,
    AlarmRule,
    Ewma,
    GrowthConfig,
    GrowthMonitor,
    GrowthSeries,
    RuleState,
    frame_values,
)
from nanoseg_daemon.metrics import DaemonMetrics
from nanoseg_daemon.publish import AnalysisRun


def test_ewma_weights_the_newest_value_and_skips_nan() -> None:
    e = Ewma(0.25)
    assert math.isnan(e.value)
    assert e.update(8.0) == 8.0  # starts at the first finite value
    assert e.update(math.nan) == 8.0  # a frame without particles holds the average
    assert e.update(4.0) == pytest.approx(0.25 * 4 + 0.75 * 8)
    with pytest.raises(ValueError):
        Ewma(0.0)


def test_series_rates_per_frame_and_per_second() -> None:
    s = GrowthSeries(alpha=1.0)  # alpha 1: the EWMA is the value itself
    p1 = s.observe(1, 100.0, {"length_nm": 200.0, "count": 3})
    assert math.isnan(p1.rate_per_frame["length_nm"]) and math.isnan(p1.rate_per_s["length_nm"])
    p2 = s.observe(2, 110.0, {"length_nm": 260.0, "count": 5})
    assert p2.rate_per_frame["length_nm"] == pytest.approx(60.0)
    assert p2.rate_per_s["length_nm"] == pytest.approx(6.0)
    assert p2.rate_per_frame["count"] == pytest.approx(2.0)
    assert math.isnan(p2.ewma["width_nm"])  # never given
    p3 = s.observe(3, 110.0, {"length_nm": 300.0})  # same timestamp: the rate from the frame 10 s before
    assert p3.rate_per_frame["length_nm"] == pytest.approx(40.0) and p3.rate_per_s["length_nm"] == pytest.approx(10.0)


def test_frames_read_microseconds_apart_give_no_runaway_rate_per_second() -> None:
    """The frames of one stream datum are read (and stamped) microseconds apart: the rate per
    second is taken over at least ``rate_window_s``, not over those microseconds (before: 1e6/s)."""
    s = GrowthSeries(alpha=1.0, rate_window_s=1.0)
    rates = []
    for k in range(40):  # 2 nm a frame; a datum of 8 frames 10 us apart every 2 s: 8 nm/s on average
        t = 100.0 + 2.0 * (k // 8) + 1e-5 * (k % 8)
        rates.append(s.observe(k + 1, t, {"length_nm": 100.0 + 2.0 * k}).rate_per_s["length_nm"])
    assert all(math.isnan(r) for r in rates[:8])  # nothing a second older yet
    # taken over ~2 s (from the previous datum's first frame): 8-15 nm/s here, never 2 nm / 10 us = 2e5/s
    assert all(8.0 <= r <= 15.0 for r in rates[8:]), rates
    assert rates[8] == pytest.approx(16.0 / 2.0)


def test_a_gap_of_frames_without_a_value_spreads_the_change_per_frame() -> None:
    s = GrowthSeries(alpha=1.0)
    for k, length in enumerate([100.0, math.nan, math.nan, 130.0], 1):
        point = s.observe(k, 10.0 * k, {"length_nm": length})
    assert point.rate_per_frame["length_nm"] == pytest.approx(10.0)  # 30 nm over 3 frames, not 30 in one
    assert point.rate_per_s["length_nm"] == pytest.approx(30.0 / 30.0)  # from the last frame with a value


def test_series_smooths_with_alpha() -> None:
    s = GrowthSeries(alpha=0.5)
    for k, x in enumerate([100.0, 200.0, 200.0]):
        p = s.observe(k + 1, float(k), {"width_nm": x})
    assert p.ewma["width_nm"] == pytest.approx(175.0)  # 100 -> 150 -> 175
    assert p.rate_per_frame["width_nm"] == pytest.approx(25.0)


def test_rule_needs_exactly_one_threshold_and_unique_names() -> None:
    with pytest.raises(ConfigError, match="exactly one of above, below"):
        parse_config({"rules": [{"name": "x", "quantity": "count"}]}, GrowthConfig)
    with pytest.raises(ConfigError, match="exactly one"):
        parse_config({"rules": [{"name": "x", "quantity": "count", "above": 1, "below": 0}]}, GrowthConfig)
    with pytest.raises(ConfigError, match="unique"):
        parse_config({"rules": [{"name": "x", "quantity": "count", "above": 1},
                                {"name": "x", "quantity": "count", "below": 1}]}, GrowthConfig)
    with pytest.raises(ConfigError, match=r"rules\.0\.quantity"):
        parse_config({"rules": [{"name": "x", "quantity": "mass", "above": 1}]}, GrowthConfig)


def test_stall_alarm_raises_after_consecutive_frames_and_clears() -> None:
    rule = AlarmRule(name="stall", quantity="length_nm", statistic="rate_per_frame", below=5.0,
                     for_frames=3, after_frames=2)
    state = RuleState(rule)
    s = GrowthSeries(alpha=1.0)
    lengths = [100, 150, 152, 153, 154, 155, 200, 201]  # grows, stalls 4 frames, grows again
    transitions = []
    for k, x in enumerate(lengths, start=1):
        alarm = state.evaluate(s.observe(k, float(k), {"length_nm": float(x)}), s.frames)
        if alarm is not None:
            transitions.append((alarm.seq_num, alarm.state, alarm.value))
    # rates: -, 50, 2, 1, 1, 1, 45, 1; frames 1-2 ignored; below 5 at 3, 4, 5 -> raised at 5
    assert transitions == [(5, "raised", 1.0), (7, "cleared", 45.0)]
    assert not state.active and state.streak == 1  # frame 8 starts a new streak


def test_nan_neither_raises_nor_clears() -> None:
    rule = AlarmRule(name="crowded", quantity="coverage_fraction", statistic="value", above=0.5)
    state = RuleState(rule)
    s = GrowthSeries(alpha=1.0)
    assert state.evaluate(s.observe(1, 0.0, {"coverage_fraction": 0.7}), s.frames) is not None
    assert state.evaluate(s.observe(2, 1.0, {"coverage_fraction": math.nan}), s.frames) is None
    assert state.active  # NaN is no information
    cleared = state.evaluate(s.observe(3, 2.0, {"coverage_fraction": 0.1}), s.frames)
    assert cleared is not None and cleared.state == "cleared" and "cleared" in cleared.message


def _result(run_uid: str, seq: int, boxes: list[tuple[int, int, int, int]], ts: float) -> FrameResult:
    """A real FrameResult of a 64 x 64 frame whose particles are the given rectangles (x0, y0, x1, y1)."""
    masks = np.zeros((len(boxes), 64, 64), bool)
    for i, (x0, y0, x1, y1) in enumerate(boxes):
        masks[i, y0:y1, x0:x1] = True
    table = particle_table(masks, None, 10.0)
    inst = Instances(np.array(boxes, np.float32).reshape(-1, 4), np.full(len(boxes), 0.9, np.float32), masks)
    return FrameResult(run_uid, f"{run_uid}-f{seq}", seq, ts, inst, table, frame_summary(table), "m@1", {}, {}, {})


def test_frame_values_from_a_real_summary() -> None:
    r = _result("r", 1, [(0, 0, 40, 4), (10, 20, 14, 40)], 0.0)  # 40 x 4 and 4 x 20 px rectangles
    v = frame_values(r.summary)
    assert v["count"] == 2
    assert v["length_px"] == pytest.approx((40 + 20) / 2, rel=0.01)
    assert v["length_nm"] == pytest.approx(10 * v["length_px"])
    assert v["coverage_fraction"] == pytest.approx((160 + 80) / 64**2)


def test_monitor_publishes_a_valid_alarms_stream_and_sets_gauges() -> None:
    cfg = GrowthConfig(ewma_alpha=1.0, rules=[AlarmRule(name="many", quantity="count", statistic="value", above=1.5)])
    metrics = DaemonMetrics()
    mon = GrowthMonitor(cfg, metrics)
    analysis = AnalysisRun("raw", "m@1", {})
    start = analysis.start_doc
    docs = []
    for seq, boxes in enumerate([[(0, 0, 20, 4)], [(0, 0, 20, 4), (0, 10, 30, 14)], [(0, 0, 20, 4)]], start=1):
        result = _result("raw", seq, boxes, 100.0 + seq)
        analysis.event(result)
        docs += mon.observe(result, analysis.compose_descriptor)
    names = [n for n, _ in docs]
    assert names == ["descriptor", "event", "event"]  # descriptor once, raised at 2, cleared at 3
    desc = docs[0][1]
    assert desc["name"] == ALARM_STREAM and desc["run_start"] == start["uid"]
    for name, doc in docs:
        schema_validators[DocumentNames[name]].validate(doc)
    raised, cleared = docs[1][1]["data"], docs[2][1]["data"]
    assert (raised["rule"], raised["state"], raised["raw_seq_num"], raised["value"]) == ("many", "raised", 2, 2.0)
    assert (cleared["state"], cleared["raw_seq_num"]) == ("cleared", 3)
    assert [d["seq_num"] for _, d in docs[1:]] == [1, 2]
    stop = analysis.stop()  # the run's stop counts the alarms stream too (it did not)
    assert stop is not None and stop[1]["num_events"] == {"primary": 3, ALARM_STREAM: 2}
    text = metrics.render().decode()
    assert 'nanoseg_growth_alarms_total{rule="many"} 1.0' in text
    assert 'nanoseg_growth_alarm_active{rule="many"} 0.0' in text
    assert 'nanoseg_growth_ewma{quantity="count"} 1.0' in text
    assert 'nanoseg_growth_rate_per_frame{quantity="count"} -1.0' in text


def test_monitor_forgets_the_least_recent_run() -> None:
    mon = GrowthMonitor(GrowthConfig(max_runs=2))
    compose = compose_run().compose_descriptor
    for run in ("a", "b", "a", "c"):
        mon.observe(_result(run, 1, [(0, 0, 8, 8)], 0.0), compose)
    assert mon.run("b") is None and mon.run("a") is not None and mon.run("c") is not None
    assert GrowthMonitor(GrowthConfig(enabled=False)).observe(_result("x", 1, [], 0.0), compose) == []


def _wires(lengths: list[int]) -> list[tuple[int, int, int, int]]:
    """Horizontal 3 px wide rectangles of the given lengths, stacked 5 px apart."""
    return [(2, 2 + 5 * k, 2 + n, 5 + 5 * k) for k, n in enumerate(lengths)]


def test_growth_series_carries_the_interval_and_tells_change_from_noise() -> None:
    rng = np.random.default_rng(0)
    short = [int(x) for x in rng.integers(20, 30, 11)]
    again = [int(x) for x in rng.integers(20, 30, 11)]
    longer = [int(x) for x in rng.integers(34, 44, 11)]
    s = GrowthSeries(alpha=1.0)
    points = [s.observe(k, float(k), frame_values(_result("r", k, _wires(w), float(k)).summary))
              for k, w in enumerate((short, again, longer), start=1)]  # fmt: skip
    p1, p2, p3 = points
    assert p1.value["length_nm_lo"] < p1.value["length_nm"] < p1.value["length_nm_hi"]
    assert p1.value["length_nm_hi"] - p1.value["length_nm_lo"] < 0.3 * p1.value["length_nm"]
    assert p2.changed_significantly(p1, "length_nm") is False  # same distribution: noise
    assert p3.changed_significantly(p2, "length_nm") is True  # ~ +13 px of mean length
    one = s.observe(4, 4.0, frame_values(_result("r", 4, _wires([30]), 4.0).summary))
    assert math.isnan(one.value["length_nm_lo"]) and one.changed_significantly(p3, "length_nm") is None
    # a rule on the interval's lower bound fires only when the mean is significantly above the target
    rule = AlarmRule(name="long", quantity="length_nm_lo", statistic="value", above=300.0)
    state = RuleState(rule)
    fired = [state.evaluate(p, k) for k, p in enumerate(points, start=1)]
    assert [a.state if a else None for a in fired] == [None, None, "raised"]


def test_frames_without_a_value_have_no_rate_and_raise_no_stall_alarm() -> None:
    """A frame without particles holds the EWMA; its rate is NaN, not 0 (no "stalled" from empty frames)."""
    rule = AlarmRule(name="stall", quantity="length_nm", statistic="rate_per_frame", below=1.0, for_frames=2)
    state = RuleState(rule)
    s = GrowthSeries(alpha=1.0)
    alarms = []
    for k, length in enumerate([100.0, 200.0, math.nan, math.nan, math.nan, 400.0], 1):
        point = s.observe(k, 10.0 * k, {"length_nm": length})
        alarms.append(state.evaluate(point, s.frames))
        if math.isnan(length):
            assert math.isnan(point.rate_per_frame["length_nm"]) and math.isnan(point.rate_per_s["length_nm"])
    assert alarms == [None] * 6
    # the same rule still fires on frames that really do not grow
    for k, length in enumerate([400.0, 400.5], 7):
        point = s.observe(k, 10.0 * k, {"length_nm": length})
        alarms.append(state.evaluate(point, s.frames))
    assert alarms[-1] is not None and alarms[-1].state == "raised" and "below 1 for 2 frames" in alarms[-1].message


@pytest.mark.parametrize("bad", ["nan", "inf", "-inf"])
def test_a_non_finite_threshold_is_refused(bad: str) -> None:
    with pytest.raises(ConfigError, match=r"rules\.0\.above: Input should be a finite number"):
        parse_config({"rules": [{"name": "r", "quantity": "count", "above": float(bad)}]}, GrowthConfig, "growth")
