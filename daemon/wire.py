"""Bluesky's 0MQ wire format without sockets: one message -> ``(name, doc)``.

``bluesky.callbacks.zmq.Publisher`` sends each document as the single frame
``prefix + b" " + name + b" " + serializer(doc)``; the prefix may be empty (the message then
starts with a space). Parsing is a pure function of the bytes so it can be tested without 0MQ.

Deserialisers: ``msgpack`` (NumPy arrays as ``msgpack_numpy.encode`` writes them, decoded by
``nanoseg.codec`` without ever unpickling) and ``json``; ``pickle`` only when the configuration
allows it, because unpickling untrusted bytes executes code.
"""

from __future__ import annotations

import json
import logging
import pickle
from collections.abc import Callable
from typing import Any, Literal

from event_model import DocumentNames

from nanoseg.codec import CodecError, msgpack_loads

logger = logging.getLogger(__name__)

RejectReason = Literal[
    # bluesky wire (this module)
    "bad_framing",  # not `prefix name payload`, name not ASCII; raw: not exactly 2 parts
    "bad_prefix",  # a prefix other than the configured one (ignored, counted)
    "unknown_document",  # a name that is not an event-model document type
    "bad_payload",  # the payload does not deserialise to a dict (incl. pickle when disabled)
    # bluesky routing (bluesky_ingest.py)
    "bad_document",  # a document lacks a required field or has a wrong type
    "unsupported_document",  # bulk_events, bulk_datum (not handled)
    "unknown_run",  # descriptor/resource/stop (raw: end_of_run) for a run that is not open
    "run_closed",  # a document for a run that has already stopped
    "unknown_descriptor",  # event before (or without) its descriptor
    "unknown_resource",  # datum / stream_datum before (or without) its (stream) resource
    "duplicate_uid",  # start/descriptor/event/resource uid seen before
    "too_many_runs",  # max_open_runs reached: the least active run was evicted
    "missing_image",  # an event of an image stream without the image field
    "fill_failed",  # the referenced file/datum could not be loaded (incl. unknown spec/mimetype)
    "frames_not_written",  # a stream_datum's frames not in its file within stream_wait_s (one per frame)
    "shape_mismatch",  # image data whose shape disagrees with its descriptor's data key
    "color_frame",  # an RGB/RGBA frame while color_frames is refuse
    "bad_metadata",  # a metadata value of the wrong type (the field is ignored)
    # both inputs
    "bad_shape",  # not 2-D (or N x H x W) / a header shape that is not [H, W]
    "bad_dtype",  # not a numeric array / a raw dtype outside the whitelist
    "oversize",  # frame bytes > max_frame_bytes or a dimension > max_dim
    # raw frames (raw_ingest.py)
    "bad_header",  # header not UTF-8, not JSON, or not a valid RawFrameHeader
    "size_mismatch",  # buffer length != prod(shape) * itemsize (truncated or too long)
    "nan_frame",  # a float frame with no number at all
    # the ingest loop
    "internal_error",  # a bug while handling a message (logged with traceback)
]


class WireError(ValueError):
    """A message rejected at the boundary; ``reason`` is a metric label, ``detail`` a log line."""

    def __init__(self, reason: RejectReason, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason: RejectReason = reason
        self.detail = detail


Deserializer = Callable[[bytes], Any]

#: Every document name event-model defines; others are ``unknown_document``.
DOCUMENT_NAMES: frozenset[str] = frozenset(d.value for d in DocumentNames)


def json_loads(payload: bytes) -> Any:
    """Decode UTF-8 JSON (arrays arrive as nested lists)."""
    return json.loads(payload.decode("utf-8"))


def make_deserializer(
    kind: Literal["msgpack", "json", "pickle"], *, allow_pickle: bool = False
) -> Deserializer:
    """The payload decoder for ``kind``; pickle needs ``allow_pickle`` and logs a warning."""
    if kind == "msgpack":
        return msgpack_loads
    if kind == "json":
        return json_loads
    if kind == "pickle":
        if not allow_pickle:
            raise ValueError("pickle deserialisation requested but allow_pickle is false")
        logger.warning(
            "bluesky input: pickle deserialisation ENABLED: any host that can reach the proxy "
            "can run code in this daemon; use msgpack or json unless the network is trusted"
        )
        return pickle.loads
    raise ValueError(f"unknown serializer {kind!r}")


def parse_bluesky_message(
    raw: bytes, prefix: bytes | None, deserializer: Deserializer
) -> tuple[str, dict[str, Any]]:
    """Split and decode one bluesky 0MQ message into ``(name, doc)``.

    ``prefix``: None or b"" accepts any prefix (as RemoteDispatcher does); otherwise a message
    with another prefix raises ``WireError("bad_prefix")``, which callers count and ignore.
    Raises WireError for every malformed message; never anything else.
    """
    parts = raw.split(b" ", 2)
    if len(parts) != 3:
        raise WireError("bad_framing", f"expected b'prefix name payload', got {raw[:64]!r}")
    got_prefix, name_bytes, payload = parts
    if prefix and got_prefix != prefix:
        raise WireError("bad_prefix", f"prefix {got_prefix[:64]!r} is not {prefix!r}")
    try:
        name = name_bytes.decode("ascii")
    except UnicodeDecodeError:
        raise WireError("bad_framing", f"document name {name_bytes[:64]!r} is not ASCII") from None
    if name not in DOCUMENT_NAMES:
        raise WireError("unknown_document", f"unknown document name {name[:64]!r}")
    try:
        doc = deserializer(payload)
    except WireError:
        raise
    except CodecError as err:
        raise WireError("bad_payload", str(err)) from None
    except Exception as err:  # any decoder failure is the sender's problem, not ours
        raise WireError(
            "bad_payload", f"{name}: cannot deserialise {len(payload)} bytes: {err!r:.200}"
        ) from None
    if not isinstance(doc, dict):
        raise WireError("bad_payload", f"{name}: payload is a {type(doc).__name__}, not a dict")
    return name, doc
