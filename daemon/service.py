"""The segmentation service: ingest -> queue -> stages -> store -> publish, plus operations.

``Service`` implements the ingest sink (it only enqueues, so ingest never waits on analysis),
owns the model slot, the result store and the publishers, answers the control socket, exports
metrics and talks to systemd. Results are stored before they are published; while the store
fails, results wait in memory (bounded) and are retried in order, together with the starts and
stops of their runs (a run's stop is published only once it and the run's results are stored).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any, TypeAlias

import zmq
from pydantic import BaseModel

from nanoseg.masks import RLE, encode_rle_batch
from nanoseg_daemon import control as ctl
from nanoseg_daemon.config import DaemonConfig
from nanoseg_daemon.contracts import FrameJob, FrameResult, RunStarted, RunStopped
from nanoseg_daemon.growth import GrowthMonitor
from nanoseg_daemon.logs import log
from nanoseg_daemon.metrics import DaemonMetrics, MetricsServer
from nanoseg_daemon.model_slot import ModelSlot, load_model
from nanoseg_daemon.pipeline import Item, ProfileBook, StageCallbacks, Stages, repo_relative
from nanoseg_daemon.publish import AnalysisRun, DocumentPublisher, SummaryPublisher
from nanoseg_daemon.queueing import FrameQueue
from nanoseg_daemon.store import ResultStore, StoreError, default_path
from nanoseg_daemon.systemd_notify import SystemdNotifier
from nanoseg_daemon.zmq_ingest import ZmqIngest

Pending: TypeAlias = tuple[FrameResult, list[RLE]] | RunStarted | RunStopped  # what waits for the store


def _describe(item: Pending) -> str:
    return item[0].frame_uid if isinstance(item, tuple) else f"{type(item).__name__} {item.run_uid}"


class Service:
    def __init__(self, cfg: DaemonConfig) -> None:
        self.cfg = cfg
        self.metrics = DaemonMetrics()
        self.growth = GrowthMonitor(cfg.growth, self.metrics)
        self.started = time.time()
        self.ctx: zmq.Context[Any] = zmq.Context()
        self.profiles = ProfileBook(cfg.profile)
        state = cfg.state_dir
        state.mkdir(parents=True, exist_ok=True)
        m = cfg.model
        self._engine_cache = Path(m.engine_cache_dir).expanduser() if m.engine_cache_dir else state / "engines"
        model = load_model(repo_relative(m.path), m.engine, m.device, m.threads, cfg.postprocess,
                           repo_relative(m.onnx_path) if m.onnx_path else None, m.sha256, self._engine_cache,
                           m.triton_target(), m.mask_tta, m.max_detections)
        self.slot = ModelSlot(model, cfg.postprocess)
        self._model_info()
        self.store = ResultStore(default_path(state), synchronous=cfg.store.synchronous, max_bytes=cfg.store.max_bytes)
        self.queue: FrameQueue[Item] = FrameQueue(cfg.queue.size, cfg.queue.policy,
                                                  lambda i: isinstance(i, FrameJob), self._dropped)
        self.stages = Stages(self._next_item, self.profiles,
                             StageCallbacks(self._output, self._failed, lambda: self.slot.current, self._is_paused))
        pb, hwm, curve = cfg.publish.bluesky, cfg.publish.send_hwm, cfg.publish.curve
        self.doc_pub = (DocumentPublisher(pb.address, bind=pb.bind, prefix=pb.prefix.encode(), serializer=pb.serializer,
                                          hwm=hwm, context=self.ctx, curve=curve) if pb.enabled else None)
        self.summary_pub = (SummaryPublisher(cfg.publish.summary.address, hwm=hwm, context=self.ctx, curve=curve)
                            if cfg.publish.summary.enabled else None)
        self.control = ctl.ControlServer(self.ctx, cfg.control.address, self.handle_control, cfg.control.curve,
                                         on_reject=lambda r: self.metrics.messages_rejected.labels(r).inc())
        self.ingest = ZmqIngest(cfg.ingest, self, context=self.ctx)
        self.metrics_server = MetricsServer(self.metrics, cfg.metrics.host, cfg.metrics.port) if cfg.metrics.enabled else None
        self.notifier = SystemdNotifier()
        self._paused = threading.Event()
        self._stopping = threading.Event()
        self._runs: dict[str, AnalysisRun] = {}
        self._run_meta: dict[str, RunStarted] = {}
        self._last_activity: dict[str, float] = {}
        self._mismatch_logged: set[str] = set()  # runs whose input mismatch is logged already
        self._pending: deque[Pending] = deque()  # waiting for the store, in output order
        self._lock = threading.Lock()
        self._processed = 0

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        if self.metrics_server:
            self.metrics_server.start()
        self.stages.start()
        self.control.start()
        self.ingest.start()
        threading.Thread(target=self._housekeeping, name="housekeeping", daemon=True).start()
        self.metrics.ready.set(1)
        self.notifier.ready(f"serving {self.slot.current.version}")
        log("service_started", name=self.cfg.name, model=self.slot.current.version,
            engine=self.slot.current.engine, control=self.control.address,
            metrics_port=self.metrics_server.port if self.metrics_server else None)

    def stop(self, drain_timeout_s: float | None = None) -> bool:
        """Stop ingest, finish queued frames (within the drain timeout), flush and close."""
        if self._stopping.is_set():
            return True
        self._stopping.set()
        self.metrics.ready.set(0)
        self.notifier.stopping()
        self.ingest.stop()
        self.queue.close()
        self._paused.clear()
        drained = self.stages.join(drain_timeout_s if drain_timeout_s is not None else self.cfg.shutdown.drain_timeout_s)
        with self._lock:
            self._flush_pending()
            lost = len(self._pending)
        self.control.stop()
        for pub in (self.doc_pub, self.summary_pub):
            if pub is not None:
                pub.close()
        self.store.close()
        if self.metrics_server:
            self.metrics_server.stop()
        self.ctx.term()
        log("service_stopped", drained=drained, unstored_results=lost, processed=self._processed)
        return drained and lost == 0

    # -- ingest sink (called from the ingest thread: enqueue only) -------------------------
    def run_started(self, ev: RunStarted) -> None:
        self.queue.put(ev)

    def frame(self, job: FrameJob) -> None:
        self.metrics.frames_received.inc()
        self.queue.put(job, timeout=self.cfg.queue.block_timeout_s)
        self.metrics.queue_depth.set(len(self.queue))

    def run_stopped(self, ev: RunStopped) -> None:
        self.queue.put(ev)

    def rejected(self, reason: str, detail: str) -> None:
        self.metrics.messages_rejected.labels(reason).inc()
        log("message_rejected", logging.WARNING, reason=reason, detail=detail[:500])

    # -- stage callbacks -------------------------------------------------------------------
    def _next_item(self, timeout: float) -> Item | None:
        item = self.queue.get(timeout)
        self.metrics.queue_depth.set(len(self.queue))
        return item

    def _is_paused(self) -> bool:
        return self._paused.is_set() and not self._stopping.is_set()

    def _dropped(self, item: Item, reason: str) -> None:
        self.metrics.frames_dropped.labels(reason).inc()
        if isinstance(item, FrameJob):
            log("frame_dropped", logging.WARNING, reason=reason, run=item.run_uid, frame=item.frame_uid)

    def _failed(self, job: FrameJob, reason: str, detail: str) -> None:
        self.metrics.frames_failed.labels(reason).inc()
        log("frame_failed", logging.WARNING, reason=reason, run=job.run_uid, frame=job.frame_uid, detail=detail[:500])

    def _output(self, item: Item | FrameResult) -> None:
        """Runs in the output stage thread, in order: store first, then publish."""
        with self._lock:
            if isinstance(item, RunStarted):
                self._open_run(item)
            elif isinstance(item, FrameResult):
                self._pending.append((item, encode_rle_batch(item.instances.masks)))
                self._flush_pending()
            else:
                self._close_run(item.run_uid, item.exit_status)

    def _open_run(self, ev: RunStarted) -> None:
        self._run_meta[ev.run_uid] = ev
        self._last_activity[ev.run_uid] = time.monotonic()
        self.metrics.open_runs.set(len(self._run_meta))
        self._pending.append(ev)  # stored in order with the run's results, retried like them
        self._flush_pending()

    def _analysis_run(self, run_uid: str) -> AnalysisRun:
        run = self._runs.get(run_uid)
        if run is None:
            m = self.slot.current
            ev = self._run_meta.get(run_uid)
            processing = {"profile": self.profiles.default, "engine": m.engine,
                          "postprocess": m.segmenter.post.model_dump(mode="json")}
            run = AnalysisRun(run_uid, m.version, processing,
                              raw_metadata=ev.metadata.extra if ev else None)
            self._runs[run_uid] = run
            for name, doc in run.opening():
                self._publish_doc(name, doc)
        return run

    def _store(self, item: Pending) -> bool:
        """Write one pending item; False for a frame already stored. Raises StoreError."""
        if isinstance(item, RunStarted):
            self.store.add_run(item, self.slot.current.version)
            return True
        if isinstance(item, RunStopped):
            self.store.stop_run(item)
            return True
        return self.store.add_frame(*item)

    def _flush_pending(self) -> None:
        """Store what waits, oldest first, publishing each item once stored; stop at a store error."""
        while self._pending:
            item = self._pending[0]
            try:
                stored = self._store(item)
            except StoreError as err:
                self.metrics.store_errors.labels(err.reason).inc()
                log("store_error", logging.ERROR, reason=err.reason, detail=str(err), item=_describe(item),
                    pending=len(self._pending))
                while len(self._pending) > self.cfg.store.max_pending:
                    self._lose(self._pending.popleft())
                return
            self._pending.popleft()
            if isinstance(item, RunStopped):
                self._finish_run(item)
            elif isinstance(item, tuple):
                if stored:
                    self._publish_result(*item)
                else:
                    self.metrics.frames_dropped.labels("duplicate").inc()

    def _lose(self, item: Pending) -> None:
        log("result_lost", logging.ERROR, item=_describe(item), reason="store_overflow")
        if isinstance(item, tuple):
            self.metrics.frames_failed.labels("store_overflow").inc()
        elif isinstance(item, RunStopped):
            self._finish_run(item)  # unstored, but its analysis run still ends

    def _publish_result(self, result: FrameResult, rles: list[RLE]) -> None:
        """Count the stored result, then publish it (so counters never lag what subscribers see)."""
        self._last_activity[result.run_uid] = time.monotonic()
        self._processed += 1
        self.metrics.frames_processed.inc()
        self.metrics.particles.observe(result.summary.count)
        self.metrics.last_frame.set(time.time())
        for stage, seconds in result.timings.items():
            self.metrics.stage_seconds.labels(stage).observe(seconds)
        run = self._analysis_run(result.run_uid)
        if result.metadata.get("input_mismatch"):
            self._input_mismatch(result)
        try:
            name, doc = run.event(result, rles)
            self._publish_doc(name, doc)
        except ValueError as err:  # out of order within a run: stored, not published as an event
            log("event_not_published", logging.WARNING, frame=result.frame_uid, detail=str(err))
        for name, doc in self.growth.observe(result, run.start_doc):  # alarms stream of the analysis run
            self._publish_doc(name, doc)
        if self.summary_pub is not None and not self.summary_pub.publish(result):
            self.metrics.publish_dropped.labels("summary").inc()
        if result.received_monotonic > 0:  # 0.0: a result built without an ingest time
            self.metrics.latency_seconds.observe(time.monotonic() - result.received_monotonic)

    def _input_mismatch(self, result: FrameResult) -> None:
        """Count a frame that does not look like its profile's input; log it once per run."""
        looks_like = str(result.metadata.get("input_looks_like"))
        self.metrics.frames_input_mismatch.labels(looks_like).inc()
        if result.run_uid not in self._mismatch_logged:
            self._mismatch_logged.add(result.run_uid)
            log("input_mismatch", logging.WARNING, run=result.run_uid, frame=result.frame_uid,
                profile=result.metadata.get("profile"), looks_like=looks_like,
                detail="the frame looks like the other kind of input than the profile expects "
                       "(transmission: bright background; optical_density: dark); check the profile, "
                       "or use one with input: auto")

    def _publish_doc(self, name: str, doc: dict[str, Any]) -> None:
        if self.doc_pub is not None and not self.doc_pub(name, doc):
            self.metrics.publish_dropped.labels("bluesky").inc()

    def _close_run(self, run_uid: str, exit_status: str) -> None:
        """Store the stop after the run's pending results; _finish_run publishes it once stored."""
        self._last_activity.pop(run_uid, None)  # closing: the housekeeping must not time it out too
        self._pending.append(RunStopped(run_uid, exit_status, time.time()))
        self._flush_pending()

    def _finish_run(self, ev: RunStopped) -> None:
        run = self._analysis_run(ev.run_uid)
        stop = run.stop(ev.exit_status)
        if stop is not None:
            self._publish_doc(*stop)
        self._runs.pop(ev.run_uid, None)
        self._run_meta.pop(ev.run_uid, None)
        self._last_activity.pop(ev.run_uid, None)
        self._mismatch_logged.discard(ev.run_uid)
        self.metrics.open_runs.set(len(self._run_meta))
        log("run_closed", run=ev.run_uid, exit_status=ev.exit_status)

    def _housekeeping(self) -> None:
        """Watchdog pings while the stages live; time out runs whose stop never came; retry the store."""
        interval = self.notifier.watchdog_interval_s or 1.0
        while not self._stopping.wait(min(interval, 1.0)):
            if self.stages.alive():
                self.notifier.watchdog()
            now = time.monotonic()
            stale = [u for u, t in list(self._last_activity.items()) if now - t > self.cfg.publish.run_stop_timeout_s]
            for uid in stale:
                self._last_activity.pop(uid, None)
                self.queue.put(RunStopped(uid, "timeout", time.time()))
            if self._pending:
                with self._lock:
                    self._flush_pending()

    # -- control ---------------------------------------------------------------------------
    def _model_info(self) -> None:
        m = self.slot.current
        self.metrics.model_info.info({"version": m.version, "engine": m.engine, "device": m.device, "path": m.path})

    def status(self) -> dict[str, Any]:
        m = self.slot.current
        return {"name": self.cfg.name, "uptime_s": round(time.time() - self.started, 1),
                "paused": self._paused.is_set(), "model": {"version": m.version, "engine": m.engine,
                                                           "device": m.device, "path": m.path,
                                                           "mask_decoding": m.segmenter.engine.mask_decoding.model_dump()},
                "postprocess": m.segmenter.post.model_dump(mode="json"),
                "postprocess_configured": self.slot.configured.model_dump(mode="json", exclude_unset=True),
                "queue_depth": len(self.queue),
                "open_runs": sorted(self._run_meta), "processed": self._processed,
                "pending_store": len(self._pending), "stages_alive": self.stages.alive()}

    def handle_control(self, req: BaseModel) -> dict[str, Any]:
        if isinstance(req, ctl.PauseRequest):
            self._paused.set()
            self.metrics.paused.set(1)
        elif isinstance(req, ctl.ResumeRequest):
            self._paused.clear()
            self.metrics.paused.set(0)
        elif isinstance(req, ctl.ReloadRequest):
            m = self.cfg.model
            old = self.slot.current.version
            try:
                new = self.slot.reload(repo_relative(req.path), m.engine, m.device, m.threads, None,
                                       req.sha256, self._engine_cache, m.triton_target(), m.mask_tta,
                                       m.max_detections)
            except Exception as err:
                self.metrics.model_reloads.labels("failed").inc()
                log("model_reload_failed", logging.ERROR, path=req.path, error=f"{type(err).__name__}: {err}",
                    serving=old)
                raise ValueError(f"reload failed, still serving {old}: {type(err).__name__}: {err}") from None
            self.metrics.model_reloads.labels("ok").inc()
            self._model_info()
            log("model_reloaded", old=old, new=new.version, warmup_s=round(new.warmup_seconds, 3))
        elif isinstance(req, ctl.SetRequest):
            updates = req.updates
            self.slot.set_postprocess(updates)
            log("postprocess_set", **updates)
        return self.status()
