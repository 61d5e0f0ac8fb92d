"""The Instances contract shared by engines, tiling and statistics."""

from __future__ import annotations

import numpy as np
import pytest

from nanoseg.instances import Instances, mask_boxes, mask_iou


def _three() -> Instances:
    masks = np.zeros((3, 10, 12), bool)
    masks[0, 1:3, 2:5] = True
    masks[1, 5, 11] = True
    masks[2, 0:10, 0] = True
    return Instances(mask_boxes(masks), np.array([0.9, 0.5, 0.7]), masks)


def test_boxes_of_masks_use_pixel_edges() -> None:
    inst = _three()
    np.testing.assert_array_equal(inst.boxes, [[2, 1, 5, 3], [11, 5, 12, 6], [0, 0, 1, 10]])
    assert inst.boxes.dtype == np.float32 and inst.scores.dtype == np.float32
    assert mask_boxes(np.zeros((1, 4, 4), bool)).tolist() == [[0, 0, 0, 0]]


def test_select_len_and_empty() -> None:
    inst = _three()
    assert len(inst) == 3 and inst.image_shape == (10, 12)
    sub = inst.select([2, 0])
    assert len(sub) == 2 and sub.scores.tolist() == pytest.approx([0.7, 0.9])
    assert sub.masks[0, 9, 0] and sub.boxes[1, 2] == 5
    assert inst.select(inst.scores > 0.6).scores.tolist() == pytest.approx([0.9, 0.7])
    assert len(inst.select(slice(1, None))) == 2
    assert len(inst.select([])) == 0
    e = Instances.empty(7, 9)
    assert len(e) == 0 and e.image_shape == (7, 9) and e.boxes.shape == (0, 4)


def test_inconsistent_instances_are_rejected() -> None:
    m = np.zeros((2, 4, 4), bool)
    with pytest.raises(ValueError, match="boxes"):
        Instances(np.zeros((3, 4)), np.zeros(2), m)
    with pytest.raises(ValueError, match="scores"):
        Instances(np.zeros((2, 4)), np.zeros(3), m)
    with pytest.raises(ValueError, match="bool"):
        Instances(np.zeros((2, 4)), np.zeros(2), m.astype(np.uint8))


def test_mask_iou_pairs_and_empty_masks() -> None:
    a = np.zeros((2, 8, 8), bool)
    a[0, :4] = True  # rows 0-3: 32 px; a[1] empty
    b = np.zeros((2, 8, 8), bool)
    b[0, 2:6] = True  # rows 2-5: overlaps a[0] in 16 px of 48
    iou = mask_iou(a, b)
    assert iou.shape == (2, 2) and iou.dtype == np.float64
    assert iou[0, 0] == pytest.approx(16 / 48) and iou[0, 1] == 0.0 and iou[1, 1] == 0.0
    assert mask_iou(a[:0], b).shape == (0, 2) and mask_iou(a, b[:0]).shape == (2, 0)
