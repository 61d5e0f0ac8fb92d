"""Particle statistics in worker processes beside the measure stage (``statistics.workers``).

A frame's statistics (``nanoseg.particle_stats.frame_statistics``: centrelines, hulls,
calipers, the summary's bootstrap) are Python-heavy, ~2-5 ms per particle on one core, and hold
the interpreter's lock while they run: in the measure stage's thread they are one core's worth
at most, whatever the machine has. ``StatisticsPool`` runs them in N processes instead, so a
machine with cores to spare (a GPU server, where the engine needs little CPU) measures N frames
at once. The results are the same function's, to the last bit.

A worker that dies (killed, out of memory) loses nothing: the frames it held are measured again
in the calling thread (told to ``on_remeasured``), the pool is started afresh for the next ones
(logged). Workers are started by a fork server (the daemon's threads are never forked), and end
with the daemon's process even when it is killed.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import select
import threading
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass

import numpy as np

from nanoseg.instances import BoxMasks
from nanoseg.particle_stats import BoxValues, FrameStatistics, frame_statistics
from nanoseg.summary_stats import StatisticsConfig
from nanoseg_daemon.logs import log

_PRELOAD = ["nanoseg.particle_stats"]  # imported once in the fork server: workers start warm


@dataclass(frozen=True)
class Pending:
    """A frame handed to a worker: its future, the executor it went to, and its arguments."""

    future: Future[FrameStatistics]
    executor: ProcessPoolExecutor
    args: tuple[BoxMasks, BoxValues | None, float | None, StatisticsConfig]


def _exit_with(pid: int) -> None:
    """A worker's initializer: end the worker when process ``pid`` (the daemon) ends, however it
    ends. Killed with SIGKILL, the daemon closes nothing, and its workers (the fork server's
    children) would wait for frames for ever."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:  # the daemon ended while this worker started
        os._exit(0)
    except (AttributeError, OSError):  # not Linux >= 5.3: the pool's own shutdown still ends them
        return

    def watch() -> None:
        select.select([fd], [], [])
        os._exit(0)

    threading.Thread(target=watch, name="exit-with-daemon", daemon=True).start()


class StatisticsPool:
    """``frame_statistics`` in ``workers`` processes, results in the order asked for by the caller.

    ``submit`` hands a frame's masks to a worker and returns at once; ``result`` waits for it.
    ``on_remeasured(n)`` is told when a worker died and ``n`` frames were measured in the caller's
    thread instead.
    """

    def __init__(self, workers: int, statistics: StatisticsConfig | None = None,
                 on_remeasured: Callable[[int], None] = lambda n: None) -> None:
        if workers < 1:
            raise ValueError(f"statistics.workers: a pool needs at least 1 worker, got {workers}")
        self.workers = workers
        st = statistics or StatisticsConfig()
        # the summary's own settings only (the daemon's section adds ``workers``): a plain core model
        self.statistics = StatisticsConfig(**st.model_dump(include=set(StatisticsConfig.model_fields)))
        self.on_remeasured = on_remeasured
        self.restarts = 0
        self._warming: list[Future[int]] = []
        self._lock = threading.Lock()
        self._executor: ProcessPoolExecutor | None = self._started()

    def _started(self) -> ProcessPoolExecutor:
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(_PRELOAD)
        ex = ProcessPoolExecutor(self.workers, mp_context=ctx, initializer=_exit_with, initargs=(os.getpid(),))
        # each start asked for now, not with the first frames (a worker takes seconds to start)
        self._warming = [ex.submit(os.getpid) for _ in range(self.workers)]
        return ex

    def wait_ready(self, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` s for the workers' start; True when they have all started."""
        done, _ = wait(self._warming, timeout=timeout_s)
        return len(done) == len(self._warming)

    def _replace(self, broken: ProcessPoolExecutor | None) -> ProcessPoolExecutor:
        """The running executor; a new one when ``broken`` is still the current one."""
        with self._lock:
            if self._executor is None:
                raise RuntimeError("the statistics pool is closed")
            if self._executor is broken:
                broken.shutdown(wait=False, cancel_futures=True)
                self._executor = self._started()
                self.restarts += 1
                log("statistics_pool_restarted", logging.WARNING, workers=self.workers, restarts=self.restarts,
                    detail="a statistics worker died; its frames are measured in the daemon's thread")
            return self._executor

    def submit(self, masks: BoxMasks, od: np.ndarray | None, pixel_size_nm: float | None) -> Pending:
        """Start measuring one frame in a worker (arguments of ``frame_statistics``; the optical
        density travels cut to the masks' boxes, ``BoxValues``)."""
        args = (masks, None if od is None else BoxValues.of(od, masks), pixel_size_nm, self.statistics)
        ex = self._executor
        try:
            if ex is None:
                raise RuntimeError("the statistics pool is closed")
            return Pending(ex.submit(frame_statistics, *args), ex, args)
        except BrokenProcessPool:
            ex = self._replace(ex)
            return Pending(ex.submit(frame_statistics, *args), ex, args)

    def result(self, pending: Pending) -> FrameStatistics:
        """The frame's statistics; measured in this thread when its worker died."""
        try:
            return pending.future.result()
        except BrokenProcessPool:
            self._replace(pending.executor)
            self.on_remeasured(1)
            return frame_statistics(*pending.args)

    def worker_pids(self) -> list[int]:
        """Process ids of the running workers (for status and tests)."""
        ex = self._executor
        procs = getattr(ex, "_processes", None) or {}
        return sorted(p.pid for p in procs.values() if p.pid is not None)

    def close(self) -> None:
        """Wait for the frames in flight, then stop the workers."""
        with self._lock:
            ex, self._executor = self._executor, None
        if ex is not None:
            ex.shutdown(wait=True)
