"""detectron2's conventions where torchvision's differ, and torchvision's kept by default."""

from __future__ import annotations

import math

import torch
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead
from torchvision.ops import MultiScaleRoIAlign

from nanoseg.detectron2_compat import (
    Detectron2AnchorGenerator,
    Detectron2RoIAlign,
    detectron2_rpn,
)
from nanoseg.model import ModelConfig, build_model


def _d2_config(**kw: object) -> ModelConfig:
    base = dict(backbone="resnet18", norm="frozen_bn", in_channels=3, image_mean=(0.0,) * 3,
                image_std=(1.0,) * 3, fpn_channels=16, box_head_dim=16, mask_head_layers=(16,),
                roi_aligned=True, semantics="detectron2")
    return ModelConfig.model_validate({**base, **kw})


def test_default_config_keeps_torchvision_modules() -> None:
    model = build_model(ModelConfig())
    assert type(model.rpn) is RegionProposalNetwork and type(model.roi_heads) is RoIHeads
    assert type(model.rpn.anchor_generator) is AnchorGenerator and model.rpn.min_size == 1e-3
    assert type(model.roi_heads.box_roi_pool) is MultiScaleRoIAlign
    assert model.backbone.body.layer2[0].conv1.stride == (2, 2)  # basic block: unchanged


def test_anchors_are_unrounded_at_fixed_strides_with_offset() -> None:
    gen = Detectron2AnchorGenerator((32, 64, 128, 256, 512), (0.5, 1.0, 2.0), offset=0.5)
    images = ImageList(torch.zeros(1, 3, 96, 96), [(96, 96)])
    feats = [torch.zeros(1, 4, n, n) for n in (24, 12, 6, 3, 2)]  # P6 of a 3x3 P5 is 2x2
    anchors = gen(images, feats)[0]
    w, h = math.sqrt(32 * 32 / 0.5), 0.5 * math.sqrt(32 * 32 / 0.5)  # ratio = height / width
    expected = torch.tensor([2 - w / 2, 2 - h / 2, 2 + w / 2, 2 + h / 2])  # centre: 0.5 * stride 4
    torch.testing.assert_close(anchors[0], expected)
    p6 = anchors[-4 * 3:].view(4, 3, 4)
    centres_x = ((p6[:, 1, 0] + p6[:, 1, 2]) / 2).tolist()
    assert centres_x == [32.0, 96.0, 32.0, 96.0]  # stride 64, not 96 // 2 = 48


def test_rpn_ranks_logits_and_drops_boxes_not_above_min_size() -> None:
    tv = RegionProposalNetwork(AnchorGenerator(), RPNHead(4, 1), 0.7, 0.3, 256, 0.5,
                               dict(training=10, testing=10), dict(training=10, testing=10), 0.7)
    rpn = detectron2_rpn(tv, min_size=2.0).eval()
    boxes = torch.tensor([[[10.0, 10, 50, 50], [12, 10, 52, 50], [60, 60, 62, 70], [60, 60, 62.5, 70]]])
    logits = torch.tensor([[20.0, 25.0, 3.0, 1.0]])  # sigmoid(20) == sigmoid(25) in float32
    kept, scores = rpn.filter_proposals(boxes, logits, [(100, 100)], [4])
    assert kept[0].tolist() == [[12.0, 10, 52, 50], [60, 60, 62.5, 70]]
    assert scores[0].tolist() == [25.0, 1.0]


def test_roi_levels_follow_detectron2_rounding() -> None:
    pool = Detectron2RoIAlign(7, 0)
    assert pool.scales == [0.25, 0.125, 0.0625, 0.03125]
    sides = [50.0, 112.0, 224.0, 448.0, 1000.0, 223.99991]
    boxes = torch.tensor([[0.0, 0.0, s, s] for s in sides])
    # A box a hair under 224 px goes to P3 as in detectron2 (torchvision's eps puts it on P4).
    assert pool.map_levels([boxes]).tolist() == [0, 1, 2, 3, 3, 1]


def test_empty_detection_takes_a_top_k_slot_then_is_removed() -> None:
    heads = build_model(_d2_config(detections_per_img=2, box_score_thresh=0.0)).eval().roi_heads
    proposals = [torch.tensor([[-30.0, 10, -10, 30], [10, 10, 30, 30], [60, 60, 80, 80]])]
    class_logits = torch.tensor([[0.0, 5.0], [0.0, 3.0], [0.0, 1.0]])
    boxes, scores, labels = heads.postprocess_detections(class_logits, torch.zeros(3, 8), proposals, [(100, 100)])
    # The first box clips to zero width outside the image: detectron2 keeps it through NMS and
    # the top-2 cut, then drops it as empty, so one detection remains.
    assert boxes[0].tolist() == [[10.0, 10, 30, 30]] and labels[0].tolist() == [1]
    assert scores[0].tolist() == [torch.softmax(torch.tensor([0.0, 3.0]), 0)[1].item()]


def test_stride_in_1x1_moves_the_bottleneck_stride() -> None:
    model = build_model(ModelConfig(backbone="resnet50", stride_in_1x1=True))
    for layer in (model.backbone.body.layer2, model.backbone.body.layer3, model.backbone.body.layer4):
        assert (layer[0].conv1.stride, layer[0].conv2.stride) == ((2, 2), (1, 1))
    assert model.backbone.body.layer1[0].conv1.stride == (1, 1)
