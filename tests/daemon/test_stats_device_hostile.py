"""NanosegStats and the plans when the daemon or its summary topic misbehave, over real 0MQ
sockets on loopback and a real RunEngine: malformed, non-finite, huge, stale and other-run
summaries are ignored with a named reason (the listener lives on), a silent or absent daemon ends
the plan with a timeout naming the address and the wait, and arguments out of range are refused
before the RunEngine starts. The normal loop against a real daemon: tests/simulator/test_beamline_loop.py.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import bluesky.plan_stubs as bps
import pytest
import zmq
from bluesky import RunEngine
from ophyd.sim import SynGauss, motor

from nanoseg_daemon.ophyd_stats import NanosegStats, NanosegStatsTimeout
from nanoseg_daemon.plans import adaptive_exposure, monitor_growth
from nanoseg_daemon.publish import SUMMARY_TOPIC
from tests.daemon.service_fixtures import Docs
from tests.daemon.service_fixtures import run_plan as run


def summary(run: str, seq: int, length: float | None = 100.0, count: int = 3) -> dict[str, Any]:
    return {"run_uid": run, "frame_uid": f"{run}-{seq}", "seq_num": seq, "count": count, "model_version": "m1",
            "summary": {"stats": {"length_nm": {"mean": length, "mean_lo": None}}, "coverage_fraction": 0.1}}


class SummaryTopic:
    """A real PUB socket on loopback in the daemon's summary format."""

    def __init__(self) -> None:
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.PUB)
        self.sock.linger = 0
        port = self.sock.bind_to_random_port("tcp://127.0.0.1")
        self.address = f"tcp://127.0.0.1:{port}"

    def send(self, body: bytes | dict[str, Any], topic: bytes = SUMMARY_TOPIC) -> None:
        self.sock.send_multipart([topic, body if isinstance(body, bytes) else json.dumps(body).encode()])

    def close(self) -> None:
        self.sock.close(0)
        self.ctx.term()


@pytest.fixture
def topic() -> Iterator[SummaryTopic]:
    t = SummaryTopic()
    yield t
    t.close()


@pytest.fixture
def stats(topic: SummaryTopic) -> Iterator[NanosegStats]:
    s = NanosegStats(topic.address, name="nanoseg", max_message_bytes=4096)
    s.timeout_s.put(5.0)
    time.sleep(0.3)  # 0MQ slow joiner
    yield s
    s.close()


def wait_for(check: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def detector() -> SynGauss:
    return SynGauss("det", motor, "motor", center=0, Imax=1, sigma=1)


@pytest.mark.parametrize(("body", "reason"), [
    (b"not json at all", "not_json"),
    (b"\xff\xfe", "not_json"),
    (b"[" * 2000 + b"]" * 2000, "not_json"),  # RecursionError in the parser
    (b"[1, 2]", "not_an_object"),
    (b"null", "not_an_object"),
    (b'{"run_uid": "r", "frame_uid": "f", "seq_num": 2, "count": Infinity}', "non_finite"),
    (b'{"run_uid": "r", "frame_uid": "f", "seq_num": 2, "count": 1, "summary": {"coverage_fraction": NaN}}',
     "non_finite"),
    (b'{"run_uid": "r", "frame_uid": "f", "seq_num": 2, "count": 1, "summary": {"coverage_fraction": 1e999}}',
     "non_finite"),
    (b'{"run_uid": "r", "frame_uid": "f", "seq_num": 2}', "missing_field"),
    (b'{"run_uid": "r", "frame_uid": "f", "seq_num": 2, "count": -1}', "bad_field"),
    (b'{"run_uid": "r", "frame_uid": "f", "seq_num": 2, "count": 1, "summary": {"stats": [1]}}', "bad_field"),
    (b'{"run_uid": "r", "frame_uid": "f", "seq_num": 2, "count": 1, "summary": "x"}', "bad_field"),
    (b'{"run_uid": "r", "frame_uid": "f", "seq_num": 2, "count": 1,'
     b' "summary": {"stats": {"length_nm": {"mean": "long"}}}}', "bad_field"),
    (b'{"run_uid": "", "frame_uid": "f", "seq_num": 2, "count": 1}', "bad_field"),
    (json.dumps({**summary("r", 2), "pad": "x" * 5000}).encode(), "too_large"),
])
def test_a_malformed_summary_is_ignored_with_its_reason_and_the_listener_lives_on(
        topic: SummaryTopic, stats: NanosegStats, body: bytes, reason: str) -> None:
    topic.send(summary("r", 1, 100.0))
    wait_for(lambda: stats.latest is not None)
    topic.send(body)
    wait_for(lambda: stats.ignored.get(reason) == 1)
    assert stats.latest is not None and (stats.latest["seq_num"], stats.length_nm_mean.get()) == (1, 100.0)
    topic.send(summary("r", 3, 300.0))  # the next good summary is still shown
    wait_for(lambda: stats.latest is not None and stats.latest["seq_num"] == 3)
    assert stats.length_nm_mean.get() == 300.0


def test_an_older_or_repeated_frame_never_replaces_the_newer(topic: SummaryTopic, stats: NanosegStats) -> None:
    topic.send(summary("r", 5, 500.0))
    wait_for(lambda: stats.latest is not None)
    topic.send(summary("r", 4, 400.0))
    topic.send(summary("r", 5, 123.0))
    wait_for(lambda: stats.ignored == {"older_frame": 1, "duplicate_frame": 1})
    assert (stats.seq_num.get(), stats.length_nm_mean.get()) == (5, 500.0)


def test_another_runs_summary_is_never_read_as_this_frames(topic: SummaryTopic, stats: NanosegStats) -> None:
    """Frame 1 of run A arrives, then run B's newer summary; a trigger and read for A frame 1 gives A's."""
    topic.send(summary("A", 1, 111.0))
    wait_for(lambda: stats.latest is not None)
    topic.send(summary("B", 7, 777.0))  # no expectation yet: shown (a monitor sees it)
    wait_for(lambda: stats.run_uid.get() == "B")
    stats.expect_run_uid.put("A")
    stats.expect_seq_num.put(1)
    st = stats.trigger()
    st.wait(2)
    reading = stats.read()
    assert (reading["nanoseg_run_uid"]["value"], reading["nanoseg_length_nm_mean"]["value"]) == ("A", 111.0)
    # while expecting run A, run B's summaries are not shown, only counted
    topic.send(summary("B", 8, 888.0))
    wait_for(lambda: stats.ignored.get("other_run") == 1)
    assert stats.read()["nanoseg_run_uid"]["value"] == "A"
    stats.expect_seq_num.put(2)
    st = stats.trigger()
    topic.send(summary("A", 2, 222.0))
    st.wait(2)
    assert (stats.run_uid.get(), stats.seq_num.get(), stats.length_nm_mean.get()) == ("A", 2, 222.0)


def test_no_daemon_the_plan_fails_with_the_address_and_the_wait(stats: NanosegStats, topic: SummaryTopic) -> None:
    stats.timeout_s.put(1.0)
    t0 = time.monotonic()
    docs, err = run(monitor_growth(detector(), stats, 500, 1, 3, 5))
    assert time.monotonic() - t0 < 10
    assert isinstance(err, NanosegStatsTimeout)
    msg = str(err)
    assert topic.address in msg and "within 1 s" in msg and "no summary received" in msg
    (stop,) = [d for n, d in docs if n == "stop"]
    assert (stop["exit_status"], stop["reason"]) == ("fail", msg)


def test_daemon_silent_mid_plan_the_plan_fails_naming_the_last_frame(stats: NanosegStats,
                                                                     topic: SummaryTopic) -> None:
    """The daemon answers frame 1 (and publishes junk and another run), then goes silent."""
    stats.timeout_s.put(1.0)

    def answer(name: str, doc: dict[str, Any]) -> None:
        if name == "event" and doc["seq_num"] == 1 and "det" in doc["data"]:
            topic.send(b"garbage")
            topic.send(summary("other", 9))
            topic.send(summary(run_uid[0], 1, 100.0))

    run_uid: list[str] = []
    RE = RunEngine({}, context_managers=[])
    docs: Docs = []
    RE.subscribe(lambda n, d: docs.append((n, d)))
    RE.subscribe(lambda _n, d: run_uid.append(d["uid"]), "start")
    RE.subscribe(answer)
    with pytest.raises(NanosegStatsTimeout) as info:
        RE(monitor_growth(detector(), stats, 500, 1, 3, 5))
    msg = str(info.value)
    assert f"run {run_uid[0]} frame 2 (or later)" in msg and topic.address in msg
    assert f"the last (run {run_uid[0]} frame 1)" in msg and "not_json 1" in msg
    (stop,) = [d for n, d in docs if n == "stop"]
    assert stop["exit_status"] == "fail" and "frame 2" in stop["reason"]
    assert len([d for n, d in docs if n == "event" and "nanoseg_count" in d["data"]]) == 1


@pytest.mark.parametrize(("kwargs", "name"), [
    ({"target_mean_length_nm": 0}, "target_mean_length_nm"),
    ({"target_mean_length_nm": -5.0}, "target_mean_length_nm"),
    ({"target_mean_length_nm": float("nan")}, "target_mean_length_nm"),
    ({"stall_rate_nm_per_frame": -1}, "stall_rate_nm_per_frame"),
    ({"stall_frames": 0}, "stall_frames"),
    ({"max_frames": 0}, "max_frames"),
    ({"max_frames": 2.5}, "max_frames"),
    ({"interval_s": -1.0}, "interval_s"),
    ({"smoothing": 0}, "smoothing"),
    ({"timeout_s": -1.0}, "nanoseg.timeout_s"),
    ({"timeout_s": 0.0}, "nanoseg.timeout_s"),
])
def test_monitor_growth_refuses_arguments_out_of_range_before_the_run(stats: NanosegStats, kwargs: dict[str, Any],
                                                                       name: str) -> None:
    args: dict[str, Any] = {"target_mean_length_nm": 500, "stall_rate_nm_per_frame": 1, "stall_frames": 3,
                            "max_frames": 5}
    if "timeout_s" in kwargs:
        stats.timeout_s.put(kwargs.pop("timeout_s"))
    args.update(kwargs)
    with pytest.raises(ValueError, match=f"^{name} must be"):
        monitor_growth(detector(), stats, **args)


@pytest.mark.parametrize(("kwargs", "name"), [
    ({"num": 0}, "num"), ({"factor": 1.0}, "factor"), ({"limits": (0.0, 1.0)}, r"limits\[0\]"),
    ({"limits": (0.5, 0.1)}, r"limits\[1\]"), ({"stable_frames": 0}, "stable_frames"),
])
def test_adaptive_exposure_refuses_arguments_out_of_range(stats: NanosegStats, kwargs: dict[str, Any],
                                                          name: str) -> None:
    args: dict[str, Any] = {"num": 3, **kwargs}
    with pytest.raises(ValueError, match=f"^{name} must be"):
        adaptive_exposure(detector(), stats, **args)


def test_a_trigger_with_a_timeout_not_above_zero_is_refused(stats: NanosegStats) -> None:
    stats.timeout_s.put(-1.0)
    with pytest.raises(ValueError, match=r"nanoseg.timeout_s must be a finite number of seconds > 0, got -1.0"):
        stats.trigger()


def test_an_address_that_cannot_be_subscribed_is_named() -> None:
    t0 = time.monotonic()
    with pytest.raises(ValueError, match="cannot subscribe to 'not-an-address'"):
        NanosegStats("not-an-address", name="nanoseg")
    assert time.monotonic() - t0 < 2


def test_a_read_outside_a_plan_still_works(topic: SummaryTopic, stats: NanosegStats) -> None:
    topic.send(summary("r", 1, 42.0))
    wait_for(lambda: stats.latest is not None)
    got: list[Any] = []

    def plan() -> Any:
        got.append((yield from bps.read(stats)))

    RunEngine({}, context_managers=[])(plan())
    assert got[0]["nanoseg_length_nm_mean"]["value"] == 42.0


def test_the_daemons_own_summary_of_a_uid_with_a_lone_surrogate_is_read() -> None:
    """A bluesky JSON document may carry a uid that is not valid UTF-8 (a lone surrogate). The
    summary the daemon sends of it holds the uid's repr instead (counted), so that the message is
    what its schema says and the device reads it like any other."""
    from collections import Counter
    from dataclasses import replace

    from nanoseg_daemon.ophyd_stats import parse_summary
    from nanoseg_daemon.publish import summary_body
    from tests.daemon.test_sinks import result

    replaced: Counter[str] = Counter()
    body = summary_body(replace(result("run-a", 1), frame_uid="bad-\ud800", model_version="m\udc00"), replaced=replaced)
    values = parse_summary([SUMMARY_TOPIC, body.encode()])
    assert (values["frame_uid"], values["model_version"]) == (repr("bad-\ud800"), repr("m\udc00"))
    assert values["run_uid"] == "run-a" and values["seq_num"] == 1 and replaced == {"not_utf8": 2}
