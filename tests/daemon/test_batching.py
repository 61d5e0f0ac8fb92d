"""Frames analysed in batches: grouped by the infer stage, results as unbatched, failures per frame.

Real sockets, a real Service with the torch engine (which takes batches) on the tiny trained model.
"""

from __future__ import annotations

import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from nanoseg.control_client import control_request
from nanoseg.tiling import FrameTiles
from nanoseg_daemon.contracts import FrameJob, FrameMetadata, FrameResult
from nanoseg_daemon.pipeline import analyse_batch, analyse_frame, prepare
from nanoseg_daemon.service import Service
from nanoseg_daemon.store import ResultReader, default_path
from tests.daemon.service_fixtures import (
    DOSE,
    Client,
    raw_header,
    start_service,
    transmission_frame,
)

FRAMES = [transmission_frame(11, i).counts for i in range(5)]


def sample(svc: Service, name: str) -> float:
    return svc.metrics.registry.get_sample_value(name) or 0.0


def queued_then_analysed(svc: Service, frames: list[np.ndarray], run: str,
                         bad_after: int | None = None, expected: int | None = None) -> list[dict[str, Any]]:
    """Pause, queue every frame (and, after frame ``bad_after``, one without signal), resume: the
    good frames' summaries (``expected`` of them; default: one per frame). Stops the service."""
    client = Client(svc)
    try:
        assert control_request(svc.control.address, {"command": "pause"})["ok"]
        for i, f in enumerate(frames):
            client.send([raw_header(i, f, run=run, pixel_size_nm=8.0, i0=DOSE), f.tobytes()])
            if i == bad_after:  # a frame without signal (all zero counts): counted as failed, the others go on
                dark = np.zeros((64, 64), np.uint16)
                client.send([raw_header("dark", dark, run=run, pixel_size_nm=8.0, i0=DOSE), dark.tobytes()])
        queued = len(frames) + (bad_after is not None)
        deadline = time.monotonic() + 10
        while sample(svc, "nanoseg_frames_received_total") < queued and time.monotonic() < deadline:
            time.sleep(0.05)
        assert control_request(svc.control.address, {"command": "resume"})["ok"]
        return list(client.summaries(len(frames) if expected is None else expected, timeout_s=120))
    finally:
        client.close()
        assert svc.stop()


def run_frames(state: Path, model: Path, max_batch: int) -> tuple[list[dict[str, Any]], list[Any], Service]:
    """The frames and a bad one, batched up to ``max_batch``: the summaries, the stored rows, the service."""
    svc = start_service(state, model, **{"batching.max_batch": max_batch, "batching.max_wait_ms": 500})
    summaries = queued_then_analysed(svc, FRAMES, "b", bad_after=2)
    return summaries, ResultReader(default_path(state)).particles("raw:detector:b"), svc


def test_batched_results_equal_unbatched_and_keep_frame_order(tmp_path: Path, trained_model_path: Path) -> None:
    one, one_rows, svc1 = run_frames(tmp_path / "one", trained_model_path, max_batch=1)
    many, many_rows, svc4 = run_frames(tmp_path / "many", trained_model_path, max_batch=4)

    # unbatched: one frame per engine call; batched: the five good frames in fewer calls
    assert sample(svc1, "nanoseg_batch_size_frames_sum") == sample(svc1, "nanoseg_batch_size_frames_count") == 5
    assert sample(svc4, "nanoseg_batch_size_frames_sum") == 5
    assert sample(svc4, "nanoseg_batch_size_frames_count") <= 3
    two_or_fewer = svc4.metrics.registry.get_sample_value("nanoseg_batch_size_frames_bucket", {"le": "2.0"})
    assert (two_or_fewer or 0.0) < sample(svc4, "nanoseg_batch_size_frames_count")  # a batch held 3 or more

    for svc in (svc1, svc4):  # the dark frame failed alone, counted with its reason
        assert svc.metrics.registry.get_sample_value("nanoseg_frames_failed_total", {"reason": "no_signal"}) == 1
        assert sample(svc, "nanoseg_frames_processed_total") == 5
    assert [s["seq_num"] for s in many] == [s["seq_num"] for s in one] == [1, 2, 3, 5, 6]
    assert [s["count"] for s in many] == [s["count"] for s in one]
    assert sum(s["count"] for s in one) > 0
    assert len(one_rows) == len(many_rows) == sum(s["count"] for s in one)
    for a, b in zip(one_rows, many_rows):  # every particle: the same frame, mask and measures
        assert (a["seq_num"], a["idx"], a["mask_rle"]) == (b["seq_num"], b["idx"], b["mask_rle"])
        assert a["score"] == pytest.approx(b["score"], rel=1e-4)


def test_a_frame_the_engine_fails_on_fails_alone(tmp_path: Path, trained_model_path: Path) -> None:
    svc = start_service(tmp_path, trained_model_path)
    try:
        model = svc.slot.current
        md = FrameMetadata(pixel_size_nm=8.0, i0=DOSE)
        jobs = [FrameJob("r", f"f{k}", k + 1, f, 0.0, md, 0.0) for k, f in enumerate(FRAMES[:3])]
        batch = [prepare(j, model, svc.profiles) for j in jobs]
        # the middle frame's model input is a row, not an image: the batch, and that frame alone, cannot run
        inputs = batch[1].frame.inputs
        broken = replace(batch[1].frame, inputs=FrameTiles(inputs.image.ravel(), inputs.plan))
        batch[1] = replace(batch[1], frame=broken)
        out = analyse_batch(batch)
        assert isinstance(out[1], Exception) and not isinstance(out[1], FrameResult)
        for k in (0, 2):
            got, alone = out[k], analyse_frame(jobs[k], model, svc.profiles)
            assert isinstance(got, FrameResult) and got.frame_uid == f"f{k}"
            assert len(got.table) == len(alone.table)
            np.testing.assert_array_equal(got.table.area_px, alone.table.area_px)
            np.testing.assert_array_equal(got.instances.scores, alone.instances.scores)
    finally:
        svc.stop()


def test_small_frames_packed_several_to_a_model_input_each_get_their_result(tmp_path: Path,
                                                                            trained_model_path: Path) -> None:
    """``batching.pack_small_frames``: 128 x 128 frames share the engine's inputs; every frame
    gets its own result, in order, with about the particles it gets alone."""
    small = [np.ascontiguousarray(f[:128, :128]) for f in FRAMES] * 2
    counts = {}
    for pack in (False, True):
        svc = start_service(tmp_path / f"pack-{pack}", trained_model_path, **{
            "batching.max_batch": 16, "batching.max_wait_ms": 500, "batching.pack_small_frames": str(pack).lower()})
        engine = svc.slot.current.segmenter.engine
        infer, inputs = engine.infer, []

        def counted(batch: np.ndarray, infer: Any = infer, inputs: list[int] = inputs) -> Any:
            inputs.append(len(batch))
            return infer(batch)

        engine.infer = counted  # type: ignore[method-assign]
        summaries = queued_then_analysed(svc, small, "p")
        assert [s["seq_num"] for s in summaries] == list(range(1, len(small) + 1))
        counts[pack] = [s["count"] for s in summaries]
        assert sum(inputs) == (3 if pack else 10)  # 128 px frames with a 64 px gap: 4 to an input
    assert sum(counts[False]) > 0
    assert sum(abs(a - b) for a, b in zip(counts[False], counts[True])) <= 2, counts


def test_two_engine_instances_run_batches_at_once_with_the_same_results_in_order(tmp_path: Path,
                                                                                 trained_model_path: Path) -> None:
    """``model.instances: 2``: two batches on two engines at once, the results those of one
    engine, in the frames' order."""
    one, one_rows, _ = run_frames(tmp_path / "one", trained_model_path, max_batch=1)
    svc = start_service(tmp_path / "two", trained_model_path, **{
        "batching.max_batch": 1, "batching.max_wait_ms": 500, "model.instances": 2, "model.threads": 1})
    model = svc.slot.current
    assert model.instances == 2
    assert control_request(svc.control.address, {"command": "status"})["result"]["model"]["instances"] == 2
    active, most, calls, lock = [0], [0], [0, 0], threading.Lock()
    for k, seg in enumerate(model.segmenters):
        infer = seg.engine.infer

        def watched(batch: np.ndarray, infer: Any = infer, k: int = k) -> Any:
            with lock:
                active[0] += 1
                most[0] = max(most[0], active[0])
                calls[k] += 1
            try:
                return infer(batch)
            finally:
                with lock:
                    active[0] -= 1

        seg.engine.infer = watched  # type: ignore[method-assign]
    two = queued_then_analysed(svc, FRAMES, "b", bad_after=2)
    two_rows = ResultReader(default_path(tmp_path / "two")).particles("raw:detector:b")

    assert most[0] == 2 and min(calls) >= 1, (most, calls)  # both engines, at once
    assert svc.metrics.registry.get_sample_value("nanoseg_frames_failed_total", {"reason": "no_signal"}) == 1
    assert [s["seq_num"] for s in two] == [s["seq_num"] for s in one] == [1, 2, 3, 5, 6]
    assert [s["count"] for s in two] == [s["count"] for s in one]
    assert len(two_rows) == len(one_rows) == sum(s["count"] for s in one) > 0
    for a, b in zip(one_rows, two_rows):
        assert (a["seq_num"], a["idx"], a["mask_rle"]) == (b["seq_num"], b["idx"], b["mask_rle"])
        assert a["score"] == pytest.approx(b["score"], rel=1e-4)


def test_an_instance_that_fails_fails_its_frame_alone_and_the_others_go_on(tmp_path: Path,
                                                                           trained_model_path: Path) -> None:
    """An engine instance that raises (a device fault) fails its batch's frame, counted; the
    other frames keep their order through both instances."""
    svc = start_service(tmp_path, trained_model_path, **{
        "model.engine": "null", "model.instances": 2, "batching.max_batch": 1, "batching.max_wait_ms": 200})
    replica = svc.slot.current.replicas[0].engine
    infer, calls = replica.infer, [0]

    def faulty(batch: np.ndarray) -> Any:
        calls[0] += 1
        if calls[0] == 1:
            raise RuntimeError("device fault")
        return infer(batch)

    replica.infer = faulty  # type: ignore[method-assign]
    summaries = queued_then_analysed(svc, FRAMES + FRAMES, "f", expected=2 * len(FRAMES) - 1)
    assert calls[0] >= 2  # the faulty instance ran again after its fault
    assert svc.metrics.registry.get_sample_value("nanoseg_frames_failed_total", {"reason": "internal_error"}) == 1
    seqs = [s["seq_num"] for s in summaries]
    assert len(seqs) == 2 * len(FRAMES) - 1 and seqs == sorted(seqs)
