"""daemon/sinks.py: the sink chain's order, retries, duplicates and errors, with the real store.

``Recorder`` is a sink written for the test against the ``Sink`` interface (as a Tiled sink
would be); the store is the real SQLite ``ResultStore`` behind ``StoreSink``.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import zmq

from nanoseg.codec import msgpack_dumps, msgpack_loads
from nanoseg.instances import Instances
from nanoseg.masks import RLE
from nanoseg.particle_stats import frame_summary, particle_table
from nanoseg_daemon.contracts import FrameMetadata, FrameResult, RunStarted, RunStopped
from nanoseg_daemon.growth import GrowthConfig, GrowthMonitor
from nanoseg_daemon.metrics import DaemonMetrics
from nanoseg_daemon.publish import DocumentPublisher
from nanoseg_daemon.sinks import BlueskySink, LogLimiter, SinkChain, SinkError, StoreSink
from nanoseg_daemon.store import ResultStore


def result(run: str, seq: int, n_wires: int = 1) -> FrameResult:
    masks = np.zeros((n_wires, 32, 32), bool)
    for i in range(n_wires):
        masks[i, 4 * i: 4 * i + 3, 2:30] = True  # 28 x 3 px rods
    boxes = np.array([[2, 4 * i, 30, 4 * i + 3] for i in range(n_wires)], np.float32).reshape(-1, 4)
    table = particle_table(masks, None, 10.0)
    inst = Instances(boxes, np.full(n_wires, 0.9, np.float32), masks)
    return FrameResult(run, f"{run}/{seq}", seq, 1000.0 + seq, inst, table, frame_summary(table), "m@1", {},
                       {"infer": 0.01}, {}, received_monotonic=time.monotonic())


def start(run: str) -> RunStarted:
    return RunStarted(run, FrameMetadata(), {"uid": run}, 1000.0)


class Recorder:
    """A sink that writes down what it gets; ``fail`` raises SinkError while it is > 0."""

    def __init__(self, name: str, durable: bool = False, fail: int = 0, bug: bool = False) -> None:
        self.name, self.durable, self.fail, self.bug = name, durable, fail, bug
        self.got: list[str] = []
        self.rle_counts: list[int] = []
        self.stops: list[RunStopped] = []
        self.closed = False

    def _take(self, what: str) -> None:
        if self.bug:
            raise ZeroDivisionError("a bug in the sink")
        if self.fail > 0:
            self.fail -= 1
            raise SinkError("unreachable", f"{self.name} is down")
        self.got.append(what)

    def open_run(self, run: RunStarted) -> None:
        self._take(f"open {run.run_uid}")

    def write_frame(self, result: FrameResult, rles: Sequence[RLE]) -> bool:
        self._take(result.frame_uid)
        self.rle_counts.append(len(rles))
        return True

    def close_run(self, stop: RunStopped) -> None:
        self._take(f"close {stop.run_uid} {stop.exit_status}")
        self.stops.append(stop)

    def close(self) -> None:
        self.closed = True


def value(m: DaemonMetrics, name: str, **labels: str) -> float:
    return m.registry.get_sample_value(name, labels) or 0.0


def test_store_first_then_the_others_in_order_and_a_replayed_frame_goes_no_further(tmp_path: Path) -> None:
    m = DaemonMetrics()
    store = ResultStore(tmp_path / "results.sqlite")
    rec = Recorder("tiled")
    chain = SinkChain([StoreSink(store, lambda: "m@1", m), rec], m, max_pending=10)
    chain.put(start("r"))
    assert chain.open_runs == ["r"] and value(m, "nanoseg_open_runs") == 1
    chain.put(result("r", 1, n_wires=2))
    chain.put(result("r", 1, n_wires=2))  # replayed: the store refuses it
    chain.put(result("r", 2))
    chain.put(RunStopped("r", "success", 1010.0))
    assert rec.got == ["open r", "r/1", "r/2", "close r success"]
    assert rec.rle_counts == [2, 1]  # the masks' RLE, one per particle, encoded once for all sinks
    assert value(m, "nanoseg_frames_dropped_total", reason="duplicate") == 1
    assert value(m, "nanoseg_frames_processed_total") == 2 == chain.processed
    assert [f.frame_uid for f in store.frames("r")] == ["r/1", "r/2"]
    assert store.runs()[0].exit_status == "success"
    assert chain.open_runs == [] and value(m, "nanoseg_open_runs") == 0
    assert chain.close() == 0 and rec.closed


def test_a_failing_durable_sink_holds_everything_after_it_in_order_until_it_recovers() -> None:
    m = DaemonMetrics()
    durable = Recorder("archive", durable=True, fail=3)
    after = Recorder("summary")
    chain = SinkChain([durable, after], m, max_pending=10)
    chain.put(start("r"))  # attempt 1 fails
    chain.put(result("r", 1))  # attempt 2 (the start again) fails
    assert after.got == [] and chain.pending == 2 and chain.processed == 0
    chain.retry()  # attempt 3 fails
    chain.retry()  # succeeds: start and frame go on, in order
    chain.put(RunStopped("r", "abort", 1.0))
    assert durable.got == after.got == ["open r", "r/1", "close r abort"]
    assert value(m, "nanoseg_sink_errors_total", sink="archive", reason="unreachable") == 3
    assert chain.pending == 0 and chain.processed == 1


def test_overflow_loses_the_oldest_frame_but_run_boundaries_still_reach_the_later_sinks() -> None:
    m = DaemonMetrics()
    durable = Recorder("archive", durable=True, fail=100)
    after = Recorder("summary")
    chain = SinkChain([durable, after], m, max_pending=1)
    chain.put(start("r"))
    chain.put(result("r", 1))  # the start is lost (oldest), but passed on
    chain.put(RunStopped("r", "success", 1.0))  # the frame is lost
    assert after.got == ["open r"]
    assert value(m, "nanoseg_frames_failed_total", reason="archive_overflow") == 1
    durable.fail = 0
    chain.retry()
    assert durable.got == ["close r success"] and after.got == ["open r", "close r success"]
    assert chain.open_runs == [] and chain.processed == 0


def test_a_failing_or_buggy_publisher_is_counted_and_skipped() -> None:
    m = DaemonMetrics()
    down, buggy, last = Recorder("bluesky", fail=1), Recorder("summary", bug=True), Recorder("tiled")
    chain = SinkChain([down, buggy, last], m, max_pending=10)
    chain.put(start("r"))
    chain.put(result("r", 1))
    assert down.got == ["r/1"] and last.got == ["open r", "r/1"] and chain.pending == 0
    assert value(m, "nanoseg_sink_errors_total", sink="bluesky", reason="unreachable") == 1
    assert value(m, "nanoseg_sink_errors_total", sink="summary", reason="internal_error") == 2
    assert chain.processed == 1  # no durable sink: counted before the publishers


def test_a_run_without_start_or_frame_for_the_timeout_is_reported_once() -> None:
    chain = SinkChain([], DaemonMetrics(), max_pending=1)
    chain.put(start("r"))
    assert chain.stale_runs(3600.0) == []
    assert chain.stale_runs(0.0) == ["r"] and chain.stale_runs(0.0) == []


def test_frames_that_come_together_are_stored_in_one_commit_before_any_is_published(tmp_path: Path) -> None:
    m = DaemonMetrics()
    store = ResultStore(tmp_path / "results.sqlite")
    commits: list[str] = []
    write = store._write

    def counted(what: str):  # type: ignore[no-untyped-def]
        commits.append(what)
        return write(what)

    store._write = counted  # type: ignore[method-assign]

    class Checker(Recorder):
        def write_frame(self, result: FrameResult, rles: Sequence[RLE]) -> bool:
            assert result.frame_uid in {f.frame_uid for f in store.frames(result.run_uid)}  # stored first
            return super().write_frame(result, rles)

    rec = Checker("bluesky")
    chain = SinkChain([StoreSink(store, lambda: "m@1", m), rec], m, max_pending=10)
    chain.put(result("r", 1))
    chain.put_many([start("r"), result("r", 1), result("r", 2, n_wires=0), result("r", 3, n_wires=3),
                    RunStopped("r", "success", 1010.0)])
    assert rec.got == ["r/1", "open r", "r/2", "r/3", "close r success"]  # r/1 again: a duplicate
    assert [c.split()[0] for c in commits] == ["add_frame", "add_run", "add_frame", "stop_run"]
    assert commits[2] == "add_frame r/1 (+2)"  # one transaction for the three frames
    assert value(m, "nanoseg_frames_dropped_total", reason="duplicate") == 1
    assert chain.processed == 3 and [p["frame_uid"] for p in store.particles("r")] == ["r/1"] + ["r/3"] * 3
    assert store.add_frames([]) == []


class GroupRecorder(Recorder):
    """A durable sink that also takes frames in groups (as the store does)."""

    def __init__(self, name: str, fail: int = 0) -> None:
        super().__init__(name, durable=True, fail=fail)
        self.groups: list[int] = []

    def write_frames(self, results: Sequence[FrameResult], rles: Sequence[Sequence[RLE]]) -> list[bool]:
        self._take(f"group of {len(results)}")
        self.groups.append(len(results))
        return [True] * len(results)


def test_a_group_the_durable_sink_refuses_waits_whole_and_goes_on_in_order() -> None:
    m = DaemonMetrics()
    durable, after = GroupRecorder("archive", fail=1), Recorder("summary")
    chain = SinkChain([durable, after], m, max_pending=10)
    chain.put_many([result("r", 1), result("r", 2)])  # refused: nothing goes on
    assert after.got == [] and chain.pending == 2 and chain.processed == 0
    chain.put_many([result("r", 3)])
    assert durable.groups == [3] and after.got == ["r/1", "r/2", "r/3"] and chain.processed == 3
    assert value(m, "nanoseg_sink_errors_total", sink="archive", reason="unreachable") == 1


def test_a_bad_frame_in_a_group_fails_alone(tmp_path: Path) -> None:
    m = DaemonMetrics()
    store = ResultStore(tmp_path / "results.sqlite")
    rec = Recorder("summary")
    chain = SinkChain([StoreSink(store, lambda: "m@1", m), rec], m, max_pending=10)
    good = result("r", 2)
    bad = FrameResult(**{**good.__dict__, "frame_uid": "r/bad", "table": result("r", 1, n_wires=2).table})
    bad.__dict__.pop("summary_json", None)
    chain.put_many([result("r", 1), bad, result("r", 3)])  # table of 2 particles, 1 instance: a bug
    assert [f.frame_uid for f in store.frames("r")] == ["r/1", "r/3"]
    assert value(m, "nanoseg_sink_errors_total", sink="store", reason="internal_error") == 1
    assert rec.got == ["r/1", "r/bad", "r/3"]  # counted, and passed on as any sink's bug is


# -- items the store can never take ----------------------------------------------------------


def with_(r: FrameResult, **changes: Any) -> FrameResult:
    """``r`` with some fields changed (a frame the stages could hand on)."""
    return FrameResult(**{**{k: v for k, v in r.__dict__.items() if k != "summary_json"}, **changes})


def test_an_item_the_store_can_never_take_is_given_up_alone_and_the_rest_goes_on(tmp_path: Path) -> None:
    """A run start with a NaN time and frames with a NaN timestamp or a seq_num beyond 64 bits
    (SQLite: NOT NULL constraint / cannot bind): each is refused at once, counted and logged, and
    never holds the good items behind it, alone or in a group; the run's stop counts its lost frame."""
    m = DaemonMetrics()
    store = ResultStore(tmp_path / "results.sqlite")
    rec = Recorder("bluesky")
    chain = SinkChain([StoreSink(store, lambda: "m@1", m), rec], m, max_pending=10)
    chain.put(RunStarted("nan", FrameMetadata(), {"uid": "nan"}, math.nan))  # refused, passed on
    chain.put(result("nan", 1))  # stored: the frame makes the run's row
    chain.put(RunStopped("nan", "success", 1010.0))
    chain.put(start("r"))
    chain.put(with_(result("r", 1), timestamp=math.nan))  # alone
    chain.put(result("r", 2))
    chain.put_many([result("r", 3), with_(result("r", 4), seq_num=2**70), result("r", 5)])  # in a group
    chain.put(RunStopped("r", "success", 1020.0))
    assert chain.pending == 0
    assert rec.got == ["open nan", "nan/1", "close nan success", "open r", "r/2", "r/3", "r/5", "close r success"]
    assert rec.stops[-1].rejected == {"store_rejected": 2}  # the run's losses, for its analysis stop
    assert [f.frame_uid for f in store.frames("r")] == ["r/2", "r/3", "r/5"]
    runs = {r.run_uid: r for r in store.runs()}
    assert runs["nan"].exit_status == runs["r"].exit_status == "success" and runs["nan"].frame_count == 1
    assert value(m, "nanoseg_sink_errors_total", sink="store", reason="rejected") == 3
    assert value(m, "nanoseg_store_errors_total", reason="rejected") == 4  # and the group's transaction
    assert value(m, "nanoseg_frames_failed_total", reason="store_rejected") == 2
    assert value(m, "nanoseg_frames_processed_total") == 4 == chain.processed
    assert chain.open_runs == [] and chain.close() == 0


def test_a_durable_sink_error_that_a_retry_may_cure_still_holds_the_items() -> None:
    m = DaemonMetrics()
    durable, after = Recorder("archive", durable=True, fail=1), Recorder("summary")
    chain = SinkChain([durable, after], m, max_pending=10)
    chain.put(result("r", 1))
    assert chain.pending == 1 and after.got == [] and value(m, "nanoseg_frames_failed_total", reason="archive_rejected") == 0
    chain.retry()
    assert after.got == ["r/1"] and chain.pending == 0


# -- the bluesky sink on a real socket --------------------------------------------------------


class Bus:
    """A real DocumentPublisher (bound on loopback) and a SUB that collects what it sends."""

    def __init__(self, serializer: Any = "msgpack") -> None:
        self.ctx: zmq.Context[Any] = zmq.Context()
        self.pub = DocumentPublisher("tcp://127.0.0.1:*", bind=True, serializer=serializer, context=self.ctx)
        self.sub = self.ctx.socket(zmq.SUB)
        self.sub.linger = 0
        self.sub.setsockopt(zmq.SUBSCRIBE, b"")
        self.sub.connect(self.pub.address)
        assert self.pub.wait_for_subscriber(10.0)

    def docs(self, until: int, timeout_s: float = 10.0) -> list[tuple[str, dict[str, Any]]]:
        """The documents sent, once ``until`` have come (or the timeout)."""
        out: list[tuple[str, dict[str, Any]]] = []
        deadline = time.monotonic() + timeout_s
        while len(out) < until and time.monotonic() < deadline:
            if self.sub.poll(100):
                _prefix, name, body = self.sub.recv().split(b" ", 2)
                out.append((name.decode(), msgpack_loads(body)))
        while self.sub.poll(300):  # and nothing more
            _prefix, name, body = self.sub.recv().split(b" ", 2)
            out.append((name.decode(), msgpack_loads(body)))
        return out

    def close(self) -> None:
        self.sub.close(0)
        self.pub.close()
        self.ctx.term()


def bluesky_sink(bus: Bus, m: DaemonMetrics) -> BlueskySink:
    return BlueskySink(bus.pub, GrowthMonitor(GrowthConfig(), m), lambda: ("m@1", {"profile": "test"}), m)


def test_a_late_stop_or_frame_of_a_run_closed_for_inactivity_does_not_open_it_again(tmp_path: Path) -> None:
    """The service closes a run for inactivity (exit status timeout); its own stop, and a frame,
    come later: no second analysis run, the first exit status stays, the frame is stored only.
    A new start of the run opens it again."""
    m = DaemonMetrics()
    store = ResultStore(tmp_path / "results.sqlite")
    bus = Bus()
    chain = SinkChain([StoreSink(store, lambda: "m@1", m), bluesky_sink(bus, m)], m, max_pending=10)
    try:
        chain.put_many([start("r"), result("r", 1)])
        chain.put(RunStopped("r", "timeout", time.time()))  # the service's (run_stop_timeout_s)
        chain.put(result("r", 2))  # late frame
        chain.put(RunStopped("r", "success", time.time()))  # the run's own, late
        chain.put(RunStopped("r", "success", time.time()))  # and again
        assert chain.open_runs == [] and chain.stale_runs(0.0) == [] and chain.pending == 0
        docs = bus.docs(until=4)
        assert [n for n, _ in docs] == ["start", "descriptor", "event", "stop"], docs
        assert docs[-1][1]["exit_status"] == "fail" and "timeout" in docs[-1][1]["reason"]
        (run,) = store.runs()
        assert run.exit_status == "timeout" and [f.frame_uid for f in store.frames("r")] == ["r/1", "r/2"]
        assert value(m, "nanoseg_closed_run_items_total", reason="late_stop") == 2
        assert value(m, "nanoseg_closed_run_items_total", reason="late_frame") == 1
        assert value(m, "nanoseg_frames_processed_total") == 2  # stored: processed
        chain.put_many([start("r"), result("r", 3), RunStopped("r", "success", time.time())])  # opened again
        again = bus.docs(until=4)
        assert [n for n, _ in again] == ["start", "descriptor", "event", "stop"]
        assert again[-1][1]["exit_status"] == "success" and store.runs()[0].exit_status == "success"
    finally:
        chain.close()
        bus.close()


def test_the_bluesky_sink_alone_never_opens_a_closed_run_again() -> None:
    m = DaemonMetrics()
    bus = Bus()
    sink = bluesky_sink(bus, m)
    try:
        sink.open_run(start("r"))
        sink.write_frame(result("r", 1), [])
        sink.close_run(RunStopped("r", "timeout", time.time()))
        sink.close_run(RunStopped("r", "success", time.time()))
        try:
            sink.write_frame(result("r", 2), [])
            raise AssertionError("a frame of a closed run was taken")
        except SinkError as err:
            assert err.reason == "run_closed"
        assert [n for n, _ in bus.docs(until=4)] == ["start", "descriptor", "event", "stop"]
    finally:
        sink.close()
        bus.close()


def big_int_start(run: str) -> RunStarted:
    return RunStarted(run, FrameMetadata(extra={"sample": "V2O5", "count": 2**70, "ok": 2**63}), {"uid": run}, 1000.0)


def test_start_metadata_msgpack_cannot_carry_is_published_as_its_repr_and_counted() -> None:
    m = DaemonMetrics()
    bus = Bus()
    chain = SinkChain([bluesky_sink(bus, m)], m, max_pending=10)
    try:
        chain.put_many([big_int_start("big"), result("big", 1), RunStopped("big", "success", time.time())])
        docs = bus.docs(until=4)
        assert [n for n, _ in docs] == ["start", "descriptor", "event", "stop"]
        raw = docs[0][1]["raw_metadata"]
        assert raw["count"] == repr(2**70) and raw["ok"] == 2**63 and raw["sample"] == "V2O5"
        assert value(m, "nanoseg_published_values_replaced_total", reason="int_beyond_64_bits") == 1
        assert value(m, "nanoseg_sink_errors_total", sink="bluesky", reason="internal_error") == 0
    finally:
        chain.close()
        bus.close()


def test_an_analysis_run_whose_opening_cannot_be_sent_publishes_nothing_after_it() -> None:
    """A serializer that refuses the start (or only the descriptor): no event of that run goes
    out, its stop only where its start did, each counted; the next run is published whole."""
    refuse: set[str] = set()

    def serializer(doc: Any) -> bytes:
        kind = "start" if "plan_name" in doc else "descriptor" if "data_keys" in doc else ""
        if kind in refuse and doc.get("raw_run_uid", doc.get("run_start")) is not None:
            raise OverflowError(f"cannot encode this {kind}")
        return msgpack_dumps(doc)

    m = DaemonMetrics()
    bus = Bus(serializer)
    chain = SinkChain([bluesky_sink(bus, m)], m, max_pending=10)
    try:
        refuse.add("start")
        chain.put_many([start("a"), result("a", 1), result("a", 2), RunStopped("a", "success", time.time())])
        assert bus.docs(until=0) == []
        refuse.clear()
        refuse.add("descriptor")
        chain.put_many([start("b"), result("b", 1), RunStopped("b", "success", time.time())])
        docs = bus.docs(until=2)
        assert [n for n, _ in docs] == ["start", "stop"]  # the run subscribers saw start is closed
        assert docs[1][1]["run_start"] == docs[0][1]["uid"] and docs[0][1]["raw_run_uid"] == "b"
        refuse.clear()
        chain.put_many([start("c"), result("c", 1), RunStopped("c", "success", time.time())])
        assert [n for n, _ in bus.docs(until=4)] == ["start", "descriptor", "event", "stop"]
        assert value(m, "nanoseg_sink_errors_total", sink="bluesky", reason="start_not_published") == 2
        assert value(m, "nanoseg_sink_errors_total", sink="bluesky", reason="run_unpublished") == 4  # a: 2 events + stop; b: 1 event
        assert value(m, "nanoseg_sink_errors_total", sink="bluesky", reason="internal_error") == 0
    finally:
        chain.close()
        bus.close()


def test_a_store_error_that_repeats_is_logged_once_per_interval_with_its_count(tmp_path: Path) -> None:
    from tests.daemon.test_tiled_sink import daemon_log_records
    from tests.hardening.test_faults import fill_store

    max_bytes = 1 << 20
    path = tmp_path / "results.sqlite"
    fill_store(path, max_bytes)  # a real full store: every write fails disk_full
    store = ResultStore(path, max_bytes=max_bytes)
    m = DaemonMetrics()
    rec = Recorder("later")
    chain = SinkChain([StoreSink(store, lambda: "m@1", m), rec], m, max_pending=5)
    now = [100.0]
    chain.log_limiter = LogLimiter(10.0, clock=lambda: now[0])

    def lines(records: list[Any], event: str) -> list[dict[str, Any]]:
        return [r.fields for r in records if r.getMessage() == event and r.levelno == logging.ERROR]

    with daemon_log_records() as records:
        chain.put(start("full"))
        for seq in range(1, 200):  # hundreds of items, one store error each, within a second
            chain.put(result("full", seq))
            now[0] += 0.001
        errors, lost = lines(records, "store_error"), lines(records, "result_lost")
        assert [(e["reason"], e["occurrences"]) for e in errors] == [("disk_full", 1)]  # the first at once
        assert [(e["reason"], e["occurrences"]) for e in lost] == [("store_overflow", 1)]
        now[0] += 10.0  # an interval later: one line each, with the count since the last
        chain.put(result("full", 200))
        errors, lost = lines(records, "store_error"), lines(records, "result_lost")
        assert [e["occurrences"] for e in errors] == [1, 200] and errors[1]["first_suppressed_ago_s"] > 10
        assert [e["occurrences"] for e in lost] == [1, 195]  # the start, then 195 frames
        chain.put(result("full", 201))  # and silent again until the next interval
        assert len(lines(records, "store_error")) == 2 and len(lines(records, "result_lost")) == 2
    # the metrics count every occurrence
    assert value(m, "nanoseg_sink_errors_total", sink="store", reason="disk_full") == 202
    assert value(m, "nanoseg_store_errors_total", reason="disk_full") == 202
    assert value(m, "nanoseg_frames_failed_total", reason="store_overflow") == 196  # 195 + 1 unlogged
    assert chain.pending == 5 and rec.got == ["open full"]  # the start went on; no frame was published
    store.close()
