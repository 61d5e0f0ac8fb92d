"""Sinks: where results go after the stages. ingest -> queue -> stages -> ``SinkChain`` -> sinks.

Every sink has the same small interface (``Sink``): a run opens, its frames are written in frame
order, the run closes; ``close`` ends the sink. The daemon config's ``sinks`` list names them in
order (default: ``store``, then ``bluesky`` and ``summary`` where enabled).

``SinkChain`` hands each item to the sinks in list order and keeps the order across them:

* A *durable* sink (the store) that raises ``SinkError`` holds the item, and every later item, in
  memory; the chain retries them oldest first (``retry``) and the later sinks get them only once
  it has succeeded, so results are stored before they are published. Beyond ``max_pending``
  waiting items the oldest is lost: a frame is counted failed (``<sink>_overflow``), a run start
  or stop still goes on to the later sinks, so no analysis run is left open.
* A durable sink's ``SinkError`` with ``permanent`` True (the store's ``rejected``: a value SQLite
  can never take, such as a NaN time) is the item's fault, not the sink's: that item alone is
  given up at once (logged, ``sink_errors_total{sink, reason}``), the same way as an overflow
  (a frame counted failed, ``<sink>_rejected``, and among its run's losses; a run start or stop
  goes on to the later sinks), and the items behind it go on.
* A run's stop closes it: a second stop of a run closed (or closing), e.g. the run's own stop
  after the service closed it for inactivity, is ignored and counted
  (``closed_run_items_total{reason="late_stop"}``); a frame of a closed run is stored (a result
  is never lost) but goes to no other sink, since its run is closed there
  (``closed_run_items_total{reason="late_frame"}``). Only a new start of the run opens it again.
  The chain remembers the last ``RECENT_CLOSED_RUNS`` closed runs.
* Frames that arrive together (``put_many``) go to a first sink that can take several at once
  (``write_frames``: the store, one transaction and one commit for the group) together, then
  each on to the later sinks: still stored before published, with one commit per group.
* A frame counts as processed (``frames_processed_total`` and the per-frame metrics) once every
  durable sink has it, before the others see it: counters never lag what subscribers see.
* ``write_frame`` returning False means the frame was already written (a replay): it is counted
  as dropped (``duplicate``) and goes no further.
* A non-durable sink's ``SinkError``, and any other exception of any sink (a bug), is counted in
  ``sink_errors_total{sink, reason}`` and logged; the item goes on to the next sink.
* Error lines are rate-limited, so that an error that repeats (a full disk, a server down, at
  hundreds of frames/s) does not flood the log: per (sink, reason) for ``<sink>_error``, per
  reason for ``result_lost``, the first occurrence is logged at once, then at most one line per
  ``ERROR_LOG_EVERY_S`` (s), whose field ``occurrences`` is the number of occurrences since the
  last line, this one included (``first_suppressed_ago_s``: how long ago the oldest of them
  was). The metrics count every occurrence.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, cast

from nanoseg.masks import RLE, encode_rle_batch
from nanoseg_daemon.contracts import FrameJob, FrameResult, RunStarted, RunStopped
from nanoseg_daemon.growth import GrowthMonitor
from nanoseg_daemon.logs import log
from nanoseg_daemon.metrics import DaemonMetrics
from nanoseg_daemon.publish import AnalysisRun, DocumentPublisher, SummaryPublisher
from nanoseg_daemon.store import ResultStore, StoreError

RECENT_CLOSED_RUNS = 1024
"""Closed runs remembered (by the chain and the bluesky sink) to recognise their late items."""

ERROR_LOG_EVERY_S = 10.0
"""At most one log line per this many seconds for an error that repeats (per sink and reason)."""


class LogLimiter:
    """Rate limit for log lines of repeated events: per key, the first occurrence is logged at once,
    then at most one line per ``every_s`` (s, ``clock`` time) carrying the count since the last.

    Parameters
    ----------
    every_s
        Least time between two lines of one key, s.
    clock
        Monotonic time source, s.
    """

    def __init__(self, every_s: float = ERROR_LOG_EVERY_S, clock: Callable[[], float] = time.monotonic) -> None:
        self.every_s, self._clock = every_s, clock
        self._last: dict[Any, float] = {}  # key -> time of its last line
        self._held: dict[Any, tuple[int, float]] = {}  # key -> (occurrences not logged, time of the first)

    def occurred(self, key: Any) -> dict[str, Any] | None:
        """Count one occurrence of ``key``. None: do not log it; else log it, with these fields
        (``occurrences``: since the last line of ``key``, this one included; and, where some were
        not logged, ``first_suppressed_ago_s``, s)."""
        now = self._clock()
        held, first = self._held.get(key, (0, now))
        last = self._last.get(key)
        if last is not None and now - last < self.every_s:
            self._held[key] = (held + 1, first)
            return None
        self._last[key] = now
        self._held.pop(key, None)
        fields: dict[str, Any] = {"occurrences": held + 1}
        if held:
            fields["first_suppressed_ago_s"] = round(now - first, 3)
        return fields


class SinkError(Exception):
    """A sink could not take an item; ``reason`` is a metric label. A durable sink's item is
    retried, unless ``permanent``: the item itself can never be taken (it is given up)."""

    def __init__(self, reason: str, detail: str, permanent: bool = False) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
        self.permanent = permanent


class Sink(Protocol):
    """One output of the daemon. Called from one thread (the output stage), in order per run:
    ``open_run``, ``write_frame`` in frame order, ``close_run``; ``close`` once at the end."""

    name: str
    """The name in the config's ``sinks`` list and in metric labels."""
    durable: bool
    """True: a ``SinkError`` holds the item for a retry, and later sinks wait for it."""

    def open_run(self, run: RunStarted) -> None: ...

    def write_frame(self, result: FrameResult, rles: Sequence[RLE]) -> bool:
        """Write one frame's result (``rles``: its masks as COCO RLE, encoded once for all sinks).
        False: already written (a replay), later sinks skip it."""
        ...

    def close_run(self, stop: RunStopped) -> None: ...

    def close(self) -> None: ...


# -- the sinks -----------------------------------------------------------------------------


class StoreSink:
    """The SQLite result store (``store.py``); durable."""

    name = "store"
    durable = True

    def __init__(self, store: ResultStore, model_version: Callable[[], str], metrics: DaemonMetrics) -> None:
        self.store, self._model_version, self._metrics = store, model_version, metrics

    def _failed(self, err: StoreError) -> SinkError:
        self._metrics.store_errors.labels(err.reason).inc()
        return SinkError(err.reason, err.detail, permanent=err.permanent)

    def open_run(self, run: RunStarted) -> None:
        try:
            self.store.add_run(run, self._model_version())
        except StoreError as err:
            raise self._failed(err) from err

    def write_frame(self, result: FrameResult, rles: Sequence[RLE]) -> bool:
        try:
            return self.store.add_frame(result, rles)
        except StoreError as err:
            raise self._failed(err) from err

    def write_frames(self, results: Sequence[FrameResult], rles: Sequence[Sequence[RLE]]) -> list[bool]:
        """``write_frame`` for several frames, one transaction (nothing of any stored on error)."""
        try:
            return self.store.add_frames(results, rles)
        except StoreError as err:
            raise self._failed(err) from err

    def close_run(self, stop: RunStopped) -> None:
        try:
            self.store.stop_run(stop)
        except StoreError as err:
            raise self._failed(err) from err

    def close(self) -> None:
        self.store.close()


class BlueskySink:
    """Analysis runs as bluesky documents (``publish.AnalysisRun``) and their growth alarms.

    A run's analysis opens (start, descriptor) at its first frame or at its stop, so an analysis
    run exists only once something of it was stored; ``describe`` gives the model version and
    the processing settings recorded in its start document.

    Subscribers never get documents of an analysis run they did not see start: when its opening
    documents cannot be sent (the serializer refuses them), its events are withheld and so is its
    stop unless the start went out, each counted (``sink_errors_total{sink="bluesky",
    reason="run_unpublished"}``; the opening failure itself ``reason="start_not_published"``).
    Start metadata the wire formats cannot carry (integers beyond 64 bits, strings that are not
    UTF-8) is published as its repr, counted (``published_values_replaced_total``). A run once
    closed stays closed: a late stop of it publishes nothing, a late frame raises ``SinkError``
    (``run_closed``); only a new start opens it again.
    """

    name = "bluesky"
    durable = False

    def __init__(self, publisher: DocumentPublisher, growth: GrowthMonitor,
                 describe: Callable[[], tuple[str, dict[str, Any]]], metrics: DaemonMetrics,
                 journal: Callable[[str, dict[str, Any], str], None] | None = None) -> None:
        """``journal(raw run uid, analysis start document, descriptor uid)``: records an analysis
        run as it opens (``ResultStore.analysis_opened``), so ``resume`` can continue it."""
        self.publisher, self._growth, self._describe, self._metrics = publisher, growth, describe, metrics
        self.journal = journal
        self._runs: dict[str, AnalysisRun] = {}
        self._raw: dict[str, RunStarted] = {}
        self._unpublished: dict[str, bool] = {}  # run uid -> whether its start went out (its descriptor did not)
        self._closed: OrderedDict[str, None] = OrderedDict()  # recently closed run uids, oldest first

    def _send(self, name: str, doc: dict[str, Any]) -> None:
        if not self.publisher(name, doc):
            self._metrics.publish_dropped.labels("bluesky").inc()

    def _analysis(self, run_uid: str) -> AnalysisRun:
        run = self._runs.get(run_uid)
        if run is None:
            version, processing = self._describe()
            raw = self._raw.get(run_uid)
            run = AnalysisRun(run_uid, version, processing, raw_metadata=raw.metadata.extra if raw else None)
            self._runs[run_uid] = run
            if run.replaced:
                for reason, n in run.replaced.items():
                    self._metrics.published_values_replaced.labels(reason).inc(n)
                log("start_metadata_replaced", logging.WARNING, run=run_uid, replaced=dict(run.replaced),
                    detail="values the wire formats cannot carry are published as their repr")
            sent: list[str] = []
            try:
                for name, doc in run.opening():
                    self._send(name, doc)
                    sent.append(name)
            except Exception as err:  # its later documents would belong to a run subscribers never saw
                self._unpublished[run_uid] = "start" in sent
                self._metrics.sink_errors.labels(self.name, "start_not_published").inc()
                log("analysis_not_published", logging.ERROR, run=run_uid, sent=sent,
                    error=f"{type(err).__name__}: {err}"[:500],
                    detail="its events are not published" + ("" if sent else ", nor its stop"))
                return run
            if self.journal is not None:
                try:
                    self.journal(run_uid, run.start_doc, run.descriptor_doc["uid"])
                except Exception as err:  # published all the same; only a restart could not continue it
                    log("analysis_not_journalled", logging.WARNING, run=run_uid, error=f"{type(err).__name__}: {err}")
        return run

    def _withheld(self, run_uid: str, what: str) -> None:
        """Count a document of an analysis run whose opening was not published."""
        self._metrics.sink_errors.labels(self.name, "run_unpublished").inc()
        log("analysis_document_withheld", logging.WARNING, run=run_uid, document=what,
            detail="the analysis run's start or descriptor was not published")

    def resume(self, run_uid: str, start_doc: dict[str, Any], descriptor_uid: str, events: int) -> None:
        """Continue the analysis run published before a restart (same start and descriptor uids,
        event numbers after ``events``)."""
        version, processing = self._describe()
        self._runs[run_uid] = AnalysisRun(run_uid, version, processing, resume=(start_doc, descriptor_uid, events))
        self._closed.pop(run_uid, None)

    def open_run(self, run: RunStarted) -> None:
        self._raw[run.run_uid] = run
        self._closed.pop(run.run_uid, None)  # a new start opens a closed run again

    def write_frame(self, result: FrameResult, rles: Sequence[RLE]) -> bool:
        if result.run_uid in self._closed:
            raise SinkError("run_closed", f"frame {result.frame_uid}: its analysis run is closed")
        run = self._analysis(result.run_uid)
        published = result.run_uid not in self._unpublished
        if published:
            try:
                self._send(*run.event(result, rles))
            except ValueError as err:  # out of order within a run: stored, not published as an event
                log("event_not_published", logging.WARNING, frame=result.frame_uid, detail=str(err))
        else:
            self._withheld(result.run_uid, "event")
        for name, doc in self._growth.observe(result, run.compose_descriptor):  # alarms stream of the analysis run
            if published:
                self._send(name, doc)
        return True

    def close_run(self, stop: RunStopped) -> None:
        if stop.run_uid in self._closed:  # closed already (the chain counts a late stop)
            log("late_stop_ignored", logging.WARNING, sink=self.name, run=stop.run_uid, exit_status=stop.exit_status)
            return
        try:
            run = self._analysis(stop.run_uid)
            start_sent = self._unpublished.get(stop.run_uid, True)
            doc = run.stop(stop.exit_status, stop.reason, losses=stop.rejected)
            if doc is not None and start_sent:
                self._send(*doc)  # a run whose start went out is closed, even without its descriptor
            elif doc is not None:
                self._withheld(stop.run_uid, "stop")
        finally:
            self._runs.pop(stop.run_uid, None)
            self._raw.pop(stop.run_uid, None)
            self._unpublished.pop(stop.run_uid, None)
            self._closed[stop.run_uid] = None
            while len(self._closed) > RECENT_CLOSED_RUNS:
                self._closed.popitem(last=False)

    def close(self) -> None:
        self.publisher.close()


class SummarySink:
    """Per-frame JSON summaries on the summary topic (``publish.SummaryPublisher``)."""

    name = "summary"
    durable = False

    def __init__(self, publisher: SummaryPublisher, metrics: DaemonMetrics) -> None:
        self.publisher, self._metrics = publisher, metrics

    def open_run(self, run: RunStarted) -> None:
        return

    def write_frame(self, result: FrameResult, rles: Sequence[RLE]) -> bool:
        replaced: Counter[str] = Counter()
        if not self.publisher.publish(result, replaced):
            self._metrics.publish_dropped.labels("summary").inc()
        for reason, n in replaced.items():  # a uid that is not UTF-8: sent as its repr
            self._metrics.published_values_replaced.labels(reason).inc(n)
        return True

    def close_run(self, stop: RunStopped) -> None:
        return

    def close(self) -> None:
        self.publisher.close()


# -- the chain -----------------------------------------------------------------------------


@dataclass
class _Frame:
    result: FrameResult
    rles: list[RLE]


@dataclass
class _Pending:
    item: RunStarted | _Frame | RunStopped
    next: int = 0  # index of the sink it goes to next
    counted: bool = False
    duplicate: bool = False  # a sink said it had it already: it goes no further
    late: bool = False  # a frame of a run closed already: to the durable sinks only
    alone: bool = False  # its group failed for an item's fault or a bug: it goes one by one

    def describe(self) -> str:
        it = self.item
        return it.result.frame_uid if isinstance(it, _Frame) else f"{type(it).__name__} {it.run_uid}"


class SinkChain:
    """The output stage: run starts, results and run stops to every sink, in order (see module)."""

    def __init__(self, sinks: Sequence[Sink], metrics: DaemonMetrics, max_pending: int,
                 losses: Callable[[str], Mapping[str, int]] = lambda run_uid: {}) -> None:
        self.sinks = list(sinks)
        self._losses = losses  # a run's frames dropped or failed before output, by reason
        self.metrics = metrics
        self.max_pending = max_pending
        self.processed = 0
        self._count_at = max((i + 1 for i, s in enumerate(self.sinks) if s.durable), default=0)
        self._pending: deque[_Pending] = deque()  # in output order
        self._open: set[str] = set()  # runs started and not yet closed by every sink
        self._activity: dict[str, float] = {}  # run uid -> monotonic time of its last start or frame
        self._with_frames: set[str] = set()  # open runs with a frame written since this chain began
        # runs whose stop the chain took (closed or closing), oldest first -> a late frame was logged
        self._recent_closed: OrderedDict[str, bool] = OrderedDict()
        self._lost: dict[str, Counter[str]] = {}  # run uid -> its frames the chain gave up, for its stop
        self._lock = threading.Lock()
        self._closed = False
        self._stage_seconds: dict[str, Any] = {}  # stage -> its histogram child (``labels`` costs per call)
        self.log_limiter = LogLimiter()  # error lines of the chain, per (event, sink, reason)

    def put(self, item: RunStarted | FrameResult | RunStopped | FrameJob) -> None:
        """Take one item from the stages (output thread)."""
        self.put_many([item])

    def put_many(self, items: Sequence[RunStarted | FrameResult | RunStopped | FrameJob]) -> None:
        """Take the items the stages passed on together, in order (output thread): consecutive
        frames among them go to the first sink as one group where it takes groups (module)."""
        with self._lock:
            for item in items:
                self._enqueue(item)
            self._flush()

    def _enqueue(self, item: RunStarted | FrameResult | RunStopped | FrameJob) -> None:
        now = time.monotonic()
        if isinstance(item, RunStarted):
            self._recent_closed.pop(item.run_uid, None)  # only a new start opens a closed run again
            self._open.add(item.run_uid)
            self._activity[item.run_uid] = now
            self.metrics.open_runs.set(len(self._open))
            self._pending.append(_Pending(item))
        elif isinstance(item, FrameResult):
            p = _Pending(_Frame(item, encode_rle_batch(item.instances.box_masks)))
            if item.run_uid in self._recent_closed:
                p.late = True
                self._late_frame(item)
            self._pending.append(p)
        elif isinstance(item, RunStopped):
            if item.run_uid in self._recent_closed:
                self._late_stop(item)
                return
            self._activity.pop(item.run_uid, None)  # closing: the timeout must not close it again
            self._recent_closed[item.run_uid] = False
            while len(self._recent_closed) > RECENT_CLOSED_RUNS:
                self._recent_closed.popitem(last=False)
            # every frame of the run has passed the stages: its losses are all counted by now
            losses = (Counter(item.rejected) + Counter(self._losses(item.run_uid))
                      + self._lost.pop(item.run_uid, Counter()))
            self._pending.append(_Pending(RunStopped(item.run_uid, item.exit_status, time.time(), dict(losses),
                                                     item.reason)))
        else:
            raise TypeError(f"not an output item: {type(item).__name__}")

    def _late_stop(self, stop: RunStopped) -> None:
        """A stop of a run closed already: ignored (its first stop stands), counted and logged."""
        self.metrics.closed_run_items.labels("late_stop").inc()
        log("late_stop", logging.WARNING, run=stop.run_uid, exit_status=stop.exit_status, reason=stop.reason,
            detail="the run was closed already (its first stop stands); this stop is ignored")

    def _late_frame(self, result: FrameResult) -> None:
        """A frame of a run closed already: stored, not published (counted; logged once per run)."""
        self.metrics.closed_run_items.labels("late_frame").inc()
        if not self._recent_closed.get(result.run_uid):
            self._recent_closed[result.run_uid] = True
            log("late_frame", logging.WARNING, run=result.run_uid, frame=result.frame_uid,
                detail="a frame of a run closed already: stored, not published (its run is closed "
                       "there); logged once per run")

    def retry(self) -> None:
        """Retry what waits for a durable sink (housekeeping). Never waits: while the output stage
        is writing (a slow sink), it will flush the waiting items itself, and the caller (the
        housekeeping thread, which pings the systemd watchdog) must not stall with it."""
        if self._pending and self._lock.acquire(blocking=False):
            try:
                if not self._closed:
                    self._flush()
            finally:
                self._lock.release()

    @property
    def pending(self) -> int:
        return len(self._pending)

    @property
    def open_runs(self) -> list[str]:
        return sorted(self._open)

    def has_frames(self, run_uid: str) -> bool:
        """Whether a frame of the open run ``run_uid`` has been written since this chain began."""
        return run_uid in self._with_frames

    def stale_runs(self, timeout_s: float) -> list[str]:
        """Runs with no start or frame for ``timeout_s``; each is reported once."""
        now = time.monotonic()
        stale = [u for u, t in list(self._activity.items()) if now - t > timeout_s]
        for uid in stale:
            self._activity.pop(uid, None)
        return stale

    def close(self) -> int:
        """Flush once more, then close every sink; returns the items still unwritten (lost)."""
        with self._lock:
            self._flush()
            lost = len(self._pending)
            self._closed = True
            for sink in self.sinks:
                try:
                    sink.close()
                except Exception as err:
                    log("sink_close_failed", logging.ERROR, sink=sink.name, error=f"{type(err).__name__}: {err}")
        return lost

    def _flush(self) -> None:
        while self._pending:
            head = self._pending[0]
            if head.next == 0 and isinstance(head.item, _Frame) and not self._write_group():
                stuck = True
            else:
                stuck = not self._advance(head)
            if stuck:
                while len(self._pending) > self.max_pending:
                    lost = self._pending.popleft()
                    self._lose(lost, f"{self.sinks[lost.next].name}_overflow")
                return
            self._pending.popleft()

    def _write_group(self) -> bool:
        """The frames first in line that no sink has seen, to the first sink at once when it is
        durable and takes groups (``write_frames``); False when it failed (they wait). An error
        that is not the sink's (a permanent ``SinkError``: an item it can never take; any other
        exception: a bug) leaves them to go one by one (``_advance``), so a bad frame fails alone."""
        sink = self.sinks[0]
        write_frames = getattr(sink, "write_frames", None)
        if not sink.durable or write_frames is None:
            return True
        group: list[_Pending] = []
        for p in self._pending:
            if p.next != 0 or not isinstance(p.item, _Frame) or p.alone:
                break
            group.append(p)
        if len(group) < 2:
            return True
        frames = [cast(_Frame, p.item) for p in group]
        try:
            written = write_frames([f.result for f in frames], [f.rles for f in frames])
        except SinkError as err:
            if not err.permanent:
                self._sink_error(sink, err.reason, str(err), group[0])
                return False
            log("sink_group_refused", logging.WARNING, sink=sink.name, error=str(err)[:500])
        except Exception as err:  # a bug
            log("sink_group_failed", logging.WARNING, sink=sink.name, error=f"{type(err).__name__}: {err}")
        else:
            for p, new in zip(group, written):
                p.next = 1
                p.duplicate = not new
            return True
        for p in group:  # one of them cannot be taken: one by one, so that it fails alone
            p.alone = True
        return True

    def _write(self, sink: Sink, item: RunStarted | _Frame | RunStopped) -> bool:
        if isinstance(item, _Frame):
            return sink.write_frame(item.result, item.rles)
        if isinstance(item, RunStarted):
            sink.open_run(item)
        else:
            sink.close_run(item)
        return True

    def _advance(self, p: _Pending) -> bool:
        """Write ``p`` to its remaining sinks; False when a durable sink failed (``p`` waits)."""
        if p.duplicate:
            self.metrics.frames_dropped.labels("duplicate").inc()
            return True
        while p.next < len(self.sinks):
            if p.next == self._count_at:
                self._count(p)
            sink = self.sinks[p.next]
            if p.late and not sink.durable:  # its run is closed: stored, not passed on
                p.next += 1
                continue
            try:
                written = self._write(sink, p.item)
            except SinkError as err:
                self._sink_error(sink, err.reason, str(err), p)
                if sink.durable and err.permanent:  # the item's fault: it alone is given up
                    self._lose(p, f"{sink.name}_rejected")
                    return True
                if sink.durable:
                    return False
                written = True
            except Exception as err:  # a bug in one sink must not stop the output
                self._sink_error(sink, "internal_error", f"{type(err).__name__}: {err}", p)
                written = True
            p.next += 1
            if not written:
                self.metrics.frames_dropped.labels("duplicate").inc()
                return True
        if p.next == self._count_at:
            self._count(p)
        self._done(p)
        return True

    def _sink_error(self, sink: Sink, reason: str, detail: str, p: _Pending) -> None:
        """Count a sink's error; log it, rate-limited per (sink, reason) (module)."""
        self.metrics.sink_errors.labels(sink.name, reason).inc()
        repeats = self.log_limiter.occurred(("sink_error", sink.name, reason))
        if repeats is not None:
            log(f"{sink.name}_error", logging.ERROR, reason=reason, detail=detail[:500], item=p.describe(),
                pending=len(self._pending), **repeats)

    def _count(self, p: _Pending) -> None:
        """Count a frame every durable sink has: processed, particles, stage times."""
        if not isinstance(p.item, _Frame) or p.counted:
            return
        p.counted = True
        r = p.item.result
        if r.run_uid not in self._recent_closed:  # a closed (or closing) run is not timed out again
            self._activity[r.run_uid] = time.monotonic()
            self._with_frames.add(r.run_uid)
        self.processed += 1
        m = self.metrics
        m.frames_processed.inc()
        m.particles.observe(r.summary.count)
        if r.instances_capped:
            m.instances_dropped.labels("max_instances").inc(r.instances_capped)
            log("instances_capped", logging.WARNING, run=r.run_uid, frame=r.frame_uid, dropped=r.instances_capped)
        m.last_frame.set(time.time())
        for stage, seconds in r.timings.items():
            child = self._stage_seconds.get(stage)
            if child is None:
                child = self._stage_seconds[stage] = m.stage_seconds.labels(stage)
            child.observe(seconds)

    def _done(self, p: _Pending) -> None:
        it = p.item
        if isinstance(it, _Frame) and p.counted and it.result.received_monotonic > 0:  # 0.0: no ingest time
            self.metrics.latency_seconds.observe(time.monotonic() - it.result.received_monotonic)
        elif isinstance(it, RunStopped):
            self._open.discard(it.run_uid)
            self._with_frames.discard(it.run_uid)
            self._activity.pop(it.run_uid, None)
            self._lost.pop(it.run_uid, None)
            self.metrics.open_runs.set(len(self._open))
            log("run_closed", run=it.run_uid, exit_status=it.exit_status)

    def _lose(self, p: _Pending, reason: str) -> None:
        """Give up on an item a durable sink cannot take (``reason``: ``<sink>_overflow`` or
        ``<sink>_rejected``): frames are lost, counted failed and among their run's losses; run
        starts and stops still go on to the later sinks."""
        repeats = self.log_limiter.occurred(("result_lost", reason))
        if repeats is not None:
            log("result_lost", logging.ERROR, item=p.describe(), reason=reason, **repeats)
        if isinstance(p.item, _Frame):
            self.metrics.frames_failed.labels(reason).inc()
            self._count_lost(p.item.result.run_uid, reason)
            return
        p.next += 1
        while p.next < len(self.sinks):
            sink = self.sinks[p.next]
            try:
                self._write(sink, p.item)
            except Exception as err:
                self._sink_error(sink, getattr(err, "reason", "internal_error"), f"{type(err).__name__}: {err}", p)
            p.next += 1
        self._done(p)

    def _count_lost(self, run_uid: str, reason: str) -> None:
        """Add a frame given up to its run's losses: on its stop waiting here, else for its stop to come."""
        for q in self._pending:
            if isinstance(q.item, RunStopped) and q.item.run_uid == run_uid and q.next == 0:
                q.item.rejected[reason] = q.item.rejected.get(reason, 0) + 1
                return
        if run_uid not in self._recent_closed:  # closed: it was a late frame, its stop is out already
            self._lost.setdefault(run_uid, Counter())[reason] += 1
