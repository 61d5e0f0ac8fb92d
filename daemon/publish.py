"""Publication: analysis runs back to bluesky, and a plain JSON summary topic.

Routing and transport are apart. ``AnalysisRun`` (pure) turns FrameResults into event-model
documents made by ``event_model.compose_run``; ``DocumentPublisher`` and ``SummaryPublisher``
only frame and send bytes.

The analysis run of a raw run: start (``raw_run_uid``, ``model_version``, ``processing``), one
descriptor (stream ``primary``, object ``nanoseg``), one event per frame in frame order, stop when
the raw run stops or the service gives up waiting (``stop(exit_status, reason)``). Event fields
(``ANALYSIS_DATA_KEYS``): scalar statistics are numbers (NaN where a frame has no particles or no
pixel size, as bluesky does for missing readings); the per-particle table and the masks are JSON
strings, because their length varies per frame and their columns per pixel size. Each field's
timestamp is the frame's acquisition time; the event's ``time`` is when it was composed.

Wire formats. bluesky: one ZeroMQ frame ``prefix + b" " + name + b" " + serializer(doc)``, exactly
what ``bluesky.callbacks.zmq.Publisher`` sends and ``RemoteDispatcher`` splits, so connect to a
``bluesky.callbacks.zmq.Proxy``'s *input* address (its SUB binds there) or bind for direct
subscribers. Serializer msgpack with ``msgpack_numpy`` hooks (default; readers use
``nanoseg.codec.msgpack_loads``) or JSON (``json_dumps``: NaN is written as the token NaN, which Python's json
reads). Summary topic: a two-frame message ``[b"nanoseg.summary", JSON body]`` (strict JSON).

CurveZMQ (optional, ``curve``): a bound socket is a CURVE server (ZAP domain ``publish``, clients
from ``authorized_clients_dir``), a connecting one a CURVE client of the proxy
(``client_secret_key``, ``proxy_public_key``).

Never blocking: the sockets are XPUB with a send high-water mark, and sends are ``NOBLOCK``: with
``XPUB_NODROP`` (default, ``count_drops=True``) a message that a full subscriber queue cannot take
is dropped and counted in ``dropped`` (a metric) instead of stalling the pipeline. A publisher is
used from one thread. ``wait_for_subscriber`` tells when a peer has subscribed (XPUB sees it).
"""

from __future__ import annotations

import copy
import json
import math
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, cast

import numpy as np
import zmq
from event_model import compose_run

from nanoseg.codec import (
    MSGPACK_INT_MAX,
    MSGPACK_INT_MIN,
    json_safe,
    json_text,
    msgpack_dumps,
    utf8_problem,
)
from nanoseg.masks import RLE, encode_rle_batch
from nanoseg.particle_stats import FrameSummary
from nanoseg_daemon.contracts import ANALYSIS_PLAN_NAME, FrameResult
from nanoseg_daemon.curve_auth import CurveServer, curve_client, curve_server
from nanoseg_daemon.ingest_config import CurveConfig

STREAM = "primary"
OBJECT = "nanoseg"
SUMMARY_TOPIC = b"nanoseg.summary"
EXIT_STATUSES = ("success", "abort", "fail")

# event field -> (ParticleTable column, statistic, units)
_STAT_FIELDS = {
    f"{col}_{stat}": (col, stat, unit)
    for col, unit in (("length_px", "px"), ("width_px", "px"), ("length_nm", "nm"), ("width_nm", "nm"))
    for stat in ("mean", "median")
} | {
    "aspect_ratio_mean": ("aspect_ratio", "mean", ""),
    "min_feret_nm_median": ("min_feret_nm", "median", "nm"),
    # the 95 % bootstrap interval of the mean length (counting rule and seed: the frame summary's)
    "length_nm_mean_lo": ("length_nm", "mean_lo", "nm"), "length_nm_mean_hi": ("length_nm", "mean_hi", "nm"),
}


def _key(dtype: str, units: str | None = None, dtype_numpy: str | None = None) -> dict[str, Any]:
    key: dict[str, Any] = {"dtype": dtype, "shape": [], "source": "nanoseg", "object_name": OBJECT}
    if units is not None:
        key["units"] = units
    if dtype_numpy is not None:
        key["dtype_numpy"] = dtype_numpy
    return key


ANALYSIS_DATA_KEYS: dict[str, dict[str, Any]] = {
    "count": _key("integer", "", "<i8"),
    **{name: _key("number", unit, "<f8") for name, (_, _, unit) in _STAT_FIELDS.items()},
    "coverage_fraction": _key("number", "", "<f8"),
    "orientation_order": _key("number", "", "<f8"),  # |<exp(2i theta)>|: 0 isotropic, 1 aligned
    "particles": _key("string"),  # JSON: ParticleTable.to_dict(), "columns" also has "score"
    "masks": _key("string"),  # JSON: a list of COCO RLE {"size": [h, w], "counts": str}, one per particle
    "frame_uid": _key("string"),
    "raw_seq_num": _key("integer", None, "<i8"),
}
"""The descriptor's data_keys: one scalar (shape []) per field."""

HINTED_FIELDS = ["count", "length_nm_mean", "width_nm_mean", "coverage_fraction"]


def _stat(summary: FrameSummary, column: str, stat: str) -> float:
    s = summary.stats.get(column)
    v = None if s is None else getattr(s, stat)
    return math.nan if v is None else float(v)


def event_data(result: FrameResult, rles: Sequence[RLE] | None = None) -> dict[str, Any]:
    """The event's ``data`` for one frame (keys of ANALYSIS_DATA_KEYS)."""
    if rles is None:
        rles = encode_rle_batch(result.instances.box_masks)
    table = result.table.to_dict(arrays=True)
    cast(dict[str, Any], table["columns"])["score"] = np.asarray(result.instances.scores, np.float64)
    order = result.summary.orientation_order
    return {
        "count": len(result.table),
        **{name: _stat(result.summary, col, stat) for name, (col, stat, _) in _STAT_FIELDS.items()},
        "coverage_fraction": float(result.summary.coverage_fraction),
        "orientation_order": math.nan if order is None else float(order),
        "particles": json_text(table, numpy=True),
        "masks": json_text(list(rles)),
        "frame_uid": result.frame_uid,
        "raw_seq_num": int(result.seq_num),
    }


def _wire_str(text: str, replaced: Counter[str]) -> str:
    """``text``, or its repr where it is not valid UTF-8 (lone surrogates), counted ``not_utf8``."""
    if utf8_problem(text) is None:
        return text
    replaced["not_utf8"] += 1
    return repr(text)


def _start_safe(obj: Any, replaced: Counter[str] | None = None) -> Any:
    """JSON-safe, with '.' and '/' replaced in mapping keys (the start schema forbids them), and
    values no wire format can carry as their repr, counted by reason in ``replaced``: integers
    beyond 64 bits (``int_beyond_64_bits``), strings that are not UTF-8 (``not_utf8``)."""
    if replaced is None:
        replaced = Counter()
    if isinstance(obj, dict):
        return {_wire_str(str(k), replaced).replace(".", "_").replace("/", "_"): _start_safe(v, replaced)
                for k, v in obj.items()}
    if isinstance(obj, list):
        return [_start_safe(v, replaced) for v in obj]
    if isinstance(obj, int) and not isinstance(obj, bool) and not MSGPACK_INT_MIN <= obj <= MSGPACK_INT_MAX:
        replaced["int_beyond_64_bits"] += 1
        return repr(obj)
    if isinstance(obj, str):
        return _wire_str(obj, replaced)
    return obj


Document = tuple[str, dict[str, Any]]


class AnalysisRun:
    """The analysis run of one raw run, as (name, doc) pairs; validated by event-model as composed.

    Events are checked against the schema and the descriptor's keys once per run, on its first:
    every event is built by ``event_data`` with the same keys and value types, and the check
    (jsonschema, about half a millisecond per event) would otherwise run on every frame."""

    def __init__(
        self,
        raw_run_uid: str,
        model_version: str,
        processing: Mapping[str, Any],
        *,
        raw_metadata: Mapping[str, Any] | None = None,
        stream_name: str = STREAM,
        time: float | None = None,
        resume: tuple[Mapping[str, Any], str, int] | None = None,
    ) -> None:
        """``resume``: (start document, descriptor uid, events published) of this analysis run as
        published before a restart: the run goes on with the same uids and event numbering, and
        ``opening`` is empty (its start and descriptor are out already)."""
        self.raw_run_uid = raw_run_uid
        self.replaced: Counter[str] = Counter()
        """Start metadata values published as their repr (``_start_safe``), by reason."""
        metadata = {
            "plan_name": ANALYSIS_PLAN_NAME,
            "raw_run_uid": raw_run_uid,
            "model_version": model_version,
            "processing": _start_safe(json_safe(dict(processing)), self.replaced),
            "raw_metadata": _start_safe(json_safe(dict(raw_metadata or {})), self.replaced),
            "hints": {"dimensions": [[["time"], stream_name]]},
        }
        self.resumed = resume is not None
        if resume is not None:
            old, descriptor_uid, published = resume
            metadata = {k: v for k, v in old.items() if k not in ("uid", "time")}
            bundle = compose_run(uid=old["uid"], time=old["time"], metadata=metadata)
        else:
            descriptor_uid, published = None, 0
            bundle = compose_run(metadata=metadata, time=time)
        self.start_doc: dict[str, Any] = cast(dict[str, Any], bundle.start_doc)
        desc = bundle.compose_descriptor(
            uid=descriptor_uid,
            name=stream_name,
            data_keys=copy.deepcopy(ANALYSIS_DATA_KEYS),  # each run's documents are its own
            object_keys={OBJECT: list(ANALYSIS_DATA_KEYS)},
            hints={OBJECT: {"fields": HINTED_FIELDS}},
            time=self.start_doc["time"],
        )
        self.descriptor_doc: dict[str, Any] = cast(dict[str, Any], desc.descriptor_doc)
        if published:  # resumed: the stop's num_events counts the events published before the restart
            desc.compose_event.event_counters[stream_name] = published + 1
        self._compose_event = desc.compose_event
        self._compose_stop = bundle.compose_stop
        self.compose_descriptor = bundle.compose_descriptor
        """Further streams of this run (growth alarms): the stop counts their events too."""
        self.events = published
        self._event_validated = False  # the schema check runs on this run's first event (see class)
        self._last_seq_num = -math.inf
        self.stop_doc: dict[str, Any] | None = None

    def opening(self) -> list[Document]:
        """The start and descriptor documents, to be sent first (none for a resumed run)."""
        if self.resumed:
            return []
        return [("start", self.start_doc), ("descriptor", self.descriptor_doc)]

    def event(self, result: FrameResult, rles: Sequence[RLE] | None = None) -> Document:
        """The event of the next frame; frames must come in increasing raw seq_num."""
        if result.run_uid != self.raw_run_uid:
            raise ValueError(f"frame of run {result.run_uid} given to the analysis of {self.raw_run_uid}")
        if result.seq_num <= self._last_seq_num:
            raise ValueError(f"frame seq_num {result.seq_num} after {self._last_seq_num}: out of order")
        if self.stop_doc is not None:
            raise ValueError(f"analysis of {self.raw_run_uid} is already stopped")
        self._last_seq_num = result.seq_num
        data = event_data(result, rles)
        doc = self._compose_event(data=data, timestamps=dict.fromkeys(data, result.timestamp),
                                  seq_num=self.events + 1,  # explicit: a resumed run goes on numbering
                                  validate=not self._event_validated)
        self._event_validated = True
        self.events += 1
        return "event", cast(dict[str, Any], doc)

    def stop(self, exit_status: str = "success", reason: str = "", time: float | None = None,
             losses: Mapping[str, int] | None = None) -> Document | None:
        """The stop document (None if already stopped: a raw stop racing the service's timeout).

        An exit status bluesky does not know becomes ``fail`` with the original in ``reason``. A
        run without one analysed frame ends ``fail`` too, its reason naming ``losses`` (frames or
        documents of the raw run refused, dropped or failed, by reason).
        """
        if self.stop_doc is not None:
            return None
        status, reason = stop_status(exit_status, reason, self.events, losses)
        self.stop_doc = cast(dict[str, Any], self._compose_stop(exit_status=status, reason=reason, time=time))
        return "stop", self.stop_doc


def stop_status(exit_status: str, reason: str, analysed: int,
                losses: Mapping[str, int] | None = None) -> tuple[Literal["success", "abort", "fail"], str]:
    """An analysis run's exit status and reason, from its raw run's and what was analysed.

    Parameters
    ----------
    exit_status, reason
        The raw run's (or the service's: ``abort`` after a restart, ``timeout``).
    analysed
        Frames of the run analysed and written.
    losses
        Frames or documents of the raw run refused, dropped or failed, by reason.

    Returns
    -------
    tuple of str
        ``exit_status`` when bluesky knows it, else ``fail`` with the original in the reason; a
        run without one analysed frame ``fail``, its reason naming the losses.
    """
    if exit_status not in EXIT_STATUSES:
        reason = f"raw exit status {exit_status!r}" + (f": {reason}" if reason else "")
        exit_status = "fail"
    if analysed == 0 and exit_status == "success":
        counted = ", ".join(f"{k} {v}" for k, v in sorted((losses or {}).items()) if v)
        reason = "no frame analysed" + (f" ({counted})" if counted else "") + (f"; {reason}" if reason else "")
        exit_status = "fail"
    return cast(Literal["success", "abort", "fail"], exit_status), reason


def json_dumps(doc: Any) -> bytes:
    return json.dumps(doc, separators=(",", ":"), default=json_safe).encode()


SERIALIZERS: dict[str, Callable[[Any], bytes]] = {"msgpack": msgpack_dumps, "json": json_dumps}


class _PubSocket:
    """An XPUB socket that never blocks.

    ``count_drops=True`` (XPUB_NODROP): when any subscriber's queue is full the message is
    dropped for all and counted; right for the usual single peer, the bluesky proxy.
    ``count_drops=False``: plain PUB behaviour, a full subscriber silently misses messages
    while the others still get them; for several direct subscribers of unequal speed.
    """

    def __init__(
        self, address: str, *, bind: bool, hwm: int, context: zmq.Context | None, count_drops: bool,
        curve: CurveConfig | None = None,
    ) -> None:
        self._own_context = context is None
        self._context = context if context is not None else zmq.Context()
        self._socket = self._context.socket(zmq.XPUB)
        self._socket.setsockopt(zmq.SNDHWM, hwm)
        self._socket.setsockopt(zmq.XPUB_NODROP, int(count_drops))
        self._socket.setsockopt(zmq.LINGER, 1000)  # close waits at most 1 s for queued messages
        self._auth: CurveServer | None = None
        if curve is not None and bind:
            self._auth = curve_server(self._socket, self._context, curve, domain="publish")
        elif curve is not None:
            curve_client(self._socket, curve)
        if bind:
            self._socket.bind(address)
            self.address = self._socket.getsockopt_string(zmq.LAST_ENDPOINT)  # resolves port '*'
        else:
            self._socket.connect(address)
            self.address = address
        self.sent = 0
        self.dropped = 0

    def send(self, frames: list[bytes]) -> bool:
        try:
            self._socket.send_multipart(frames, flags=zmq.NOBLOCK)
        except zmq.Again:
            self.dropped += 1
            return False
        self.sent += 1
        return True

    def wait_for_subscriber(self, timeout: float) -> bool:
        """True once a peer has subscribed (a proxy's SUB subscribes on connect), within timeout s."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            if self._socket.poll(int(left * 1000) + 1, zmq.POLLIN) and self._socket.recv()[:1] == b"\x01":
                return True
        return False

    def close(self) -> None:
        self._socket.close()
        if self._auth is not None:
            self._auth.stop()
        if self._own_context:
            self._context.term()


class _SocketPublisher:
    """Counters, subscriber wait and close shared by the document and summary publishers."""

    _sock: _PubSocket

    @property
    def sent(self) -> int:
        return self._sock.sent

    @property
    def dropped(self) -> int:
        return self._sock.dropped

    def wait_for_subscriber(self, timeout: float) -> bool:
        return self._sock.wait_for_subscriber(timeout)

    def close(self) -> None:
        self._sock.close()


class DocumentPublisher(_SocketPublisher):
    """Sends (name, doc) in bluesky's 0MQ wire format; a callable ``f(name, doc) -> sent``."""

    def __init__(
        self,
        address: str,
        *,
        bind: bool = False,
        prefix: bytes = b"",
        serializer: str | Callable[[Any], bytes] = "msgpack",
        hwm: int = 1000,
        context: zmq.Context | None = None,
        count_drops: bool = True,
        curve: CurveConfig | None = None,
    ) -> None:
        if b" " in prefix:
            raise ValueError(f"prefix {prefix!r} may not contain b' '")
        self._prefix = prefix
        self._serializer = SERIALIZERS[serializer] if isinstance(serializer, str) else serializer
        self._sock = _PubSocket(address, bind=bind, hwm=hwm, context=context, count_drops=count_drops,
                                curve=curve)
        self.address = self._sock.address

    def __call__(self, name: str, doc: Mapping[str, Any]) -> bool:
        return self._sock.send([b" ".join([self._prefix, name.encode(), self._serializer(doc)])])


def _summary_parts(result: FrameResult, published_at: float | None,
                   replaced: Counter[str] | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """The summary message's fields before and after ``summary``; a uid or version that is not
    UTF-8 as its repr, counted in ``replaced`` (``SummaryMessage`` cannot carry it)."""
    replaced = Counter() if replaced is None else replaced
    head = {
        "run_uid": _wire_str(result.run_uid, replaced),
        "frame_uid": _wire_str(result.frame_uid, replaced),
        "seq_num": result.seq_num,
        "count": len(result.table),
        "model_version": _wire_str(result.model_version, replaced),
        "timestamp": result.timestamp,
        "published_at": time.time() if published_at is None else published_at,
    }
    tail = {"invalid_pixels": result.invalid_pixels, "timings": result.timings}
    return head, tail


def summary_message(result: FrameResult, published_at: float | None = None) -> dict[str, Any]:
    """The JSON summary of one frame (strict JSON: missing values are null)."""
    head, tail = _summary_parts(result, published_at)
    return cast(dict[str, Any], json_safe({**head, "summary": result.summary.to_dict(), **tail}))


def summary_body(result: FrameResult, published_at: float | None = None, replaced: Counter[str] | None = None) -> str:
    """``summary_message`` as compact strict JSON (``nanoseg.codec.json_text``), with the frame
    summary as the result encoded it once for the store too (``FrameResult.summary_json``);
    strings replaced by their repr counted in ``replaced`` by reason."""
    head, tail = _summary_parts(result, published_at, replaced)
    return f'{json_text(head)[:-1]},"summary":{result.summary_json},{json_text(tail)[1:]}'


class SummaryPublisher(_SocketPublisher):
    """Per-frame summaries as ``[SUMMARY_TOPIC, JSON]`` for clients that don't speak bluesky."""

    def __init__(
        self,
        address: str,
        *,
        bind: bool = True,
        hwm: int = 1000,
        context: zmq.Context | None = None,
        count_drops: bool = True,
        curve: CurveConfig | None = None,
    ) -> None:
        self._sock = _PubSocket(address, bind=bind, hwm=hwm, context=context, count_drops=count_drops,
                                curve=curve)
        self.address = self._sock.address

    def publish(self, result: FrameResult, replaced: Counter[str] | None = None) -> bool:
        """Send ``result``'s summary; False when it was dropped (a full queue). Strings replaced by
        their repr are counted in ``replaced``."""
        return self._sock.send([SUMMARY_TOPIC, summary_body(result, replaced=replaced).encode()])

