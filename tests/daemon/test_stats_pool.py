"""daemon/stats_pool.py: particle statistics in worker processes (``statistics.workers``).

Real processes (a fork server's workers), the null engine's masks and the tests' trained
model's; a worker is killed with SIGKILL while it holds frames.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydantic import ValidationError

from nanoseg.particle_stats import frame_statistics
from nanoseg.postprocess import PostprocessConfig
from nanoseg.summary_stats import StatisticsConfig
from nanoseg_daemon.config import DaemonConfig
from nanoseg_daemon.contracts import FrameJob, FrameMetadata, FrameResult
from nanoseg_daemon.model_slot import LoadedModel, load_model
from nanoseg_daemon.pipeline import (
    Detected,
    Item,
    ProfileBook,
    StageCallbacks,
    Stages,
    detect_batch,
    find_instances,
    prepare,
)
from nanoseg_daemon.queueing import FrameQueue
from nanoseg_daemon.stats_pool import Pending, StatisticsPool
from tests.daemon.service_fixtures import DOSE, transmission_frame

SUMMARY = StatisticsConfig(edge_rule="miles_lantuejoul", bootstrap_resamples=200)


def job(seq: int) -> FrameJob:
    frame = transmission_frame(11, seq % 3)
    return FrameJob("r", f"r/{seq}", seq, frame.counts, time.time(), FrameMetadata(pixel_size_nm=8.0, i0=DOSE),
                    time.monotonic())


def fingerprint(r: FrameResult) -> str:
    """Everything the statistics give a frame, as text (floats exact)."""
    lines = [None if c is None else (c.points.tolist(), c.width_px.tolist()) for c in r.table.centrelines]
    mean_od = None if r.table.mean_od is None else r.table.mean_od.tolist()
    return json.dumps([r.frame_uid, r.table.to_dict(), mean_od, lines, r.summary.to_dict()])


@pytest.fixture(scope="module")
def profiles() -> ProfileBook:
    return ProfileBook("ptychography")


@pytest.fixture(scope="module")
def null_model(trained_model_path: Path) -> LoadedModel:
    return load_model(trained_model_path, "null", "cpu", 1, PostprocessConfig(), null_detections=6)


@pytest.fixture(scope="module")
def model(trained_model_path: Path) -> LoadedModel:
    return load_model(trained_model_path, "torch", "cpu", 2, PostprocessConfig())


def run_stages(model: LoadedModel, profiles: ProfileBook, frames: int, workers: int,
               during: object = None) -> tuple[list[FrameResult], list[tuple[str, str]], list[int], Stages]:
    """Frames through the four (five) stages; ``during(stages)`` is called once the first batch is in."""
    items: FrameQueue[Item] = FrameQueue(frames + 1, "block", lambda i: False, lambda i, r: None)
    for seq in range(1, frames + 1):
        items.put(job(seq))
    items.close()
    out: list[object] = []
    failed: list[tuple[str, str]] = []
    remeasured: list[int] = []
    stages = Stages(lambda timeout, n: items.get_many(n, timeout), profiles,
                    StageCallbacks(out.extend, lambda j, r, d: failed.append((r, d)), lambda: model,
                                   lambda: False, statistics_remeasured=remeasured.append),
                    statistics=SUMMARY, statistics_workers=workers)
    stages.start()
    if callable(during):
        during(stages)
    assert stages.join(300.0), "stages did not finish"
    results = [r for r in out if isinstance(r, FrameResult)]
    assert len(results) == len(out)  # frames only: no run events were sent
    return results, failed, remeasured, stages


def test_the_pool_gives_the_same_statistics_as_the_thread_in_the_frames_order(
        null_model: LoadedModel, profiles: ProfileBook) -> None:
    here, failed, _, _ = run_stages(null_model, profiles, 12, workers=0)
    pooled, failed_pooled, remeasured, stages = run_stages(null_model, profiles, 12, workers=2)
    assert not failed and not failed_pooled and not remeasured
    assert [r.frame_uid for r in pooled] == [f"r/{i}" for i in range(1, 13)]
    assert all(len(r.table) == 6 for r in pooled)
    assert [fingerprint(r) for r in pooled] == [fingerprint(r) for r in here]
    assert all(r.timings["stats"] > 0 for r in pooled)
    assert any(t.name == "stage-collect" for t in stages.threads)
    assert stages.pool is not None and stages.pool.worker_pids() == []  # stopped with the stages


def test_a_worker_killed_while_it_holds_frames_loses_no_result(model: LoadedModel, profiles: ProfileBook) -> None:
    """SIGKILL to every worker (stopped first) once frames are in the pool: those frames are measured in the
    daemon's thread (counted), the pool starts afresh for the rest, every result comes out once,
    in order, the same as without a pool."""
    killed: list[int] = []

    def kill_workers(stages: Stages) -> None:
        pool = stages.pool
        assert pool is not None
        handed = threading.Event()
        submit = pool.submit

        def submit_and_tell(*args: Any) -> Pending:
            pending = submit(*args)
            handed.set()
            return pending

        pool.submit = submit_and_tell  # type: ignore[method-assign,assignment]
        deadline = time.monotonic() + 120
        while not pool.worker_pids() and time.monotonic() < deadline:
            time.sleep(0.005)  # the workers are starting
        pids = pool.worker_pids()
        for pid in pids:  # stopped, they hold the frames handed to them until they are killed
            os.kill(pid, signal.SIGSTOP)
        assert handed.wait(120), "no frame reached the pool"
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

    here, _, _, _ = run_stages(model, profiles, 6, workers=0)
    out, failed, remeasured, stages = run_stages(model, profiles, 6, workers=2, during=kill_workers)
    assert killed and not failed
    assert [r.frame_uid for r in out] == [f"r/{i}" for i in range(1, 7)]
    assert [fingerprint(r) for r in out] == [fingerprint(r) for r in here]
    assert stages.pool is not None and stages.pool.restarts == 1 and sum(remeasured) >= 1


def test_the_pool_measures_on_after_its_workers_died(null_model: LoadedModel, profiles: ProfileBook) -> None:
    p = prepare(job(1), null_model, profiles)
    (d,) = detect_batch([p])
    assert isinstance(d, Detected)
    f = find_instances(d)
    masks, od = f.instances.box_masks, p.frame.optical_density
    expected = frame_statistics(masks, od, 8.0, SUMMARY)
    remeasured: list[int] = []
    pool = StatisticsPool(1, SUMMARY, remeasured.append)
    try:
        assert pool.wait_ready(120) and len(pool.worker_pids()) == 1
        first = pool.result(pool.submit(masks, od, 8.0))
        (pid,) = pool.worker_pids()
        os.kill(pid, signal.SIGKILL)
        # the next frame finds the pool broken when it is handed over or while it waits: either way
        # it is measured, and the pool is started afresh once
        again = [pool.result(pool.submit(masks, od, 8.0)) for _ in range(3)]
        assert pool.worker_pids() and pid not in pool.worker_pids()
    finally:
        pool.close()
    for got in [first, *again]:
        assert got.table.to_dict() == expected.table.to_dict()
        assert got.summary.to_dict() == expected.summary.to_dict()
        assert got.table.mean_od is not None and expected.table.mean_od is not None
        assert np.array_equal(got.table.mean_od, expected.table.mean_od)
    assert pool.restarts == 1 and sum(remeasured) <= 1


def test_an_error_in_a_worker_is_the_frames_own_not_a_lost_worker() -> None:
    """What ``frame_statistics`` raises in a worker reaches the caller as such (the stages count
    the frame failed with its reason); the worker lives on and nothing is re-measured."""
    remeasured: list[int] = []
    pool = StatisticsPool(1, on_remeasured=remeasured.append)
    try:
        with pytest.raises(ValueError, match="masks must be"):
            pool.result(pool.submit(np.zeros((1, 4, 4), np.uint8), None, None))  # type: ignore[arg-type]
        mask = np.zeros((1, 20, 20), bool)
        mask[0, 5:15, 8:11] = True
        assert len(pool.result(pool.submit(mask, None, None)).table) == 1  # type: ignore[arg-type]
    finally:
        pool.close()
    assert pool.restarts == 0 and not remeasured


def test_statistics_workers_is_checked_by_name() -> None:
    assert DaemonConfig().statistics.workers == 0
    assert DaemonConfig.model_validate({"statistics": {"workers": 3}}).statistics.workers == 3
    with pytest.raises(ValidationError, match=r"statistics\.workers"):
        DaemonConfig.model_validate({"statistics": {"workers": -1}})
    with pytest.raises(ValidationError, match=r"statistics\.worker"):
        DaemonConfig.model_validate({"statistics": {"worker": 2}})
    with pytest.raises(ValueError, match=r"statistics\.workers"):
        StatisticsPool(0)


WORKER_HOST = """
import sys, time
import numpy as np
from nanoseg_daemon.stats_pool import StatisticsPool
pool = StatisticsPool(2)
if sys.argv[1] == "measured":
    mask = np.zeros((1, 20, 20), bool)
    mask[0, 5:15, 8:11] = True
    pool.result(pool.submit(mask, None, None))
print(*pool.worker_pids(), flush=True)
time.sleep(600)
"""


@pytest.mark.parametrize("when", ["starting", "measured"])
def test_the_workers_end_with_a_daemon_killed_by_sigkill(when: str) -> None:
    """Killed with SIGKILL the daemon closes nothing: its workers (the fork server's children)
    must notice by themselves, not wait for frames for ever: whether they were still starting
    (``starting``: killed as soon as the pool has its processes) or had measured a frame."""
    host = subprocess.Popen([sys.executable, "-c", WORKER_HOST, when], stdout=subprocess.PIPE, text=True)
    try:
        assert host.stdout is not None
        pids = [int(p) for p in host.stdout.readline().split()]
        assert pids and all(Path(f"/proc/{p}").exists() for p in pids)
    finally:
        host.send_signal(signal.SIGKILL)
        host.wait()
    deadline = time.monotonic() + 120
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(alive(p) for p in pids), "a statistics worker outlived its daemon"


def alive(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie, ended but not yet reaped, does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
