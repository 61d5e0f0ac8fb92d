"""A daemon that subscribes after a run started recovers the run from Tiled (all real components).

    RunEngine + ophyd camera --TiledWriter--> tiled serve (the raw run, as a beamline stores it)
                             --Publisher(prefix raw)--> Proxy --> Service (started mid-run)
    Service --analysis run (prefix nanoseg)--> the same Proxy --> RemoteDispatcher

The daemon misses the start, the descriptor and the first two events; the third event names a
descriptor it never saw, so it asks Tiled, which holds the run's start and descriptor since the
RunEngine emitted them, opens the run from them and analyses the frames that follow.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import bluesky.plan_stubs as bps
import numpy as np
import pytest
from bluesky import RunEngine
from bluesky.callbacks.zmq import Publisher
from event_model import DocumentNames, schema_validators

from nanoseg.codec import msgpack_dumps
from nanoseg_daemon.service import Service
from nanoseg_daemon.store import ResultReader, default_path
from tests.daemon.ingest_fixtures import ImageCamera, start_proxy
from tests.daemon.service_fixtures import DOSE, start_service, transmission_frame
from tests.daemon.test_bluesky_end_to_end import DocumentCollector, probe_until
from tests.daemon.tiled_fixtures import API_KEY

tiled_client = pytest.importorskip("tiled.client", reason="tiled not installed (pip install -e '.[dev]')")
writing = pytest.importorskip("bluesky_tiled_plugins.writing.tiled_writer",
                              reason="bluesky-tiled-plugins not installed (pip install -e '.[dev]')")

RAW, ANALYSIS = b"raw", b"nanoseg"
BEFORE, AFTER = 2, 3  # events sent before the daemon subscribed, and after


def rejected(svc: Service, reason: str) -> float:
    return svc.metrics.registry.get_sample_value("nanoseg_messages_rejected_total", {"reason": reason}) or 0.0


def test_late_joiner_recovers_the_run_from_tiled(tmp_path: Path, trained_model_path: Path, tiled_url: str) -> None:
    raw_container = tiled_client.from_uri(tiled_url, api_key=API_KEY).create_container("raw_late")
    in_addr, out_addr = start_proxy()
    frames = [transmission_frame(11, i) for i in range(BEFORE + AFTER)]
    cam = ImageCamera(name="cam", frames=np.stack([f.counts for f in frames]))
    RE = RunEngine({}, context_managers=[])
    raw_docs: list[tuple[str, dict[str, Any]]] = []
    RE.subscribe(writing.TiledWriter(raw_container))
    raw_pub = Publisher(in_addr, prefix=RAW, serializer=msgpack_dumps)
    RE.subscribe(raw_pub)
    RE.subscribe(lambda name, doc: raw_docs.append((name, doc)))
    late: dict[str, Any] = {}

    def join() -> None:
        """The daemon starts now: the run's start, descriptor and first events are gone by."""
        svc = late["svc"] = start_service(tmp_path, trained_model_path, **{
            "ingest.raw.enabled": "false", "ingest.bluesky.enabled": "true",
            "ingest.bluesky.address": out_addr, "ingest.bluesky.prefix": RAW.decode(),
            "publish.bluesky.bind": "false", "publish.bluesky.address": in_addr,
            "publish.bluesky.prefix": ANALYSIS.decode(), "sinks": "[store, bluesky]",
            "tiled.uri": tiled_url, "tiled.api_key": API_KEY, "tiled.raw_path": "[raw_late]"})
        late["collector"] = DocumentCollector(out_addr, ANALYSIS)
        assert svc.doc_pub is not None and svc.doc_pub.wait_for_subscriber(10.0)
        probe_until(lambda: raw_pub("probe", {}), lambda: rejected(svc, "unknown_document"), "the daemon")

    def plan() -> Iterator[Any]:
        yield from bps.open_run(md={"pixel_size_nm": 8.0, "i0": DOSE, "sample": "late lot"})
        for k in range(BEFORE + AFTER):
            if k == BEFORE:
                join()
            yield from bps.trigger_and_read([cam])
        yield from bps.close_run()

    try:
        (uid,) = RE(plan())
        svc: Service = late["svc"]
        docs = late["collector"].analysis_of(uid, timeout=120)
    finally:
        raw_pub.close()
        if "collector" in late:
            late["collector"].close()
        if "svc" in late:
            assert late["svc"].stop()

    for name, doc in docs:
        schema_validators[DocumentNames[name]].validate(doc)
    start, stop = docs[0][1], docs[-1][1]
    raw_events = [d for n, d in raw_docs if n == "event"]
    events = [d for n, d in docs if n == "event"]
    # linked to the raw run, with the metadata of the start the daemon never received
    assert start["raw_run_uid"] == uid and start["raw_metadata"]["sample"] == "late lot"
    assert [e["data"]["frame_uid"] for e in events] == [e["uid"] for e in raw_events[BEFORE:]]
    assert any(e["data"]["count"] for e in events)
    for e in events:  # the recovered start's pixel size scales the lengths
        if e["data"]["count"]:
            assert e["data"]["length_nm_mean"] == pytest.approx(8.0 * e["data"]["length_px_mean"], rel=1e-6)
    assert stop["exit_status"] == "success", stop
    assert "joined late" in stop["reason"] and f"{BEFORE} frames sent before it joined" in stop["reason"]
    assert rejected(svc, "unknown_descriptor") == 0  # the event that asked waited for the answer
    reader = ResultReader(default_path(tmp_path))
    assert [f.frame_uid for f in reader.frames(uid)] == [e["uid"] for e in raw_events[BEFORE:]]
    assert reader.open_runs() == []
    (run,) = [r for r in reader.runs() if r.run_uid == uid]
    assert run.metadata["pixel_size_nm"] == 8.0 and run.exit_status == "success"
