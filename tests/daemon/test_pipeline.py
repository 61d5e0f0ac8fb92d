"""daemon/pipeline.py: one frame's analysis, and the stages under a model reload."""

from __future__ import annotations

import os
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from nanoseg.checkpoint import load_checkpoint, save_checkpoint
from nanoseg.particle_stats import particle_table
from nanoseg.postprocess import PostprocessConfig
from nanoseg_daemon.contracts import FrameJob, FrameMetadata, FrameResult
from nanoseg_daemon.model_slot import LoadedModel, ModelSlot, load_model
from nanoseg_daemon.pipeline import (
    Item,
    ProfileBook,
    StageCallbacks,
    Stages,
    analyse_frame,
    prepare,
)
from nanoseg_daemon.queueing import FrameQueue
from tests.daemon.service_fixtures import DOSE, transmission_frame

FRAME = transmission_frame(11, 0)


def job(seq: int = 1) -> FrameJob:
    return FrameJob("r", f"r/{seq}", seq, FRAME.counts, time.time(), FrameMetadata(pixel_size_nm=8.0, i0=DOSE),
                    time.monotonic())


@pytest.fixture(scope="module")
def profiles() -> ProfileBook:
    return ProfileBook("ptychography")


@pytest.fixture(scope="module")
def model(trained_model_path: Path) -> LoadedModel:
    return load_model(trained_model_path, "torch", "cpu", 2, PostprocessConfig())


def test_analyse_frame_is_the_segmenters_one_path_with_timings(model: LoadedModel, profiles: ProfileBook) -> None:
    r = analyse_frame(job(), model, profiles)
    p = prepare(job(), model, profiles)
    inst = model.segmenter.segment_prepared(p.frame)
    assert len(r.instances) == len(inst) > 0
    assert np.array_equal(r.instances.masks, inst.masks)
    expected = particle_table(inst.masks, p.frame.image, 8.0).columns()  # OD columns from the prepared frame
    for name, col in r.table.columns().items():
        np.testing.assert_allclose(col, expected[name], equal_nan=True)
    assert set(r.timings) == {"prepare", "infer", "postprocess", "stats"} and min(r.timings.values()) > 0
    assert r.model_version == model.version and r.metadata["pixel_size_nm"] == 8.0


def test_a_reload_between_preparation_and_inference_leaves_the_frame_on_the_model_it_was_prepared_for(
        model: LoadedModel, tmp_path: Path, profiles: ProfileBook) -> None:
    ckpt = load_checkpoint(Path(model.path))
    other = tmp_path / "other.pt"
    save_checkpoint(replace(ckpt, meta={**ckpt.meta, "name": "other"}), other, half=True)
    slot = ModelSlot(model)
    first = slot.current.version
    looked_up: list[str] = []

    def current() -> LoadedModel:
        m = slot.current
        looked_up.append(m.version)
        if len(looked_up) == 1:  # the operator's reload lands right after the frame's preparation looked
            slot.reload(other, "torch", "cpu", 2)
        return m

    items: FrameQueue[Item] = FrameQueue(4, "block", lambda i: False, lambda i, r: None)
    items.put(job())
    items.close()  # the stages end once the frame is through
    out: list[object] = []
    failed: list[tuple[str, str]] = []
    stages = Stages(lambda timeout, n: items.get_many(n, timeout), profiles,
                    StageCallbacks(out.extend, lambda j, r, d: failed.append((r, d)), current, lambda: False))
    stages.start()
    assert stages.join(120.0), "stages did not finish"
    assert not failed
    assert slot.current.version != first  # the reload happened
    (r,) = out
    assert isinstance(r, FrameResult)
    assert r.model_version == first  # inference ran on the model the frame was prepared for
    assert looked_up == [first]  # the model is looked up once per frame


def test_a_profile_named_by_a_frame_that_is_a_fifo_fails_the_frame_at_once(tmp_path: Path) -> None:
    """A frame's ``metadata.profile`` may be a path: one naming a FIFO (or a device) fails that
    frame as ``unknown_profile`` instead of blocking the prepare stage until someone writes to it."""
    from nanoseg.errors import FrameError

    fifo = tmp_path / "profile.yaml"
    os.mkfifo(fifo)
    book = ProfileBook("ptychography")
    errors: list[FrameError] = []

    def get() -> None:
        with pytest.raises(FrameError) as info:
            book.get(str(fifo))
        errors.append(info.value)

    t = threading.Thread(target=get, daemon=True)  # before the fix: blocked for ever in the read
    t.start()
    t.join(10)
    assert not t.is_alive() and len(errors) == 1
    assert errors[0].reason == "unknown_profile" and "not a regular file" in str(errors[0])
