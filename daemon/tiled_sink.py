"""Sink ``tiled``: analysis runs written into a Tiled catalog, beside the raw runs.

Layout, per analysis run (one container, keyed by the analysis run's start uid)::

    <tiled.path>/<analysis uid>          metadata: start (the analysis start document, as the
                                         bluesky sink's: raw_run_uid, model_version, processing,
                                         raw_metadata), stop (exit_status and reason as the bluesky
                                         sink's stop, time, num_frames, losses by reason)
        labels/<seq_num:06d>             uint16 (H, W) label image: 0 background, instance i -> i + 1;
                                         metadata: frame_uid, timestamp, model_version, summary
        particles/<seq_num:06d>          table, one row per instance (label = i + 1): score, box
                                         (x0, y0, x1, y1 px) and the particle statistics columns

Where masks overlap, the later instance (higher label) owns the shared pixels in the label image;
the store keeps every mask whole (COCO RLE). Tiled clients read the arrays and tables directly
(``from_uri(url)[uid]["labels"]["000001"].read()``).

The sink is not durable: a Tiled outage is counted (``sink_errors_total{sink="tiled", reason}``:
``tiled_unreachable``, ``tiled_rejected``) and never holds back the store. After an unreachable
server the sink does not try it again for ``tiled.retry_after_s`` (items in between are counted
``tiled_unreachable`` at once), so a server that times out does not slow the output stage at
every item. Every client call runs in the sink's own worker thread and is given up after
``tiled.timeout_s`` (wall clock, tiled's own retries included: its client retries a failed request
up to ``TILED_RETRY_ATTEMPTS``, default 10, within ``TILED_RETRY_TIMEOUT``, 45 s), so one outage
stalls the output stage, and with it the store and the bus, ``tiled.timeout_s`` at most. A call
given up on is counted ``tiled_unreachable``; while it is still unanswered no other is started
(one thread, no backlog), and it may still complete on the server (a frame counted failed may be
there all the same). A frame whose run's container could not be made is counted
``tiled_no_run``; an outage in the middle of a run leaves that run's container without the frames
in between (the store has them).

A server that comes back without the run's container (restarted with a fresh catalog, e.g.
``tiled serve catalog --temp``, or its catalog lost) answers 404 for it: the sink then makes the
container of each open run again, at its next frame or stop, with the start metadata it wrote
first and a note ``recreated`` (time, ``frames_missing``: the frames written there before, gone
with the old catalog, which the store has), and logs ``tiled_run_recreated`` (WARNING); the rest
of the run and its stop go to the new container. A run started after such a restart makes the
container path (``tiled.path``) again.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

import numpy as np

from nanoseg.codec import json_safe
from nanoseg.masks import RLE
from nanoseg_daemon.config import TiledSection
from nanoseg_daemon.contracts import FrameResult, RunStarted, RunStopped
from nanoseg_daemon.logs import log
from nanoseg_daemon.publish import AnalysisRun, stop_status
from nanoseg_daemon.sinks import SinkError

KEY_DIGITS = 6
"""Frame keys are the zero-padded seq_num, so keys sort in frame order."""


def frame_key(seq_num: int) -> str:
    """The key of frame ``seq_num`` (1-based) under ``labels`` and ``particles``."""
    return f"{seq_num:0{KEY_DIGITS}d}"


def label_image(result: FrameResult) -> np.ndarray:
    """The frame's instances as one uint16 (H, W) label image.

    Parameters
    ----------
    result
        One frame's result; instances in original frame pixels.

    Returns
    -------
    numpy.ndarray
        uint16, 0 = background, instance i -> i + 1; overlapping pixels go to the higher label.
    """
    masks = result.instances.box_masks
    if len(masks) > np.iinfo(np.uint16).max:
        raise ValueError(f"{len(masks)} instances do not fit a uint16 label image")
    out = np.zeros(masks.image_shape, np.uint16)
    for i, ((y, x), crop) in enumerate(zip(masks.offsets, masks.crops)):
        window = out[y:y + crop.shape[0], x:x + crop.shape[1]]
        window[crop[:window.shape[0], :window.shape[1]].astype(bool)] = i + 1
    return out


def particle_frame(result: FrameResult) -> Any:
    """The frame's particle table as a pandas DataFrame (row i = instance i, ``label`` = i + 1)."""
    import pandas as pd

    inst = result.instances
    boxes = np.asarray(inst.boxes, np.float64).reshape(-1, 4)
    cols: dict[str, np.ndarray] = {
        "label": np.arange(1, len(inst) + 1, dtype=np.int64),
        "score": np.asarray(inst.scores, np.float64),
        "x0": boxes[:, 0], "y0": boxes[:, 1], "x1": boxes[:, 2], "y1": boxes[:, 3],
    }
    cols.update(result.table.columns())
    return pd.DataFrame(cols)


class _Gone(SinkError):
    """The server has no such node (404, or ``KeyError`` from the client): counted as
    ``tiled_rejected`` unless the sink makes the run's container again."""


class _CallThread:
    """One daemon thread that runs the sink's client calls, so that the caller can give one up
    after a deadline (a hung server) while the call goes on here; a daemon thread, so a call still
    hanging never holds up the process's exit."""

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[tuple[Callable[[], Any], Future[Any]]] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def submit(self, fn: Callable[[], Any]) -> Future[Any]:
        """Run ``fn`` in the thread (started at first use); its result or exception in the future."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="tiled-sink", daemon=True)
            self._thread.start()
        fut: Future[Any] = Future()
        self._jobs.put((fn, fut))
        return fut

    def _loop(self) -> None:
        while True:
            fn, fut = self._jobs.get()
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                fut.set_result(fn())
            except BaseException as err:  # handed to the caller, or dropped with a call given up on
                fut.set_exception(err)


class TiledSink:
    """Analysis runs into a Tiled catalog (see module); ``durable`` False.

    Parameters
    ----------
    cfg
        The ``tiled`` config section (server URL, API key, container path, timeout).
    describe
        The serving model's version and processing settings, for the analysis start document.
    """

    name = "tiled"
    durable = False

    def __init__(self, cfg: TiledSection, describe: Callable[[], tuple[str, dict[str, Any]]]) -> None:
        self.cfg, self._describe = cfg, describe
        self._root: Any = None  # the container receiving runs, made at first use
        self._raw: dict[str, RunStarted] = {}
        self._runs: dict[str, Any] = {}  # raw run uid -> its analysis container
        self._starts: dict[str, dict[str, Any]] = {}  # raw run uid -> the start document its container got
        self._frames: dict[str, int] = {}  # raw run uid -> frames written
        self._down_until = 0.0  # monotonic time before which the server is not tried again
        self._calls = _CallThread()
        self._given_up: Future[Any] | None = None  # the last call given up on, maybe still running

    def _call(self, what: str, fn: Callable[[], Any]) -> Any:
        """Run one client call in the call thread, for ``cfg.timeout_s`` (s, wall clock) at most;
        failures become ``SinkError`` with a reason label."""
        import httpx

        wait = self._down_until - time.monotonic()
        if wait > 0:  # a server that timed out would stall the output stage on every item
            raise SinkError("tiled_unreachable", f"{what}: not tried, server unreachable (next try in {wait:.0f} s)")
        if self._given_up is not None and not self._given_up.done():
            raise SinkError("tiled_unreachable", f"{what}: not tried, a request given up on is still unanswered")
        self._given_up = None
        fut = self._calls.submit(fn)
        try:
            return fut.result(timeout=self.cfg.timeout_s)
        except FutureTimeout:
            self._given_up = fut
            self._server_down()
            log("tiled_call_given_up", logging.WARNING, call=what, timeout_s=self.cfg.timeout_s,
                retry_after_s=self.cfg.retry_after_s,
                detail="no answer within tiled.timeout_s (tiled's own retries included); the request may "
                       "still complete on the server")
            raise SinkError("tiled_unreachable", f"{what}: no answer within {self.cfg.timeout_s:g} s") from None
        except httpx.TransportError as err:  # no server, timeout, connection reset
            self._server_down()
            raise SinkError("tiled_unreachable", f"{what}: {type(err).__name__}: {err}") from err
        except KeyError as err:  # the client's lookup of a child the server does not have
            raise _Gone("tiled_rejected", f"{what}: no such entry {err}") from err
        except httpx.HTTPStatusError as err:  # 401 bad key, 404 no such node, 409 key exists, 4xx/5xx
            if err.response.status_code == 404:
                raise _Gone("tiled_rejected", f"{what}: {err}") from err
            raise SinkError("tiled_rejected", f"{what}: {err}") from err

    def _server_down(self) -> None:
        """The server did not answer: connect again at the next try, and leave it alone for
        ``cfg.retry_after_s`` (s) first."""
        self._root = None
        self._down_until = time.monotonic() + self.cfg.retry_after_s

    def _container(self) -> Any:
        if self._root is None:
            from tiled.client import from_uri

            cfg = self.cfg

            def connect() -> Any:
                node = from_uri(cfg.uri, api_key=cfg.api_key, timeout=cfg.timeout_s)
                for key in cfg.path:
                    node = node[key] if key in node else node.create_container(key)
                return node

            self._root = self._call("connect", connect)
        return self._root

    def _make_run(self, start: Mapping[str, Any], note: Mapping[str, Any] | None = None) -> Any:
        """Make the analysis container of ``start`` (with ``labels`` and ``particles``); where the
        container path is gone from the server (a fresh catalog), make it again and retry once."""
        metadata: dict[str, Any] = {"start": json_safe(dict(start))}
        if note is not None:
            metadata["recreated"] = json_safe(dict(note))

        def create() -> Any:
            root = self._container()
            return self._call("create_run", lambda: root.create_container(start["uid"], metadata=metadata))

        try:
            node = create()
        except _Gone:  # the container path is gone: made again by ``_container``
            self._root = None
            node = create()
        self._call("create_run", lambda: (node.create_container("labels"), node.create_container("particles")))
        return node

    def _analysis(self, run_uid: str) -> Any:
        node = self._runs.get(run_uid)
        if node is None:
            version, processing = self._describe()
            raw = self._raw.get(run_uid)
            start = AnalysisRun(run_uid, version, processing,
                                raw_metadata=raw.metadata.extra if raw else None).start_doc
            node = self._make_run(start)
            self._runs[run_uid] = node
            self._starts[run_uid] = start
            self._frames[run_uid] = 0
        return node

    def _recreated(self, run_uid: str, gone: _Gone) -> Any:
        """The open run's container made again after the server answered ``gone`` (404) for it:
        same start metadata, plus the note ``recreated``; ``gone`` raised again where the
        container is there all the same (the 404 was for something else)."""
        start = self._starts[run_uid]
        self._root = None  # the container path may be gone too
        root = self._container()
        if self._call("find_run", lambda: start["uid"] in root):
            raise gone
        frames = self._frames.get(run_uid, 0)
        note = {"time": time.time(), "frames_missing": frames,
                "detail": "the Tiled server lost this container (restarted with a fresh catalog, or its "
                          "catalog lost) while the run was open; the frames written before are missing "
                          "here, the daemon's store has them"}
        node = self._make_run(start, note)
        self._runs[run_uid] = node
        log("tiled_run_recreated", logging.WARNING, run=run_uid, analysis=start["uid"], frames_missing=frames,
            error=gone.detail[:500],
            detail="the run's container was gone from the Tiled server; made again, later frames and the "
                   "stop go there")
        return node

    def analysis_key(self, run_uid: str) -> str:
        """The key (analysis start uid) of the open raw run ``run_uid``'s analysis container."""
        return str(self._analysis(run_uid).metadata["start"]["uid"])

    def open_run(self, run: RunStarted) -> None:
        self._raw[run.run_uid] = run
        self._analysis(run.run_uid)

    def write_frame(self, result: FrameResult, rles: Sequence[RLE]) -> bool:
        try:
            node = self._analysis(result.run_uid)
        except SinkError as err:
            raise SinkError("tiled_no_run", err.detail) from err
        key = frame_key(result.seq_num)
        meta = {"frame_uid": result.frame_uid, "timestamp": result.timestamp,
                "model_version": result.model_version, "summary": json_safe(result.summary.to_dict()),
                "metadata": json_safe(result.metadata)}
        labels, table = label_image(result), particle_frame(result)

        def write(node: Any) -> None:
            self._call("write_labels", lambda: node["labels"].write_array(labels, key=key, metadata=meta,
                                                                             dims=("y", "x")))
            self._call("write_particles", lambda: node["particles"].write_table(
                table, key=key, metadata={"frame_uid": result.frame_uid}))

        try:
            write(node)
        except _Gone as gone:
            write(self._recreated(result.run_uid, gone))
        self._frames[result.run_uid] += 1
        return True

    def close_run(self, stop: RunStopped) -> None:
        try:
            node = self._analysis(stop.run_uid)
            frames = self._frames.get(stop.run_uid, 0)
            status, reason = stop_status(stop.exit_status, stop.reason, frames, stop.rejected)
            stop_md: Mapping[str, Any] = {"exit_status": status, "reason": reason, "time": stop.time,
                                          "num_frames": frames, "losses": dict(stop.rejected)}
            try:
                self._call("stop_run", lambda: node.update_metadata({"stop": dict(stop_md)}))
            except _Gone as gone:
                node = self._recreated(stop.run_uid, gone)
                self._call("stop_run", lambda: node.update_metadata({"stop": dict(stop_md)}))
        finally:
            self._runs.pop(stop.run_uid, None)
            self._starts.pop(stop.run_uid, None)
            self._raw.pop(stop.run_uid, None)
            self._frames.pop(stop.run_uid, None)

    def close(self) -> None:
        self._root = None


def analysis_runs(container: Any, raw_run_uid: str) -> list[str]:
    """The analysis runs of one raw run in a Tiled container.

    Parameters
    ----------
    container
        The tiled client container the sink writes into (``tiled.path``).
    raw_run_uid
        The raw run's uid (``raw_run_uid`` of the analysis start documents).

    Returns
    -------
    list of str
        The keys (analysis start uids) of its analysis runs, oldest first.
    """
    from tiled.queries import Key

    found = container.search(Key("start.raw_run_uid") == raw_run_uid)
    return [key for _, key in sorted((node.metadata["start"]["time"], key) for key, node in found.items())]
