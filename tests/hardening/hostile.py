"""Seeded generators of malformed and hostile input, each message with the reasons it must be counted under.

Raw frames (``[header JSON, buffer]`` to the PULL input) and bluesky 0MQ messages
(``prefix name payload`` through a proxy) in categories: truncated multipart, wrong or missing
header fields, dtype/shape mismatch, zero-size and oversize frames, NaN/inf frames, invalid UTF-8,
random msgpack, documents out of order, duplicate uids, and pickles built to create a file when
unpickled. ``rejected`` lists the reasons expected in ``nanoseg_messages_rejected_total`` (one per
rejection, so an event page can count several), ``failed`` those in ``nanoseg_frames_failed_total``
(frames that pass ingest and fail preparation). Valid messages carry neither.

The expectations are written out by hand from the documented reasons (daemon/wire.py,
raw_ingest.py, bluesky_ingest.py, nanoseg/errors.py), never computed with the daemon's code.
"""

from __future__ import annotations

import json
import pickle
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import numpy as np

from nanoseg.codec import msgpack_dumps

MAX_FRAME_BYTES = 256 * 1024  # ingest.raw.max_frame_bytes of the fuzzed daemon
PICKLE_PROTOCOLS = range(pickle.HIGHEST_PROTOCOL + 1)


class TouchOnLoad:
    """Unpickling this creates ``path``: it stands for any code a pickle can run."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, tuple[Path]]:
        return (Path.touch, (self.path,))


def touching_pickle(path: Path, protocol: int) -> bytes:
    return pickle.dumps(TouchOnLoad(path), protocol=protocol)


@dataclass(frozen=True)
class Msg:
    category: str
    parts: list[bytes]  # raw: the multipart message; bluesky: one frame
    rejected: tuple[str, ...] = ()
    failed: tuple[str, ...] = ()

    @property
    def hostile(self) -> bool:
        return bool(self.rejected or self.failed)


# -- raw frames --------------------------------------------------------------------------------


def _header(**fields: Any) -> dict[str, Any]:
    base = {"frame_id": uuid.uuid4().hex, "run": "hostile", "dtype": "uint16", "shape": [8, 8],
            "timestamp": time.time(), "metadata": {"pixel_size_nm": 8.0}}
    base.update(fields)
    return {k: v for k, v in base.items() if v is not _MISSING}


_MISSING = object()


def _j(obj: Any) -> bytes:
    return json.dumps(obj).encode()  # NaN and Infinity tokens allowed, as a sender might write


def _noise(rng: np.random.Generator, n: int) -> bytes:
    return rng.integers(0, 256, n, dtype=np.uint8).tobytes()


def _random_header_bytes(rng: np.random.Generator) -> bytes:
    """Bytes that are not a JSON object: random, or printable garbage opening like one."""
    while True:
        raw = _noise(rng, int(rng.integers(0, 200))) if rng.random() < 0.5 else \
            b"{" + bytes(rng.integers(32, 127, int(rng.integers(0, 80)), dtype=np.uint8))
        try:
            if isinstance(json.loads(raw.decode("utf-8")), dict):
                continue
        except (UnicodeDecodeError, json.JSONDecodeError):
            pass
        return raw


def raw_categories(pickle_path: Path) -> dict[str, Callable[[np.random.Generator], Msg]]:
    buf64 = np.zeros(8 * 8, np.uint16).tobytes()

    def frame_hdr(dtype: str, shape: list[int], **kw: Any) -> bytes:
        return _j(_header(dtype=dtype, shape=shape, **kw))

    def full(fill: float) -> np.ndarray:
        return np.full((8, 8), fill, np.float32)

    cats: dict[str, Callable[[np.random.Generator], Msg]] = {
        # truncated or padded multipart
        "one_part": lambda r: Msg("one_part", [_j(_header())], ("bad_framing",)),
        "empty_message": lambda r: Msg("empty_message", [b""], ("bad_framing",)),
        "three_parts": lambda r: Msg("three_parts", [_j(_header()), buf64, b"x"], ("bad_framing",)),
        "many_random_parts": lambda r: Msg(
            "many_random_parts", [_noise(r, int(r.integers(0, 40))) for _ in range(int(r.integers(3, 7)))],
            ("bad_framing",)),
        # headers that are not JSON objects
        "header_random_bytes": lambda r: Msg("header_random_bytes", [_random_header_bytes(r), buf64], ("bad_header",)),
        "header_invalid_utf8": lambda r: Msg(
            "header_invalid_utf8", [b'{"frame_id": "\xff\xfe", "dtype": "uint16"}', buf64], ("bad_header",)),
        "header_json_array": lambda r: Msg("header_json_array", [_j([1, 2, 3]), buf64], ("bad_header",)),
        "header_truncated": lambda r: Msg(
            "header_truncated", [_j(_header())[: int(r.integers(1, 40))], buf64], ("bad_header",)),
        "header_oversize": lambda r: Msg(
            "header_oversize", [_j(_header(metadata={"extra": {"pad": "x" * 70_000}})), buf64], ("bad_header",)),
        # wrong or missing fields
        "missing_timestamp": lambda r: Msg("missing_timestamp", [_j(_header(timestamp=_MISSING)), buf64], ("bad_header",)),
        "missing_frame_id": lambda r: Msg("missing_frame_id", [_j(_header(frame_id=_MISSING)), buf64], ("bad_header",)),
        "missing_dtype": lambda r: Msg("missing_dtype", [_j(_header(dtype=_MISSING)), buf64], ("bad_header",)),
        "missing_shape": lambda r: Msg("missing_shape", [_j(_header(shape=_MISSING)), buf64], ("bad_header",)),
        "unknown_key": lambda r: Msg("unknown_key", [_j(_header(colour="red")), buf64], ("bad_header",)),
        "frame_id_float": lambda r: Msg("frame_id_float", [_j(_header(frame_id=1.5)), buf64], ("bad_header",)),
        "frame_id_bool": lambda r: Msg("frame_id_bool", [_j(_header(frame_id=True)), buf64], ("bad_header",)),
        "timestamp_nan": lambda r: Msg("timestamp_nan", [_j(_header(timestamp=float("nan"))), buf64], ("bad_header",)),
        "timestamp_text": lambda r: Msg("timestamp_text", [_j(_header(timestamp="yesterday")), buf64], ("bad_header",)),
        "run_empty": lambda r: Msg("run_empty", [_j(_header(run="")), buf64], ("bad_header",)),
        "pixel_size_negative": lambda r: Msg(
            "pixel_size_negative", [_j(_header(metadata={"pixel_size_nm": -8.0})), buf64], ("bad_header",)),
        "metadata_unknown_key": lambda r: Msg(
            "metadata_unknown_key", [_j(_header(metadata={"sample": "V2O5"})), buf64], ("bad_header",)),
        # dtype and shape
        "dtype_unsupported": lambda r: Msg(
            "dtype_unsupported",
            [frame_hdr(str(r.choice(["complex64", "float16", "object", "int64", "bool", "<U4"])), [8, 8]), buf64],
            ("bad_dtype",)),
        "dtype_not_text": lambda r: Msg("dtype_not_text", [_j(_header(dtype=7)), buf64], ("bad_dtype",)),
        "shape_zero": lambda r: Msg("shape_zero", [frame_hdr("uint16", [0, 64]), b""], ("bad_shape",)),
        "shape_negative": lambda r: Msg("shape_negative", [frame_hdr("uint16", [-8, 8]), buf64], ("bad_shape",)),
        "shape_1d": lambda r: Msg("shape_1d", [frame_hdr("uint16", [64]), buf64], ("bad_shape",)),
        "shape_3d": lambda r: Msg("shape_3d", [frame_hdr("uint16", [1, 8, 8]), buf64], ("bad_shape",)),
        "shape_text": lambda r: Msg("shape_text", [_j(_header(shape=["a", "b"])), buf64], ("bad_shape",)),
        "shape_fraction": lambda r: Msg("shape_fraction", [_j(_header(shape=[8.5, 8])), buf64], ("bad_shape",)),
        # sizes
        "oversize_dim": lambda r: Msg("oversize_dim", [frame_hdr("uint8", [20_000, 2]), b"\0" * 40_000], ("oversize",)),
        "oversize_header_bytes": lambda r: Msg("oversize_header_bytes", [frame_hdr("float64", [4096, 4096]), buf64],
                                               ("oversize",)),
        "truncated_buffer": lambda r: Msg(
            "truncated_buffer", [frame_hdr("uint16", [8, 8]), buf64[: int(r.integers(0, len(buf64)))]],
            ("size_mismatch",)),
        "padded_buffer": lambda r: Msg(
            "padded_buffer", [frame_hdr("uint16", [8, 8]), buf64 + _noise(r, int(r.integers(1, 64)))],
            ("size_mismatch",)),
        "zero_size_buffer": lambda r: Msg("zero_size_buffer", [frame_hdr("uint16", [64, 64]), b""], ("size_mismatch",)),
        "dtype_shape_mismatch": lambda r: Msg(
            "dtype_shape_mismatch", [frame_hdr("uint16", [8, 8]), np.zeros((8, 8), np.float64).tobytes()],
            ("size_mismatch",)),
        # NaN and inf
        "all_nan": lambda r: Msg("all_nan", [frame_hdr("float32", [8, 8]), full(np.nan).tobytes()], ("nan_frame",)),
        "all_inf": lambda r: Msg("all_inf", [frame_hdr("float32", [8, 8]), full(np.inf).tobytes()], (), ("non_finite",)),
        "nan_and_inf": lambda r: Msg(
            "nan_and_inf",
            [frame_hdr("float64", [8, 8]), np.where(r.random((8, 8)) < 0.5, np.nan, -np.inf).tobytes()],
            (), ("non_finite",)),
        # end of run
        "end_of_unknown_run": lambda r: Msg(
            "end_of_unknown_run", [_j({"run": f"never-{uuid.uuid4().hex}", "timestamp": 1.0, "end_of_run": True}), b""],
            ("unknown_run",)),
        "end_of_run_with_buffer": lambda r: Msg(
            "end_of_run_with_buffer", [_j({"run": "hostile", "timestamp": 1.0, "end_of_run": True}), buf64],
            ("bad_framing",)),
        # pickles that would create a file when unpickled
        "pickle_header": lambda r: Msg(
            "pickle_header", [touching_pickle(pickle_path, int(r.choice(PICKLE_PROTOCOLS))), buf64], ("bad_header",)),
        "pickle_buffer": lambda r: Msg(
            "pickle_buffer", [frame_hdr("uint16", [64, 64]), touching_pickle(pickle_path, 5)], ("size_mismatch",)),
    }
    return cats


def raw_oversize_buffer() -> Msg:
    """A real 720 kB buffer, beyond max_frame_bytes but within what the socket still delivers."""
    arr = np.zeros((300, 300), np.float64)
    return Msg("oversize_buffer", [_j(_header(dtype="float64", shape=[300, 300])), arr.tobytes()], ("oversize",))


def hostile_stream(cats: dict[str, Callable[[np.random.Generator], Msg]], n: int,
                   rng: np.random.Generator) -> Iterator[Msg]:
    """``n`` messages, every category at least once, the rest drawn at random."""
    names = sorted(cats)
    order = names + list(rng.choice(names, max(0, n - len(names))))
    rng.shuffle(order)
    for name in order:
        yield cats[name](rng)


# -- bluesky documents -------------------------------------------------------------------------


class BlueskyEncoder:
    """Encodes documents as a bluesky Publisher would, for the daemon's serializer."""

    def __init__(self, prefix: bytes, serializer: str) -> None:
        self.prefix, self.serializer = prefix, serializer

    def payload(self, doc: Any) -> bytes:
        if self.serializer == "msgpack":
            return msgpack_dumps(doc)
        return json.dumps(doc, default=lambda a: a.tolist()).encode()  # NaN/Infinity as tokens

    def message(self, name: str, doc: Any, prefix: bytes | None = None) -> bytes:
        return b" ".join([self.prefix if prefix is None else prefix, name.encode(), self.payload(doc)])

    def raw(self, name: bytes, payload: bytes) -> bytes:
        return b" ".join([self.prefix, name, payload])


def _uid() -> str:
    return str(uuid.uuid4())


def _start(uid: str, **extra: Any) -> dict[str, Any]:
    return {"uid": uid, "time": time.time(), "scan_id": 1, **extra}


def _stop(run: str, exit_status: str = "success") -> dict[str, Any]:
    return {"uid": _uid(), "run_start": run, "time": time.time(), "exit_status": exit_status, "num_events": {}}


def _descriptor(run: str, uid: str, image: tuple[int, int] | None = None) -> dict[str, Any]:
    keys: dict[str, Any] = {"x": {"dtype": "number", "shape": [], "source": "sim"}}
    if image is not None:
        keys = {"img": {"dtype": "array", "shape": list(image), "source": "cam"}, **keys}
    return {"uid": uid, "run_start": run, "time": time.time(), "name": "primary", "data_keys": keys,
            "configuration": {}, "object_keys": {}, "hints": {}}


def _event(desc: str, seq: int, data: dict[str, Any], uid: str | None = None) -> dict[str, Any]:
    return {"uid": uid or _uid(), "descriptor": desc, "seq_num": seq, "time": time.time(),
            "data": data, "timestamps": dict.fromkeys(data, time.time()), "filled": {}}


def image_run(enc: BlueskyEncoder, frames: list[np.ndarray]) -> tuple[list[Msg], list[str]]:
    """A valid run whose events each carry one image; returns its messages and the event uids."""
    run, desc = _uid(), _uid()
    msgs = [Msg("valid", [enc.message("start", _start(run, pixel_size_nm=8.0))]),
            Msg("valid", [enc.message("descriptor", _descriptor(run, desc, frames[0].shape))])]
    uids = []
    for k, f in enumerate(frames, 1):
        ev = _event(desc, k, {"img": f, "x": float(k)})
        uids.append(ev["uid"])
        msgs.append(Msg("valid", [enc.message("event", ev)]))
    msgs.append(Msg("valid", [enc.message("stop", _stop(run))]))
    return msgs, uids


def bluesky_single(enc: BlueskyEncoder, pickle_path: Path) -> dict[str, Callable[[np.random.Generator], list[Msg]]]:
    """Categories of one hostile message (or a hostile message in a short valid context)."""
    msgpack_kind = enc.serializer == "msgpack"

    def one(cat: str, message: bytes, *rejected: str) -> list[Msg]:
        return [Msg(cat, [message], rejected)]

    def random_msgpack_value(r: np.random.Generator) -> bytes:
        values = [7, -1, 2.5, "start", b"\x00\x01", None, True, [1, {"uid": "x"}], msgpack.ExtType(5, b"xyz")]
        return msgpack.packb(values[int(r.integers(len(values)))])

    def random_payload(r: np.random.Generator) -> bytes:
        """Random bytes whose first byte opens no map (msgpack) or object (JSON): never a dict."""
        body = _noise(r, int(r.integers(0, 64)))
        first = int(r.integers(0, 256))
        while 0x80 <= first <= 0x8F or first in (0xDE, 0xDF) or first in b"{ \t\r\n":
            first = int(r.integers(0, 256))
        return bytes([first]) + body

    def numpy_object_array(r: np.random.Generator) -> bytes:
        """A start document holding an msgpack_numpy "array" whose data is a touching pickle."""
        kind = [b"O", b""][int(r.integers(0, 2))]
        arr = {b"nd": True, b"type": "|O", b"kind": kind, b"shape": [1],
               b"data": touching_pickle(pickle_path, 5)}
        return enc.raw(b"start", msgpack.packb({"uid": _uid(), "time": 1.0, "dark": arr}))

    cats: dict[str, Callable[[np.random.Generator], list[Msg]]] = {
        "no_spaces": lambda r: one("no_spaces", b"garbage" + _noise(r, 8).replace(b" ", b"_"), "bad_framing"),
        "two_parts": lambda r: one("two_parts", enc.prefix + b" start", "bad_framing"),
        "name_not_ascii": lambda r: one("name_not_ascii", enc.raw("st\xe4rt".encode(), enc.payload({})), "bad_framing"),
        "wrong_prefix": lambda r: one("wrong_prefix", enc.message("start", _start(_uid()), prefix=b"intruder"),
                                      "bad_prefix"),
        "unknown_document": lambda r: one("unknown_document", enc.message("frobnicate", {}), "unknown_document"),
        "random_payload": lambda r: one("random_payload", enc.raw(b"start", random_payload(r)), "bad_payload"),
        "pickle_payload": lambda r: one(
            "pickle_payload", enc.raw(b"start", touching_pickle(pickle_path, int(r.choice(PICKLE_PROTOCOLS)))),
            "bad_payload"),
        "unsupported_document": lambda r: one(
            "unsupported_document",
            enc.message(str(r.choice(["bulk_events", "bulk_datum"])), {"uid": "x"}),
            "unsupported_document"),
        # ophyd-async's documents are read now: a stream resource of no known run, a stream datum
        # that is no valid document
        "stream_resource_unknown_run": lambda r: one(
            "stream_resource_unknown_run", enc.message("stream_resource", {"uid": "x"}), "unknown_run"),
        "stream_datum_invalid": lambda r: one(
            "stream_datum_invalid", enc.message("stream_datum", {"uid": "x"}), "bad_document"),
        "start_missing_uid": lambda r: one("start_missing_uid", enc.message("start", {"time": 1.0}), "bad_document"),
        "start_uid_not_text": lambda r: one("start_uid_not_text", enc.message("start", {"uid": 5, "time": 1.0}),
                                            "bad_document"),
        "start_time_text": lambda r: one("start_time_text", enc.message("start", {"uid": _uid(), "time": "noon"}),
                                         "bad_document"),
        "descriptor_missing_fields": lambda r: one("descriptor_missing_fields",
                                                   enc.message("descriptor", {"uid": _uid()}), "bad_document"),
        "event_missing_fields": lambda r: one("event_missing_fields", enc.message("event", {"uid": _uid()}),
                                              "bad_document"),
        "stop_without_start": lambda r: one("stop_without_start", enc.message("stop", _stop(_uid())), "unknown_run"),
        "descriptor_unknown_run": lambda r: one("descriptor_unknown_run",
                                                enc.message("descriptor", _descriptor(_uid(), _uid())), "unknown_run"),
        "event_before_descriptor": lambda r: one(
            "event_before_descriptor", enc.message("event", _event(_uid(), 1, {"x": 1.0})), "unknown_descriptor"),
        "event_page_before_descriptor": lambda r: one(
            "event_page_before_descriptor",
            enc.message("event_page", {"uid": [_uid(), _uid(), _uid()], "descriptor": _uid(), "seq_num": [1, 2, 3],
                                       "time": [1.0, 2.0, 3.0], "data": {"x": [1.0, 2.0, 3.0]},
                                       "timestamps": {"x": [1.0, 2.0, 3.0]}, "filled": {}}),
            "unknown_descriptor", "unknown_descriptor", "unknown_descriptor"),
        "resource_unknown_run": lambda r: one(
            "resource_unknown_run",
            enc.message("resource", {"uid": _uid(), "run_start": _uid(), "spec": "AD_HDF5", "root": "/",
                                     "resource_path": "x.h5", "resource_kwargs": {}, "path_semantics": "posix"}),
            "unknown_run"),
        "datum_unknown_resource": lambda r: one(
            "datum_unknown_resource",
            enc.message("datum", {"resource": _uid(), "datum_id": f"{_uid()}/0", "datum_kwargs": {}}),
            "unknown_resource"),
    }
    if msgpack_kind:
        cats["random_msgpack_value"] = lambda r: one("random_msgpack_value", enc.raw(b"start", random_msgpack_value(r)),
                                                     "bad_payload")
        cats["numpy_object_array"] = lambda r: one("numpy_object_array", numpy_object_array(r), "bad_payload")
    else:
        cats["json_invalid_utf8"] = lambda r: one(
            "json_invalid_utf8", enc.raw(b"start", b'{"uid": "\xff\xfe", "time": 1.0}'), "bad_payload")
        cats["json_truncated"] = lambda r: one(
            "json_truncated", enc.raw(b"start", enc.payload(_start(_uid()))[: int(r.integers(1, 20))]), "bad_payload")
        cats["json_not_object"] = lambda r: one("json_not_object", enc.raw(b"start", b"[1, 2, 3]"), "bad_payload")
    return cats


def bluesky_stateful(enc: BlueskyEncoder) -> dict[str, Callable[[np.random.Generator], list[Msg]]]:
    """Categories that open a real run and break its rules (order, duplicates, bad images)."""
    json_kind = enc.serializer == "json"

    def ok(name: str, doc: dict[str, Any]) -> Msg:
        return Msg("valid", [enc.message(name, doc)])

    def bad(cat: str, name: str, doc: dict[str, Any], rejected: tuple[str, ...] = (),
            failed: tuple[str, ...] = ()) -> Msg:
        return Msg(cat, [enc.message(name, doc)], rejected, failed)

    def with_run(build: Callable[[str], list[Msg]], stop: bool = True) -> list[Msg]:
        run = _uid()
        return [ok("start", _start(run, pixel_size_nm=8.0)), *build(run), *([ok("stop", _stop(run))] if stop else [])]

    def image_event(cat: str, image: Any, rejected: tuple[str, ...] = (), failed: tuple[str, ...] = ()) -> list[Msg]:
        def build(run: str) -> list[Msg]:
            desc = _uid()
            return [ok("descriptor", _descriptor(run, desc, (8, 8))),
                    bad(cat, "event", _event(desc, 1, {"img": image, "x": 1.0}), rejected, failed)]
        return with_run(build)

    def duplicate_start(r: np.random.Generator) -> list[Msg]:
        run = _uid()
        return [ok("start", _start(run)), bad("duplicate_start", "start", _start(run), ("duplicate_uid",)),
                ok("stop", _stop(run))]

    def duplicate_descriptor(r: np.random.Generator) -> list[Msg]:
        desc = _uid()
        return with_run(lambda run: [ok("descriptor", _descriptor(run, desc)),
                                     bad("duplicate_descriptor", "descriptor", _descriptor(run, desc),
                                         ("duplicate_uid",))])

    def duplicate_event(r: np.random.Generator) -> list[Msg]:
        desc, ev = _uid(), _uid()
        return with_run(lambda run: [ok("descriptor", _descriptor(run, desc)),
                                     ok("event", _event(desc, 1, {"x": 1.0}, ev)),
                                     bad("duplicate_event", "event", _event(desc, 2, {"x": 2.0}, ev),
                                         ("duplicate_uid",))])

    def stop_twice(r: np.random.Generator) -> list[Msg]:
        run = _uid()
        return [ok("start", _start(run)), ok("stop", _stop(run)),
                bad("stop_twice", "stop", _stop(run), ("run_closed",))]

    def descriptor_after_stop(r: np.random.Generator) -> list[Msg]:
        run = _uid()
        return [ok("start", _start(run)), ok("stop", _stop(run)),
                bad("descriptor_after_stop", "descriptor", _descriptor(run, _uid()), ("run_closed",))]

    def event_after_stop(r: np.random.Generator) -> list[Msg]:
        run, desc = _uid(), _uid()
        return [ok("start", _start(run)), ok("descriptor", _descriptor(run, desc)), ok("stop", _stop(run)),
                bad("event_after_stop", "event", _event(desc, 1, {"x": 1.0}), ("unknown_descriptor",))]

    def missing_image(r: np.random.Generator) -> list[Msg]:
        def build(run: str) -> list[Msg]:
            desc = _uid()
            return [ok("descriptor", _descriptor(run, desc, (8, 8))),
                    bad("missing_image", "event", _event(desc, 1, {"x": 1.0}), ("missing_image",))]
        return with_run(build)

    def bad_metadata(r: np.random.Generator) -> list[Msg]:
        run = _uid()
        field = str(r.choice(["pixel_size_nm", "i0", "dark", "nanoseg_profile"]))
        value: Any = {"pixel_size_nm": "eight", "i0": -5, "dark": "dark", "nanoseg_profile": 12}[field]
        return [bad("bad_metadata", "start", _start(run, **{field: value}), ("bad_metadata",)), ok("stop", _stop(run))]

    def too_many_runs(r: np.random.Generator) -> list[Msg]:
        runs = [_uid() for _ in range(9)]  # ingest.bluesky.max_open_runs is 8
        msgs = [ok("start", _start(u)) for u in runs[:8]]
        msgs.append(bad("too_many_runs", "start", _start(runs[8]), ("too_many_runs",)))
        msgs += [ok("stop", _stop(u)) for u in runs[1:]]
        msgs.append(bad("stop_after_eviction", "stop", _stop(runs[0]), ("run_closed",)))
        return msgs

    nan8 = np.full((8, 8), np.nan, np.float32)
    cats: dict[str, Callable[[np.random.Generator], list[Msg]]] = {
        "duplicate_start": duplicate_start,
        "duplicate_descriptor": duplicate_descriptor,
        "duplicate_event": duplicate_event,
        "stop_twice": stop_twice,
        "descriptor_after_stop": descriptor_after_stop,
        "event_after_stop": event_after_stop,
        "missing_image": missing_image,
        "bad_metadata": bad_metadata,
        "too_many_runs": too_many_runs,
        "image_text": lambda r: image_event("image_text", "not an image", ("bad_dtype",)),
        "image_1d": lambda r: image_event("image_1d", np.arange(8, dtype=np.uint16), ("bad_shape",)),
        "image_4d": lambda r: image_event("image_4d", np.zeros((1, 1, 2, 2), np.uint16), ("bad_shape",)),
        "image_ragged": lambda r: image_event("image_ragged", [[1, 2], [3]], ("bad_shape",)),
        "image_nan": lambda r: image_event("image_nan", nan8, (), ("non_finite",)),
        "image_inf": lambda r: image_event("image_inf", np.full((8, 8), np.inf), (), ("non_finite",)),
        "image_zero_size": lambda r: image_event(  # refused at the input (it was a failed frame)
            "image_zero_size", [[]] if json_kind else np.zeros((0, 8), np.uint16), ("bad_shape",)),
        "image_bool": lambda r: image_event("image_bool", np.ones((8, 8), bool), (), ("bad_dtype",)),
    }
    if not json_kind:
        cats["image_complex"] = lambda r: image_event("image_complex", np.ones((8, 8), np.complex64), ("bad_dtype",))
    return cats
