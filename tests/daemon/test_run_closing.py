"""No run left open, none opened twice: real services on loopback and a real SQLite state directory.

A raw run open when a daemon stopped is closed by the next daemon on the same state directory (in
its own analysis run); a run the service closed for inactivity stays closed when its own stop
comes later.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from nanoseg_daemon.config import load_daemon_config
from nanoseg_daemon.service import Service
from nanoseg_daemon.store import ResultReader, ResultStore, default_path
from tests.daemon.results_fixtures import frame_result
from tests.daemon.service_fixtures import Client, service_overrides
from tests.hardening.hardening_fixtures import raw_frame_message, small_frame, wait_for
from tests.hardening.test_faults import DocCollector


def started(state: Path, model: Path, **extra: Any) -> tuple[Service, DocCollector]:
    """A service on ``state`` whose bluesky publication a collector hears from its first document."""
    svc = Service(load_daemon_config(None, service_overrides(state, model, **{"model.threads": "1", **extra}),
                                     environ={}))
    assert svc.doc_pub is not None
    docs = DocCollector(svc.doc_pub.address)
    assert svc.doc_pub.wait_for_subscriber(10.0)
    svc.start()
    return svc, docs


def names(docs: list[tuple[str, dict[str, Any]]], kind: str) -> list[dict[str, Any]]:
    return [d for n, d in docs if n == kind]


def test_a_raw_run_open_when_the_daemon_stopped_is_closed_by_the_next_daemon(tmp_path: Path,
                                                                             trained_model_path: Path) -> None:
    """The raw run's sender never sent end_of_run: the next daemon closes it at once (abort, the
    reason named) with a stop of the analysis run published before, and a run the store holds
    without its start too; nothing is left open."""
    first, docs1 = started(tmp_path, trained_model_path)
    client = Client(first)
    try:
        client.send(raw_frame_message(0, small_frame(0), run="never_ended"))
        wait_for(lambda: len(names(docs1.docs, "event")) == 1, 60, "the first daemon's event")
    finally:
        client.close()
        docs1.close()
        assert first.stop()
    (analysis,) = names(docs1.docs, "start")
    raw_uid = analysis["raw_run_uid"]
    (run,) = ResultReader(default_path(tmp_path)).runs()
    assert run.run_uid == raw_uid and run.stopped_at is None  # open when the daemon stopped
    store = ResultStore(default_path(tmp_path))
    store.add_frame(frame_result("no-start", 1))  # what a run whose start was never stored leaves
    store.close()

    second, docs2 = started(tmp_path, trained_model_path)
    try:
        stop = wait_for(lambda: next((d for d in names(docs2.docs, "stop") if d["run_start"] == analysis["uid"]),
                                     None), 60, "the stop of the first daemon's analysis run")
        wait_for(lambda: not ResultReader(default_path(tmp_path)).unlisted_open_runs(), 30, "no-start closed")
    finally:
        docs2.close()
        assert second.stop()
    assert stop["exit_status"] == "abort" and "raw input run" in stop["reason"], stop
    assert stop["num_events"] == {"primary": 1}
    assert all(d["raw_run_uid"] != raw_uid for d in names(docs2.docs, "start"))  # no second analysis run
    reader = ResultReader(default_path(tmp_path))
    runs = {r.run_uid: r for r in reader.runs()}
    assert runs[raw_uid].exit_status == "abort" and "open when the daemon stopped" in runs[raw_uid].metadata["stop_reason"]
    assert runs["no-start"].exit_status == "abort" and "start was not stored" in runs["no-start"].metadata["stop_reason"]
    assert reader.open_runs() == [] and reader.unlisted_open_runs() == []
    assert all(r.stopped_at is not None for r in runs.values())


def test_a_run_closed_for_inactivity_stays_closed_when_its_own_stop_comes_later(tmp_path: Path,
                                                                               trained_model_path: Path) -> None:
    """``run_stop_timeout_s`` closes a raw run whose sender paused; its end_of_run comes later:
    one analysis run only, the first exit status kept, the late stop counted."""
    svc, docs = started(tmp_path, trained_model_path, **{"publish.run_stop_timeout_s": "1"})
    client = Client(svc)
    try:
        client.send(raw_frame_message(0, small_frame(0), run="paused"))
        wait_for(lambda: names(docs.docs, "stop"), 60, "the service's timeout stop")
        client.send([json.dumps({"run": "paused", "timestamp": time.time(), "end_of_run": True}).encode(), b""])
        wait_for(lambda: svc.metrics.registry.get_sample_value(
            "nanoseg_closed_run_items_total", {"reason": "late_stop"}), 30, "the late stop counted")
        time.sleep(0.5)
        assert svc.status()["open_runs"] == []
    finally:
        client.close()
        docs.close()
        assert svc.stop()
    assert [n for n, _ in docs.docs] == ["start", "descriptor", "event", "stop"], docs.docs
    assert "timeout" in docs.docs[-1][1]["reason"]
    (run,) = ResultReader(default_path(tmp_path)).runs()
    assert run.exit_status == "timeout" and run.frame_count == 1
