"""The segmentation service: ingest -> queue -> stages -> sinks, plus operations.

``Service`` wires the parts and owns their lifecycle: ingest delivers to the ``Intake`` (which
only enqueues, so ingest never waits on analysis), the ``Stages`` prepare and analyse frames with
the model in the ``ModelSlot``, and the ``SinkChain`` hands results to the sinks listed in the
config (store, bluesky, summary; ``sinks.py``). Beside the path: the control socket, the metrics
endpoint, systemd notifications and the housekeeping (watchdog, run timeouts, store retries).
"""

from __future__ import annotations

import fcntl
import logging
import os
import threading
import time
from pathlib import Path
from typing import IO, Any

import zmq
from pydantic import BaseModel

from nanoseg.engines.onnx_engine import int8_saturation_risk
from nanoseg_daemon import control as ctl
from nanoseg_daemon.config import DaemonConfig, SinkName
from nanoseg_daemon.contracts import FrameResult, RunStopped
from nanoseg_daemon.growth import GrowthMonitor
from nanoseg_daemon.logs import log
from nanoseg_daemon.metrics import DaemonMetrics, MetricsServer
from nanoseg_daemon.model_slot import ModelSlot, load_configured, repo_relative
from nanoseg_daemon.pipeline import Intake, Item, ProfileBook, StageCallbacks, Stages
from nanoseg_daemon.publish import DocumentPublisher, SummaryPublisher
from nanoseg_daemon.sinks import BlueskySink, Sink, SinkChain, StoreSink, SummarySink
from nanoseg_daemon.store import ResultStore, default_path
from nanoseg_daemon.systemd_notify import SystemdNotifier
from nanoseg_daemon.zmq_ingest import ZmqIngest

STATE_LOCK = "daemon.lock"
"""The file in the state directory that one daemon holds locked (``flock``) while it runs."""


class StateDirInUse(RuntimeError):
    """Another daemon holds the state directory (its store and its open runs)."""


def lock_state_dir(state: Path) -> IO[str]:
    """Hold ``state``/daemon.lock exclusively (``flock``) for as long as the returned file stays
    open; the kernel releases it when the process ends, however it ends (SIGKILL included). The
    file holds the holder's pid, for the message.

    Raises
    ------
    StateDirInUse
        If another daemon (process, or a Service in this process) holds it: two daemons on one
        store would each close and take up the other's open runs at a restart.
    """
    f = open(state / STATE_LOCK, "a+", encoding="utf-8")  # noqa: SIM115 - held open for the daemon's life
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read(64).strip() or "unknown"
        f.close()
        raise StateDirInUse(f"{state} is in use by another nanoseg daemon (pid {holder}); give each daemon "
                            "its own store.state_dir") from None
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()}\n")
    f.flush()
    return f


class Service:
    def __init__(self, cfg: DaemonConfig) -> None:
        self.cfg = cfg
        self.metrics = DaemonMetrics()
        self.started = time.time()
        self.ctx: zmq.Context[Any] = zmq.Context()
        self.profiles = ProfileBook(cfg.profile)
        state = cfg.state_dir
        state.mkdir(parents=True, exist_ok=True)
        self._state_lock = lock_state_dir(state)  # one daemon per state dir: its store, its open runs
        try:
            m = cfg.model
            self._engine_cache = cfg.engine_cache
            self.slot = ModelSlot(load_configured(m, cfg.postprocess, self._engine_cache), cfg.postprocess)
            self._model_info()
            self.intake = Intake(cfg.queue, self.metrics)
            self.sinks = SinkChain([self._sink(name) for name in cfg.sink_names], self.metrics, cfg.store.max_pending,
                                   self.intake.pop_losses)
            self._paused = threading.Event()
            self._stopping = threading.Event()
            self._reload_lock = threading.Lock()
            self._reloading: tuple[str, float] | None = None  # (path, monotonic start) of the reload running
            self._mismatch_logged: set[str] = set()  # runs whose input mismatch is logged already
            self.stages = Stages(self.intake.next_items, self.profiles,
                                 StageCallbacks(self._output, self.intake.failed, lambda: self.slot.current,
                                                lambda: self._paused.is_set() and not self._stopping.is_set(),
                                                self.metrics.batch_size.observe,
                                                self.metrics.statistics_remeasured.inc),
                                 batching=cfg.batching, statistics=cfg.statistics,
                                 statistics_workers=cfg.statistics.workers, engine_instances=m.instances)
            self.control = ctl.ControlServer(self.ctx, cfg.control.address, self.handle_control, cfg.control.curve,
                                             on_reject=lambda r: self.metrics.messages_rejected.labels(r).inc())
            self.store = next((s.store for s in self.sinks.sinks if isinstance(s, StoreSink)), None)
            bluesky_sink = next((s for s in self.sinks.sinks if isinstance(s, BlueskySink)), None)
            if bluesky_sink is not None and self.store is not None:
                bluesky_sink.journal = self.store.analysis_opened
            self.ingest = ZmqIngest(cfg.ingest, self.intake, context=self.ctx, journal=self.store,
                                    run_lookup=self._run_lookup())
            self._resumed: dict[str, float] = {}  # runs taken up after a restart -> monotonic time then
            self.metrics_server = MetricsServer(self.metrics, cfg.metrics.host, cfg.metrics.port) if cfg.metrics.enabled else None
            self.notifier = SystemdNotifier()
        except BaseException:
            self._state_lock.close()  # a daemon that did not start holds nothing
            raise

    def _output(self, items: list[Item | FrameResult]) -> None:
        """The output stage: note a frame that does not look like its profile's input, then the sinks."""
        for item in items:
            if isinstance(item, FrameResult) and item.metadata.get("input_mismatch"):
                self._input_mismatch(item)
            elif isinstance(item, RunStopped):
                self._mismatch_logged.discard(item.run_uid)
        self.sinks.put_many(items)

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

    def _sink(self, name: SinkName) -> Sink:
        """Build the sink ``name`` from its config section."""
        cfg, hwm, curve = self.cfg, self.cfg.publish.send_hwm, self.cfg.publish.curve
        if name == "store":
            store = ResultStore(default_path(cfg.state_dir), synchronous=cfg.store.synchronous, max_bytes=cfg.store.max_bytes)
            return StoreSink(store, lambda: self.slot.current.version, self.metrics)
        if name == "bluesky":
            pb = cfg.publish.bluesky
            pub = DocumentPublisher(pb.address, bind=pb.bind, prefix=pb.prefix.encode(), serializer=pb.serializer,
                                    hwm=hwm, context=self.ctx, curve=curve)
            return BlueskySink(pub, GrowthMonitor(cfg.growth, self.metrics), self._processing, self.metrics)
        if name == "tiled" and cfg.tiled is not None:  # the config refuses sink tiled without its section
            from nanoseg_daemon.tiled_sink import TiledSink  # tiled is an optional dependency
            return TiledSink(cfg.tiled, self._processing)
        return SummarySink(SummaryPublisher(cfg.publish.summary.address, hwm=hwm, context=self.ctx, curve=curve),
                           self.metrics)

    def _run_lookup(self) -> Any:
        """Tiled, where a run whose start the daemon never saw is looked up (None: not configured)."""
        t = self.cfg.tiled
        if t is None or not t.recover_runs or not self.cfg.ingest.bluesky.enabled:
            return None
        from nanoseg_daemon.tiled_runs import TiledRunLookup  # tiled is an optional dependency
        return TiledRunLookup(t)

    def _processing(self) -> tuple[str, dict[str, Any]]:
        """The serving model's version and processing settings, for an analysis run's start."""
        return self.slot.current.describe(self.profiles.default)

    @property
    def doc_pub(self) -> DocumentPublisher | None:
        """The bluesky sink's publisher, if that sink is listed."""
        return next((s.publisher for s in self.sinks.sinks if isinstance(s, BlueskySink)), None)

    @property
    def summary_pub(self) -> SummaryPublisher | None:
        """The summary sink's publisher, if that sink is listed."""
        return next((s.publisher for s in self.sinks.sinks if isinstance(s, SummarySink)), None)

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        self._resume_runs()
        if self.metrics_server:
            self.metrics_server.start()
        self.stages.start()
        if self.stages.pool is not None and not self.stages.pool.wait_ready(60.0):
            log("statistics_workers_slow", logging.WARNING, workers=self.stages.pool.workers,
                detail="the statistics workers did not start within 60 s; frames wait for them")
        self.control.start()
        self.ingest.start()
        threading.Thread(target=self._housekeeping, name="housekeeping", daemon=True).start()
        self.metrics.set_ready(True)
        self.notifier.ready(f"serving {self.slot.current.version}")
        log("service_started", name=self.cfg.name, model=self.slot.current.version,
            engine=self.slot.current.engine, instances=self.slot.current.instances, control=self.control.address, sinks=self.cfg.sink_names,
            metrics_port=self.metrics_server.port if self.metrics_server else None)

    def stop(self, drain_timeout_s: float | None = None) -> bool:
        """Stop ingest, finish queued frames (within the drain timeout), flush and close the sinks."""
        if self._stopping.is_set():
            return True
        self._stopping.set()
        self.metrics.set_ready(False)
        self.notifier.stopping()
        self.ingest.stop()
        self.intake.close()
        self._paused.clear()
        drained = self.stages.join(drain_timeout_s if drain_timeout_s is not None else self.cfg.shutdown.drain_timeout_s)
        self.control.stop()
        lost = self.sinks.close()
        if self.metrics_server:
            self.metrics_server.stop()
        self.ctx.term()
        self._state_lock.close()  # the state directory is free for the next daemon
        log("service_stopped", drained=drained, unstored_results=lost, processed=self.sinks.processed)
        return drained and lost == 0

    def _resume_runs(self) -> None:
        """Take up the runs the store lists open (the daemon stopped or was killed during them):
        later frames go into the same analysis run, and ``resume_timeout_s`` closes one of which
        nothing comes. A run that cannot be taken up is closed at once, exit status ``abort``,
        with the reason (``_close_left_open``): a raw input run (the raw input cannot continue
        its frame numbering), any run while bluesky ingest is off, and a run the store holds
        unstopped without its start (rows that frames made for a start never stored). No run the
        store holds is left open; an analysis run published before the restart is closed with
        its own stop document."""
        if self.store is None:
            return
        bluesky_sink = next((s for s in self.sinks.sinks if isinstance(s, BlueskySink)), None)
        router = self.ingest.router
        for run in self.store.open_runs():
            if bluesky_sink is not None and run.analysis_start is not None and run.analysis_descriptor_uid:
                bluesky_sink.resume(run.run_uid, run.analysis_start, run.analysis_descriptor_uid, run.frames)
            if run.start_doc.get("nanoseg_input") == "raw":
                self._close_left_open(run.run_uid, "raw_input", "a raw input run is not taken up after a restart")
                continue
            if router is None:
                self._close_left_open(run.run_uid, "bluesky_ingest_disabled", "bluesky ingest is off now")
                continue
            router.resume(run.start_doc, run.descriptors, run.last_seq_num)
            self._resumed[run.run_uid] = time.monotonic()
            log("run_resumed", run=run.run_uid, stored_frames=run.frames,
                analysis_run=None if run.analysis_start is None else run.analysis_start.get("uid"))
        for uid in self.store.unlisted_open_runs():
            self._close_left_open(uid, "start_not_stored", "its start was not stored, so it cannot be taken up")

    def _close_left_open(self, run_uid: str, why: str, detail: str) -> None:
        """Close a run the store lists open that this daemon cannot take up: exit status
        ``abort``, the stop reason naming ``detail``; logged ``run_not_resumed`` with ``why``."""
        self.intake.run_stopped(RunStopped(run_uid, "abort", time.time(),
                                           reason=f"open when the daemon stopped; {detail}"))
        log("run_not_resumed", logging.WARNING, run=run_uid, reason=why, detail=detail)

    def _close_unresumed(self) -> None:
        """Close resumed runs that sent nothing within ``resume_timeout_s``: their stop came while down."""
        timeout = self.cfg.publish.resume_timeout_s
        open_runs = set(self.sinks.open_runs)
        for uid, since in list(self._resumed.items()):
            if self.sinks.has_frames(uid) or (uid not in open_runs and time.monotonic() - since > 5.0):
                del self._resumed[uid]  # resumed (or already closed)
            elif time.monotonic() - since > timeout:
                del self._resumed[uid]
                self.intake.queue.put(RunStopped(uid, "abort", time.time(), reason=(
                    f"open when the daemon stopped; nothing of it came within {timeout:g} s of the restart "
                    "(its stop was probably sent while the daemon was down)")))
                log("run_not_resumed", logging.WARNING, run=uid, reason="resume_timeout")

    def _housekeeping(self) -> None:
        """Watchdog pings while the stages live; time out runs whose stop never came; retry the store."""
        interval = self.notifier.watchdog_interval_s or 1.0
        while not self._stopping.wait(min(interval, 1.0)):
            if self.stages.alive():
                self.notifier.watchdog()
            if self.stages.pool is not None:
                self.metrics.statistics_workers.set(len(self.stages.pool.worker_pids()))
            self._close_unresumed()
            for uid in self.sinks.stale_runs(self.cfg.publish.run_stop_timeout_s):
                self.intake.queue.put(RunStopped(uid, "timeout", time.time()))
            self.sinks.retry()

    # -- control ---------------------------------------------------------------------------
    def _model_info(self) -> None:
        m = self.slot.current
        self.metrics.model_info.info({"version": m.version, "engine": m.engine, "device": m.device, "path": m.path,
                                      "instances": str(m.instances)})
        eng = m.segmenter.engine
        if m.device == "cpu" and int8_saturation_risk(getattr(eng, "precision", "float32"),
                                                      bool(getattr(eng, "int8_reduce_range", False))):
            log("int8_saturation_risk", logging.WARNING, model=m.version,
                detail="an int8 graph on a CPU without VNNI: its int8 products can saturate (measured mask AP "
                       "86.2 -> 83.9) and run no faster than float32; serve the float32 graph, or export with "
                       "nanoseg export --int8 --reduce-range")

    def status(self) -> dict[str, Any]:
        """The daemon's state as the control ``status`` reply's result (``reloading``: the reload in
        progress, or None)."""
        m = self.slot.current
        return {"name": self.cfg.name, "uptime_s": round(time.time() - self.started, 1),
                "paused": self._paused.is_set(), "model": {"version": m.version, "engine": m.engine,
                                                           "device": m.device, "path": m.path,
                                                           "instances": m.instances,
                                                           "mask_decoding": m.segmenter.engine.mask_decoding.model_dump()},
                "postprocess": m.segmenter.post.model_dump(mode="json"),
                "postprocess_configured": self.slot.configured.model_dump(mode="json", exclude_unset=True),
                "queue_depth": len(self.intake.queue), "sinks": self.cfg.sink_names,
                "open_runs": self.sinks.open_runs, "processed": self.sinks.processed,
                "pending_store": self.sinks.pending, "stages_alive": self.stages.alive(),
                "statistics_workers": self.stages.pool.worker_pids() if self.stages.pool else [],
                "reloading": self._reload_in_progress()}

    def _reload_in_progress(self) -> dict[str, Any] | None:
        """The reload running, ``{"path", "seconds"}`` (seconds so far), or None."""
        running = self._reloading
        if running is None:
            return None
        path, since = running
        return {"path": path, "seconds": round(time.monotonic() - since, 1)}

    def handle_control(self, req: BaseModel) -> dict[str, Any] | ctl.Deferred:
        """Serve one control request: the status after it, or (``reload_model``) a ``Deferred``
        the control server runs in a worker thread, so that other requests are served meanwhile."""
        if isinstance(req, ctl.PauseRequest):
            self._paused.set()
            self.metrics.paused.set(1)
        elif isinstance(req, ctl.ResumeRequest):
            self._paused.clear()
            self.metrics.paused.set(0)
        elif isinstance(req, ctl.ReloadRequest):
            return self._begin_reload(req)
        elif isinstance(req, ctl.SetRequest):
            updates = req.updates
            self.slot.set_postprocess(updates)
            log("postprocess_set", **updates)
        return self.status()

    def _begin_reload(self, req: ctl.ReloadRequest) -> ctl.Deferred:
        """Admit ``req`` as the one reload in progress and hand its work to a control worker; a
        reload while another runs is refused at once (``CommandFailed``), counted as
        ``messages_rejected{reason="reload_in_progress"}``, and nothing is queued."""
        with self._reload_lock:
            running = self._reloading
            if running is None:
                self._reloading = (req.path, time.monotonic())
        if running is not None:
            path, since = running
            seconds = round(time.monotonic() - since, 1)
            self.metrics.messages_rejected.labels(ctl.RELOAD_IN_PROGRESS).inc()
            log("model_reload_refused", logging.WARNING, path=req.path, reloading=path, seconds=seconds)
            raise ctl.CommandFailed(f"a reload is in progress: {path}, {seconds:g} s so far; "
                                    "send reload_model again when it has finished")
        return ctl.Deferred(lambda: self._reload(req), name="model-reload", not_started=self._reload_ended)

    def _reload_ended(self) -> None:
        """The reload in progress has ended (or never started): the next one may begin."""
        with self._reload_lock:
            self._reloading = None

    def _reload(self, req: ctl.ReloadRequest) -> dict[str, Any]:
        """Load, verify and warm up ``req``'s model beside the serving one and swap it in (in a
        control worker thread); the status after it. A failed reload is counted and logged, and
        raises ``CommandFailed``; the old model goes on serving."""
        m = self.cfg.model
        old = self.slot.current.version
        try:
            try:
                new = self.slot.reload(repo_relative(req.path), m.engine, m.device, m.threads, None,
                                       req.sha256, self._engine_cache, m.triton_target(), m.mask_tta,
                                       m.max_detections, m.null_detections, m.instances)
            except Exception as err:
                self.metrics.model_reloads.labels("failed").inc()
                log("model_reload_failed", logging.ERROR, path=req.path, error=f"{type(err).__name__}: {err}",
                    serving=old)
                # counted here as the failed reload; the request itself was well-formed
                raise ctl.CommandFailed(f"reload failed, still serving {old}: {type(err).__name__}: {err}") from None
            self.metrics.model_reloads.labels("ok").inc()
            self._model_info()
            log("model_reloaded", old=old, new=new.version, warmup_s=round(new.warmup_seconds, 3))
        finally:
            self._reload_ended()
        if self._stopping.is_set():  # finished during or after stop: the stopped parts are not asked
            return {"model": {"version": new.version}, "stopping": True}  # for a status
        return self.status()
