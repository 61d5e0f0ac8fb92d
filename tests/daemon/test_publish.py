"""Analysis documents and their transport, over real ZeroMQ sockets and a real bluesky Proxy."""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
import threading
import time
from typing import Any

import numpy as np
import pytest
import zmq
from bluesky.callbacks.zmq import RemoteDispatcher
from event_model import DocumentNames, compose_run, schema_validators

from nanoseg.codec import msgpack_loads
from nanoseg.masks import decode_rle
from nanoseg_daemon.publish import (
    SUMMARY_TOPIC,
    AnalysisRun,
    DocumentPublisher,
    SummaryPublisher,
)
from tests.daemon.results_fixtures import WIRES, frame_result

DESERIALIZERS = {"msgpack": msgpack_loads, "json": json.loads}  # what subscribers of each serializer use
PROCESSING = {"profile": "ptychography", "score_threshold": 0.7, "nms.iou": 0.5}


def _analysis(n_frames: int = 3) -> tuple[AnalysisRun, list[tuple[str, dict[str, Any]]]]:
    run = AnalysisRun("raw-1", "test-model-1", PROCESSING, raw_metadata={"scan_id": 7, "sample": "V2O5"})
    docs = run.opening()
    # frame 2 has no particles: its statistics are NaN, its table and masks empty
    docs += [run.event(frame_result("raw-1", k, n_wires=0 if k == 2 else 3)) for k in range(1, n_frames + 1)]
    stop = run.stop("success")
    assert stop is not None
    return run, [*docs, stop]


def _validate(docs: list[tuple[str, dict[str, Any]]]) -> None:
    for name, doc in docs:
        schema_validators[DocumentNames[name]].validate(doc)


def _check_contents(docs: list[tuple[str, dict[str, Any]]]) -> None:
    names = [n for n, _ in docs]
    assert names == ["start", "descriptor", "event", "event", "event", "stop"]
    start, desc, stop = docs[0][1], docs[1][1], docs[-1][1]
    events = [d for n, d in docs if n == "event"]
    assert start["raw_run_uid"] == "raw-1" and start["model_version"] == "test-model-1"
    assert start["processing"]["nms_iou"] == 0.5 and start["raw_metadata"]["scan_id"] == 7
    assert desc["run_start"] == start["uid"] and set(desc["data_keys"]) == set(events[0]["data"])
    assert stop["run_start"] == start["uid"] and stop["num_events"] == {"primary": 3}
    assert [e["seq_num"] for e in events] == [1, 2, 3]
    assert [e["data"]["raw_seq_num"] for e in events] == [1, 2, 3]

    d = events[0]["data"]
    lengths = [w[2] for w in WIRES]
    assert d["count"] == 3 and d["frame_uid"] == "raw-1-ev1"
    assert d["length_px_mean"] == pytest.approx(np.mean(lengths), abs=0.5)
    assert d["length_nm_median"] == pytest.approx(5.0 * np.median(lengths), abs=2.5)
    assert 0 < d["coverage_fraction"] < 0.2 and 0 <= d["orientation_order"] < 0.5
    table = json.loads(d["particles"])
    assert table["columns"]["width_px"] == pytest.approx([w[3] for w in WIRES], abs=1.0)
    assert table["columns"]["score"] == pytest.approx([0.95, 0.85, 0.75])
    masks = [decode_rle(r) for r in json.loads(d["masks"])]
    ref = frame_result("raw-1", 1).instances.masks
    assert all(np.array_equal(m, r) for m, r in zip(masks, ref, strict=True))
    assert events[0]["timestamps"]["count"] == 1_700_000_001.0

    empty = events[1]["data"]
    assert empty["count"] == 0 and np.isnan(empty["length_px_mean"]) and json.loads(empty["masks"]) == []


def test_analysis_documents_validate_and_describe_the_frames():
    _, docs = _analysis()
    _validate(docs)
    _check_contents(docs)


@pytest.mark.parametrize("serializer", ["msgpack", "json"])
def test_direct_subscriber_receives_bluesky_wire_format(serializer):
    pub = DocumentPublisher("tcp://127.0.0.1:*", bind=True, prefix=b"nseg", serializer=serializer)
    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.connect(pub.address)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    try:
        assert pub.wait_for_subscriber(5.0)
        _, docs = _analysis()
        assert all(pub(name, doc) for name, doc in docs)
        got = []
        for _ in docs:
            assert sub.poll(5000)
            prefix, name, payload = sub.recv().split(b" ", 2)
            assert prefix == b"nseg"
            got.append((name.decode(), DESERIALIZERS[serializer](payload)))
        _validate(got)
        _check_contents(got)
        assert (pub.sent, pub.dropped) == (len(docs), 0)
    finally:
        sub.close()
        ctx.term()
        pub.close()


@pytest.fixture
def bluesky_proxy():
    """bluesky's Proxy in its own process (as bluesky-0MQ-proxy runs), on random loopback ports."""
    code = (
        "from bluesky.callbacks.zmq import Proxy\n"
        "p = Proxy('tcp://127.0.0.1', 'tcp://127.0.0.1')\n"
        "print(p.in_port, p.out_port, flush=True)\n"
        "p.start()\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline() if proc.stdout else ""
        in_address, out_address = line.split()
        yield in_address, out_address
    finally:
        proc.terminate()
        proc.wait(10)


def test_remote_dispatcher_through_bluesky_proxy_receives_valid_documents(bluesky_proxy):
    in_address, out_address = bluesky_proxy
    dispatcher = RemoteDispatcher(out_address, deserializer=DESERIALIZERS["msgpack"])
    received: list[tuple[str, dict[str, Any]]] = []
    stopped = threading.Event()

    def collect(name: str, doc: dict[str, Any]) -> None:
        received.append((name, doc))
        if name == "stop":
            stopped.set()

    dispatcher.subscribe(collect)

    def run_dispatcher() -> None:
        with contextlib.suppress(asyncio.CancelledError):
            dispatcher.start()

    dispatcher_thread = threading.Thread(target=run_dispatcher, daemon=True)
    dispatcher_thread.start()
    pub = DocumentPublisher(in_address)  # connects to the proxy's input, like bluesky's Publisher
    try:
        assert pub.wait_for_subscriber(10.0)  # the proxy's SUB has connected and subscribed
        # the dispatcher joins the proxy's output asynchronously: probe until it hears us
        deadline = time.monotonic() + 10.0
        while not received and time.monotonic() < deadline:
            pub("start", compose_run(metadata={"purpose": "probe"}).start_doc)
            time.sleep(0.05)
        assert received, "the RemoteDispatcher never received a probe"
        _, docs = _analysis()
        for name, doc in docs:
            pub(name, doc)
        assert stopped.wait(10.0)
    finally:
        pub.close()
        task = dispatcher._task
        if task is not None:
            dispatcher.loop.call_soon_threadsafe(task.cancel)
        dispatcher_thread.join(5.0)
    assert not dispatcher_thread.is_alive()
    ours = [(n, d) for n, d in received if d.get("purpose") != "probe"]
    _validate(ours)
    _check_contents(ours)


def test_summary_topic_is_strict_json():
    pub = SummaryPublisher("tcp://127.0.0.1:*")
    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.connect(pub.address)
    sub.setsockopt(zmq.SUBSCRIBE, SUMMARY_TOPIC)
    try:
        assert pub.wait_for_subscriber(5.0)
        for k, n in ((1, 3), (2, 0)):
            assert pub.publish(frame_result("raw-1", k, n_wires=n))
        bodies = []
        for _ in range(2):
            assert sub.poll(5000)
            topic, body = sub.recv_multipart()
            assert topic == SUMMARY_TOPIC
            bodies.append(json.loads(body, parse_constant=lambda c: pytest.fail(f"non-JSON {c}")))
    finally:
        sub.close()
        ctx.term()
        pub.close()
    first, empty = bodies
    assert (first["run_uid"], first["frame_uid"], first["seq_num"], first["count"]) == ("raw-1", "raw-1-ev1", 1, 3)
    assert first["model_version"] == "test-model-1" and first["timestamp"] == 1_700_000_001.0
    assert first["summary"]["stats"]["length_px"]["mean"] == pytest.approx(np.mean([w[2] for w in WIRES]), abs=0.5)
    assert empty["count"] == 0 and empty["summary"]["stats"]["length_px"]["mean"] is None
    assert empty["summary"]["orientation_order"] is None


def test_slow_subscriber_makes_sends_drop_not_block():
    ctx = zmq.Context()
    pub = DocumentPublisher("inproc://slow", bind=True, hwm=2, context=ctx)
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.RCVHWM, 2)
    sub.connect("inproc://slow")
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    try:
        assert pub.wait_for_subscriber(5.0)
        _, docs = _analysis()
        t0 = time.monotonic()
        results = [pub(*docs[k % len(docs)]) for k in range(60)]  # the subscriber reads nothing
        assert time.monotonic() - t0 < 2.0
        assert pub.dropped > 0 and pub.sent + pub.dropped == 60 and results.count(True) == pub.sent
        n = 0
        while sub.poll(200):
            sub.recv()
            n += 1
        assert n == pub.sent  # what was not counted as dropped did arrive
    finally:
        sub.close()
        pub.close()
        ctx.term()


def test_frame_order_and_stop_rules():
    run = AnalysisRun("raw-1", "m", {})
    run.event(frame_result("raw-1", 2))
    with pytest.raises(ValueError, match="out of order"):
        run.event(frame_result("raw-1", 2))
    with pytest.raises(ValueError, match="run other"):
        run.event(frame_result("other", 3))
    stop = run.stop("timeout", "no raw stop within 60 s")
    assert stop is not None and stop[1]["exit_status"] == "fail"
    assert stop[1]["reason"] == "raw exit status 'timeout': no raw stop within 60 s"
    assert run.stop("success") is None  # the raw stop arriving after the timeout
    schema_validators[DocumentNames.stop].validate(stop[1])


def test_a_run_without_an_analysed_frame_ends_fail_with_the_reasons_counted():
    run = AnalysisRun("raw-1", "m", {})
    stop = run.stop("success", losses={"missing_image": 3, "fill_failed": 1, "decode_error": 0})
    assert stop is not None and stop[1]["exit_status"] == "fail"
    assert stop[1]["reason"] == "no frame analysed (fill_failed 1, missing_image 3)"
    assert stop[1]["num_events"] == {"primary": 0}
    schema_validators[DocumentNames.stop].validate(stop[1])
    aborted = AnalysisRun("raw-2", "m", {}).stop("abort")  # the raw run's own status stands
    assert aborted is not None and aborted[1]["exit_status"] == "abort"
    ok = AnalysisRun("raw-3", "m", {})
    ok.event(frame_result("raw-3", 1))
    done = ok.stop("success", losses={"missing_image": 1})
    assert done is not None and (done[1]["exit_status"], done[1]["reason"]) == ("success", "")
