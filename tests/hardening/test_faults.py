"""Faults around a running daemon; after each, nothing stored is lost or duplicated, the model that
served before still serves, and the counters say what happened.

In-process daemons for the socket and store faults; `nanoseg serve` subprocesses for the signals.
"""

from __future__ import annotations

import json
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import zmq
from bluesky.callbacks.zmq import Publisher
from event_model import compose_run

from nanoseg.codec import msgpack_dumps, msgpack_loads
from nanoseg.control_client import control_request
from nanoseg_daemon.store import ResultReader, ResultStore, default_path
from nanoseg_sim.demo import free_ports
from tests.hardening.hardening_fixtures import (
    Pusher,
    ServeProcess,
    by_reason,
    raw_frame_message,
    serve_overrides,
    small_frame,
    start_lean_service,
    svc_metrics,
    total,
    wait_for,
    write_config,
)

PROCESSED = "nanoseg_frames_processed_total"


def processed(m: dict[str, dict[str, float]]) -> int:
    return total(m, PROCESSED)


def stored_uids(state_dir: Path, run_uid: str) -> list[str]:
    return [f.frame_uid for f in ResultReader(default_path(state_dir)).frames(run_uid)]


# -- the bluesky proxy restarts ----------------------------------------------------------------


@contextmanager
def proxy_process(in_port: int, out_port: int) -> Iterator[subprocess.Popen[bytes]]:
    exe = Path(sys.executable).parent / "bluesky-0MQ-proxy"
    proc = subprocess.Popen([str(exe), "--in-address", f"tcp://127.0.0.1:{in_port}",
                             "--out-address", f"tcp://127.0.0.1:{out_port}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_proxy_restart_mid_run_bluesky_input_reconnects(tmp_path: Path, trained_model_path: Path) -> None:
    in_port, out_port = free_ports(2)
    svc = start_lean_service(tmp_path, trained_model_path, **{
        "ingest.raw.enabled": "false", "ingest.bluesky.enabled": "true",
        "ingest.bluesky.address": f"tcp://127.0.0.1:{out_port}"})
    publisher = Publisher(f"tcp://127.0.0.1:{in_port}", serializer=msgpack_dumps)
    version = svc.slot.current.version
    bundle = compose_run(metadata={"pixel_size_nm": 8.0})
    desc = bundle.compose_descriptor(name="primary", data_keys={"img": {"dtype": "array", "shape": [64, 64],
                                                                       "source": "cam"}})
    events = [desc.compose_event(data={"img": small_frame(k)}, timestamps={"img": time.time()}) for k in range(8)]

    def probed(n_before: int) -> bool:  # a document the daemon counts proves the path proxy -> daemon
        publisher("bogus_probe_document", {})
        time.sleep(0.1)
        return by_reason(svc_metrics(svc), "nanoseg_messages_rejected_total").get("unknown_document", 0) > n_before

    try:
        with proxy_process(in_port, out_port):
            wait_for(lambda: probed(0), 30, "the first proxy to connect publisher and daemon")
            publisher("start", bundle.start_doc)
            publisher("descriptor", desc.descriptor_doc)
            for ev in events[:4]:
                publisher("event", ev)
            wait_for(lambda: processed(svc_metrics(svc)) == 4, 60, "4 frames through the first proxy")
        probes = by_reason(svc_metrics(svc), "nanoseg_messages_rejected_total")["unknown_document"]
        time.sleep(1.0)  # the daemon's SUB sees the proxy gone and starts reconnecting
        with proxy_process(in_port, out_port):
            wait_for(lambda: probed(probes), 30, "publisher and daemon to reconnect to the new proxy")
            for ev in events[4:]:
                publisher("event", ev)
            publisher("stop", bundle.compose_stop())
            wait_for(lambda: processed(svc_metrics(svc)) == 8 and not svc.status()["open_runs"], 60,
                     "the rest of the run through the restarted proxy")
        m = svc_metrics(svc)
        assert set(by_reason(m, "nanoseg_messages_rejected_total")) == {"unknown_document"}  # the probes only
        assert not by_reason(m, "nanoseg_frames_failed_total") and not by_reason(m, "nanoseg_frames_dropped_total")
        assert svc.slot.current.version == version
    finally:
        publisher.close()
        assert svc.stop()
    assert stored_uids(tmp_path, bundle.start_doc["uid"]) == [ev["uid"] for ev in events]
    run = next(r for r in ResultReader(default_path(tmp_path)).runs() if r.run_uid == bundle.start_doc["uid"])
    assert run.exit_status == "success" and run.frame_count == 8


# -- nobody listens, or somebody listens too slowly --------------------------------------------


def test_no_subscriber_for_results(tmp_path: Path, trained_model_path: Path) -> None:
    """Results are stored and the pipeline runs while nobody subscribes, or the proxy is absent."""
    dead = f"tcp://127.0.0.1:{free_ports(1)[0]}"  # no proxy listens there
    svc = start_lean_service(tmp_path, trained_model_path, **{
        "publish.bluesky.bind": "false", "publish.bluesky.address": dead})
    assert svc.ingest.raw_address and svc.summary_pub
    client = Pusher(svc.ingest.raw_address)
    try:
        for i in range(5):
            client.send(raw_frame_message(i, small_frame(i)))
        wait_for(lambda: processed(svc_metrics(svc)) == 5, 60, "5 frames analysed with no subscriber")
        late = Pusher(None, svc.summary_pub.address)  # a subscriber that comes late gets what follows
        try:
            for i in range(5, 7):
                client.send(raw_frame_message(i, small_frame(i)))
            assert [s["seq_num"] for s in late.summaries(2, timeout_s=60)] == [6, 7]
        finally:
            late.close()
        m = svc_metrics(svc)
        assert processed(m) == 7 and not by_reason(m, "nanoseg_publish_dropped_total")
    finally:
        client.close()
        assert svc.stop()
    assert stored_uids(tmp_path, "raw:detector:r1") == [f"raw:detector:r1:{i}" for i in range(7)]


def stalled_sub(ctx: zmq.Context[Any], address: str) -> zmq.Socket[Any]:
    """A subscriber that takes almost nothing and never reads."""
    sock = ctx.socket(zmq.SUB)
    sock.linger = 0
    sock.setsockopt(zmq.RCVHWM, 1)
    sock.setsockopt(zmq.RCVBUF, 4096)
    sock.setsockopt(zmq.SUBSCRIBE, b"")
    sock.connect(address)
    return sock


def test_slow_result_consumer_never_blocks_analysis(tmp_path: Path, trained_model_path: Path) -> None:
    """Subscribers that never read: publication drops (counted), analysis and storage go on."""
    ctx: zmq.Context[Any] = zmq.Context()
    source = ctx.socket(zmq.PUB)  # bluesky documents in: many short runs make many documents out
    source.linger = 0
    source.bind("tcp://127.0.0.1:*")
    svc = start_lean_service(tmp_path, trained_model_path, **{
        "ingest.bluesky.enabled": "true", "ingest.bluesky.address": source.getsockopt_string(zmq.LAST_ENDPOINT),
        "publish.send_hwm": "1"})
    assert svc.doc_pub and svc.summary_pub and svc.ingest.raw_address
    stalled = [stalled_sub(ctx, svc.doc_pub.address), stalled_sub(ctx, svc.summary_pub.address)]
    client = Pusher(svc.ingest.raw_address)
    version = svc.slot.current.version
    n_runs, every = 200, 40
    n_frames = n_runs // every
    runs = [compose_run(metadata={"scan_id": k}) for k in range(n_runs)]

    def send(name: str, doc: dict[str, Any]) -> None:
        source.send(b" ".join([b"", name.encode(), msgpack_dumps(doc)]))

    try:
        time.sleep(0.5)  # slow joiners
        t0 = time.monotonic()
        for k, bundle in enumerate(runs):
            send("start", bundle.start_doc)
            send("stop", bundle.compose_stop())
            if k % every == 0:
                client.send(raw_frame_message(k, small_frame(k)))
        client.send(end_of_run("r1"))
        wait_for(lambda: processed(svc_metrics(svc)) == n_frames and not svc.status()["open_runs"], 120,
                 "every frame analysed and every run closed")
        elapsed = time.monotonic() - t0
        m = svc_metrics(svc)
        dropped = by_reason(m, "nanoseg_publish_dropped_total")
        assert dropped.get("bluesky", 0) > 0, dropped  # 3 documents per run, far beyond what the stalled peer takes
        assert svc.doc_pub.dropped == dropped["bluesky"]
        assert svc.slot.current.version == version
        print(f"\n{n_runs} runs + {n_frames} frames in {elapsed:.1f} s with stalled subscribers; dropped {dropped}")
    finally:
        for s in stalled:
            s.close(0)
        client.close()
        source.close(0)
        ctx.term()
        assert svc.stop()
    reader = ResultReader(default_path(tmp_path))
    stopped = [r for r in reader.runs() if r.exit_status == "success"]
    assert {r.run_uid for r in stopped} == {b.start_doc["uid"] for b in runs} | {"raw:detector:r1"}
    assert [r.frame_count for r in reader.runs() if r.run_uid == "raw:detector:r1"] == [n_frames]


# -- the store's disk is full ------------------------------------------------------------------


def fill_store(path: Path, max_bytes: int) -> int:
    """Fill a store to its size cap with padding runs, finished ones (earlier runs' history: a
    run left open would be closed by the next daemon); returns how many."""
    ResultStore(path, max_bytes=max_bytes).close()  # the schema
    k = 0
    with sqlite3.connect(path) as conn:
        page = conn.execute("PRAGMA page_size").fetchone()[0]
        conn.execute(f"PRAGMA max_page_count = {max(1, max_bytes // page)}")  # as the store caps it
        for chunk in (65536, 8192, 1024, 128, 16):
            while True:
                try:
                    conn.execute("""INSERT INTO runs (run_uid, started_at, stopped_at, exit_status, metadata,
                                    model_version) VALUES (?, 0, 0, 'success', ?, 'padding')""",
                                 (f"padding-{k}", json.dumps({"pad": "x" * chunk})))
                    conn.commit()
                except sqlite3.OperationalError as err:
                    assert "full" in str(err)
                    conn.rollback()
                    break
                k += 1
    return k


def test_disk_full_keeps_results_and_run_events_pending_and_stores_them_once_space_returns(
    tmp_path: Path, trained_model_path: Path
) -> None:
    max_bytes = 1 << 20
    padding = fill_store(default_path(tmp_path), max_bytes)
    svc = start_lean_service(tmp_path, trained_model_path, **{"store.max_bytes": str(max_bytes)})
    assert svc.ingest.raw_address and svc.summary_pub and svc.doc_pub
    docs = DocCollector(svc.doc_pub.address)
    client = Pusher(svc.ingest.raw_address, svc.summary_pub.address)
    version = svc.slot.current.version
    try:
        for i in range(6):
            client.send(raw_frame_message(i, small_frame(i)))
        client.send(end_of_run("r1"))
        wait_for(lambda: svc.status()["pending_store"] == 8, 60, "run start, 6 results and run stop waiting")
        m = svc_metrics(svc)
        assert by_reason(m, "nanoseg_store_errors_total").get("disk_full", 0) >= 1  # retried oldest first
        assert processed(m) == 0 and not client.summaries(1, timeout_s=0.5)  # nothing published before stored
        assert svc.status()["open_runs"] == ["raw:detector:r1"]
        with sqlite3.connect(default_path(tmp_path), timeout=10) as conn:  # an operator frees space
            conn.execute("DELETE FROM runs WHERE run_uid LIKE 'padding-%'")
        summaries = client.summaries(6, timeout_s=60)  # housekeeping retries the store every second
        assert [s["seq_num"] for s in summaries] == list(range(1, 7))
        wait_for(lambda: not svc.status()["open_runs"], 30, "the run closed once its stop is stored")
        client.send(raw_frame_message(0, small_frame(6), run="r2"))  # and the daemon goes on as usual
        assert len(client.summaries(1, timeout_s=60)) == 1
        m = svc_metrics(svc)
        assert processed(m) == 7 and svc.status()["pending_store"] == 0
        assert not by_reason(m, "nanoseg_frames_failed_total")  # nothing lost to store_overflow
        assert svc.slot.current.version == version
        analysis = docs.run_of("raw:detector:r1")
        assert [n for n, _ in analysis] == ["start", "descriptor", *["event"] * 6, "stop"]
        assert [d["data"]["frame_uid"] for n, d in analysis if n == "event"] == [
            f"raw:detector:r1:{i}" for i in range(6)]
    finally:
        docs.close()
        client.close()
        assert svc.stop()
    assert padding > 10
    assert stored_uids(tmp_path, "raw:detector:r1") == [f"raw:detector:r1:{i}" for i in range(6)]
    run = next(r for r in ResultReader(default_path(tmp_path)).runs() if r.run_uid == "raw:detector:r1")
    assert run.exit_status == "success" and run.metadata["pixel_size_nm"] == 8.0  # start and stop not lost


def end_of_run(run: str) -> list[bytes]:
    return [json.dumps({"run": run, "timestamp": time.time(), "end_of_run": True}).encode(), b""]


class DocCollector:
    """A SUB on the daemon's bluesky publication, decoding documents as they come (a thread)."""

    def __init__(self, address: str) -> None:
        self.docs: list[tuple[str, dict[str, Any]]] = []
        self._stop = threading.Event()
        self._ctx: zmq.Context[Any] = zmq.Context()
        self._sock = self._ctx.socket(zmq.SUB)
        self._sock.linger = 0
        self._sock.setsockopt(zmq.SUBSCRIBE, b"")
        self._sock.connect(address)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        time.sleep(0.3)  # slow joiner

    def _run(self) -> None:
        while not self._stop.is_set():
            if self._sock.poll(100):
                _prefix, name, payload = self._sock.recv().split(b" ", 2)
                self.docs.append((name.decode(), msgpack_loads(payload)))

    def run_of(self, raw_run_uid: str, timeout: float = 30.0) -> list[tuple[str, dict[str, Any]]]:
        """The analysis run's documents in arrival order, once its stop has come."""
        def complete() -> list[tuple[str, dict[str, Any]]] | None:
            docs = list(self.docs)
            start = next((d["uid"] for n, d in docs if n == "start" and d["raw_run_uid"] == raw_run_uid), None)
            desc = {d["uid"] for n, d in docs if n == "descriptor" and d["run_start"] == start}
            run = [(n, d) for n, d in docs if d.get("uid") == start or d.get("run_start") == start
                   or d.get("descriptor") in desc]
            return run if run and run[-1][0] == "stop" else None

        return wait_for(complete, timeout, f"the analysis run of {raw_run_uid}")  # type: ignore[no-any-return]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self._sock.close(0)
        self._ctx.term()


# -- model reload to a corrupt file ------------------------------------------------------------


def test_reload_to_corrupt_models_keeps_the_old_model_serving(tmp_path: Path, trained_model_path: Path) -> None:
    good = trained_model_path.read_bytes()
    corrupt = {"truncated.pt": good[: len(good) // 3], "empty.pt": b"",
               "flipped.pt": good[:4096] + bytes(b ^ 0xFF for b in good[4096:8192]) + good[8192:],
               "text.pt": b"not a checkpoint\n"}
    for name, data in corrupt.items():
        (tmp_path / name).write_bytes(data)
    svc = start_lean_service(tmp_path / "state", trained_model_path)
    assert svc.ingest.raw_address and svc.summary_pub
    client = Pusher(svc.ingest.raw_address, svc.summary_pub.address)
    version = svc.slot.current.version
    try:
        for i in range(3):
            client.send(raw_frame_message(i, small_frame(i)))
        for name in [*corrupt, "missing.pt"]:
            reply = control_request(svc.control.address, {"command": "reload_model", "path": str(tmp_path / name)},
                                    timeout_s=60)
            assert not reply["ok"] and f"still serving {version}" in reply["error"], (name, reply)
        for i in range(3, 6):
            client.send(raw_frame_message(i, small_frame(i)))
        summaries = client.summaries(6, timeout_s=90)
        assert [s["model_version"] for s in summaries] == [version] * 6
        m = svc_metrics(svc)
        assert by_reason(m, "nanoseg_model_reloads_total") == {"failed": len(corrupt) + 1}
        status = control_request(svc.control.address, {"command": "status"})["result"]
        assert status["model"]["version"] == version and status["processed"] == 6
    finally:
        client.close()
        assert svc.stop()
    frames = ResultReader(default_path(tmp_path / "state")).frames("raw:detector:r1")
    assert [f.model_version for f in frames] == [version] * 6


# -- signals to `nanoseg serve` ----------------------------------------------------------------


@contextmanager
def serve_process(state_dir: Path, model: Path, **extra: Any) -> Iterator[tuple[ServeProcess, Path]]:
    sockets = Path(tempfile.mkdtemp(prefix="ns-", dir="/tmp"))  # short: ipc paths have a length limit
    config = write_config(state_dir.parent / f"{state_dir.name}.yaml", serve_overrides(state_dir, model, sockets, **extra))
    proc = ServeProcess(config, state_dir.parent / f"{state_dir.name}.log")
    try:
        proc.wait_started()
        yield proc, sockets
    finally:
        proc.close()
        shutil.rmtree(sockets, ignore_errors=True)


def test_sigterm_mid_frame_drains_and_exits_0(tmp_path: Path, trained_model_path: Path) -> None:
    state = tmp_path / "state"
    n = 16  # batches of 4 are stored (and counted) together: the signal lands with 3 of them to go
    with serve_process(state, trained_model_path, **{"batching.max_batch": 4}) as (proc, sockets):
        client = Pusher(f"ipc://{sockets}/raw", f"ipc://{sockets}/summary")
        try:
            for i in range(n):
                client.send(raw_frame_message(i, small_frame(i)))
            def accepted() -> dict[str, dict[str, float]] | None:
                m = proc.metrics()
                return m if total(m, "nanoseg_frames_received_total") == n and processed(m) >= 1 else None

            m = wait_for(accepted, 60, "all frames accepted and the first analysed")
            proc.signal(signal.SIGTERM)
            assert processed(m) < n  # the signal lands mid-run: frames still queued or in analysis
            assert proc.wait(60) == 0
            assert len(client.summaries(n, timeout_s=5)) == n  # all published before the exit
        finally:
            client.close()
    stopped = proc.event("service_stopped")
    assert stopped is not None and stopped["drained"] is True and stopped["unstored_results"] == 0
    assert stopped["processed"] == n
    assert stored_uids(state, "raw:detector:r1") == [f"raw:detector:r1:{i}" for i in range(n)]


def test_sigkill_and_restart_keeps_stored_frames_and_never_duplicates(tmp_path: Path, trained_model_path: Path) -> None:
    state = tmp_path / "state"
    n = 30  # enough that the kill lands mid-run even when batches of small frames go fast
    frames = [raw_frame_message(i, small_frame(i)) for i in range(n)]
    with serve_process(state, trained_model_path) as (proc, sockets):
        client = Pusher(f"ipc://{sockets}/raw")
        try:
            for parts in frames:
                client.send(parts)
            wait_for(lambda: processed(proc.metrics()) >= 3, 60, "3 frames stored")
            proc.signal(signal.SIGKILL)
            assert proc.wait(30) == -signal.SIGKILL
        finally:
            client.close()
    before = {f.frame_uid: f.stored_at for f in ResultReader(default_path(state)).frames("raw:detector:r1")}
    assert 3 <= len(before) < n
    with serve_process(state, trained_model_path) as (proc, sockets):
        client = Pusher(f"ipc://{sockets}/raw")
        try:
            for parts in frames:  # the detector re-sends the whole run
                client.send(parts)
            def handled() -> dict[str, dict[str, float]] | None:
                m = proc.metrics()
                return m if processed(m) + total(m, "nanoseg_frames_dropped_total") == n else None

            m = wait_for(handled, 90, "every re-sent frame handled")
            assert processed(m) == n - len(before)
            assert by_reason(m, "nanoseg_frames_dropped_total") == {"duplicate": len(before)}
        finally:
            client.close()
        proc.signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    after = ResultReader(default_path(state)).frames("raw:detector:r1")
    assert [f.frame_uid for f in after] == [f"raw:detector:r1:{i}" for i in range(n)]
    assert {f.frame_uid: f.stored_at for f in after if f.frame_uid in before} == before  # untouched
    with sqlite3.connect(default_path(state)) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)


def test_a_second_daemon_on_the_same_state_dir_is_refused_at_once(tmp_path: Path, trained_model_path: Path) -> None:
    """Two daemons on one store would each close and take up the other's open runs at a restart:
    the second is refused naming the first's pid, in a process (exit 2) and in the same process;
    the directory is free again once the first stops, or is killed (the kernel drops the lock)."""
    from nanoseg_daemon.service import StateDirInUse

    state = tmp_path / "state"
    with serve_process(state, trained_model_path) as (first, _sockets):
        sockets = Path(tempfile.mkdtemp(prefix="ns-", dir="/tmp"))
        try:
            config = write_config(tmp_path / "second.yaml", serve_overrides(state, trained_model_path, sockets))
            second = ServeProcess(config, tmp_path / "second.log")
            assert second.proc.wait(120) == 2
            log = (tmp_path / "second.log").read_text()
            assert f"is in use by another nanoseg daemon (pid {first.proc.pid})" in log
            with pytest.raises(StateDirInUse, match=f"pid {first.proc.pid}"):
                start_lean_service(state, trained_model_path)
        finally:
            shutil.rmtree(sockets, ignore_errors=True)
        first.signal(signal.SIGKILL)
        assert first.proc.wait(30) == -signal.SIGKILL
    svc = start_lean_service(state, trained_model_path)  # the killed daemon's lock went with it
    try:
        with pytest.raises(StateDirInUse):
            start_lean_service(state, trained_model_path)
    finally:
        assert svc.stop()
    assert start_lean_service(state, trained_model_path).stop()  # stopped: free again
