"""No run left behind: a `nanoseg serve` killed with SIGKILL mid-run and restarted on the same state
directory takes the run up again (same analysis run, frames sent while down counted as missed)
and closes it on the bus and in the store."""

from __future__ import annotations

import shutil
import signal
import sqlite3
import tempfile
import time
from pathlib import Path
from typing import Any

import zmq
from event_model import DocumentNames, compose_run, schema_validators

from nanoseg.codec import msgpack_dumps
from nanoseg_daemon.store import ResultReader, ResultStore, default_path
from tests.hardening.hardening_fixtures import (
    ServeProcess,
    serve_overrides,
    small_frame,
    start_lean_service,
    total,
    wait_for,
    write_config,
)
from tests.hardening.test_faults import DocCollector


def test_sigkill_mid_run_then_restart_resumes_the_same_analysis_run(tmp_path: Path, trained_model_path: Path) -> None:
    state = tmp_path / "state"
    sockets = Path(tempfile.mkdtemp(prefix="ns-", dir="/tmp"))  # short: ipc paths have a length limit
    ctx: zmq.Context[Any] = zmq.Context()
    source = ctx.socket(zmq.PUB)  # the raw run's documents, in bluesky's 0MQ wire format
    source.linger = 0
    source.bind(f"ipc://{sockets}/in")

    def send(name: str, doc: dict[str, Any]) -> None:
        source.send(b" ".join([b"", name.encode(), msgpack_dumps(doc)]))

    config = write_config(tmp_path / "serve.yaml", serve_overrides(state, trained_model_path, sockets, **{
        "ingest.raw.enabled": "false", "ingest.bluesky.enabled": "true",
        "ingest.bluesky.address": f"ipc://{sockets}/in"}))
    bundle = compose_run(metadata={"pixel_size_nm": 8.0})
    raw_uid = bundle.start_doc["uid"]
    desc = bundle.compose_descriptor(name="primary", data_keys={"img": {"dtype": "array", "shape": [64, 64],
                                                                       "source": "cam"}})
    events = [desc.compose_event(data={"img": small_frame(k)}, timestamps={"img": time.time()}) for k in range(20)]
    collector = DocCollector(f"ipc://{sockets}/docs")

    def connected(proc: ServeProcess) -> None:
        """Wait until the daemon's SUB gets what is sent (a probe document it counts)."""
        def probed() -> bool:
            send("bogus_probe_document", {})
            time.sleep(0.1)
            return total(proc.metrics(), "nanoseg_messages_rejected_total") > 0

        wait_for(probed, 30, "the daemon to subscribe")

    def processed(proc: ServeProcess) -> int:
        return total(proc.metrics(), "nanoseg_frames_processed_total")

    first = ServeProcess(config, tmp_path / "serve.log")
    try:
        first.wait_started()
        connected(first)
        send("start", dict(bundle.start_doc))
        send("descriptor", dict(desc.descriptor_doc))
        for ev in events[:8]:
            send("event", ev)
        wait_for(lambda: processed(first) == 8, 60, "8 frames stored before the kill")
        first.signal(signal.SIGKILL)
        assert first.wait(30) == -signal.SIGKILL
        for ev in events[8:12]:  # sent while the daemon is down: missed
            send("event", ev)
        second = ServeProcess(config, tmp_path / "serve.log")
        try:
            second.wait_started()
            resumed = second.event("run_resumed")
            assert resumed is not None and resumed["run"] == raw_uid and resumed["stored_frames"] == 8
            connected(second)
            for ev in events[12:]:
                send("event", ev)
            send("stop", dict(bundle.compose_stop()))
            wait_for(lambda: processed(second) == 8, 60, "the 8 frames after the restart")
            docs = collector.run_of(raw_uid, timeout=60)
            second.signal(signal.SIGTERM)
            assert second.wait(60) == 0
        finally:
            second.close()
    finally:
        first.close()
        collector.close()
        source.close(0)
        ctx.term()
        shutil.rmtree(sockets, ignore_errors=True)

    # the bus: one analysis run (one start, one descriptor), 16 events numbered 1..16, one stop
    names = [n for n, _ in docs]
    assert names.count("start") == 1 and names.count("descriptor") == 1 and names[-1] == "stop"
    for name, doc in docs:
        schema_validators[DocumentNames[name]].validate(doc)
    analysed = [d for n, d in docs if n == "event"]
    assert [e["seq_num"] for e in analysed] == list(range(1, 17))
    assert [e["data"]["frame_uid"] for e in analysed] == [ev["uid"] for ev in events[:8] + events[12:]]
    stop = docs[-1][1]
    assert stop["exit_status"] == "success" and "4 frames missed" in stop["reason"], stop
    # the store: the same 16 frames, the run closed with the reason, nothing left open
    reader = ResultReader(default_path(state))
    assert [f.frame_uid for f in reader.frames(raw_uid)] == [ev["uid"] for ev in events[:8] + events[12:]]
    run = next(r for r in reader.runs() if r.run_uid == raw_uid)
    assert run.exit_status == "success" and "4 frames missed" in run.metadata["stop_reason"]
    assert reader.open_runs() == []
    with sqlite3.connect(default_path(state)) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)


def test_a_run_whose_stop_came_while_down_is_closed_abort_after_the_resume_timeout(
        tmp_path: Path, trained_model_path: Path) -> None:
    run = compose_run()
    desc = run.compose_descriptor(name="primary", data_keys={"img": {"dtype": "array", "shape": [64, 64],
                                                                    "source": "cam"}})
    store = ResultStore(default_path(tmp_path))  # what a daemon killed during the run left behind
    store.run_opened(dict(run.start_doc))
    store.descriptor_added(run.start_doc["uid"], dict(desc.descriptor_doc))
    store.close()
    ctx: zmq.Context[Any] = zmq.Context()
    source = ctx.socket(zmq.PUB)  # the publisher of the raw run, which sends nothing more
    source.linger = 0
    source.bind("tcp://127.0.0.1:*")
    svc = start_lean_service(tmp_path, trained_model_path, **{
        "ingest.bluesky.enabled": "true", "ingest.bluesky.address": source.getsockopt_string(zmq.LAST_ENDPOINT),
        "publish.resume_timeout_s": "2.0"})
    assert svc.doc_pub is not None
    collector = DocCollector(svc.doc_pub.address)
    try:
        docs = collector.run_of(run.start_doc["uid"], timeout=30)
    finally:
        collector.close()
        assert svc.stop()
        source.close(0)
        ctx.term()
    stop = docs[-1][1]
    assert stop["exit_status"] == "abort" and "within 2 s of the restart" in stop["reason"], stop
    reader = ResultReader(default_path(tmp_path))
    (rec,) = reader.runs()
    assert rec.exit_status == "abort" and "within 2 s" in rec.metadata["stop_reason"]
    assert reader.open_runs() == []
