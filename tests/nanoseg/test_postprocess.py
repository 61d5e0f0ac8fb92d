"""Mask pasting puts each model's mask grid where its training put it; frame-level filters."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torchvision.models.detection.roi_heads import project_masks_on_boxes
from torchvision.ops import roi_align

from nanoseg.engines import RawDetections
from nanoseg.instances import BoxMasks, Instances, mask_boxes
from nanoseg.model import ModelConfig, mask_grid_offset_px
from nanoseg.postprocess import (
    NestedSuppression,
    PostprocessConfig,
    filter_instances,
    maskness,
    paste_mask,
    to_instances,
)

TORCHVISION = ModelConfig()
DETECTRON2 = ModelConfig(backbone="resnet50", semantics="detectron2", roi_aligned=True)


def stripes(shape: tuple[int, int] = (192, 192)) -> np.ndarray:
    """(N, H, W) bool: thin straight wires, 8-20 px wide, at angles where half a pixel matters."""
    yy, xx = np.mgrid[: shape[0], : shape[1]] + 0.5
    out = []
    for angle, width, (cx, cy), length in [(0, 9, (90, 60), 150), (35, 14, (96, 96), 170),
                                           (90, 11, (40, 100), 120), (128, 20, (120, 110), 140),
                                           (160, 8, (70, 150), 100)]:
        t = np.deg2rad(angle)
        u = (xx - cx) * np.cos(t) + (yy - cy) * np.sin(t)
        v = -(xx - cx) * np.sin(t) + (yy - cy) * np.cos(t)
        out.append((np.abs(u) <= length / 2) & (np.abs(v) <= width / 2))
    return np.stack(out)


def pasted_iou(targets: np.ndarray, masks: np.ndarray, boxes: np.ndarray, offset: float) -> float:
    ious = []
    for t, m, b in zip(targets, masks, boxes):
        p = paste_mask(t, b, m.shape, 0.5, offset)
        ious.append(np.count_nonzero(p & m) / np.count_nonzero(p | m))
    return float(np.mean(ious))


def test_torchvision_trained_masks_are_pasted_half_a_pixel_down_right() -> None:
    masks = stripes()
    boxes = mask_boxes(masks)
    # The mask targets torchvision's Mask R-CNN loss trains on: what a perfect network predicts.
    targets = project_masks_on_boxes(torch.from_numpy(masks.astype(np.uint8)), torch.from_numpy(boxes),
                                     torch.arange(len(boxes)), 28).numpy()
    offset = mask_grid_offset_px(TORCHVISION)
    assert offset == 0.5
    right, naive = pasted_iou(targets, masks, boxes, offset), pasted_iou(targets, masks, boxes, 0.0)
    assert right > 0.95 and right > naive + 0.02, (right, naive)


def test_detectron2_masks_are_pasted_on_the_box_grid() -> None:
    masks = stripes()
    boxes = mask_boxes(masks)
    rois = torch.cat([torch.arange(len(boxes))[:, None].float(), torch.from_numpy(boxes)], 1)
    # detectron2's targets: ROIAlignV2 (aligned=True) of the ground-truth bitmasks.
    targets = roi_align(torch.from_numpy(masks.astype(np.float32))[:, None], rois, (28, 28), 1.0, 0,
                        aligned=True)[:, 0].numpy()
    offset = mask_grid_offset_px(DETECTRON2)
    assert offset == 0.0
    right, shifted = pasted_iou(targets, masks, boxes, offset), pasted_iou(targets, masks, boxes, 0.5)
    assert right > 0.95 and right > shifted + 0.02, (right, shifted)


def test_to_instances_thresholds_scores_and_pastes_with_the_offset() -> None:
    probs = np.zeros((2, 28, 28), np.float32)
    probs[:, 10:18, 10:18] = 1.0
    raw = RawDetections(np.array([[10, 10, 38, 38], [0, 0, 28, 28]], np.float32), np.array([0.9, 0.3], np.float32),
                        probs)
    inst = to_instances(raw, (64, 64), PostprocessConfig(score_threshold=0.5), mask_offset_px=0.5)
    assert len(inst) == 1
    ys, xs = np.nonzero(inst.masks[0])
    # cells 10..17 of a 1 px grid starting at 10.5 px: pixel centres 20.5..28.5 sample >= 0.5
    assert (ys.min(), ys.max(), xs.min(), xs.max()) == (20, 28, 20, 28)


@pytest.mark.parametrize("offset, margin", [(0.5, 0.0), (0.0, 1.0)])
def test_to_instances_keeps_masks_box_local_with_the_pixels_of_paste_mask(offset: float, margin: float) -> None:
    rng = np.random.default_rng(3)
    shape = (96, 80)
    x0, y0 = rng.uniform(-30, 75, 40), rng.uniform(-30, 90, 40)
    boxes = np.stack([x0, y0, x0 + rng.uniform(0.2, 60, 40), y0 + rng.uniform(0.2, 60, 40)], axis=1)
    boxes[0] = (200, 200, 230, 230)  # off the canvas: an empty mask
    probs = rng.uniform(0, 1, (40, 28, 28)).astype(np.float32)
    raw = RawDetections(boxes.astype(np.float32), rng.uniform(0, 1, 40).astype(np.float32), probs)
    cfg = PostprocessConfig(score_threshold=0.3, mask_threshold=0.6)
    inst = to_instances(raw, shape, cfg, mask_offset_px=offset, mask_margin_px=margin)
    keep = np.flatnonzero(raw.scores >= 0.3)
    dense = np.stack([paste_mask(probs[i], boxes[i].astype(np.float32), shape, 0.6, offset, margin) for i in keep])
    local = inst.box_masks
    assert inst.box_masks is local  # stored box-local, not cut from a dense stack
    assert local.crops[0].size == 0
    assert np.array_equal(np.asarray(local), dense)
    assert np.array_equal(local.offsets, BoxMasks.from_dense(dense).offsets)


def test_mask_rescoring_multiplies_scores_by_maskness() -> None:
    crisp = np.zeros((28, 28), np.float32)
    crisp[8:20, 8:20] = 1.0
    blurry = np.zeros((28, 28), np.float32)
    blurry[8:20, 8:20] = 0.6
    blurry[12:16, 12:16] = 0.9  # 16 cells at 0.9, 128 at 0.6
    empty = np.full((28, 28), 0.2, np.float32)
    probs = np.stack([blurry, crisp, empty])
    assert maskness(probs, 0.5) == pytest.approx([(16 * 0.9 + 128 * 0.6) / 144, 1.0, 0.0])
    raw = RawDetections(np.array([[0, 0, 28, 28]] * 3, np.float32), np.array([0.7, 0.8, 0.95], np.float32), probs)
    plain = to_instances(raw, (32, 32), PostprocessConfig(score_threshold=0.5))
    assert plain.scores.tolist() == pytest.approx([0.7, 0.8, 0.95])
    re = to_instances(raw, (32, 32), PostprocessConfig(score_threshold=0.5, mask_rescoring=True))
    # the blurry mask falls below the threshold (0.7 x 0.633), the crisp one keeps 0.8, no mask -> 0
    assert re.scores.tolist() == pytest.approx([0.8]) and re.scores.dtype == np.float32
    assert (re.masks[0] == plain.masks[1]).all()
    assert len(to_instances(RawDetections(np.zeros((0, 4), np.float32), np.zeros(0, np.float32),
                                          np.zeros((0, 28, 28), np.float32)), (8, 8),
                            PostprocessConfig(mask_rescoring=True))) == 0


@pytest.mark.parametrize("enabled", [True, False])
def test_nested_small_instance_inside_a_large_one_is_dropped(enabled: bool) -> None:
    big = np.zeros((64, 64), bool)
    big[10:50, 10:50] = True
    small = np.zeros((64, 64), bool)
    small[20:30, 20:30] = True
    masks = np.stack([big, small])
    inst = Instances(mask_boxes(masks), np.array([0.9, 0.8], np.float32), masks)
    post = PostprocessConfig(nested=NestedSuppression(enabled=enabled))
    assert len(filter_instances(inst, post)) == (1 if enabled else 2)
