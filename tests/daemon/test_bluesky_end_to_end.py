"""The daemon in a beamline's bluesky setup, end to end on loopback, all real components.

    RunEngine + ophyd camera --Publisher(prefix raw)--> Proxy --> Service (ingest prefix raw)
    Service --analysis run (prefix nanoseg)--> the same Proxy --> RemoteDispatcher(prefix nanoseg)

The frames are synthetic transmission images (8 nm pixels, Poisson counts around I0 = DOSE) whose
wire count is known; the analysis documents must pass event-model's schemas, describe every frame
in order, and count the wires within |pred - gt| <= max(3, 35 %) (the partially trained dev model
included). Distinct prefixes keep the daemon from reading its own analysis runs back (see
``test_daemon_ignores_its_own_analysis_runs_without_prefixes``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import bluesky.plans as bp
import numpy as np
import pytest
from bluesky import RunEngine
from bluesky.callbacks.zmq import Publisher, RemoteDispatcher
from event_model import DocumentNames, compose_run, schema_validators

from nanoseg.codec import msgpack_dumps, msgpack_loads
from nanoseg_daemon.service import Service
from nanoseg_daemon.store import ResultReader, default_path
from tests.daemon.ingest_fixtures import HDF5Camera, ImageCamera, blob_detector, start_proxy
from tests.daemon.service_fixtures import DOSE, TransmissionFrame, start_service, transmission_frame

PIXEL_NM = 8.0
RAW, ANALYSIS = b"raw", b"nanoseg"
Doc = tuple[str, dict[str, Any]]


def tolerance(n_wires: int) -> float:
    return max(3.0, 0.35 * n_wires)


class DocumentCollector:
    """A RemoteDispatcher on the proxy's output, in its own thread, recording (name, doc)."""

    def __init__(self, address: str, prefix: bytes) -> None:
        self.docs: list[Doc] = []
        self._cond = threading.Condition()
        self.dispatcher = RemoteDispatcher(address, prefix=prefix, deserializer=msgpack_loads)
        self.dispatcher.subscribe(self._record)
        self.thread = threading.Thread(target=self._run, name="remote-dispatcher", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        with contextlib.suppress(asyncio.CancelledError):
            self.dispatcher.start()

    def _record(self, name: str, doc: dict[str, Any]) -> None:
        with self._cond:
            self.docs.append((name, doc))
            self._cond.notify_all()

    def analysis_of(self, raw_uid: str, timeout: float = 120.0) -> list[Doc]:
        """The documents of the analysis run of ``raw_uid``, once its stop has arrived."""
        def complete() -> list[Doc] | None:
            starts = [d["uid"] for n, d in self.docs if n == "start" and d.get("raw_run_uid") == raw_uid]
            if not starts:
                return None
            (start,) = starts
            descriptors = {d["uid"] for n, d in self.docs if n == "descriptor" and d["run_start"] == start}
            run = [(n, d) for n, d in self.docs
                   if d.get("uid") == start or d.get("run_start") == start or d.get("descriptor") in descriptors]
            return run if run[-1][0] == "stop" else None

        with self._cond:
            if not self._cond.wait_for(complete, timeout):
                raise AssertionError(f"no complete analysis run of {raw_uid}; got {[n for n, _ in self.docs]}")
            return complete() or []

    def close(self) -> None:
        task = self.dispatcher._task
        if task is not None:
            self.dispatcher.loop.call_soon_threadsafe(task.cancel)
        self.thread.join(5.0)


@dataclass
class Beamline:
    svc: Service
    state_dir: Path
    collector: DocumentCollector
    RE: RunEngine
    raw_docs: list[Doc] = field(default_factory=list)

    def run(self, plan: Any, **md: Any) -> tuple[str, list[Doc]]:
        """Run a plan; returns its uid and its raw documents."""
        start = len(self.raw_docs)
        (uid,) = cast(tuple[str, ...], self.RE(plan, **md))  # the run uids (call_returns_result off)
        return uid, self.raw_docs[start:]

    def sample(self, name: str, **labels: str) -> float:
        return self.svc.metrics.registry.get_sample_value(name, labels) or 0.0


def probe_until(send: Any, arrived: Any, what: str, timeout: float = 15.0) -> None:
    """0MQ subscribers join late: send probes until one arrives."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        send()
        time.sleep(0.05)
        if arrived():
            return
    raise AssertionError(f"{what} never received a probe")


@pytest.fixture(scope="module")
def beamline(tmp_path_factory: pytest.TempPathFactory, trained_model_path: Path) -> Iterator[Beamline]:
    in_addr, out_addr = start_proxy()
    state = tmp_path_factory.mktemp("state")
    svc = start_service(state, trained_model_path, **{
        "ingest.raw.enabled": "false", "ingest.bluesky.enabled": "true",
        "ingest.bluesky.address": out_addr, "ingest.bluesky.prefix": RAW.decode(),
        "publish.bluesky.bind": "false", "publish.bluesky.address": in_addr,
        "publish.bluesky.prefix": ANALYSIS.decode(),
    })
    collector = DocumentCollector(out_addr, ANALYSIS)
    raw_pub = Publisher(in_addr, prefix=RAW, serializer=msgpack_dumps)
    probe_pub = Publisher(in_addr, prefix=ANALYSIS, serializer=msgpack_dumps)
    try:
        assert svc.doc_pub is not None and svc.doc_pub.wait_for_subscriber(10.0)
        probe_until(lambda: raw_pub("probe", {}),
                    lambda: svc.metrics.registry.get_sample_value(
                        "nanoseg_messages_rejected_total", {"reason": "unknown_document"}), "the daemon")
        probe_until(lambda: probe_pub("start", dict(compose_run(metadata={"purpose": "probe"}).start_doc)),
                    lambda: bool(collector.docs), "the RemoteDispatcher")
        RE = RunEngine({}, context_managers=[])
        bl = Beamline(svc, state, collector, RE)
        RE.subscribe(raw_pub)
        RE.subscribe(lambda name, doc: bl.raw_docs.append((name, doc)))
        yield bl
    finally:
        raw_pub.close()
        probe_pub.close()
        collector.close()
        assert svc.stop()


def check_analysis(bl: Beamline, raw_uid: str, raw_docs: list[Doc], frames: list[TransmissionFrame],
                   latency_before: tuple[float, float]) -> list[dict[str, Any]]:
    """Everything an analysis run must satisfy; returns its primary events."""
    docs = bl.collector.analysis_of(raw_uid)
    for name, doc in docs:
        schema_validators[DocumentNames[name]].validate(doc)
    names = [n for n, _ in docs]
    assert names[0] == "start" and names[-1] == "stop" and names.count("start") == names.count("stop") == 1
    start, stop = docs[0][1], docs[-1][1]
    raw_start = next(d for n, d in raw_docs if n == "start")
    assert start["raw_run_uid"] == raw_uid and start["model_version"] == bl.svc.slot.current.version
    assert start["raw_metadata"]["scan_id"] == raw_start["scan_id"]
    assert start["processing"]["engine"] == "torch"

    (primary,) = [d for n, d in docs if n == "descriptor" and d["name"] == "primary"]
    events = [d for n, d in docs if n == "event" and d["descriptor"] == primary["uid"]]
    raw_events = [d for n, d in raw_docs if n == "event"]
    assert [e["seq_num"] for e in events] == list(range(1, len(frames) + 1))
    assert [e["data"]["frame_uid"] for e in events] == [e["uid"] for e in raw_events]
    assert [e["data"]["raw_seq_num"] for e in events] == [e["seq_num"] for e in raw_events]
    assert stop["exit_status"] == "success" and stop["num_events"]["primary"] == len(frames)

    for event, frame in zip(events, frames):
        data = event["data"]
        assert abs(data["count"] - frame.n_wires) <= tolerance(frame.n_wires), (data["count"], frame.n_wires)
        particles = json.loads(data["particles"])["columns"]
        masks = json.loads(data["masks"])
        assert len(particles["score"]) == len(masks) == data["count"]
        assert all(m["size"] == list(frame.counts.shape) for m in masks)
        if data["count"]:  # the start document's pixel size scales the lengths
            assert data["length_nm_mean"] == pytest.approx(PIXEL_NM * data["length_px_mean"], rel=1e-6)

    # the store holds the run's metadata (pixel size, I0, scan id) and every frame
    reader = ResultReader(default_path(bl.state_dir))
    (run,) = [r for r in reader.runs() if r.run_uid == raw_uid]
    assert (run.metadata["pixel_size_nm"], run.metadata["i0"]) == (PIXEL_NM, DOSE)
    assert run.metadata["extra"]["scan_id"] == raw_start["scan_id"]
    stored = reader.frames(raw_uid)
    assert [f.count for f in stored] == [e["data"]["count"] for e in events]
    assert all(f.metadata["pixel_size_nm"] == PIXEL_NM for f in stored)

    # ingest -> published latency is observed once per frame and covers the frame's stages
    count0, sum0 = latency_before
    assert bl.sample("nanoseg_frame_latency_seconds_count") == count0 + len(frames)
    stage_seconds = sum(sum(f.timings.values()) for f in stored)
    assert bl.sample("nanoseg_frame_latency_seconds_sum") - sum0 >= stage_seconds > 0
    return events


def latency(bl: Beamline) -> tuple[float, float]:
    return bl.sample("nanoseg_frame_latency_seconds_count"), bl.sample("nanoseg_frame_latency_seconds_sum")


def test_inline_images_from_a_run_engine_come_back_as_an_analysis_run(beamline: Beamline) -> None:
    frames = [transmission_frame(11, i) for i in range(3)]
    cam = ImageCamera(name="cam", frames=np.stack([f.counts for f in frames]))
    before = latency(beamline)
    uid, raw_docs = beamline.run(bp.count([cam], num=len(frames)), pixel_size_nm=PIXEL_NM, i0=DOSE,
                                 sample="V2O5 lot 7")
    assert isinstance(raw_docs[2][1]["data"]["cam_image"], np.ndarray)  # the frame travels in the event
    check_analysis(beamline, uid, raw_docs, frames, before)
    start = beamline.collector.analysis_of(uid)[0][1]
    assert start["raw_metadata"]["sample"] == "V2O5 lot 7"


def test_area_detector_hdf5_files_through_resource_and_datum(beamline: Beamline, tmp_path: Path) -> None:
    frames = [transmission_frame(11, i) for i in (3, 4)]
    cam = HDF5Camera(name="cam", frames=np.stack([f.counts for f in frames]), directory=tmp_path)
    before = latency(beamline)
    uid, raw_docs = beamline.run(bp.count([cam], num=len(frames)), pixel_size_nm=PIXEL_NM, i0=DOSE)
    names = [n for n, _ in raw_docs]
    assert names.count("resource") == 1 and names.count("datum") == len(frames)
    events = [d for n, d in raw_docs if n == "event"]
    assert all(isinstance(e["data"]["cam_image"], str) for e in events)  # datum ids: the pixels are on disk
    assert cam.files and cam.files[0].stat().st_size > frames[0].counts.nbytes
    check_analysis(beamline, uid, raw_docs, frames, before)


def test_ophyd_async_detector_writing_hdf5_through_stream_resource_and_stream_datum(
        beamline: Beamline, tmp_path: Path) -> None:
    det = blob_detector(tmp_path)
    uid, raw_docs = beamline.run(bp.count([det], num=3), pixel_size_nm=PIXEL_NM, i0=DOSE)
    names = [n for n, _ in raw_docs]
    assert names.count("stream_resource") == 2 and names.count("stream_datum") == 6  # image and its sum
    assert "resource" not in names and "datum" not in names
    docs = beamline.collector.analysis_of(uid)
    for name, doc in raw_docs + docs:
        schema_validators[DocumentNames[name]].validate(doc)
    start, stop = docs[0][1], docs[-1][1]
    assert start["raw_run_uid"] == uid
    (raw_desc,) = [d for n, d in raw_docs if n == "descriptor"]
    raw_events = [d for n, d in raw_docs if n == "event"]
    (primary,) = [d for n, d in docs if n == "descriptor" and d["name"] == "primary"]
    events = [d for n, d in docs if n == "event" and d["descriptor"] == primary["uid"]]
    assert [e["data"]["frame_uid"] for e in events] == [f"{raw_desc['uid']}/{e['seq_num']}" for e in raw_events]
    assert [e["data"]["raw_seq_num"] for e in events] == [1, 2, 3]
    assert all(json.loads(e["data"]["masks"]) == [] or
               all(m["size"] == [240, 320] for m in json.loads(e["data"]["masks"])) for e in events)
    assert stop["exit_status"] == "success" and stop["num_events"]["primary"] == 3
    assert ResultReader(default_path(beamline.state_dir)).frame_count(uid) == 3


class MisdescribedCamera(ImageCamera):
    """Says its frames are 32 x 32; they are not."""

    def describe(self) -> dict[str, Any]:
        desc = super().describe()
        desc[self.image.name]["shape"] = [32, 32]
        return cast(dict[str, Any], desc)


def test_a_run_whose_every_frame_is_refused_ends_fail_with_the_reasons(beamline: Beamline) -> None:
    cam = MisdescribedCamera(name="cam", frames=np.full((1, 64, 64), 3000, np.uint16))
    before = beamline.sample("nanoseg_messages_rejected_total", reason="shape_mismatch")
    uid, _ = beamline.run(bp.count([cam], num=2), pixel_size_nm=PIXEL_NM, i0=DOSE)
    docs = beamline.collector.analysis_of(uid)
    for name, doc in docs:
        schema_validators[DocumentNames[name]].validate(doc)
    stop = docs[-1][1]
    assert (stop["exit_status"], stop["reason"]) == ("fail", "no frame analysed (shape_mismatch 2)")
    assert stop["num_events"].get("primary", 0) == 0
    assert beamline.sample("nanoseg_messages_rejected_total", reason="shape_mismatch") == before + 2


def test_daemon_ignores_its_own_analysis_runs_without_prefixes(tmp_path: Path, trained_model_path: Path) -> None:
    in_addr, out_addr = start_proxy()
    svc = start_service(tmp_path, trained_model_path, **{
        "ingest.raw.enabled": "false", "ingest.bluesky.enabled": "true", "ingest.bluesky.address": out_addr,
        "publish.bluesky.bind": "false", "publish.bluesky.address": in_addr})
    pub = Publisher(in_addr, serializer=msgpack_dumps)
    try:
        assert svc.doc_pub is not None and svc.doc_pub.wait_for_subscriber(10.0)
        probe_until(lambda: pub("probe", {}),
                    lambda: svc.metrics.registry.get_sample_value(
                        "nanoseg_messages_rejected_total", {"reason": "unknown_document"}), "the daemon")
        RE = RunEngine({}, context_managers=[])
        RE.subscribe(pub)
        cam = ImageCamera(name="cam", frames=np.full((1, 64, 64), 3000, np.uint16))
        (uid,) = cast(tuple[str, ...], RE(bp.count([cam], num=1), pixel_size_nm=PIXEL_NM, i0=DOSE))
        deadline = time.monotonic() + 60
        while not ResultReader(default_path(tmp_path)).frame_count(uid) and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(2.0)  # the loop, where it exists, makes ~100 runs a second
        assert [r.run_uid for r in ResultReader(default_path(tmp_path)).runs()] == [uid]
    finally:
        pub.close()
        svc.stop()
