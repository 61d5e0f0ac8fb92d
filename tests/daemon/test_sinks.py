"""daemon/sinks.py: the sink chain's order, retries, duplicates and errors, with the real store.

``Recorder`` is a sink written for the test against the ``Sink`` interface (as a Tiled sink
would be); the store is the real SQLite ``ResultStore`` behind ``StoreSink``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from nanoseg.instances import Instances
from nanoseg.masks import RLE
from nanoseg.particle_stats import frame_summary, particle_table
from nanoseg_daemon.contracts import FrameMetadata, FrameResult, RunStarted, RunStopped
from nanoseg_daemon.metrics import DaemonMetrics
from nanoseg_daemon.sinks import SinkChain, SinkError, StoreSink
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
