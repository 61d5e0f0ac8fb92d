"""daemon/wire.py: bluesky's 0MQ message format, deserialisers, and never unpickling by default."""

from __future__ import annotations

import functools
import json
import logging
import pickle

import msgpack
import msgpack_numpy
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nanoseg.codec import msgpack_loads
from nanoseg.config_io import ConfigError, parse_config
from nanoseg_daemon.ingest_config import BlueskyIngestConfig
from nanoseg_daemon.wire import (
    WireError,
    json_loads,
    make_deserializer,
    parse_bluesky_message,
)
from tests.daemon.ingest_fixtures import TouchOnLoad

msgpack_dumps = functools.partial(msgpack.dumps, default=msgpack_numpy.encode)


def message(name: bytes, payload: bytes, prefix: bytes = b"") -> bytes:
    """What bluesky.callbacks.zmq.Publisher.__call__ sends."""
    return b" ".join([prefix, name, payload])


def test_publisher_framing_without_prefix_round_trips_numpy_arrays():
    image = np.arange(12, dtype=np.uint16).reshape(3, 4)
    doc = {"uid": "e1", "data": {"img": image, "x": np.float32(1.5)}, "seq_num": 1}
    name, out = parse_bluesky_message(message(b"event", msgpack_dumps(doc)), None, msgpack_loads)
    assert name == "event"
    assert out["data"]["img"].dtype == np.uint16
    np.testing.assert_array_equal(out["data"]["img"], image)
    assert out["data"]["x"] == np.float32(1.5)
    assert out["seq_num"] == 1


def test_payload_may_contain_spaces():
    payload = json.dumps({"uid": "a b c", "plan_name": "count  x"}).encode()
    _, doc = parse_bluesky_message(message(b"start", payload), b"", json_loads)
    assert doc == {"uid": "a b c", "plan_name": "count  x"}


def test_configured_prefix_is_honoured():
    payload = json.dumps({"uid": "s"}).encode()
    name, _ = parse_bluesky_message(message(b"start", payload, b"bl7"), b"bl7", json_loads)
    assert name == "start"
    with pytest.raises(WireError) as err:
        parse_bluesky_message(message(b"start", payload, b"bl8"), b"bl7", json_loads)
    assert err.value.reason == "bad_prefix"
    with pytest.raises(WireError) as err:
        parse_bluesky_message(message(b"start", payload), b"bl7", json_loads)
    assert err.value.reason == "bad_prefix"
    # no configured prefix: any prefix is accepted, as RemoteDispatcher does
    assert parse_bluesky_message(message(b"start", payload, b"bl8"), None, json_loads)[0] == "start"


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"start", "bad_framing"),
        (b"start{}", "bad_framing"),
        (b" st\xffart {}", "bad_framing"),
        (b" hello {}", "unknown_document"),
        (b" __class__ {}", "unknown_document"),
        (b" start not-json", "bad_payload"),
        (b" start [1, 2]", "bad_payload"),
        (b" start \xff\xfe", "bad_payload"),
    ],
)
def test_malformed_messages_are_rejected_with_a_reason(raw, reason):
    with pytest.raises(WireError) as err:
        parse_bluesky_message(raw, None, json_loads)
    assert err.value.reason == reason
    assert err.value.detail


def test_msgpack_that_is_not_a_map_is_bad_payload():
    with pytest.raises(WireError) as err:
        parse_bluesky_message(message(b"stop", msgpack.dumps([1, 2])), None, msgpack_loads)
    assert err.value.reason == "bad_payload"


def test_msgpack_array_with_wrong_buffer_size_is_bad_payload():
    enc = msgpack_numpy.encode(np.zeros((4, 4), np.float32))
    enc[b"data"] = b"\x00" * 8
    with pytest.raises(WireError) as err:
        parse_bluesky_message(message(b"event", msgpack.dumps({"d": enc})), None, msgpack_loads)
    assert err.value.reason == "bad_payload"


def test_msgpack_object_array_is_never_unpickled(tmp_path):
    target = tmp_path / "pwned"
    bomb = {
        b"nd": True,
        b"type": "|O",
        b"kind": b"O",
        b"shape": [1],
        b"data": pickle.dumps(TouchOnLoad(target)),
    }
    msgpack_numpy.decode(dict(bomb))  # control: msgpack_numpy itself would run it
    assert target.exists()
    target.unlink()
    raw = message(b"event", msgpack.dumps({"uid": "e", "data": {"img": bomb}}))
    with pytest.raises(WireError) as err:
        parse_bluesky_message(raw, None, msgpack_loads)
    assert err.value.reason == "bad_payload"
    assert not target.exists()


@pytest.mark.parametrize("deserializer", [msgpack_loads, json_loads])
def test_pickle_payload_is_rejected_and_never_executed(tmp_path, deserializer):
    target = tmp_path / "pwned"
    payload = pickle.dumps({"uid": "s", "x": TouchOnLoad(target)})
    with pytest.raises(WireError) as err:
        parse_bluesky_message(message(b"start", payload), None, deserializer)
    assert err.value.reason == "bad_payload"
    assert not target.exists()


def test_pickle_only_when_enabled_and_then_with_a_warning_each_time(tmp_path, caplog):
    with pytest.raises(ValueError, match="allow_pickle"):
        make_deserializer("pickle")
    with caplog.at_level(logging.WARNING, logger="nanoseg_daemon.wire"):
        loads = make_deserializer("pickle", allow_pickle=True)
        make_deserializer("pickle", allow_pickle=True)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2 and "pickle" in warnings[0].getMessage()
    name, doc = parse_bluesky_message(message(b"start", pickle.dumps({"uid": "s"})), None, loads)
    assert (name, doc) == ("start", {"uid": "s"})
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="nanoseg_daemon.wire"):
        make_deserializer("msgpack", allow_pickle=True)
    assert not caplog.records


def test_config_refuses_pickle_without_consent():
    with pytest.raises(ConfigError, match="allow_pickle"):
        parse_config({"serializer": "pickle"}, BlueskyIngestConfig)
    cfg = parse_config({"serializer": "pickle", "allow_pickle": True}, BlueskyIngestConfig)
    assert cfg.serializer == "pickle"
    with pytest.raises(ConfigError, match="prefix"):
        parse_config({"prefix": "a b"}, BlueskyIngestConfig)
    with pytest.raises(ConfigError, match="unknown key"):
        parse_config({"serializr": "json"}, BlueskyIngestConfig)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_arbitrary_bytes_raise_only_wire_errors(raw):
    for loads in (msgpack_loads, json_loads):
        try:
            name, doc = parse_bluesky_message(raw, None, loads)
        except WireError as err:
            assert err.reason in {"bad_framing", "unknown_document", "bad_payload"}
        else:
            assert isinstance(doc, dict) and isinstance(name, str)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200))
def test_arbitrary_msgpack_payloads_raise_only_wire_errors(payload):
    try:
        parse_bluesky_message(b" event " + payload, None, msgpack_loads)
    except WireError as err:
        assert err.reason == "bad_payload"
