"""Frames -> results: the analysis of one frame, and the overlapping stages that run it.

``analyse_frame`` is the whole per-frame pipeline in one function: decode/validate + optical
density + scale/tile (``nanoseg.prepare``), then ``Segmenter.analyse`` (engine and mask pasting
-> merge and filters -> statistics). The sinks (``sinks.py``) then store and publish the result.

``Stages`` runs prepare, infer (batched), measure (post-processing and statistics) and output in
four threads joined by small bounded queues, so the model never waits on preparation, statistics
or I/O; with ``statistics.workers`` the statistics run in worker processes (``stats_pool``). Run
start/stop items travel through the same queues, so every consumer sees start -> frames in order
-> stop. A frame carries the model it was prepared for into inference, so a reload between the
two never splits a frame across models.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeAlias, cast

import numpy as np

from nanoseg.config_io import ConfigError, load_yaml
from nanoseg.engines import RawDetections
from nanoseg.errors import FrameError
from nanoseg.frame_profile import FlatFieldI0, FrameProfile, ScalarI0
from nanoseg.input_spec import FrameMode
from nanoseg.instances import BoxMasks, Instances
from nanoseg.particle_stats import FrameStatistics, FrameSummary, ParticleTable, frame_statistics
from nanoseg.paths import resolve_config
from nanoseg.prepare import PreparedFrame, ScaleChooser
from nanoseg.scale import ScaleChoice
from nanoseg.segmenter import Segmenter
from nanoseg.summary_stats import StatisticsConfig
from nanoseg_daemon.config import BatchingSection, QueueSection
from nanoseg_daemon.contracts import FrameJob, FrameResult, RunStarted, RunStopped
from nanoseg_daemon.logs import log
from nanoseg_daemon.metrics import DaemonMetrics
from nanoseg_daemon.model_slot import LoadedModel
from nanoseg_daemon.queueing import Closed, FrameQueue
from nanoseg_daemon.stats_pool import Pending, StatisticsPool

Item: TypeAlias = RunStarted | FrameJob | RunStopped


class ProfileBook:
    """Frame profiles by name (configs/profiles or paths), validated once and cached, and the
    runs' versions of them with their own I0 (``profile_for``)."""

    _MAX_VARIANTS = 256  # profiles with a run's I0; forgotten all at once beyond this

    def __init__(self, default: str) -> None:
        self.default = default
        self._cache: dict[str, FrameProfile] = {}
        self._variants: dict[tuple[str, float | None], FrameProfile] = {}
        self.get(default)  # fail at start, not at the first frame

    def get(self, name: str | None) -> FrameProfile:
        key = name or self.default
        if key not in self._cache:
            try:
                self._cache[key] = load_yaml(resolve_config(key, "profiles"), FrameProfile)
            except (FileNotFoundError, ConfigError) as err:
                raise FrameError("unknown_profile", str(err)) from None
        return self._cache[key]

    def with_i0(self, name: str | None, i0: float | None) -> FrameProfile:
        """Profile ``name`` with I0 from a flat field (``i0`` None) or the scalar ``i0`` (counts)."""
        key = (name or self.default, i0)
        prof = self._variants.get(key)
        if prof is None:
            base = self.get(name)
            policy = FlatFieldI0(policy="flat_field") if i0 is None else ScalarI0(policy="scalar", value=i0)
            prof = base.model_copy(update={"i0": policy})
            if len(self._variants) >= self._MAX_VARIANTS:
                self._variants.clear()
            self._variants[key] = prof
        return prof


def profile_for(job: FrameJob, profiles: ProfileBook) -> FrameProfile:
    """The job's profile, with I0 taken from the run's metadata when it supplies one."""
    prof = profiles.get(job.metadata.profile)
    if prof.mode != "optical_density" or prof.expected_input == "optical_density":
        return prof
    if job.metadata.flat_field is not None:
        return profiles.with_i0(job.metadata.profile, None)
    if job.metadata.i0 is not None:
        return profiles.with_i0(job.metadata.profile, job.metadata.i0)
    return prof


@dataclass(frozen=True)
class Prepared:
    job: FrameJob
    frame: PreparedFrame
    profile: FrameProfile
    model: LoadedModel  # the model the frame was prepared for; its inference runs on this one
    seconds: float


class RunScales:
    """``pixel_size_nm: auto`` once per run: the first frame's choice (``Segmenter.choose_scale``,
    one model pass per scale tried) holds for the run's later frames on the same model, as one
    run has one magnification. A frame where the model found nothing at any scale does not fix
    the run's scale; the next frame tries again."""

    def __init__(self) -> None:
        self._chosen: dict[tuple[str, str], ScaleChoice] = {}

    def chooser(self, run_uid: str, model: LoadedModel) -> ScaleChooser:
        """The run's scale chooser for ``model``."""
        key = (run_uid, model.version)

        def choose(image: np.ndarray, mode: FrameMode) -> ScaleChoice:
            if key not in self._chosen:
                choice = model.segmenter.choose_scale(image, mode)
                if not choice.confidence:
                    return choice
                self._chosen[key] = choice
                log("auto_scale_chosen", logging.INFO, run=run_uid, model=model.version,
                    pixel_size_nm=round(choice.pixel_size_nm, 3), confidence=round(choice.confidence, 3))
            return self._chosen[key]

        return choose

    def forget(self, run_uid: str) -> None:
        """Drop a finished run's choices."""
        for key in [k for k in self._chosen if k[0] == run_uid]:
            del self._chosen[key]


def prepare(job: FrameJob, model: LoadedModel, profiles: ProfileBook, scales: RunScales | None = None) -> Prepared:
    t0 = time.perf_counter()
    prof = profile_for(job, profiles)
    md = job.metadata
    frame = model.segmenter.prepare(job.frame, prof, flat_field=md.flat_field, dark_frame=md.dark_frame,
                                    pixel_size_nm=md.pixel_size_nm,
                                    scale_chooser=scales.chooser(job.run_uid, model) if scales else None)
    return Prepared(job, frame, prof, model, time.perf_counter() - t0)


def infer_and_measure(p: Prepared, statistics: StatisticsConfig | None = None) -> FrameResult:
    """Inference and statistics of a prepared frame, on the model it was prepared for, one frame
    alone (the stages batch the engine: ``detect_batch``, then ``measure``); summarised as
    ``statistics`` says (the config's ``statistics`` section; None: its defaults)."""
    timings = {"prepare": p.seconds, "infer": 0.0}
    a = p.model.segmenter.analyse(p.frame, p.frame.stated_pixel_size_nm, timings, None, statistics)
    return _result(p, a.instances, a.table, a.summary, a.instances_capped, timings)


@dataclass(frozen=True)
class Found:
    """A frame's instances, its statistics still to come (``statistics.workers``)."""

    prepared: Prepared
    instances: Instances
    capped: int
    timings: dict[str, float]  # prepare, infer, postprocess so far, s

    @property
    def statistics_inputs(self) -> tuple[BoxMasks, np.ndarray | None, float | None]:
        """``frame_statistics``'s masks, optical density and pixel size (nm) for this frame."""
        frame = self.prepared.frame
        return self.instances.box_masks, frame.optical_density, frame.stated_pixel_size_nm


def find_instances(d: Detected) -> Found:
    """Post-processing of a frame whose detections are known: its instances (``measured`` then
    adds the statistics, wherever they ran)."""
    timings = {"prepare": d.prepared.seconds, "infer": d.seconds}
    inst, capped = d.prepared.model.segmenter.detected_instances(d.prepared.frame, d.detections, timings)
    return Found(d.prepared, inst, capped, timings)


def measured(f: Found, stats: FrameStatistics) -> FrameResult:
    """The frame's result from its instances and their statistics (``frame_statistics``)."""
    return _result(f.prepared, f.instances, stats.table, stats.summary, f.capped,
                   {**f.timings, "stats": stats.seconds})


def _result(p: Prepared, instances: Instances, table: ParticleTable, summary: FrameSummary, capped: int,
            timings: dict[str, float]) -> FrameResult:
    px = p.frame.stated_pixel_size_nm
    return FrameResult(
        run_uid=p.job.run_uid, frame_uid=p.job.frame_uid, seq_num=p.job.seq_num,
        timestamp=p.job.timestamp, instances=instances, table=table, summary=summary,
        model_version=p.model.version, invalid_pixels=p.frame.invalid.to_dict(), timings=timings,
        metadata={**p.job.metadata.extra, "pixel_size_nm": px, "profile": p.profile.name,
                  **_preparation(p.frame)},
        received_monotonic=p.job.received_monotonic, instances_capped=capped,
    )


def _preparation(frame: PreparedFrame) -> dict[str, object]:
    """How the frame was prepared, for the result's metadata: the input check (what the frame
    looks like, how it was used, whether the profile expected the other kind) and, with
    ``pixel_size_nm: auto``, the pixel size chosen (nm), how (``confidence``: the model's, 0-1;
    ``width``: the objects' width it came from, px)."""
    out: dict[str, object] = {}
    check = frame.input_check
    if check is not None:
        out |= {"input_looks_like": check.looks_like, "input_used": check.used, "input_mismatch": check.mismatch}
    if frame.auto_scale is not None:
        out |= {"pixel_size_auto_nm": round(frame.auto_scale.pixel_size_nm, 4),
                "pixel_size_auto_method": frame.auto_scale.method,
                "pixel_size_auto_confidence": frame.auto_scale.confidence,
                "object_width_px": frame.auto_scale.object_width_px}
    return out


def analyse_frame(job: FrameJob, model: LoadedModel, profiles: ProfileBook,
                  statistics: StatisticsConfig | None = None) -> FrameResult:
    """The whole pipeline for one frame (what the three stages do, in one call)."""
    return infer_and_measure(prepare(job, model, profiles), statistics=statistics)


@dataclass(frozen=True)
class Detected:
    """A prepared frame and its tiles' raw detections (what the engine found, nothing measured)."""

    prepared: Prepared
    detections: list[RawDetections]
    seconds: float  # the frame's share of the engine's time on its batch, s


def detect_batch(batch: Sequence[Prepared], pack_gap_px: int | None = None) -> list[Detected | Exception]:
    """The engine once on the tiles of frames prepared for one model (``Segmenter.detect_frames``;
    with ``pack_gap_px``, small frames packed several to a model input, ``detect_packed``), on an
    instance of the model no other batch holds (``LoadedModel.instance``): per frame, in order, its
    detections, or the exception it raised. When the engine fails on the batch, each frame runs
    alone, so a bad frame fails alone."""
    with batch[0].model.instance() as segmenter:
        return _detect(segmenter, batch, pack_gap_px)


def _detect(segmenter: Segmenter, batch: Sequence[Prepared], pack_gap_px: int | None) -> list[Detected | Exception]:
    t0 = time.perf_counter()
    try:
        if pack_gap_px is None:
            raws = segmenter.detect_frames([p.frame.inputs for p in batch])
        else:
            raws = segmenter.detect_packed([p.frame.inputs for p in batch], [p.frame.model_shape for p in batch],
                                           pack_gap_px)
    except Exception as err:
        if len(batch) == 1:
            return [err]
        return [out for p in batch for out in _detect(segmenter, [p], pack_gap_px)]
    seconds, tiles = time.perf_counter() - t0, max(sum(len(p.frame.inputs) for p in batch), 1)
    return [Detected(p, r, seconds * len(p.frame.inputs) / tiles) for p, r in zip(batch, raws)]


@dataclass(frozen=True)
class InFlight:
    """A batch on one of the model's other instances (``model.instances`` > 1): its frames and
    what ``detect_batch`` will return for them."""

    batch: list[Prepared]
    future: Future[list[Detected | Exception]]


def measure(d: Detected, statistics: StatisticsConfig | None = None) -> FrameResult:
    """Post-processing and statistics (summarised as ``statistics`` says) of a frame whose
    detections are known: ``find_instances`` and ``frame_statistics`` here, in this thread."""
    f = find_instances(d)
    return measured(f, frame_statistics(*f.statistics_inputs, statistics))


def analyse_batch(batch: Sequence[Prepared], statistics: StatisticsConfig | None = None
                  ) -> list[FrameResult | Exception]:
    """``detect_batch`` then ``measure``, in one call (what the infer and measure stages do):
    per frame, in order, its result or the exception it raised."""
    out: list[FrameResult | Exception] = []
    for d in detect_batch(batch):
        try:
            out.append(d if isinstance(d, Exception) else measure(d, statistics))
        except Exception as err:
            out.append(err)
    return out


class Intake:
    """Ingest's sink (``contracts.IngestSink``) and the stages' source: counts what comes in and
    enqueues it (never waiting on analysis); counts what is dropped or fails before output."""

    def __init__(self, cfg: QueueSection, metrics: DaemonMetrics) -> None:
        self.metrics = metrics
        self._losses: dict[str, Counter[str]] = {}  # run uid -> frames dropped/failed by reason, for its stop
        self._losses_lock = threading.Lock()
        self.block_timeout_s = cfg.block_timeout_s
        self.queue: FrameQueue[Item] = FrameQueue(cfg.size, cfg.policy, lambda i: isinstance(i, FrameJob), self.dropped)

    def run_started(self, ev: RunStarted) -> None:
        self.queue.put(ev)

    def frame(self, job: FrameJob) -> None:
        self.metrics.frames_received.inc()
        self.queue.put(job, timeout=self.block_timeout_s)
        self.metrics.queue_depth.set(len(self.queue))

    def run_stopped(self, ev: RunStopped) -> None:
        self.queue.put(ev)

    def rejected(self, reason: str, detail: str, logged: bool = True, count: int = 1) -> None:
        self.metrics.messages_rejected.labels(reason).inc(count)
        if logged:
            log("message_rejected", logging.WARNING, reason=reason, detail=detail[:500])

    def converted(self, reason: str, detail: str) -> None:
        self.metrics.frames_converted.labels(reason).inc()
        log("frame_converted", logging.INFO, reason=reason, detail=detail[:500])

    def _count_loss(self, run_uid: str, reason: str) -> None:
        with self._losses_lock:
            self._losses.setdefault(run_uid, Counter())[reason] += 1

    def pop_losses(self, run_uid: str) -> Counter[str]:
        """The run's frames dropped or failed so far, by reason (forgotten here)."""
        with self._losses_lock:
            return self._losses.pop(run_uid, Counter())

    def next_items(self, timeout: float, n: int) -> list[Item]:
        """Up to ``n`` of the items waiting for the stages, in order, or the first to come within
        ``timeout`` (s; []: idle); raises ``Closed`` once closed and empty."""
        items = self.queue.get_many(n, timeout)
        self.metrics.queue_depth.set(len(self.queue))
        return items

    def dropped(self, item: Item, reason: str) -> None:
        self.metrics.frames_dropped.labels(reason).inc()
        if isinstance(item, FrameJob):
            self._count_loss(item.run_uid, reason)
            log("frame_dropped", logging.WARNING, reason=reason, run=item.run_uid, frame=item.frame_uid)

    def failed(self, job: FrameJob, reason: str, detail: str) -> None:
        self.metrics.frames_failed.labels(reason).inc()
        self._count_loss(job.run_uid, reason)
        log("frame_failed", logging.WARNING, reason=reason, run=job.run_uid, frame=job.frame_uid, detail=detail[:500])

    def close(self) -> None:
        self.queue.close()


@dataclass
class StageCallbacks:
    """What the stages report to the service."""

    output: Callable[[list[Item | FrameResult]], None]  # run events and results, in order, as they come
    failed: Callable[[FrameJob, str, str], None]  # job, reason, detail
    model: Callable[[], LoadedModel]  # looked up once per frame, at preparation
    paused: Callable[[], bool]
    batched: Callable[[int], None] = lambda frames: None  # frames per engine batch
    statistics_remeasured: Callable[[int], None] = lambda frames: None  # frames re-measured after a worker died


STOP = object()


class Stages:
    """prepare -> infer -> measure -> output threads.

    ``source(timeout, n)`` takes up to ``n`` of the items already waiting at once (or the first
    to come within ``timeout`` s; [] when idle; raises ``Closed`` once closed and empty), so a
    busy daemon hands frames from thread to thread in groups rather than one at a time: each
    hand-off wakes a thread and passes Python's interpreter lock, which costs as much as the
    work on a small frame. Items travel between the stages as lists.

    The infer stage takes the prepared frames waiting for it, up to ``batching.max_batch``, the
    first waiting at most ``batching.max_wait_ms`` for more, and runs the engine once on them
    (``detect_batch``); a batch holds frames prepared for one model and ends at a run event, so
    results leave in the order the frames came. The measure stage (mask pasting, filters,
    statistics) runs beside it, so the engine never waits for them.

    With ``engine_instances`` N > 1 (``model.instances``) the infer stage hands each batch to
    one of N threads, each running it on an instance of the model that no other holds, and goes
    on to gather the next: N batches run at once. The measure stage takes them in the frames'
    order, waiting for a batch still running.

    With ``statistics_workers`` N > 0 the measure stage post-processes and hands each frame's
    statistics to a pool of N processes (``stats_pool``), and a fifth thread, collect, takes
    the results in the frames' order and passes them on: N frames are measured at once."""

    def __init__(self, source: Callable[[float, int], list[Item]], profiles: ProfileBook,
                 cb: StageCallbacks, inner_queue: int = 2, batching: BatchingSection | None = None,
                 statistics: StatisticsConfig | None = None, statistics_workers: int = 0,
                 engine_instances: int = 1) -> None:
        self.source, self.profiles, self.cb = source, profiles, cb
        self.statistics = statistics
        self.pool = (StatisticsPool(statistics_workers, statistics, cb.statistics_remeasured)
                     if statistics_workers > 0 else None)
        self.batching = batching or BatchingSection()
        # lists of up to max_batch items; about as many frames waiting between stages as one batch
        lists = max(1, max(inner_queue, self.batching.max_batch) // self.batching.max_batch)
        self.q_infer: queue.Queue[list[Item | Prepared] | object] = queue.Queue(lists)
        # batches running at once, beyond the one the measure stage waits for: one per instance
        self.q_measure: queue.Queue[list[Item | Detected | InFlight] | object] = queue.Queue(
            max(lists, engine_instances))
        self.engines = (ThreadPoolExecutor(engine_instances, thread_name_prefix="stage-infer-instance")
                        if engine_instances > 1 else None)
        self.q_out: queue.Queue[list[Item | FrameResult] | object] = queue.Queue(
            max(1, inner_queue // self.batching.max_batch))
        self.threads = [threading.Thread(target=self._prepare_loop, name="stage-prepare", daemon=True),
                        threading.Thread(target=self._infer_loop, name="stage-infer", daemon=True),
                        threading.Thread(target=self._measure_loop, name="stage-measure", daemon=True),
                        threading.Thread(target=self._output_loop, name="stage-output", daemon=True)]
        # frames whose statistics are in the pool's hands, in order: about two batches
        self.q_collect: queue.Queue[list[tuple[object, Pending | None]] | object] = queue.Queue(2)
        if self.pool is not None:
            self.threads.append(threading.Thread(target=self._collect_loop, name="stage-collect", daemon=True))
        self.heartbeat = time.monotonic()
        self._infer_stopped = False  # the infer stage has taken STOP
        self.scales = RunScales()

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def alive(self) -> bool:
        return all(t.is_alive() for t in self.threads)

    def _prepare_loop(self) -> None:
        while True:
            self.heartbeat = time.monotonic()
            if self.cb.paused():
                time.sleep(0.05)
                continue
            try:
                items = self.source(0.2, self.batching.max_batch)  # up to one batch
            except Closed:
                break
            out: list[Item | Prepared] = []
            for item in items:
                if isinstance(item, FrameJob):
                    try:
                        out.append(prepare(item, self.cb.model(), self.profiles, self.scales))
                    except FrameError as err:
                        self.cb.failed(item, err.reason, str(err))
                    except Exception as err:  # a bug must not kill the service: count and log it
                        self.cb.failed(item, "internal_error", f"{type(err).__name__}: {err}")
                else:
                    if isinstance(item, RunStopped):
                        self.scales.forget(item.run_uid)
                    out.append(item)
            if out:
                self.q_infer.put(out)
        self.q_infer.put(STOP)

    def _infer_loop(self) -> None:
        pending: deque[object] = deque()  # items taken from q_infer, in order
        while pending or not self._infer_stopped:
            if not pending:
                got = self.q_infer.get()
                if got is STOP:
                    break
                pending.extend(cast("list[object]", got))
            out: list[object] = []
            while pending and not isinstance(pending[0], Prepared):
                out.append(pending.popleft())  # run events pass in order
            if pending:
                batch = self._gather(pending)
                self.cb.batched(len(batch))
                gap = self.batching.pack_gap_px if self.batching.pack_small_frames else None
                if self.engines is not None and batch[0].model.instances > 1:
                    out.append(InFlight(batch, self.engines.submit(detect_batch, batch, gap)))
                else:
                    out.extend(self._detected(batch, detect_batch(batch, gap)))
            if out:
                self.q_measure.put(out)
        self.q_measure.put(STOP)
        if self.engines is not None:
            self.engines.shutdown(wait=False)

    def _detected(self, batch: Sequence[Prepared], found: list[Detected | Exception]) -> list[Detected]:
        """The frames of ``batch`` the engine ran on (``detect_batch``'s ``found``); the others failed."""
        out: list[Detected] = []
        for p, d in zip(batch, found):
            if isinstance(d, Detected):
                out.append(d)
            else:
                self._failed(p.job, d)
        return out

    def _landed(self, items: list[object]) -> Iterator[object]:
        """``items`` in order, each batch in flight as its frames' detections once it is done."""
        for item in items:
            if not isinstance(item, InFlight):
                yield item
                continue
            try:
                found = item.future.result()
            except Exception as err:  # a bug must not kill the service: the batch's frames fail, counted
                found = [err] * len(item.batch)
            yield from self._detected(item.batch, found)

    def _measure_loop(self) -> None:
        if self.pool is not None:
            self._measure_in_pool_loop(self.pool)
            return
        while True:
            items = self.q_measure.get()
            if items is STOP:
                break
            out: list[object] = []
            for item in self._landed(cast("list[object]", items)):
                if isinstance(item, Detected):
                    try:
                        out.append(measure(item, self.statistics))
                    except Exception as err:
                        self._failed(item.prepared.job, err)
                else:
                    out.append(item)
            if out:
                self.q_out.put(out)
        self.q_out.put(STOP)

    def _measure_in_pool_loop(self, pool: StatisticsPool) -> None:
        """Post-processing here, statistics handed to the pool; the collect stage waits for them."""
        while True:
            items = self.q_measure.get()
            if items is STOP:
                break
            out: list[tuple[object, Pending | None]] = []
            for item in self._landed(cast("list[object]", items)):
                if isinstance(item, Detected):
                    try:
                        f = find_instances(item)
                        out.append((f, pool.submit(*f.statistics_inputs)))
                    except Exception as err:
                        self._failed(item.prepared.job, err)
                else:
                    out.append((item, None))
            if out:
                self.q_collect.put(out)
        self.q_collect.put(STOP)

    def _collect_loop(self) -> None:
        """Each frame's statistics from the pool, in the frames' order, then on to the output."""
        pool = cast(StatisticsPool, self.pool)
        while True:
            entries = self.q_collect.get()
            if entries is STOP:
                break
            out: list[object] = []
            for item, pending in cast("list[tuple[object, Pending | None]]", entries):
                if pending is not None and out and not pending.future.done():
                    self.q_out.put(out)  # the results ready go on while the next one is measured
                    out = []
                if pending is None:
                    out.append(item)
                    continue
                f = cast(Found, item)
                try:
                    out.append(measured(f, pool.result(pending)))
                except Exception as err:
                    self._failed(f.prepared.job, err)
            if out:
                self.q_out.put(out)
        pool.close()
        self.q_out.put(STOP)

    def _failed(self, job: FrameJob, err: Exception) -> None:
        if isinstance(err, FrameError):
            self.cb.failed(job, err.reason, str(err))
        else:  # a bug must not kill the service: count and log it
            self.cb.failed(job, "internal_error", f"{type(err).__name__}: {err}")

    def _gather(self, pending: deque[object]) -> list[Prepared]:
        """The prepared frame first in ``pending`` and those for its model that follow, taken
        from ``pending`` and, within the wait, from the queue, up to ``max_batch``; the batch ends
        early at a run event or another model's frame (left first in ``pending``), or at STOP."""
        first = cast(Prepared, pending.popleft())
        batch = [first]
        deadline = time.monotonic() + self.batching.max_wait_ms / 1000
        while len(batch) < self.batching.max_batch:
            if not pending:
                if self._infer_stopped:
                    break
                try:
                    got = self.q_infer.get(timeout=max(deadline - time.monotonic(), 0.0))
                except queue.Empty:
                    break
                if got is STOP:
                    self._infer_stopped = True
                    break
                pending.extend(cast("list[object]", got))
            nxt = pending[0]
            if not (isinstance(nxt, Prepared) and nxt.model is first.model):
                break
            batch.append(cast(Prepared, pending.popleft()))
        return batch

    def _output_loop(self) -> None:
        while True:
            items = self.q_out.get()
            if items is STOP:
                break
            self.cb.output(cast("list[Item | FrameResult]", items))

    def join(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        for t in self.threads:
            t.join(max(deadline - time.monotonic(), 0))
        return not any(t.is_alive() for t in self.threads)
