"""The daemon's path without per-particle work: engine null with no detections, over real sockets.

Every frame still passes every stage and comes back as a stored and published result, with zero
particles; with the default (six rods) the same frames come back with particles, so the
zero is the setting's doing. Also the cuts made on that path: the summary encoded once for the
store and the summary topic, events schema-checked once per run, frames taken in groups.
"""

from __future__ import annotations

import json
import time
import typing
from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest
import zmq
from event_model import DocumentNames, schema_validators

from nanoseg.codec import msgpack_loads
from nanoseg.config_io import ConfigError
from nanoseg.postprocess import PostprocessConfig
from nanoseg_daemon.config import load_daemon_config
from nanoseg_daemon.contracts import FrameJob, FrameMetadata
from nanoseg_daemon.model_slot import load_model
from nanoseg_daemon.pipeline import ProfileBook, analyse_frame
from nanoseg_daemon.publish import event_data, summary_body, summary_message
from nanoseg_daemon.queueing import Closed, FrameQueue
from nanoseg_daemon.store import ResultReader, default_path
from nanoseg_daemon.summary_schema import SummaryMessage
from tests.daemon.service_fixtures import DOSE, Client, raw_header, start_service

FRAMES = 12


def frame(k: int) -> np.ndarray:
    """A 128 x 128 uint16 transmission frame: a bright background, a little noise."""
    rng = np.random.default_rng(k)
    return rng.poisson(DOSE, (128, 128)).astype(np.uint16)


def events(sock: zmq.Socket[bytes], n: int, timeout_ms: int = 20000) -> list[dict[str, Any]]:
    """The first ``n`` event documents published on the bluesky socket (other documents skipped)."""
    out: list[dict[str, Any]] = []
    while len(out) < n and sock.poll(timeout_ms):
        _prefix, name, body = sock.recv().split(b" ", 2)
        if name == b"event":
            out.append(msgpack_loads(body))
    return out


@pytest.mark.parametrize("detections", [0, None])
def test_every_frame_comes_back_stored_and_published(tmp_path: Path, trained_model_path: Path,
                                                     detections: int | None) -> None:
    extra = {"model.engine": "null"} | ({} if detections is None else {"model.null_detections": detections})
    svc = start_service(tmp_path, trained_model_path, **extra)
    client = Client(svc)
    assert svc.doc_pub is not None
    docs = client.ctx.socket(zmq.SUB)
    docs.linger = 0
    docs.connect(svc.doc_pub.address)
    docs.setsockopt(zmq.SUBSCRIBE, b"")
    try:
        assert svc.doc_pub.wait_for_subscriber(10.0)
        for k in range(FRAMES):
            client.send([raw_header(k, frame(k), run="n1", pixel_size_nm=8.0, i0=DOSE), frame(k).tobytes()])
        summaries = list(client.summaries(FRAMES, timeout_s=60))
        published = events(docs, FRAMES)
    finally:
        docs.close(0)
        client.close()
        assert svc.stop()
    assert [s["seq_num"] for s in summaries] == list(range(1, FRAMES + 1))
    assert [e["data"]["raw_seq_num"] for e in published] == list(range(1, FRAMES + 1))
    for e in published:  # the daemon checks its run's first event only; every one is valid
        schema_validators[DocumentNames.event].validate(e)
    stored = ResultReader(default_path(tmp_path)).frames("raw:detector:n1")
    assert [r.seq_num for r in stored] == list(range(1, FRAMES + 1))
    counts = {s["count"] for s in summaries} | {e["data"]["count"] for e in published} | {r.count for r in stored}
    if detections == 0:
        assert counts == {0}
        assert all(e["data"]["masks"] == "[]" and np.isnan(e["data"]["length_nm_mean"]) for e in published)
        assert ResultReader(default_path(tmp_path)).particles("raw:detector:n1") == []
    else:  # the same frames with the engine's rods: particles on every frame, the same on each
        assert len(counts) == 1 and counts.pop() > 0


def test_null_detections_is_checked_and_only_for_the_null_engine() -> None:
    assert load_daemon_config(None, {"model.engine": "null"}, environ={}).model.null_detections == 6
    with pytest.raises(ConfigError, match="null_detections"):
        load_daemon_config(None, {"model.engine": "null", "model.null_detections": "7"}, environ={})
    with pytest.raises(ConfigError, match="null_detections"):
        load_daemon_config(None, {"model.engine": "torch", "model.null_detections": "0"}, environ={})


@pytest.mark.parametrize("detections", [0, 6])
def test_the_summary_topic_carries_the_summary_the_store_encoded(trained_model_path: Path, detections: int) -> None:
    model = load_model(trained_model_path, "null", "cpu", 1, PostprocessConfig(), null_detections=detections)
    job = FrameJob("r", "r:1", 1, frame(1), time.time(), FrameMetadata(pixel_size_nm=8.0, i0=DOSE), time.monotonic())
    result = analyse_frame(job, model, ProfileBook("ptychography"))
    assert (len(result.table) > 0) == (detections > 0)
    body = summary_body(result, published_at=123.5)
    assert json.loads(body) == summary_message(result, 123.5)
    assert json.loads(body)["summary"] == json.loads(result.summary_json)
    # the message is what its schema says, key for key: nothing sent that the schema does not name
    message = SummaryMessage.model_validate_json(body)
    assert message.count == len(result.table) and message.run_uid == "r" and message.seq_num == 1
    _assert_named_by(json.loads(body), SummaryMessage)
    if detections:
        assert message.summary.stats["length_nm"].mean is not None
    # the event's particle table: ParticleTable.to_dict's values and the scores, written from the
    # arrays; a value that is not finite is null in both
    if detections:
        result.table.bow_px[0], result.table.tortuosity[-1] = np.nan, np.inf
    particles = json.loads(event_data(result)["particles"])
    want = result.table.to_dict()
    cast(dict[str, Any], want["columns"])["score"] = [float(s) for s in result.instances.scores]
    assert particles == json.loads(json.dumps(want))
    assert len(particles["columns"]["score"]) == len(result.table) and len(particles["columns"]) > 30
    assert not detections or (particles["columns"]["bow_px"][0] is None and particles["columns"]["tortuosity"][-1] is None)


def _assert_named_by(value: object, model: object, where: str = "") -> None:
    """Every key of the JSON ``value`` is a field of the pydantic ``model`` (recursively through
    its models, and the values of its dict fields)."""
    from pydantic import BaseModel

    if isinstance(model, type) and issubclass(model, BaseModel):
        assert isinstance(value, dict), where
        for key, item in value.items():
            assert key in model.model_fields, f"{where}.{key} is not in {model.__name__}"
            _assert_named_by(item, model.model_fields[key].annotation, f"{where}.{key}")
        return
    args = [a for a in typing.get_args(model) if a is not type(None)]
    if typing.get_origin(model) is dict and isinstance(value, dict):
        for key, item in value.items():
            _assert_named_by(item, args[1], f"{where}.{key}")
    elif len(args) == 1 and value is not None:  # Optional[...]
        _assert_named_by(value, args[0], where)


def test_frames_are_taken_in_groups_in_order() -> None:
    dropped: list[object] = []
    q: FrameQueue[int] = FrameQueue(8, "block", lambda i: True, lambda i, r: dropped.append(i))
    assert q.get_many(4, timeout=0.01) == []
    for i in range(6):
        q.put(i)
    assert q.get_many(4) == [0, 1, 2, 3]
    assert q.get_many(4) == [4, 5]
    q.put(6)
    q.put(7)
    q.close()
    assert q.get_many(1) == [6]
    assert q.get_many(4) == [7]
    with pytest.raises(Closed):
        q.get_many(4)
    assert not dropped
