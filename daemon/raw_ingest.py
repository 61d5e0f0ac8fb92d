"""Raw detector frames: a two-part message ``[header JSON, buffer]`` -> FrameJob / RunStopped.

For detectors that don't speak bluesky. The header is UTF-8 JSON matching ``RawFrameHeader``::

    {"frame_id": 17, "run": "scan-42", "dtype": "uint16", "shape": [512, 512],
     "timestamp": 1767225600.25,
     "metadata": {"pixel_size_nm": 12.5, "i0": 4000, "profile": "stxm", "extra": {"sample": "V2O5"}}}

The buffer holds ``prod(shape) * itemsize`` bytes, C order (row-major, y down), little-endian.
``{"run": "scan-42", "timestamp": ..., "end_of_run": true}`` with an empty buffer closes a run.
The first frame of a run id produces a RunStarted before its FrameJob. Identifiers follow
contracts.py: run ``raw:<source>:<run>``, frame ``raw:<source>:<run>:<frame_id>``, each part with
``%`` and ``:`` percent-encoded (``uid_part``), so distinct (source, run, frame id) give distinct
uids; ids without those characters appear as they are. Frame ids are compared as text: 7 and "7"
are the same frame.

``timestamp`` is POSIX time in seconds, 0 < t < 2**32 (1970 to 2106; milliseconds are refused).
``metadata.extra`` must be JSON-like data msgpack can encode: integers within int64/uint64,
finite floats, text, booleans, null, lists and objects, at most ``EXTRA_MAX_DEPTH`` levels deep.

Every malformed message raises ``WireError`` with a reason: bad_framing (not exactly 2 parts, or
a buffer with end_of_run), bad_header (not UTF-8, not JSON, not the schema), bad_dtype, bad_shape,
oversize (frame bytes > max_frame_bytes or a side > max_dim), size_mismatch (buffer length),
nan_frame (a float frame that is NaN everywhere, if configured), unknown_run (end_of_run for a run
that is not open). Frames with some NaN pixels pass; preparation counts them.
"""

from __future__ import annotations

import json
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import (
    Field,
    PositiveInt,
    StrictInt,
    StrictStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from nanoseg.codec import MSGPACK_INT_MAX, MSGPACK_INT_MIN, utf8_problem
from nanoseg.config_io import StrictModel
from nanoseg_daemon.contracts import FrameJob, FrameMetadata, IngestSink, RunStarted, RunStopped
from nanoseg_daemon.ingest_config import RawIngestConfig
from nanoseg_daemon.wire import RejectReason, WireError

RawDtype = Literal["uint8", "uint16", "uint32", "int16", "int32", "float32", "float64"]

MAX_HEADER_BYTES = 64 * 1024
EXTRA_MAX_DEPTH = 16
"""Levels of lists and objects allowed inside ``metadata.extra`` (the object itself is level 1)."""
MAX_TIMESTAMP = 2.0**32
"""Exclusive upper bound of a header's timestamp, s since the epoch (2106-02-07)."""

Buffer = bytes | bytearray | memoryview


def json_like_problem(
    value: Any, max_depth: int = EXTRA_MAX_DEPTH
) -> tuple[tuple[str | int, ...], str] | None:
    """Where (path of keys and indexes) and why ``value`` is not JSON-like data msgpack can encode.

    Allowed: None, bool, int in [-2**63, 2**64 - 1], finite float, str (valid Unicode), lists and
    dicts with str keys, at most ``max_depth`` levels of containers. Returns None if ``value``
    is allowed. Iterative, so any depth is safe to inspect.
    """
    stack: list[tuple[tuple[str | int, ...], Any, int]] = [((), value, 0)]
    while stack:
        path, v, depth = stack.pop()
        if v is None or isinstance(v, bool):
            continue
        if isinstance(v, int):
            if not MSGPACK_INT_MIN <= v <= MSGPACK_INT_MAX:
                return path, f"integer of {v.bit_length()} bits is outside int64/uint64"
        elif isinstance(v, float):
            if not math.isfinite(v):
                return path, f"number {v} is not finite"
        elif isinstance(v, str):
            if (why := utf8_problem(v)) is not None:
                return path, why
        elif isinstance(v, list | dict):
            if depth >= max_depth:
                return path, f"nested deeper than {max_depth} levels"
            if isinstance(v, list):
                items: list[tuple[str | int, Any]] = list(enumerate(v))
            else:
                items = list(v.items())
                for k, _ in items:
                    if not isinstance(k, str):
                        return path, f"key {k!r} is not text"
                    if (why := utf8_problem(k)) is not None:
                        return path, f"key: {why}"
            stack.extend(((*path, k), item, depth + 1) for k, item in reversed(items))
        else:
            return path, f"a {type(v).__name__} is not JSON-like data"
    return None


def uid_part(value: str | int) -> str:
    """``value`` as one ``:``-separated part of a raw identifier: ``%`` and ``:`` percent-encoded
    (``%25``, ``%3A``), so that distinct parts stay distinct; other text is unchanged."""
    return str(value).replace("%", "%25").replace(":", "%3A")


class RawFrameMetadata(StrictModel):
    """Per-frame metadata; None = the daemon's profile decides."""

    pixel_size_nm: float | None = Field(None, gt=0, allow_inf_nan=False)
    i0: float | None = Field(None, gt=0, allow_inf_nan=False, description="Incident intensity.")
    profile: str | None = Field(None, min_length=1, description="Frame-preparation profile.")
    extra: dict[str, Any] = Field(
        default_factory=dict,
        description="Copied into the results verbatim (scan id, sample...): JSON-like data "
        "msgpack can encode (integers within int64/uint64, finite numbers, text, true/false, "
        f"null, lists, objects), at most {EXTRA_MAX_DEPTH} levels deep.",
    )

    @field_validator("profile")
    @classmethod
    def _profile_text(cls, value: str | None) -> str | None:
        if value is not None and (why := utf8_problem(value)) is not None:
            raise ValueError(why)
        return value

    @field_validator("extra")
    @classmethod
    def _extra_json_like(cls, value: dict[str, Any]) -> dict[str, Any]:
        problem = json_like_problem(value, EXTRA_MAX_DEPTH)
        if problem is not None:
            path, why = problem
            # ctx["path"] extends the error's location (parse_raw_header names the exact field)
            raise PydanticCustomError("extra_not_encodable", "{why}", {"why": why, "path": path})
        return value


class RawFrameHeader(StrictModel):
    """The JSON header of a raw frame message (or of an end-of-run message)."""

    frame_id: (
        Annotated[StrictStr, Field(min_length=1, max_length=256)]
        | Annotated[StrictInt, Field(ge=MSGPACK_INT_MIN, le=MSGPACK_INT_MAX)]
        | None
    ) = Field(
        None,
        description="Unique per source (text, or an int64/uint64 integer); required for frames.",
    )
    run: str = Field("default", min_length=1, max_length=256, description="Run id of the sender.")
    dtype: RawDtype | None = Field(None, description="Pixel type; required for frames.")
    shape: tuple[PositiveInt, PositiveInt] | None = Field(
        None, description="[H, W], pixels; required for frames."
    )
    timestamp: float = Field(
        allow_inf_nan=False,
        description="Acquisition time, POSIX seconds since the epoch: 0 < t < 2**32 "
        "(1970 to 2106); milliseconds are refused.",
    )
    metadata: RawFrameMetadata = Field(default_factory=RawFrameMetadata)
    end_of_run: bool = Field(False, description="Close the run; the buffer must be empty.")

    @field_validator("run", "frame_id")
    @classmethod
    def _id_text(cls, value: str | int | None) -> str | int | None:
        if isinstance(value, str) and (why := utf8_problem(value)) is not None:
            raise ValueError(why)
        return value

    @field_validator("timestamp")
    @classmethod
    def _posix_seconds(cls, value: float) -> float:
        if not 0 < value < MAX_TIMESTAMP:
            hint = " (milliseconds?)" if MAX_TIMESTAMP <= value < MAX_TIMESTAMP * 1000 else ""
            raise ValueError(f"must be seconds since the epoch, 0 < t < 2**32, got {value!r}{hint}")
        return value

    @model_validator(mode="after")
    def _frame_fields(self) -> RawFrameHeader:
        if not self.end_of_run and None in (self.frame_id, self.dtype, self.shape):
            raise ValueError("a frame needs frame_id, dtype and shape")
        return self


def _header_reason(err: ValidationError) -> RejectReason:
    loc = err.errors()[0]["loc"]
    if loc and loc[0] == "dtype":
        return "bad_dtype"
    if loc and loc[0] == "shape":
        return "bad_shape"
    return "bad_header"


def _where(error: Any) -> tuple[Any, ...]:
    """An error's location, extended by the path inside the field where the validator gave one."""
    return (*error["loc"], *error.get("ctx", {}).get("path", ()))


def parse_raw_header(data: Buffer) -> RawFrameHeader:
    """Validate the header part; raises WireError (bad_header, bad_dtype, bad_shape)."""
    if len(data) > MAX_HEADER_BYTES:
        raise WireError("bad_header", f"header of {len(data)} bytes > {MAX_HEADER_BYTES}")
    try:
        text = bytes(data).decode("utf-8")
    except UnicodeDecodeError as err:
        raise WireError("bad_header", f"header is not UTF-8: {err}") from None
    try:
        obj = json.loads(text)
    except RecursionError:
        raise WireError("bad_header", "header JSON is nested too deeply to parse") from None
    except ValueError as err:  # JSONDecodeError, or an integer of more digits than int() reads
        raise WireError("bad_header", f"header is not JSON: {err}") from None
    if not isinstance(obj, dict):
        raise WireError("bad_header", f"header is a JSON {type(obj).__name__}, not an object")
    try:
        return RawFrameHeader.model_validate(obj)
    except ValidationError as err:
        detail = "; ".join(
            f"{'.'.join(map(str, _where(e))) or '<header>'}: {e['msg']}" for e in err.errors()
        )
        raise WireError(_header_reason(err), f"header: {detail}") from None


class RawFrameDecoder:
    """Validates raw frame messages and numbers frames per run.

    ``decode(parts)`` returns the FrameJob or RunStopped; a message that opens a run (or evicts
    one beyond ``max_open_runs``) also leaves a RunStarted (or a RunStopped with exit status
    ``fail``) for ``pop_run_events()``, which must be delivered first. ``handle(parts, sink)``
    does both and reports errors to the sink. Not thread-safe.
    """

    def __init__(
        self,
        config: RawIngestConfig | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._config = config or RawIngestConfig()
        self._clock = clock
        self._runs: OrderedDict[str, int] = OrderedDict()  # run uid -> frames so far
        self._pending: list[RunStarted | RunStopped] = []

    @property
    def open_runs(self) -> list[str]:
        return list(self._runs)

    def run_uid(self, run: str) -> str:
        """``raw:<source>:<run>``, each part escaped by ``uid_part``."""
        return f"raw:{uid_part(self._config.source)}:{uid_part(run)}"

    def frame_uid(self, run: str, frame_id: str | int) -> str:
        """``raw:<source>:<run>:<frame_id>``, each part escaped by ``uid_part``."""
        return f"{self.run_uid(run)}:{uid_part(frame_id)}"

    def pop_run_events(self) -> list[RunStarted | RunStopped]:
        """Run events caused by the last decode, to deliver before its result."""
        events, self._pending = self._pending, []
        return events

    def decode(self, parts: Sequence[Buffer]) -> FrameJob | RunStopped:
        received = self._clock()
        if len(parts) != 2:
            raise WireError("bad_framing", f"expected 2 parts [header, buffer], got {len(parts)}")
        header = parse_raw_header(parts[0])
        buffer = memoryview(parts[1]).cast("B")
        run_uid = self.run_uid(header.run)
        if header.end_of_run:
            if buffer.nbytes:
                raise WireError("bad_framing", "end_of_run message with a non-empty buffer")
            if run_uid not in self._runs:
                raise WireError("unknown_run", f"end_of_run for run {header.run!r} not open")
            del self._runs[run_uid]
            return RunStopped(run_uid, "success", header.timestamp)
        frame = self._frame(header, buffer)
        assert header.frame_id is not None  # the header validator
        metadata = FrameMetadata(
            pixel_size_nm=header.metadata.pixel_size_nm,
            i0=header.metadata.i0,
            profile=header.metadata.profile,
            extra={**header.metadata.extra, "frame_id": header.frame_id, "raw_run": header.run},
        )
        if run_uid not in self._runs:
            self._open(run_uid, header, metadata)
        self._runs.move_to_end(run_uid)
        self._runs[run_uid] += 1
        return FrameJob(
            run_uid=run_uid,
            frame_uid=self.frame_uid(header.run, header.frame_id),
            seq_num=self._runs[run_uid],
            frame=frame,
            timestamp=header.timestamp,
            metadata=metadata,
            received_monotonic=received,
        )

    def handle(self, parts: Sequence[Buffer], sink: IngestSink) -> None:
        """Decode and deliver to ``sink`` (run events first); errors go to ``sink.rejected``."""
        try:
            out = self.decode(parts)
        except WireError as err:
            sink.rejected(err.reason, err.detail)
            return
        for ev in self.pop_run_events():
            if isinstance(ev, RunStarted):
                sink.run_started(ev)
            else:
                sink.rejected("too_many_runs", f"raw run {ev.run_uid} evicted without end_of_run")
                sink.run_stopped(ev)
        if isinstance(out, FrameJob):
            sink.frame(out)
        else:
            sink.run_stopped(out)

    def _frame(self, header: RawFrameHeader, buffer: memoryview) -> np.ndarray:
        assert header.dtype is not None and header.shape is not None  # the header validator
        h, w = header.shape
        dtype = np.dtype(header.dtype).newbyteorder("<")
        nbytes = h * w * dtype.itemsize
        if (why := self._config.oversize(h, w, nbytes)) is not None:
            raise WireError("oversize", why)
        if buffer.nbytes != nbytes:
            raise WireError(
                "size_mismatch",
                f"buffer has {buffer.nbytes} bytes, {h}x{w} {header.dtype} needs {nbytes}",
            )
        frame = np.frombuffer(buffer, dtype=dtype).reshape(h, w)
        if (
            self._config.reject_all_nan
            and dtype.kind == "f"
            and math.isnan(frame.flat[0])
            and np.isnan(frame).all()
        ):
            raise WireError("nan_frame", f"frame {header.frame_id!r} is NaN everywhere")
        return frame

    def _open(self, run_uid: str, header: RawFrameHeader, metadata: FrameMetadata) -> None:
        while len(self._runs) >= self._config.max_open_runs:
            old, _ = self._runs.popitem(last=False)
            self._pending.append(RunStopped(old, "fail", time.time()))
        self._runs[run_uid] = 0
        start_doc = {
            "uid": run_uid,
            "time": header.timestamp,
            "nanoseg_input": "raw",
            "raw_source": self._config.source,
            "raw_run": header.run,
            "metadata": header.metadata.model_dump(mode="json"),
        }
        run_metadata = FrameMetadata(
            pixel_size_nm=metadata.pixel_size_nm,
            i0=metadata.i0,
            profile=metadata.profile,
            extra={**header.metadata.extra, "raw_run": header.run},
        )
        self._pending.append(RunStarted(run_uid, run_metadata, start_doc, header.timestamp))
