"""What bluesky documents mean to the daemon: a DocumentRouter that calls an IngestSink.

``start`` -> RunStarted (metadata from the start document), ``descriptor`` -> which data key is
the image and its declared shape, ``event``/``event_page`` -> one FrameJob per image (N x H x W
images give N frames; colour frames become gray; what an image value may be: image_fields.py),
``resource``/``datum`` -> kept in a per-run event-model Filler that loads file-backed images
(AD_HDF5 built in), ``stream_resource``/``stream_datum`` (ophyd-async detectors) -> the frames a
stream datum points at, read by the reader of the resource's mimetype (stream_readers.py; HDF5
built in), one FrameJob each, ``stop`` -> RunStopped and the run is forgotten.

Frames read from a stream datum have the frame uid ``<descriptor uid>/<seq_num>`` (the raw event
with that descriptor and seq_num is the frame's event; ``/<j>`` is added for the j-th of several
frames per event; ``<stream_datum uid>/<k>`` when the datum's seq_nums are unset) and the time
they were read as timestamp (a stream datum carries none). Rejections are also counted per run
and travel in ``RunStopped.rejected``, so an analysis run that lost every frame can say why.

Start-document metadata: run_metadata.py.

A wrong-typed value is reported as ``bad_metadata`` and left out. A start, stop or event (page)
whose ``time``, or an event whose image timestamp, is not a finite number (NaN, +-inf, an integer
too large for a float, a string) is refused as ``bad_document`` naming the field (a stop whose
``time`` is refused still stops its run, at the time it came, and says so in the stop's reason:
the RunEngine sends no second stop); so is an event_page whose columns differ in length, and a
stream_datum whose indices or seq_nums are not integers or that claims more rows than
``max_datums_per_run`` (a stream datum stands for one datum per frame). A stream datum whose
resource cannot be read is counted once (``fill_failed``, its row count in the detail); its rows
not written in time are counted one each (``frames_not_written``), the first one logged.

A document that comes before what it refers to (event before descriptor, descriptor or stop
before start, datum or stream_datum before its resource) is held for ``early_documents_s`` and
replayed when that comes (early_documents.py); a run never seen is looked up in Tiled where
configured (tiled_runs.py: a daemon that joined late); what stays unresolved, duplicate uids and
other faults are reported through ``sink.rejected`` and never raise (unresolved documents logged
once per run, or per descriptor where only events came). ``resume`` takes up a run open before a
restart from the journal's documents. Memory is bounded: a stopped run is forgotten, at most
``max_open_runs`` runs are open (a further start evicts the least active one with a
``too_many_runs`` rejection and a RunStopped with exit status ``fail``), and resources and datums
are capped per run. Not thread-safe: one ingest thread calls it.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import math
import numbers
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import numpy as np
from event_model import (
    Datum,
    DatumPage,
    DocumentRouter,
    Event,
    EventDescriptor,
    EventPage,
    Filler,
    Resource,
    RunStart,
    RunStop,
    StreamDatum,
    StreamResource,
    UndefinedAssetSpecification,
    UnresolvableForeignKeyError,
    unpack_datum_page,
    unpack_event_page,
)

from nanoseg_daemon.contracts import (
    ANALYSIS_PLAN_NAME,
    FrameJob,
    FrameMetadata,
    IngestSink,
    RunStarted,
    RunStopped,
)
from nanoseg_daemon.early_documents import EarlyDocuments
from nanoseg_daemon.image_fields import (
    Frame,
    ImageRejected,
    Shape,
    declared_shape,
    frame_axis,
    frames_of,
    is_image_data_key,
)
from nanoseg_daemon.ingest_config import BlueskyIngestConfig
from nanoseg_daemon.logs import log
from nanoseg_daemon.run_metadata import image_array, metadata_from_start
from nanoseg_daemon.stream_readers import StreamReader, StreamReadError, load_stream_readers
from nanoseg_daemon.wire import RejectReason

logger = logging.getLogger(__name__)

_RECENT_EVENT_UIDS = 4096  # per run: duplicates are resends, so a window suffices
_MAX_DESCRIPTORS_PER_RUN = 64
_RECENT_CLOSED_RUNS = 1024


class _Reject(Exception):
    """A document refused; ``missing``: the uid it refers to and that is not known (yet)."""

    def __init__(self, reason: RejectReason, detail: str, missing: str | None = None) -> None:
        super().__init__(detail)
        self.reason: RejectReason = reason
        self.detail = detail
        self.missing = missing


# what a document may be waiting for: held for it (early_documents.py), or looked up in Tiled
_WAITING = frozenset({"unknown_run", "unknown_descriptor", "unknown_resource"})


def _shown(value: Any) -> str:
    """A short repr of a document value for a rejection's detail (a huge integer by its size)."""
    if isinstance(value, int) and value.bit_length() > 64:
        return f"an integer of about {value.bit_length() * math.log10(2):.0f} digits"
    return f"{value!r:.60}"


STREAM_READ_BYTES = 64 * 1024 * 1024
"""About how many bytes of a stream datum's rows are read at once (64 MiB): a datum's frames are
read and queued a part at a time, never all into memory together."""


def _finite_time(value: Any, what: str) -> float:
    """``value`` (a document's time or timestamp) as a finite float; a ``bad_document`` rejection
    naming ``what`` when it is not a number, NaN, +-inf or an integer too large for a float
    (the store could never write it)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise _Reject("bad_document", f"{what} is not a number: {_shown(value)}")
    try:
        out = float(value)
    except (OverflowError, ValueError, TypeError):
        out = math.nan
    if not math.isfinite(out):
        raise _Reject("bad_document", f"{what} is not a finite number: {_shown(value)}")
    return out


def _integer(value: Any, what: str) -> int:
    """``value`` (a stream datum's index or seq_num) as an int; a ``bad_document`` rejection
    naming ``what`` when it is not an integer (a float with a fraction, +-inf, NaN, a string)."""
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return int(value)
    if isinstance(value, numbers.Real) and not isinstance(value, bool) and float(value).is_integer():
        return int(float(value))  # 3.0; inf and NaN are not integers
    raise _Reject("bad_document", f"{what} is not an integer: {_shown(value)}")


def _column_lengths(doc: Mapping[str, Any]) -> dict[str, int | None]:
    """The length of each column of an event_page (``uid``, ``time``, ``seq_num``, and each key of
    ``data``, ``timestamps``, ``filled``); None for one that is not a sequence."""
    columns: dict[str, Any] = {k: doc[k] for k in ("uid", "time", "seq_num")}
    for group in ("data", "timestamps", "filled"):
        values = doc.get(group) or {}
        if not isinstance(values, Mapping):
            raise _Reject("bad_document", f"event_page: {group} is not a mapping")
        columns.update({f"{group}[{k!r}]": v for k, v in values.items()})
    lengths: dict[str, int | None] = {}
    for name, column in columns.items():
        try:
            lengths[name] = None if isinstance(column, str | bytes | Mapping) else len(column)
        except TypeError:
            lengths[name] = None
    return lengths


class BoundedDict(OrderedDict[Any, Any]):
    """A dict that forgets its oldest entries beyond ``maxsize`` (calls ``on_evict(key, value)``)."""

    def __init__(self, maxsize: int, on_evict: Callable[[Any, Any], None] | None = None) -> None:
        super().__init__()
        self.maxsize = maxsize
        self.on_evict = on_evict

    def __setitem__(self, key: Any, value: Any) -> None:
        super().__setitem__(key, value)
        while len(self) > self.maxsize:
            old_key, old_value = self.popitem(last=False)
            if self.on_evict is not None:
                self.on_evict(old_key, old_value)


def _close_handler(_key: Any, handler: Any) -> None:
    close = getattr(handler, "close", None)
    if callable(close):
        try:
            close()
        except Exception:  # a handler that fails to close must not stop ingest
            logger.exception("closing asset handler %r failed", handler)


def load_handlers(paths: dict[str, str]) -> dict[str, Any]:
    """The handler registry: AD_HDF5 plus configured ``spec -> 'module:Class'`` entries."""
    from area_detector_handlers.handlers import AreaDetectorHDF5Handler

    registry: dict[str, Any] = {"AD_HDF5": AreaDetectorHDF5Handler}
    for spec, path in paths.items():
        module_name, _, attr = path.partition(":")
        registry[spec] = getattr(importlib.import_module(module_name), attr)
    return registry


def _close_reader(_key: Any, resource: _StreamResource) -> None:
    if resource.reader is not None:
        _close_handler(_key, resource.reader)


class RunLookup(Protocol):
    """Where a run whose start was never seen can be found (tiled_runs.TiledRunLookup)."""

    def request(self, kind: Literal["run", "descriptor"], uid: str) -> None: ...

    def results(self) -> list[Any]:
        """Answers with ``kind``, ``uid``, ``run`` (``start``, ``descriptors``, ``stopped``; None:
        not found) and ``error``."""
        ...


class RunJournal(Protocol):
    """Where open runs' documents are kept so a restarted daemon can resume them (the store)."""

    def run_opened(self, start_doc: dict[str, Any]) -> None: ...

    def descriptor_added(self, run_uid: str, descriptor: dict[str, Any]) -> None: ...


@dataclass
class _Stream:
    """What a descriptor says: which key is the image, its declared shape, and whether it lives in
    files (``external_keys``: filled from datums; ``stream_keys``: sent by stream datums)."""

    image_key: str | None
    external_keys: frozenset[str]
    stream_keys: frozenset[str] = frozenset()
    image_shape: Shape | None = None


@dataclass
class _StreamResource:
    doc: StreamResource
    reader: StreamReader | None = None  # opened at its first image datum


@dataclass
class _Run:
    uid: str
    metadata: FrameMetadata
    filler: Filler
    handler_cache: BoundedDict
    flat_field: np.ndarray | None
    streams: dict[str, _Stream] = field(default_factory=dict)  # descriptor uid -> stream
    resources: dict[str, None] = field(default_factory=dict)  # insertion-ordered set
    stream_resources: BoundedDict = field(default_factory=lambda: BoundedDict(1))
    recent_events: BoundedDict = field(default_factory=lambda: BoundedDict(_RECENT_EVENT_UIDS))
    frames: int = 0
    rejected: dict[str, int] = field(default_factory=dict)  # reason -> count, for the run's stop
    resumed_after: int | None = None  # resumed or joined late: frames stored before (None: neither)
    missed: int = 0  # raw frames never seen (a gap in the events' seq_num)
    joined_late: bool = False  # recovered from Tiled: the missed frames came before the daemon joined


class BlueskyRouter(DocumentRouter):
    """Bluesky documents -> RunStarted / FrameJob / RunStopped on ``sink``; never raises.

    ``clock``: monotonic time source for ``FrameJob.received_monotonic`` and for how long early
    documents are held. ``journal``: records each run's start and descriptors (the store), so
    ``resume`` can take the run up after a restart. A document that refers to a run, descriptor or
    resource not seen yet is held for it (``early_documents_s``, several publishers) and replayed
    when it comes; ``run_lookup`` (Tiled) is asked for a run or descriptor that never came (a
    subscriber that joined late), and a run it finds is opened from its stored start and
    descriptors. What stays unresolved is counted per document (``unknown_run``,
    ``unknown_descriptor``, ``unknown_resource``) and logged once per run (per descriptor where
    only events came). ``tick`` (the ingest loop, between messages) expires held documents and
    takes the lookups' answers.
    """

    def __init__(
        self,
        sink: IngestSink,
        config: BlueskyIngestConfig | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        journal: RunJournal | None = None,
        run_lookup: RunLookup | None = None,
    ) -> None:
        super().__init__()
        self._journal = journal
        self._lookup = run_lookup
        self._asked = BoundedDict(_RECENT_CLOSED_RUNS)  # uid -> monotonic time it was last looked up
        self._given_up = BoundedDict(_RECENT_CLOSED_RUNS)  # uids whose documents are counted at once now
        self._group_of = BoundedDict(_RECENT_CLOSED_RUNS)  # descriptor uid -> its run uid (from held descriptors)
        self._logged_groups = BoundedDict(_RECENT_CLOSED_RUNS)  # runs (or descriptors) logged as unresolved
        self._closed_descriptors = BoundedDict(_RECENT_CLOSED_RUNS)  # descriptors of stopped runs
        self._sink = sink
        self._config = config or BlueskyIngestConfig()
        self._metadata_keys = self._config.resolved_metadata_keys()
        self._handlers = load_handlers(self._config.handlers)
        self._stream_readers = load_stream_readers(self._config.stream_readers)
        self._clock = clock
        self._runs: OrderedDict[str, _Run] = OrderedDict()  # least recently active first
        self._current_run: str | None = None  # the run of the document being handled
        self._descriptor_run: dict[str, str] = {}
        self._resource_run: dict[str, str] = {}  # (stream) resource uid -> run uid
        self._closed_runs = BoundedDict(_RECENT_CLOSED_RUNS)
        # Analysis runs (ours or another nanoseg's) travel through the same proxy: not raw data.
        self._analysis_runs = BoundedDict(_RECENT_CLOSED_RUNS)
        self._analysis_descriptors = BoundedDict(_RECENT_CLOSED_RUNS)
        c = self._config
        self._early = EarlyDocuments(c.early_documents_s, c.early_documents_max, c.early_documents_max_bytes, clock)

    # -- plumbing ----------------------------------------------------------------------------

    def __call__(self, name: str, doc: dict, validate: bool = False) -> tuple[str, dict]:
        self._expire()
        self._handle(name, doc)
        return name, doc

    def _handle(self, name: str, doc: dict[str, Any], since: float | None = None) -> None:
        """One document; then the documents that were waiting for it (``since``: a held one's arrival)."""
        self._current_run = None
        try:
            method = getattr(self, name, None) if not name.startswith("_") else None
            if name not in _HANDLED or method is None:
                raise _Reject("unsupported_document", f"{name} documents are not handled")
            method(doc)
        except _Reject as rej:
            self._unresolved(rej, name, doc, since)
            return
        except (KeyError, TypeError, ValueError, AttributeError, OverflowError) as err:
            self._reject("bad_document", f"{name}: malformed document: {err!r:.200}")
        except Exception as err:  # a bug here must not stop ingest; it is logged in full
            logger.exception("bluesky router failed on a %s document", name)
            self._reject("internal_error", f"{name}: {err!r:.200}")
        if name in _INTRODUCING and isinstance(doc.get("uid"), str) and self._early.waiting_for(doc["uid"]):
            for held in self._early.release(doc["uid"]):  # in arrival order, each followed by its own waiters
                self._handle(held.name, held.doc, held.since)

    def _unresolved(self, rej: _Reject, name: str, doc: dict[str, Any], since: float | None) -> None:
        """A refused document: held for what it waits for (asking Tiled for a run), else counted."""
        key = rej.missing if isinstance(rej.missing, str) else None  # a malformed uid waits for nothing
        if key is None or rej.reason not in _WAITING or key in self._given_up:
            self._count_unresolved(rej.reason, rej.detail, key)
            return
        if rej.reason != "unknown_resource":
            self._ask("run" if rej.reason == "unknown_run" else "descriptor", key)
        if name == "descriptor" and isinstance(doc.get("run_start"), str):
            self._group_of[doc["uid"]] = doc["run_start"]
        if self._early.hold_s <= 0:
            self._count_unresolved(rej.reason, rej.detail, key)
            return
        for held in self._early.hold(key, name, doc, rej.reason, rej.detail, since):
            self._count_unresolved(held.reason, f"{held.detail} (pushed out of the early documents: "
                                                 f"more than {self._early.max_documents} held)", held.key)

    def _count_unresolved(self, reason: str, detail: str, key: str | None) -> None:
        """Count one unresolved document; log one line per run (or per descriptor, when only its
        events came) rather than one per event of a run the daemon joined late."""
        group = self._group_of.get(key, key)
        logged = group is None or group not in self._logged_groups
        if group is not None:
            self._logged_groups[group] = None
        more = " (further documents of it are counted, not logged)" if group is not None else ""
        self._reject(reason, detail + more, logged=logged)

    def _ask(self, kind: Literal["run", "descriptor"], uid: str) -> None:
        """Ask the run lookup about ``uid``, at most once a second per uid."""
        if self._lookup is None:
            return
        now = self._clock()
        if now - self._asked.get(uid, -math.inf) < 1.0:
            return
        self._asked[uid] = now
        self._lookup.request(kind, uid)

    def _expire(self) -> None:
        for held in self._early.expired():
            self._given_up[held.key] = None  # what comes for it later is counted at once
            if held.name == "descriptor":
                self._given_up[held.doc["uid"]] = None
            self._count_unresolved(held.reason, f"{held.detail} (held {self._early.hold_s:g} s: it never came)",
                                   held.key)

    def tick(self) -> None:
        """Expire held documents; open the runs the lookup found (between messages, ingest thread)."""
        if self._lookup is not None:
            for answer in self._lookup.results():
                self._recovered(answer)
        self._expire()

    def _recovered(self, answer: Any) -> None:
        """A lookup's answer: open the run it found as if its start and descriptors came now."""
        raw = answer.run
        if raw is None:
            if not answer.error:
                log("run_not_in_tiled", logging.WARNING, kind=answer.kind, uid=answer.uid,
                    detail="its documents are counted as they come")
                if self._early.hold_s <= 0:  # nothing held to wait on: ask no more
                    self._given_up[answer.uid] = None
            return
        uid = raw.start.get("uid")
        if uid in self._runs or uid in self._closed_runs:
            return
        if raw.stopped:
            log("run_not_recovered", logging.WARNING, run=uid, reason="stopped already in Tiled")
            return
        self._given_up.pop(uid, None)
        self._handle("start", raw.start)
        run = self._runs.get(uid)
        if run is None and uid not in self._analysis_runs:
            return
        if run is not None:
            run.resumed_after, run.joined_late = 0, True
        for desc in raw.descriptors:  # an analysis run's: marked as such, its held events ignored
            self._given_up.pop(desc["uid"], None)
            if desc["uid"] not in self._descriptor_run:
                self._handle("descriptor", desc)
        if run is None:
            return
        log("run_recovered", run=uid, descriptors=len(raw.descriptors), held=len(self._early),
            detail="start and descriptors read from Tiled (the daemon joined after the run started)")

    def _reject(self, reason: str, detail: str, logged: bool = True, count: int = 1) -> None:
        """Report a rejection (``count`` frames lost to it, logged once), counted against the run
        the current document belongs to."""
        run = self._runs.get(self._current_run) if self._current_run is not None else None
        if run is not None:
            run.rejected[reason] = run.rejected.get(reason, 0) + count
        self._sink.rejected(reason, detail, logged=logged, count=count)

    @property
    def open_runs(self) -> list[str]:
        """Uids of the runs currently open, least recently active first."""
        return list(self._runs)

    def _run(self, uid: Any, what: str) -> _Run:
        run = self._runs.get(uid)
        if run is None:
            if uid in self._closed_runs:
                raise _Reject("run_closed", f"{what} for run {uid} which has stopped")
            raise _Reject("unknown_run", f"{what} for unknown run {uid}", uid if isinstance(uid, str) else None)
        self._runs.move_to_end(uid)
        self._current_run = uid
        return run

    def _journal_call(self, what: str, *args: Any) -> None:
        if self._journal is None:
            return
        try:
            getattr(self._journal, what)(*args)
        except Exception as err:  # a run that cannot be journalled is still analysed, not resumable
            self._reject("journal_failed", f"{what}: {type(err).__name__}: {err}")

    def resume(self, start_doc: dict[str, Any], descriptors: list[dict[str, Any]], stored_frames: int) -> None:
        """Take up a run that was open when the daemon stopped: its start and descriptors as if
        received again (a RunStarted goes to the sink), frames numbered after ``stored_frames``.

        The first image event after this counts the raw frames sent while the daemon was down
        (the gap in the events' ``seq_num``) as ``missed``; the run's stop reports them.
        """
        self("start", start_doc)
        run = self._runs.get(start_doc.get("uid"))  # type: ignore[arg-type]
        if run is None:
            return
        run.frames = run.resumed_after = stored_frames
        for desc in descriptors:
            self("descriptor", desc)

    def _forget(self, run: _Run) -> None:
        del self._runs[run.uid]
        for d in run.streams:
            self._descriptor_run.pop(d, None)
            self._closed_descriptors[d] = self._given_up[d] = None  # later events: counted at once
            self._group_of[d] = run.uid
        for r in [*run.resources, *run.stream_resources]:
            self._resource_run.pop(r, None)
        for key, resource in list(run.stream_resources.items()):
            _close_reader(key, resource)
        run.stream_resources.clear()
        for key, handler in list(run.handler_cache.items()):
            _close_handler(key, handler)
        run.handler_cache.clear()
        run.filler.close()
        self._closed_runs[run.uid] = None

    # -- documents ---------------------------------------------------------------------------

    def start(self, doc: RunStart) -> None:
        uid = doc["uid"]
        if not isinstance(uid, str):
            raise _Reject("bad_document", "start: uid is not a string")
        start_time = _finite_time(doc["time"], f"start {uid}: time")
        if doc.get("plan_name") == ANALYSIS_PLAN_NAME or "raw_run_uid" in doc:
            self._analysis_runs[uid] = None  # never analyse an analysis run (a feedback loop)
            return
        if uid in self._runs or uid in self._closed_runs:
            raise _Reject("duplicate_uid", f"start {uid} seen before")
        metadata, problems = metadata_from_start(
            doc, self._metadata_keys, self._config.flat_field_key
        )
        for p in problems:
            self._reject("bad_metadata", f"run {uid}: {p}")
        while len(self._runs) >= self._config.max_open_runs:
            oldest = next(iter(self._runs.values()))
            self._forget(oldest)
            self._reject(
                "too_many_runs", f"run {oldest.uid} evicted without stop to open run {uid}"
            )
            self._sink.run_stopped(RunStopped(oldest.uid, "fail", time.time(), dict(oldest.rejected)))
        handler_cache = BoundedDict(self._config.max_resources_per_run, on_evict=_close_handler)
        filler = Filler(
            self._handlers,
            inplace=False,
            coerce="force_numpy",
            retry_intervals=list(self._config.fill_retry_intervals),
            handler_cache=handler_cache,
            resource_cache=BoundedDict(self._config.max_resources_per_run),
            datum_cache=BoundedDict(self._config.max_datums_per_run),
        )
        self._runs[uid] = _Run(uid, metadata, filler, handler_cache, flat_field=metadata.flat_field,
                               stream_resources=BoundedDict(self._config.max_resources_per_run,
                                                            on_evict=self._evict_stream_resource))
        self._journal_call("run_opened", dict(doc))
        self._sink.run_started(RunStarted(uid, metadata, dict(doc), start_time))

    def descriptor(self, doc: EventDescriptor) -> None:
        uid = doc["uid"]
        if doc["run_start"] in self._analysis_runs:
            self._analysis_descriptors[uid] = None
            return
        run = self._run(doc["run_start"], f"descriptor {uid}")
        if uid in self._descriptor_run:
            raise _Reject("duplicate_uid", f"descriptor {uid} seen before")
        if len(run.streams) >= _MAX_DESCRIPTORS_PER_RUN:
            raise _Reject(
                "bad_document", f"run {run.uid}: more than {_MAX_DESCRIPTORS_PER_RUN} descriptors"
            )
        data_keys: Mapping[str, Mapping[str, Any]] = doc["data_keys"]
        image_key = self._config.image_key
        if image_key is None:
            image_key = next((k for k, v in data_keys.items() if is_image_data_key(v)), None)
        elif image_key not in data_keys:
            image_key = None
        stream_keys = frozenset(k for k, v in data_keys.items() if str(v.get("external", "")).startswith("STREAM:"))
        external = frozenset(k for k, v in data_keys.items() if v.get("external")) - stream_keys
        shape = declared_shape(data_keys[image_key]) if image_key is not None else None
        run.streams[uid] = _Stream(image_key, external, stream_keys, shape)
        self._descriptor_run[uid] = run.uid
        self._journal_call("descriptor_added", run.uid, dict(doc))
        run.filler.descriptor(doc)
        for obj in (doc.get("configuration") or {}).values():
            flat = (obj.get("data") or {}).get(self._config.flat_field_key)
            if flat is not None:
                self._set_flat(run, flat, f"descriptor {uid} configuration")

    def _resource_owner(self, doc: Resource | StreamResource, what: str) -> _Run:
        """The open run a (stream) resource belongs to: its run_start, or the only open run (a
        resource document may omit it); a uid seen before is a duplicate."""
        uid = doc["uid"]
        run_uid = doc.get("run_start")
        if run_uid is None and len(self._runs) == 1:
            run_uid = next(iter(self._runs))
        run = self._run(run_uid, f"{what} {uid}")
        if uid in self._resource_run:
            raise _Reject("duplicate_uid", f"{what} {uid} seen before")
        return run

    def resource(self, doc: Resource) -> None:
        uid = doc["uid"]
        run = self._resource_owner(doc, "resource")
        run.resources[uid] = None
        if len(run.resources) > self._config.max_resources_per_run:
            oldest = next(iter(run.resources))
            del run.resources[oldest]
            self._resource_run.pop(oldest, None)
        self._resource_run[uid] = run.uid
        run.filler.resource(doc)

    def datum(self, doc: Datum) -> Datum:
        resource = doc["resource"]
        run_uid = self._resource_run.get(resource)
        if run_uid is None:
            raise _Reject(
                "unknown_resource", f"datum {doc['datum_id']} for unknown resource {resource}", resource
            )
        self._run(run_uid, f"datum {doc['datum_id']}").filler.datum(doc)
        return doc

    def datum_page(self, doc: DatumPage) -> None:
        for datum in unpack_datum_page(doc):
            self._handle("datum", dict(datum))  # one datum held or refused does not lose the rest

    def stream_resource(self, doc: StreamResource) -> None:
        uid = doc["uid"]
        run = self._resource_owner(doc, "stream_resource")
        for name in ("data_key", "mimetype", "uri"):
            if not isinstance(doc[name], str):
                raise _Reject("bad_document", f"stream_resource {uid}: {name} is not a string")
        self._resource_run[uid] = run.uid
        run.stream_resources[uid] = _StreamResource(doc)

    def _evict_stream_resource(self, uid: str, resource: _StreamResource) -> None:
        self._resource_run.pop(uid, None)
        _close_reader(uid, resource)

    def stream_datum(self, doc: StreamDatum) -> None:
        uid, resource_uid, descriptor = doc["uid"], doc["stream_resource"], doc["descriptor"]
        run_uid = self._resource_run.get(resource_uid)
        if run_uid is None:
            raise _Reject("unknown_resource", f"stream_datum {uid} for unknown stream_resource {resource_uid}",
                          resource_uid)
        run = self._run(run_uid, f"stream_datum {uid}")
        resource: _StreamResource | None = run.stream_resources.get(resource_uid)
        stream = run.streams.get(descriptor)
        if resource is None:
            raise _Reject("unknown_resource", f"stream_datum {uid}: stream_resource {resource_uid} forgotten")
        if stream is None:
            raise _Reject("unknown_descriptor", f"stream_datum {uid} for unknown descriptor {descriptor}", descriptor)
        if resource.doc["data_key"] != stream.image_key:
            return  # another detector field (a sum, a timestamp): not an image
        seq_nums, indices = doc["seq_nums"], doc["indices"]
        first, last = (_integer(seq_nums[k], f"stream_datum {uid}: seq_nums.{k}") for k in ("start", "stop"))
        start, stop = (_integer(indices[k], f"stream_datum {uid}: indices.{k}") for k in ("start", "stop"))
        if not 0 <= start <= stop or last - first not in (0, stop - start):  # 0: seq_nums unset
            raise _Reject("bad_document", f"stream_datum {uid}: indices {start}:{stop} "
                                          f"do not match seq_nums {first}:{last}")
        per_event, frame_shape = frame_axis(stream.image_shape)
        limit = self._config.max_datums_per_run  # a stream datum stands for one datum per frame
        if (stop - start) * per_event > limit:
            raise _Reject("bad_document", f"stream_datum {uid}: indices {start}:{stop} claim "
                                          f"{(stop - start) * per_event} rows, more than max_datums_per_run "
                                          f"({limit}); nothing read")
        begin, end = start * per_event, stop * per_event
        lo, step = begin, 1  # the first read one row; then rows of about STREAM_READ_BYTES a read
        while lo < end:
            rows = self._read_rows(run, resource, lo, min(lo + step, end), end, f"stream_datum {uid}")
            for i, row in enumerate(rows):
                k = lo - begin + i
                seq, j = first + k // per_event, k % per_event
                where = f"stream_datum {uid} row {begin + k}"
                try:
                    frames = self._frames(row, frame_shape, where)
                except _Reject as rej:  # one bad frame does not lose the rest of the datum
                    self._reject(rej.reason, rej.detail)
                    continue
                name = f"{descriptor}/{seq}" if last > first else f"{uid}/{k // per_event}"
                for frame in frames:
                    self._emit(run, name + (f"/{j}" if per_event > 1 else ""), frame, time.time())
            if len(rows) < min(lo + step, end) - lo:
                return  # the rest never came, or could not be read: counted by _read_rows
            lo += len(rows)
            step = max(1, STREAM_READ_BYTES // max(rows[0].nbytes, 1))

    def _read_rows(self, run: _Run, resource: _StreamResource, start: int, stop: int, end: int,
                   where: str) -> np.ndarray:
        """Rows ``start:stop`` of a stream resource whose datum ends at row ``end``. A resource
        that cannot be read counts each row to ``end`` as ``fill_failed``; rows that never came,
        to ``end``, are counted as ``frames_not_written`` (the datum's later rows are not waited
        for again); one log line each way, with the count."""
        want = end - start
        try:
            if resource.reader is None:
                factory = self._stream_readers.get(resource.doc["mimetype"])
                if factory is None:
                    raise StreamReadError(f"no reader for mimetype {resource.doc['mimetype']!r}")
                resource.reader = factory(resource.doc["uri"], resource.doc.get("parameters") or {},
                                          wait_s=self._config.stream_wait_s)
            rows = resource.reader.read(start, stop)
        except StreamReadError as err:
            self._reject("fill_failed", f"{where}: {want} rows ({start}:{end}) not read: {err}", count=want)
            return np.empty((0,))
        if len(rows) < stop - start:
            missing = end - start - len(rows)
            self._reject("frames_not_written", f"{where}: rows {start + len(rows)}:{end} of {resource.doc['uri']} "
                         f"({missing}) not written within {self._config.stream_wait_s:g} s", count=missing)
        return rows

    def event_page(self, doc: EventPage) -> EventPage:
        lengths = _column_lengths(doc)
        n = lengths["uid"]
        if n is None or any(length != n for length in lengths.values()):
            self._current_run = self._descriptor_run.get(doc["descriptor"])  # counted against its run
            odd = ", ".join(f"{k} {'not a list' if v is None else v}" for k, v in lengths.items() if v != n)
            raise _Reject("bad_document", f"event_page: columns differ in length: uid "
                                          f"{'not a list' if n is None else n}, {odd}"[:400])
        for event in unpack_event_page(doc):
            self._handle("event", dict(event))  # one event held or refused does not lose the rest
        return doc

    def event(self, doc: Event) -> Event:
        self._frames_from_event(doc)
        return doc

    def _frames_from_event(self, doc: Event) -> None:
        uid, descriptor = doc["uid"], doc["descriptor"]
        if descriptor in self._analysis_descriptors:
            return
        run_uid = self._descriptor_run.get(descriptor)
        if run_uid is None:
            closed = descriptor in self._closed_descriptors
            raise _Reject("unknown_descriptor", f"event {uid} for unknown descriptor {descriptor}"
                          + (" (its run has stopped)" if closed else ""), descriptor)
        run = self._run(run_uid, f"event {uid}")
        if uid in run.recent_events:
            raise _Reject("duplicate_uid", f"event {uid} seen before")
        stream = run.streams[descriptor]
        ts = _finite_time(doc["time"], f"event {uid}: time") if "time" in doc else None
        timestamps = doc.get("timestamps") or {}
        if stream.image_key is not None and stream.image_key in doc["data"] and stream.image_key in timestamps:
            ts = _finite_time(timestamps[stream.image_key], f"event {uid}: timestamps[{stream.image_key!r}]")
        run.recent_events[uid] = None
        flat_key = self._config.flat_field_key
        wanted = {k for k in (stream.image_key, flat_key) if k is not None and k in doc["data"]}
        if stream.image_key is not None and stream.image_key not in wanted \
                and stream.image_key not in stream.stream_keys:  # those come in stream datums
            raise _Reject("missing_image", f"event {uid} lacks image field {stream.image_key!r}")
        if not wanted:
            return
        if run.resumed_after is not None and stream.image_key in doc["data"]:
            seq = doc.get("seq_num")
            if isinstance(seq, int) and seq - 1 > run.resumed_after:
                run.missed = seq - 1 - run.resumed_after
                logger.warning("run %s %s: %d frames missed", run.uid,
                               "joined late" if run.joined_late else "resumed", run.missed)
            run.resumed_after = None
        doc = self._fill(run, doc, wanted, stream.external_keys)
        if flat_key in wanted:
            self._set_flat(run, doc["data"][flat_key], f"event {uid}")
        if stream.image_key is None or stream.image_key not in doc["data"]:
            return
        if ts is None:
            raise _Reject("bad_document", f"event {uid}: no time and no timestamp of {stream.image_key!r}")
        for frame in self._frames(doc["data"][stream.image_key], stream.image_shape, f"event {uid}"):
            self._emit(run, uid if frame.index is None else f"{uid}/{frame.index}", frame, ts)

    def _frames(self, value: Any, declared: Shape | None, where: str) -> list[Frame]:
        try:
            frames = frames_of(value, declared, self._config, self._config.color_frames)
        except ImageRejected as rej:
            raise _Reject(rej.reason, f"{where}: {rej.detail}") from None
        for f in frames:
            if f.converted is not None:
                self._sink.converted(f.converted, f"{where}: colour frame converted to gray")
        return frames

    def _emit(self, run: _Run, frame_uid: str, frame: Frame, timestamp: float) -> None:
        run.frames += 1
        self._sink.frame(
            FrameJob(
                run_uid=run.uid,
                frame_uid=frame_uid,
                seq_num=run.frames,
                frame=frame.pixels,
                timestamp=timestamp,
                metadata=dataclasses.replace(run.metadata, flat_field=run.flat_field),
                received_monotonic=self._clock(),
            )
        )

    def stop(self, doc: RunStop) -> None:
        if doc["run_start"] in self._analysis_runs:
            return
        uid = doc.get("uid")
        run = self._run(doc["run_start"], f"stop {uid}")
        notes: list[str] = []
        try:
            stop_time = _finite_time(doc.get("time"), f"stop {uid}: time")
        except _Reject as rej:  # the run still ends here: no second stop will come
            self._reject(rej.reason, rej.detail)
            stop_time = time.time()
            notes.append(f"{rej.detail}; stopped at the time it came")
        label = "missed_before_join" if run.joined_late else "missed_while_down"
        rejected = dict(run.rejected) | ({label: run.missed} if run.missed else {})
        if run.joined_late:
            notes.append("joined late (start and descriptors recovered from Tiled)"
                         + (f"; {run.missed} frames sent before it joined not analysed" if run.missed else ""))
        elif run.missed:
            notes.append(f"resumed after a restart; {run.missed} frames missed while the daemon was down")
        stopped = RunStopped(run.uid, str(doc.get("exit_status", "success")), stop_time, rejected, "; ".join(notes))
        self._forget(run)
        self._sink.run_stopped(stopped)

    # -- helpers -----------------------------------------------------------------------------

    @staticmethod
    def _fill(run: _Run, doc: Event, keys: set[str], external: frozenset[str]) -> Event:
        """The event with file-backed values of ``keys`` loaded (a copy when anything is filled).

        A key needs filling when the event says ``filled: False`` for it, or says nothing and the
        descriptor marks it ``external``.
        """
        filled = doc.get("filled") or {}
        todo = {k for k in keys if filled.get(k) is False or (k not in filled and k in external)}
        if not todo:
            return doc
        uid = doc["uid"]
        try:
            filled_doc: Event = run.filler.fill_event(doc, include=todo, inplace=False)
            return filled_doc
        except UnresolvableForeignKeyError as err:
            raise _Reject("fill_failed", f"event {uid}: unknown datum or resource: {err}") from None
        except UndefinedAssetSpecification as err:
            raise _Reject("fill_failed", f"event {uid}: no handler: {err}") from None
        except Exception as err:  # handlers read arbitrary files: any failure is the data's
            cause = err.__cause__ or err  # event-model wraps the handler's error
            raise _Reject("fill_failed", f"event {uid}: {cause!r:.300}") from None

    def _set_flat(self, run: _Run, value: Any, where: str) -> None:
        arr = image_array(value)
        if arr is None:
            self._reject(
                "bad_metadata", f"run {run.uid}: {where}: flat field is not a 2-D numeric array"
            )
        else:
            run.flat_field = arr


_INTRODUCING = frozenset({"start", "descriptor", "resource", "stream_resource"})  # documents others wait for
_HANDLED = frozenset(
    {"start", "descriptor", "event", "event_page", "resource", "datum", "datum_page",
     "stream_resource", "stream_datum", "stop"}
)
