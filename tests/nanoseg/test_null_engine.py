"""The null engine: fixed detections at the checkpoint's input shape, through the real post-processing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from nanoseg.checkpoint import input_shape, load_checkpoint
from nanoseg.engines import EngineError
from nanoseg.engines.factory import engine_from_checkpoint
from nanoseg.engines.null_engine import DETECTIONS
from nanoseg.postprocess import PostprocessConfig
from nanoseg.segmenter import Segmenter
from nanoseg_daemon.config import load_daemon_config


def test_null_engine_gives_its_rods_on_every_input(trained_model_path: Path) -> None:
    ckpt = load_checkpoint(trained_model_path)
    eng = engine_from_checkpoint(ckpt, "null")
    assert (eng.name, eng.input_shape) == ("null", input_shape(ckpt))
    raw = eng.infer(np.zeros((3, *eng.input_shape), np.float32))
    assert len(raw) == 3 and all(len(r) == len(DETECTIONS) for r in raw)
    np.testing.assert_array_equal(raw[0].boxes[0], DETECTIONS[0][:4])
    with pytest.raises(EngineError):
        eng.infer(np.zeros((1, 1, 64, 64), np.float32))

    seg = Segmenter.for_checkpoint(eng, ckpt, PostprocessConfig(score_threshold=0.5, min_area_px=0))
    inst = seg.segment_gray(np.zeros((128, 128), np.float32))
    assert len(inst) == len(DETECTIONS)  # every rod scores >= 0.5 and lies in the 128 x 128 corner
    areas = inst.box_masks.areas()
    assert np.all(areas > 20)
    boxes = np.asarray([d[:4] for d in DETECTIONS])  # a rod's mask covers part of its box, never more
    order = np.argsort(-np.asarray([d[4] for d in DETECTIONS]), kind="stable")
    assert np.all(areas < ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))[order])


def test_yaml_null_selects_the_null_engine() -> None:
    assert load_daemon_config(None, {"model.engine": "null"}, environ={}).model.engine == "null"
    assert load_daemon_config(None, {}, environ={"NANOSEG__MODEL__ENGINE": "null"}).model.engine == "null"
