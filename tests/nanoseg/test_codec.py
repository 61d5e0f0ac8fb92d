"""nanoseg/codec.py: JSON-safe values and the msgpack-numpy wire codec (never unpickling)."""

from __future__ import annotations

import json
import pickle

import msgpack
import numpy as np
import pytest

from nanoseg.codec import CodecError, json_safe, json_text, msgpack_dumps, msgpack_loads


def test_json_safe_writes_standard_json() -> None:
    doc = {1: np.float32(2.5), "nan": float("nan"), "t": (np.int64(3), np.inf), "a": np.arange(3),
           "big": np.zeros((40, 40)), "obj": object}
    out = json_safe(doc, max_array_size=100)
    assert out["1"] == 2.5 and out["nan"] is None and out["t"] == [3, None] and out["a"] == [0, 1, 2]
    assert out["big"] == "<array (40, 40) float64>" and out["obj"] == "<class 'object'>"
    json.dumps(out, allow_nan=False)
    assert json_safe(np.zeros((40, 40)))[39][39] == 0.0  # no limit by default


def test_json_text_is_json_safe_dumped() -> None:
    """The fast encoder (orjson) writes the values ``json.dumps(json_safe(...))`` writes."""
    import datetime
    import enum

    class Kind(enum.IntEnum):
        A = 3

    rng = np.random.default_rng(0)
    obj = {
        "f": [0.1, 1e-5, 1e16, 5e-324, float("nan"), float("inf"), -0.0, 1 / 3],
        "np": {"f32": np.float32(0.1), "f64": np.float64(2.5), "i": np.int64(-7), "b": np.bool_(True),
               "arr": rng.normal(size=(3, 2)).astype(np.float32), "nan_arr": np.array([1.0, np.nan])},
        "t": (1, "x", None, True), 4: "int key", 1.5: "float key", "kind": Kind.A,
        "when": datetime.datetime(2026, 12, 3, 21, 0), "other": Kind,
        "big": 2**70,
    }
    for value in (obj, {k: v for k, v in obj.items() if k != "big"}, [obj["np"], obj["f"]], float("nan"), {}):
        assert json.loads(json_text(value)) == json.loads(
            json.dumps(json_safe(value), allow_nan=False, separators=(",", ":")))
        assert "NaN" not in json_text(value) and "Infinity" not in json_text(value)
    assert json_text({"a": [1, 2.5]}) == '{"a":[1,2.5]}'  # compact


def test_msgpack_round_trip_keeps_arrays() -> None:
    doc = {"img": np.arange(12, dtype=np.uint16).reshape(3, 4), "x": 1.5, "s": "a"}
    back = msgpack_loads(msgpack_dumps(doc))
    assert back["img"].dtype == np.uint16 and np.array_equal(back["img"], doc["img"])
    assert back["x"] == 1.5 and back["s"] == "a"


def test_msgpack_object_arrays_are_refused_not_unpickled() -> None:
    bomb = {b"nd": True, b"type": "|O", b"kind": b"O", b"shape": [1], b"data": pickle.dumps([1])}
    with pytest.raises(CodecError, match="unpickling"):
        msgpack_loads(msgpack.packb({"d": bomb}))
