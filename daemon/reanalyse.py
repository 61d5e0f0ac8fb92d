"""``nanoseg reanalyse RUN_UID --tiled URL [--model M] [--profile P]``: a finished raw run from Tiled,
analysed again (usually with a newer model) into a new analysis run in Tiled.

The run is read as the RunEngine's TiledWriter stored it (``tiled_runs``: start, descriptors, the
image of every event, one frame at a time) and goes through the daemon's own path: the bluesky
router (start metadata, image fields, colour and shape checks, size limits), the stages' frame
path (``prepare`` with the run's scale, ``infer_and_measure``: ``Segmenter.analyse``, statistics)
with the configured model, and the ``tiled`` sink,
which writes the analysis run beside the raw run exactly as the daemon does (start with
``raw_run_uid``, label images, particle tables, stop with exit status and reason). Settings come
from the daemon's config (``--config``, ``--set``, ``NANOSEG__...``): model, profile,
postprocess, ingest.bluesky and the ``tiled`` section (``raw_path``: where the raw runs are,
``path``: where analysis runs go; API key from ``NANOSEG__TILED__API_KEY``).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import sys
import time
from collections import Counter
from dataclasses import dataclass, field

from nanoseg.config_io import ConfigError, parse_sets
from nanoseg.errors import FrameError
from nanoseg.masks import encode_rle_batch
from nanoseg_daemon.bluesky_ingest import BlueskyRouter
from nanoseg_daemon.config import DaemonConfig, load_daemon_config
from nanoseg_daemon.contracts import FrameJob, RunStarted, RunStopped
from nanoseg_daemon.logs import log, setup_logging
from nanoseg_daemon.model_slot import LoadedModel, load_configured
from nanoseg_daemon.pipeline import ProfileBook, RunScales, infer_and_measure, prepare
from nanoseg_daemon.publish import stop_status
from nanoseg_daemon.sinks import SinkError
from nanoseg_daemon.tiled_sink import TiledSink


class ReanalysisError(Exception):
    """A run that cannot be reanalysed (not in Tiled, not finished, no tiled section)."""


@dataclass
class Reanalysis:
    """What a reanalysis wrote: the new analysis run's uid (its key in ``tiled.path``) and counts."""

    raw_run_uid: str
    analysis_uid: str = ""
    frames: int = 0
    losses: Counter[str] = field(default_factory=Counter)
    exit_status: str = ""
    reason: str = ""
    error: str = ""  # why the analysis run could not be made in Tiled
    stopped: bool = False  # the analysis run's stop is written


class _Analyse:
    """The router's IngestSink: each frame analysed at once, results to the tiled sink."""

    def __init__(self, model: LoadedModel, profiles: ProfileBook, sink: TiledSink, profile: str | None,
                 out: Reanalysis) -> None:
        self.model, self.profiles, self.sink, self.profile, self.out = model, profiles, sink, profile, out
        self.scales = RunScales()  # pixel_size_nm auto: chosen once per run, as the daemon's stages do

    def run_started(self, ev: RunStarted) -> None:
        try:
            self.sink.open_run(ev)
            self.out.analysis_uid = self.sink.analysis_key(ev.run_uid)
        except SinkError as err:
            self.out.error = str(err)

    def frame(self, job: FrameJob) -> None:
        if self.profile is not None:  # --profile: for every frame, over the run's own
            job = dataclasses.replace(job, metadata=dataclasses.replace(job.metadata, profile=self.profile))
        try:
            result = infer_and_measure(prepare(job, self.model, self.profiles, self.scales))
        except FrameError as err:
            self.out.losses[err.reason] += 1
            log("frame_failed", logging.WARNING, reason=err.reason, frame=job.frame_uid, detail=str(err)[:300])
            return
        try:
            self.sink.write_frame(result, encode_rle_batch(result.instances.box_masks))
        except SinkError as err:
            self.out.losses[err.reason] += 1
            log("frame_not_written", logging.ERROR, reason=err.reason, frame=job.frame_uid, detail=err.detail[:300])
            return
        self.out.frames += 1

    def run_stopped(self, ev: RunStopped) -> None:
        losses = Counter(ev.rejected) + self.out.losses
        self.out.exit_status, self.out.reason = stop_status(ev.exit_status, ev.reason, self.out.frames, losses)
        self.sink.close_run(dataclasses.replace(ev, rejected=dict(losses)))
        self.out.stopped = True

    def rejected(self, reason: str, detail: str, logged: bool = True,  # counted in the run's stop
                 count: int = 1) -> None:
        if logged:
            log("message_rejected", logging.WARNING, reason=reason, detail=detail[:300])

    def converted(self, reason: str, detail: str) -> None:
        log("frame_converted", reason=reason, detail=detail[:300])


def reanalyse(cfg: DaemonConfig, run_uid: str, profile: str | None = None) -> Reanalysis:
    """Analyse the finished raw run ``run_uid`` from Tiled again; write a new analysis run there.

    Parameters
    ----------
    cfg
        The daemon's config: ``tiled`` (server, ``raw_path``, ``path``), model, profile,
        postprocess and ``ingest.bluesky`` (image key, size limits, colour frames).
    run_uid
        The raw run's start uid.
    profile
        Frame profile for every frame; None = the run's ``nanoseg_profile``, else ``cfg.profile``.

    Returns
    -------
    Reanalysis
        The new analysis run's uid, frames analysed, losses by reason, its exit status and reason.
    """
    import httpx

    from nanoseg_daemon.tiled_runs import connect, raw_frames, read_run

    if cfg.tiled is None:
        raise ReanalysisError("no Tiled server: give --tiled URL (or a tiled section)")
    try:
        raw = read_run(connect(cfg.tiled, cfg.tiled.raw_path), run_uid)
    except KeyError as err:
        raise ReanalysisError(f"tiled.raw_path {cfg.tiled.raw_path}: no such container ({err})") from None
    except httpx.HTTPError as err:  # unreachable, not an http(s) URL, refused API key, server error
        raise ReanalysisError(f"Tiled at {cfg.tiled.uri}: {_http_error(err)}; nothing was written") from None
    if raw is None:
        raise ReanalysisError(f"run {run_uid} is not in Tiled under {'/'.join(cfg.tiled.raw_path) or 'the root'}")
    if not raw.stopped:
        raise ReanalysisError(f"run {run_uid} has no stop in Tiled yet: reanalyse a finished run")
    # frames one after the other: one instance of the network whatever model.instances says
    model = load_configured(cfg.model.model_copy(update={"instances": 1}), cfg.postprocess, cfg.engine_cache)
    profiles = ProfileBook(profile or cfg.profile)
    sink = TiledSink(cfg.tiled, lambda: model.describe(profiles.default))
    out = Reanalysis(run_uid)
    bluesky = cfg.ingest.bluesky.model_copy(update={"early_documents_s": 0.0})  # everything comes in order
    router = BlueskyRouter(_Analyse(model, profiles, sink, profile, out), bluesky)
    router("start", raw.start)
    if not out.analysis_uid:
        raise ReanalysisError(f"cannot write the analysis run into Tiled: {out.error or 'the start was refused'}")
    try:
        for desc in raw.descriptors:
            router("descriptor", desc)
        for name, doc in raw_frames(raw, bluesky.image_key):
            router(name, doc)
    except httpx.HTTPError as err:  # Tiled went away while the raw frames were read
        with contextlib.suppress(Exception):  # the analysis run ends `fail` where Tiled still takes it
            router("stop", {"uid": f"{run_uid}-reanalysis-failed", "run_start": run_uid, "time": time.time(),
                            "exit_status": "fail"})
        with contextlib.suppress(Exception):
            sink.close()
        ended = "ended `fail`" if out.stopped else "left without a stop (Tiled did not take it)"
        raise ReanalysisError(f"Tiled at {cfg.tiled.uri} failed while reading run {run_uid} after "
                              f"{out.frames} frames: {_http_error(err)}; the analysis run {out.analysis_uid} "
                              f"was {ended}; reanalyse again") from None
    stop = dict(raw.node.metadata["stop"])
    router("stop", {**stop, "run_start": run_uid, "time": time.time()})  # the analysis ends now
    sink.close()
    return out


def _http_error(err: Exception) -> str:
    """One line of an httpx error: its type and message (a refused connection, HTTP 401...)."""
    return f"{type(err).__name__}: {str(err).splitlines()[0].rstrip('.') if str(err) else 'no detail'}"


def cmd_reanalyse(args: argparse.Namespace) -> int:
    sets = parse_sets(args.set or [])
    for key, value in (("tiled.uri", args.tiled), ("model.path", args.model)):
        if value:
            sets[key] = value
    try:
        cfg = load_daemon_config(args.config, sets)
    except ConfigError as err:
        print(f"nanoseg reanalyse: {err}", file=sys.stderr)
        return 2
    setup_logging(cfg.log.level, cfg.log.json_lines)
    try:
        done = reanalyse(cfg, args.run_uid, args.profile)
    except ReanalysisError as err:
        print(f"nanoseg reanalyse: {err}", file=sys.stderr)
        return 2
    losses = ", ".join(f"{k} {v}" for k, v in sorted(done.losses.items()))
    print(f"nanoseg reanalyse: run {done.raw_run_uid}: {done.frames} frames analysed"
          + (f", lost: {losses}" if losses else "") + f"; exit status {done.exit_status}"
          + (f" ({done.reason})" if done.reason else ""), file=sys.stderr)
    print(done.analysis_uid)
    return 0 if done.exit_status == "success" else 1
