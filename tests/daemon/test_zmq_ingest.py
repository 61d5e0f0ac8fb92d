"""daemon/zmq_ingest.py on loopback: a real RunEngine -> bluesky Publisher -> Proxy -> ZmqIngest,
and raw frames from PUSH sockets, optionally with CurveZMQ."""

from __future__ import annotations

import contextlib
import functools
import json
import pickle
import shutil
import threading
import time
from pathlib import Path

import bluesky.plans as bp
import msgpack
import msgpack_numpy
import numpy as np
import pytest
import zmq
import zmq.auth
from bluesky import RunEngine
from bluesky.callbacks.zmq import Proxy, Publisher, ServerCurve

from nanoseg_daemon.ingest_config import IngestConfig
from nanoseg_daemon.zmq_ingest import ZmqIngest
from tests.daemon.ingest_fixtures import (
    HDF5Camera,
    ImageCamera,
    RecordingSink,
    TouchOnLoad,
    start_proxy,
    test_frames,
    wait_until_connected,
)

MSGPACK = functools.partial(msgpack.dumps, default=msgpack_numpy.encode)


def _json_default(obj):
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    raise TypeError(type(obj))


def JSON(doc):
    return json.dumps(doc, default=_json_default).encode()


@pytest.fixture(scope="module")
def proxy() -> tuple[str, str]:
    return start_proxy()


@pytest.fixture(scope="module")
def RE() -> RunEngine:
    return RunEngine({}, context_managers=[])


@contextlib.contextmanager
def running_ingest(sink, **config):
    ingest = ZmqIngest(IngestConfig.model_validate(config), sink)
    ingest.start()
    try:
        yield ingest
    finally:
        assert ingest.stop(timeout=5.0)
        assert not ingest.running


@contextlib.contextmanager
def publisher(address, **kwargs):
    pub = Publisher(address, **kwargs)
    try:
        yield pub
    finally:
        pub.close()


def publish_run(RE, pub, plan, **md) -> str:
    token = RE.subscribe(pub)
    try:
        (uid,) = RE(plan, **md)
    finally:
        RE.unsubscribe(token)
    return uid


def probe(pub):
    """A message the ingest rejects as unknown_document (or bad_prefix): proof of connection."""
    return lambda: pub("probe", {})


@pytest.mark.parametrize("serializer", ["msgpack", "json"])
def test_run_engine_through_publisher_and_proxy(proxy, RE, serializer):
    in_addr, out_addr = proxy
    sink = RecordingSink()
    frames = test_frames(5)
    cam = ImageCamera(name="cam", frames=frames)
    dark = np.full((24, 32), 2.0)
    with (
        running_ingest(sink, bluesky={"address": out_addr, "serializer": serializer}),
        publisher(in_addr, serializer=MSGPACK if serializer == "msgpack" else JSON) as pub,
    ):
        wait_until_connected(probe(pub), sink, "unknown_document")
        uid = publish_run(
            RE, pub, bp.count([cam], num=5), pixel_size_nm=6.0, i0=800, dark=dark, sample="S1"
        )
        sink.wait_for(lambda s: s.stopped)
    assert sink.order == [("start", uid)] + [("frame", uid)] * 5 + [("stop", uid)]
    md = sink.started[0].metadata
    assert (md.pixel_size_nm, md.i0, md.extra["sample"]) == (6.0, 800.0, "S1")
    np.testing.assert_array_equal(md.dark_frame, dark)
    for k, job in enumerate(sink.frames):
        np.testing.assert_array_equal(job.frame, frames[k])
        assert job.seq_num == k + 1
    if serializer == "msgpack":
        assert sink.frames[0].frame.dtype == np.uint16  # numpy arrays survive the wire
    assert sink.stopped[0].exit_status == "success"
    assert not sink.rejections


def test_hdf5_run_through_the_proxy(proxy, RE, tmp_path):
    in_addr, out_addr = proxy
    sink = RecordingSink()
    frames = test_frames(3, dtype=np.float32)
    cam = HDF5Camera(name="cam", frames=frames, directory=tmp_path)
    with (
        running_ingest(sink, bluesky={"address": out_addr}),
        publisher(in_addr, serializer=MSGPACK) as pub,
    ):
        wait_until_connected(probe(pub), sink, "unknown_document")
        uid = publish_run(RE, pub, bp.count([cam], num=3), pixel_size_nm=35.0)
        sink.wait_for(lambda s: s.stopped)
    assert not sink.rejections
    assert [j.run_uid for j in sink.frames] == [uid] * 3
    for k, job in enumerate(sink.frames):
        np.testing.assert_array_equal(job.frame, frames[k])


def test_pickle_payload_is_rejected_and_never_run_when_pickle_is_off(proxy, RE, tmp_path):
    in_addr, out_addr = proxy
    sink = RecordingSink()
    target = tmp_path / "pwned"
    bomb = pickle.dumps({"uid": "evil", "time": 1.0, "x": TouchOnLoad(target)})
    cam = ImageCamera(name="cam", frames=test_frames(2))
    with (
        running_ingest(sink, bluesky={"address": out_addr}) as ingest,
        publisher(in_addr, serializer=lambda doc: bomb) as evil,
        publisher(in_addr, serializer=MSGPACK) as good,
    ):
        wait_until_connected(probe(evil), sink, "unknown_document")
        wait_until_connected(probe(good), sink, "unknown_document")
        for _ in range(3):
            evil("start", {})
        sink.wait_for(lambda s: s.reasons.count("bad_payload") == 3)
        assert not target.exists() and not sink.started
        uid = publish_run(RE, good, bp.count([cam], num=2))  # still serving
        sink.wait_for(lambda s: s.stopped)
        assert ingest.running
    assert [s.run_uid for s in sink.started] == [uid] and len(sink.frames) == 2
    assert not target.exists()


def test_prefix_is_honoured(proxy, RE):
    in_addr, out_addr = proxy
    sink = RecordingSink()
    cam = ImageCamera(name="cam", frames=test_frames(2))
    with (
        publisher(in_addr, prefix=b"bl7", serializer=MSGPACK) as ours,
        publisher(in_addr, prefix=b"bl8", serializer=MSGPACK) as theirs,
    ):
        bluesky = {"address": out_addr, "prefix": "bl7", "subscribe_all": True}
        with running_ingest(sink, bluesky=bluesky):
            wait_until_connected(probe(theirs), sink, "bad_prefix")
            wait_until_connected(probe(ours), sink, "unknown_document")
            publish_run(RE, theirs, bp.count([cam], num=2))
            sink.wait_for(
                lambda s: s.reasons.count("bad_prefix") == 5
            )  # start, desc, 2 events, stop
            uid = publish_run(RE, ours, bp.count([cam], num=2))
            sink.wait_for(lambda s: s.stopped)
            assert [s.run_uid for s in sink.started] == [uid] and len(sink.frames) == 2
        sink.clear()
        # without subscribe_all, 0MQ filters other prefixes before they reach the daemon
        with running_ingest(sink, bluesky={"address": out_addr, "prefix": "bl7"}):
            wait_until_connected(probe(ours), sink, "unknown_document")
            publish_run(RE, theirs, bp.count([cam], num=2))
            uid = publish_run(RE, ours, bp.count([cam], num=2))
            sink.wait_for(lambda s: s.stopped)
            time.sleep(0.1)
    assert [s.run_uid for s in sink.started] == [uid] and not sink.rejections


def raw_header(frame_id, shape=(16, 20), dtype="uint16", **extra):
    h = {"frame_id": frame_id, "run": "r1", "dtype": dtype, "shape": list(shape), "timestamp": 5.0}
    return json.dumps({**h, **extra}).encode()


def test_raw_frames_good_and_bad_over_a_pull_socket():
    sink = RecordingSink()
    frames = test_frames(3, shape=(16, 20))
    good = [[raw_header(k), frames[k].tobytes()] for k in range(3)]
    bad = [
        ([raw_header(10), frames[0].tobytes()[:-2]], "size_mismatch"),
        ([raw_header(11, dtype="int64"), frames[0].tobytes()], "bad_dtype"),
        ([b'{"frame_id": 12, "run":', frames[0].tobytes()], "bad_header"),
        ([b"\xc3\x28" + raw_header(13), frames[0].tobytes()], "bad_header"),
        ([raw_header(14, shape=(64, 64), dtype="float64"), b"\x00" * 64 * 64 * 8], "oversize"),
        ([raw_header(15)], "bad_framing"),
        ([raw_header(16), frames[0].tobytes(), b"more"], "bad_framing"),
        (
            [raw_header(17, dtype="float32"), np.full((16, 20), np.nan, np.float32).tobytes()],
            "nan_frame",
        ),
    ]
    raw = {"enabled": True, "bind": "tcp://127.0.0.1:*", "max_frame_bytes": 4096, "source": "cam"}
    with running_ingest(sink, bluesky={"enabled": False}, raw=raw) as ingest:
        ctx = zmq.Context.instance()
        push = ctx.socket(zmq.PUSH)
        push.setsockopt(zmq.LINGER, 0)
        push.connect(ingest.raw_address)
        for k in range(3):  # good0 bad0 bad1 bad2 good1 bad3 bad4 bad5 good2 bad6 bad7
            push.send_multipart(good[k])
            for parts, _ in bad[k * 3 : k * 3 + 3]:
                push.send_multipart(parts)
        end = json.dumps({"run": "r1", "timestamp": 6.0, "end_of_run": True}).encode()
        push.send_multipart([end, b""])
        sink.wait_for(lambda s: s.stopped)
        push.close()
        assert ingest.running
        address = ingest.raw_address
    assert sink.order == [("start", "raw:cam:r1")] + [("frame", "raw:cam:r1")] * 3 + [
        ("stop", "raw:cam:r1")
    ]
    for k, job in enumerate(sink.frames):
        np.testing.assert_array_equal(job.frame, frames[k])
        assert job.frame_uid == f"raw:cam:r1:{k}"
    assert sink.reasons == [reason for _, reason in bad]
    # stop() closed the socket: the same port can be bound again
    again = zmq.Context.instance().socket(zmq.PULL)
    again.bind(address)
    again.close(linger=0)


class FailingSink(RecordingSink):
    """A sink whose first frame() raises: a bug downstream must not kill ingest."""

    def frame(self, job):
        if not getattr(self, "failed", False):
            self.failed = True
            raise RuntimeError("downstream bug")
        super().frame(job)


def test_a_failing_sink_does_not_kill_the_loop():
    sink = FailingSink()
    raw = {"enabled": True, "bind": "tcp://127.0.0.1:*"}
    with running_ingest(sink, bluesky={"enabled": False}, raw=raw) as ingest:
        push = zmq.Context.instance().socket(zmq.PUSH)
        push.setsockopt(zmq.LINGER, 0)
        push.connect(ingest.raw_address)
        image = np.ones((4, 4), np.uint8)
        for k in range(2):
            push.send_multipart([raw_header(k, shape=(4, 4), dtype="uint8"), image.tobytes()])
        sink.wait_for(lambda s: s.frames)
        push.close()
    assert sink.reasons == ["internal_error"]
    assert [j.frame_uid for j in sink.frames] == ["raw:detector:r1:1"]


@pytest.fixture
def curve_keys(tmp_path) -> dict[str, Path]:
    keys = tmp_path / "keys"
    allowed = tmp_path / "allowed"
    keys.mkdir()
    allowed.mkdir()
    for name in ("daemon", "detector", "stranger", "proxy"):
        zmq.auth.create_certificates(str(keys), name)
    shutil.copy(keys / "detector.key", allowed / "detector.key")
    return {"dir": keys, "allowed": allowed}


def curve_push(ctx, keys: Path, client: str, server: str, address: str) -> zmq.Socket:
    sock = ctx.socket(zmq.PUSH)
    sock.setsockopt(zmq.LINGER, 0)
    sock.curve_publickey, sock.curve_secretkey = zmq.auth.load_certificate(
        str(keys / f"{client}.key_secret")
    )
    sock.curve_serverkey, _ = zmq.auth.load_certificate(str(keys / f"{server}.key"))
    sock.connect(address)
    return sock


def test_curve_raw_input_accepts_only_authorised_detectors(curve_keys):
    keys = curve_keys["dir"]
    sink = RecordingSink()
    config = {
        "bluesky": {"enabled": False},
        "raw": {"enabled": True, "bind": "tcp://127.0.0.1:*"},
        "curve": {
            "server_secret_key": str(keys / "daemon.key_secret"),
            "authorized_clients_dir": str(curve_keys["allowed"]),
        },
    }
    image = np.arange(16, dtype=np.uint8).reshape(4, 4)
    ctx = zmq.Context()
    try:
        with running_ingest(sink, **config) as ingest:
            stranger = curve_push(ctx, keys, "stranger", "daemon", ingest.raw_address)
            plain = ctx.socket(zmq.PUSH)
            plain.setsockopt(zmq.LINGER, 0)
            plain.connect(ingest.raw_address)
            for sock, fid in ((stranger, "s"), (plain, "p")):
                sock.send_multipart(
                    [raw_header(fid, shape=(4, 4), dtype="uint8"), image.tobytes()], zmq.NOBLOCK
                )
            detector = curve_push(ctx, keys, "detector", "daemon", ingest.raw_address)
            detector.send_multipart([raw_header("d", shape=(4, 4), dtype="uint8"), image.tobytes()])
            sink.wait_for(lambda s: s.frames)
            time.sleep(0.3)  # time for the others' messages, had they been let in
            for sock in (stranger, plain, detector):
                sock.close()
    finally:
        ctx.term()
    assert [j.frame_uid for j in sink.frames] == ["raw:detector:r1:d"]
    np.testing.assert_array_equal(sink.frames[0].frame, image)


def test_curve_client_of_a_curve_proxy(curve_keys, RE):
    keys = curve_keys["dir"]
    allowed = curve_keys["allowed"]
    shutil.copy(keys / "daemon.key", allowed / "daemon.key")
    proxy = Proxy(
        "tcp://127.0.0.1",
        "tcp://127.0.0.1",
        out_curve=ServerCurve(keys / "proxy.key_secret", allowed, None),
    )
    threading.Thread(target=proxy.start, daemon=True).start()
    sink = RecordingSink()
    config = {
        "bluesky": {"address": str(proxy.out_port)},
        "curve": {
            "client_secret_key": str(keys / "daemon.key_secret"),
            "proxy_public_key": str(keys / "proxy.key"),
        },
    }
    cam = ImageCamera(name="cam", frames=test_frames(2))
    with running_ingest(sink, **config), publisher(str(proxy.in_port), serializer=MSGPACK) as pub:
        wait_until_connected(probe(pub), sink, "unknown_document")
        uid = publish_run(RE, pub, bp.count([cam], num=2))
        sink.wait_for(lambda s: s.stopped)
    assert [j.run_uid for j in sink.frames] == [uid, uid]


def test_documents_from_a_second_publisher_before_their_start_wait_for_it(proxy):
    """Two publishers into one proxy: 0MQ orders each publisher's messages, not the two together."""
    from event_model import compose_run

    in_addr, out_addr = proxy
    sink = RecordingSink()
    run = compose_run(metadata={"pixel_size_nm": 8.0})
    desc = run.compose_descriptor(name="primary", data_keys={"img": {"dtype": "array", "shape": [24, 32],
                                                                    "source": "cam"}})
    frames = test_frames(2)
    events = [desc.compose_event(data={"img": f}, timestamps={"img": time.time()}) for f in frames]
    orphan = run.compose_descriptor(name="never", data_keys={"img": {"dtype": "array", "shape": [24, 32],
                                                                     "source": "cam"}})
    with (
        running_ingest(sink, bluesky={"address": out_addr, "early_documents_s": 0.5}),
        publisher(in_addr, serializer=MSGPACK) as main,
        publisher(in_addr, serializer=MSGPACK) as detector,
    ):
        wait_until_connected(probe(main), sink, "unknown_document")
        wait_until_connected(probe(detector), sink, "unknown_document")
        detector("event", events[0])  # the detector's process is ahead of the RunEngine's
        time.sleep(0.1)
        main("start", run.start_doc)
        main("descriptor", desc.descriptor_doc)
        detector("event", events[1])
        detector("event", orphan.compose_event(data={"img": frames[0]}, timestamps={"img": time.time()}))
        sink.wait_for(lambda s: len(s.frames) == 2)  # the stop must not overtake the detector's event
        main("stop", run.compose_stop())
        sink.wait_for(lambda s: s.stopped)
        assert not sink.rejections  # the orphan is still held
        sink.wait_for(lambda s: s.rejections, timeout=5.0)  # expired with no further message
    uid = run.start_doc["uid"]
    assert sink.order == [("start", uid), ("frame", uid), ("frame", uid), ("stop", uid)]
    assert [j.frame_uid for j in sink.frames] == [e["uid"] for e in events]
    assert sink.reasons == ["unknown_descriptor"] and "never came" in sink.rejections[0][1]
