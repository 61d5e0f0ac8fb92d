"""nanoseg/device_postprocess.py (torch, any device) against the numpy post-processing and
statistics, on the CPU device with the tests' trained model: the same masks, scores and moment
columns, so that the device path defines nothing of its own."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from nanoseg import device_postprocess as dp
from nanoseg.checkpoint import load_checkpoint
from nanoseg.engines.factory import engine_from_checkpoint
from nanoseg.instances import BoxMasks
from nanoseg.particle_stats import particle_table
from nanoseg.postprocess import PostprocessConfig, paste_mask, to_instances
from nanoseg.segmenter import Segmenter

CONFIGS = [PostprocessConfig(), PostprocessConfig(mask_rescoring=True, score_threshold=0.3, mask_threshold=0.4)]


@pytest.fixture(scope="module")
def segmenter(trained_model_path: Path) -> Segmenter:
    ckpt = load_checkpoint(trained_model_path)
    return Segmenter.for_checkpoint(engine_from_checkpoint(ckpt, "torch", "cpu", threads=2), ckpt, PostprocessConfig())


@pytest.fixture(scope="module")
def outputs(segmenter: Segmenter, paper_samples: list) -> list:
    """Per frame: the engine's host detections and the same detections left on the device."""
    out = []
    for gray, _ in paper_samples:
        batch = np.repeat(gray[None, None], segmenter.engine.input_shape[0], axis=1)
        (raw,) = segmenter.engine.infer(batch)
        (det,) = dp.split_device_outputs(*segmenter.engine.infer_device(batch))  # type: ignore[attr-defined]
        out.append((gray.shape, raw, det))
    return out


@pytest.mark.parametrize("cfg", CONFIGS)
def test_device_instances_equal_the_numpy_ones(segmenter: Segmenter, outputs: list, cfg: PostprocessConfig) -> None:
    total = 0
    for shape, raw, det in outputs:
        host = to_instances(raw, shape, cfg, segmenter.mask_offset_px, segmenter.mask_margin_px)
        dev = dp.to_instances(det, shape, cfg, segmenter.mask_offset_px, segmenter.mask_margin_px)
        assert len(dev) == len(host)
        np.testing.assert_allclose(dev.scores, host.scores, rtol=1e-6)
        np.testing.assert_array_equal(dev.boxes, host.boxes)
        assert np.array_equal(dev.masks, host.masks)  # bit for bit
        total += len(host)
    assert total >= 10  # the frames have wires and the model finds them
    assert segmenter.mask_margin_px > 0  # the shipped decoding pastes over a grown box


def test_pasting_at_the_canvas_edges_and_degenerate_boxes() -> None:
    rng = np.random.default_rng(3)
    probs = rng.random((6, 28, 28)).astype(np.float32)
    boxes = np.array([[-5.3, -2.0, 20.4, 9.9], [50.2, 40.1, 70.0, 64.0], [10, 10, 10, 30], [0, 0, 64, 64],
                      [63.6, 10, 90, 20], [3.3, 7.7, 4.1, 8.2]], np.float32)
    dev = dp.paste_masks(torch.from_numpy(probs), torch.from_numpy(boxes), (64, 64), 0.5, 0.5, 1.0).to_host()
    for k in range(len(boxes)):
        assert np.array_equal(dev.full(k), paste_mask(probs[k], boxes[k], (64, 64), 0.5, 0.5, 1.0)), k


def test_segmenter_on_the_device_segments_as_on_the_host(segmenter: Segmenter, paper_samples: list) -> None:
    on_device = Segmenter(segmenter.engine, segmenter.spec, segmenter.post, segmenter.mask_offset_px,
                          segmenter.mask_margin_px, device_post=True)
    assert on_device.post_on_device and not segmenter.post_on_device  # the engine is on the CPU: numpy
    gray = paper_samples[0][0]
    a, b = segmenter.segment_gray(gray), on_device.segment_gray(gray)
    assert len(a) == len(b) > 0 and np.array_equal(a.masks, b.masks)


def test_device_moment_columns_equal_the_particle_table(segmenter: Segmenter, paper_samples: list) -> None:
    masks = [segmenter.segment_gray(gray).box_masks for gray, _ in paper_samples]
    masks.append(BoxMasks.from_dense(np.stack([np.eye(16, dtype=bool), np.ones((16, 16), bool),
                                               np.pad(np.ones((1, 1), bool), ((15, 0), (3, 12)))])))
    for bm in masks:
        table = particle_table(bm)
        cols = dp.moment_columns(dp.DeviceMasks.from_host(bm, "cpu"))
        expected = table.columns()
        for name in ("area_px", "centroid_x", "centroid_y", "major_px", "minor_px", "eccentricity",
                     "bbox_width_px", "bbox_height_px"):
            np.testing.assert_allclose(cols[name], expected[name], rtol=1e-9, atol=1e-9, err_msg=name)
        turn = (cols["orientation_deg"] - expected["orientation_deg"] + 90.0) % 180.0 - 90.0
        assert np.all(np.abs(turn) < 1e-6)
        assert np.array_equal(cols["touches_edge"], table.touches_edge)
