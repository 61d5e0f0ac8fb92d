"""Mask R-CNN for nanowires: one foreground class, built from a small ``ModelConfig``.

The model is torchvision's ``MaskRCNN`` with three project-specific choices:

* single-channel input: the stem convolution takes 1 channel (gray OD images), so no compute is
  spent on three copies of the same plane (``in_channels`` = 3 is kept for imported detectron2
  models, which expect BGR);
* no resizing inside the model (``FixedScaleTransform``): frames are brought to the model's pixel
  scale by the frame preparation (``nanoseg.optical_density``), so training crops and inference
  frames keep the wires at the size the model learned;
* light, configurable heads (box-head width, mask-head convs) and elongated anchors.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

from pydantic import Field, model_validator
from torch import Tensor, nn
from torchvision.models import mobilenet_v3_large, resnet18, resnet34, resnet50, resnet101
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool
from torchvision.ops.misc import FrozenBatchNorm2d

from nanoseg import detectron2_compat as d2
from nanoseg.config_io import StrictModel
from nanoseg.mask_refiner import MaskRefiner, MaskRefinerConfig

Backbone = Literal["resnet18", "resnet34", "resnet50", "resnet101", "mobilenet_v3_large"]
Norm = Literal["frozen_bn", "bn", "gn"]


class ModelConfig(StrictModel):
    """Everything needed to rebuild the network (weights excluded). Sizes in px at model scale."""

    backbone: Backbone = "resnet18"
    norm: Norm = "bn"
    in_channels: Literal[1, 3] = 1
    fpn_channels: int = Field(128, ge=16, le=512)
    image_mean: tuple[float, ...] = (40.0,)
    """Per-channel mean subtracted from the 0–255 input."""
    image_std: tuple[float, ...] = (60.0,)
    anchor_sizes: tuple[int, ...] = (16, 32, 64, 128, 256)
    """One anchor size per FPN level (P2..P6), px."""
    aspect_ratios: tuple[float, ...] = (0.2, 0.5, 1.0, 2.0, 5.0)
    """Anchor height/width ratios; wires are elongated, so wider than detectron2's 0.5–2."""
    rpn_pre_nms_top_n_train: int = 600
    rpn_post_nms_top_n_train: int = 300
    rpn_pre_nms_top_n_test: int = 300
    rpn_post_nms_top_n_test: int = 100
    rpn_nms_thresh: float = Field(0.7, gt=0, le=1)
    rpn_batch_size_per_image: int = 256
    box_batch_size_per_image: int = 128
    box_positive_fraction: float = Field(0.25, gt=0, le=1)
    box_fg_iou_thresh: float = Field(0.5, gt=0, le=1)
    box_bg_iou_thresh: float = Field(0.5, gt=0, le=1)
    box_score_thresh: float = Field(0.05, ge=0, le=1)
    box_nms_thresh: float = Field(0.5, gt=0, le=1)
    detections_per_img: int = Field(50, ge=1, le=1000)
    box_head_dim: int = Field(256, ge=16)
    box_head_convs: int = Field(0, ge=0)
    """Extra 3x3 convs before the box head's fully connected layers (detectron2 'conv' heads)."""
    mask_head_layers: tuple[int, ...] = (128, 128)
    """Channels of the mask head's 3x3 convs; the mask is predicted at 2x the ROI size."""
    mask_roi_size: int = Field(14, ge=7, le=56)
    mask_pool_levels: int = Field(4, ge=1, le=4)
    """How many FPN levels, finest first, the mask head pools from: 4 assigns each ROI a level by
    its box size (torchvision, detectron2); 1 pools every ROI from P2 (stride 4). A long thin wire
    has a large box, so level assignment sends it to a coarse level although it is a few px wide."""
    roi_sampling_ratio: int = Field(2, ge=0)
    roi_aligned: bool = False
    """ROIAlign with the half-pixel correction (detectron2's aligned=True)."""
    box_reg_weights: tuple[float, float, float, float] = (10.0, 10.0, 5.0, 5.0)
    stride_in_1x1: bool = False
    """ResNet bottlenecks downsample in their 1x1 conv (detectron2's MSRA weights), not the 3x3."""
    semantics: Literal["torchvision", "detectron2"] = "torchvision"
    """Whose anchors, proposal selection, ROI level assignment and detection filtering to follow
    (``detectron2``: imported checkpoints, see ``nanoseg.detectron2_compat``)."""
    anchor_offset: float = Field(0.0, ge=0, lt=1)
    """Centre of the first anchor, in strides (detectron2 semantics only)."""
    rpn_min_box_size: float = Field(1e-3, ge=0)
    """Proposals with a side below this are dropped, px (detectron2 semantics: not above it)."""
    mask_refiner: MaskRefinerConfig | None = None
    """Refine each coarse mask from the image at a finer grid (``nanoseg.mask_refiner``); trained
    after the network, on its own detections (``nanoseg train-refiner``)."""

    @model_validator(mode="after")
    def _consistent(self) -> ModelConfig:
        if len(self.image_mean) != self.in_channels or len(self.image_std) != self.in_channels:
            raise ValueError("image_mean and image_std need one value per input channel")
        if len(self.anchor_sizes) != 5:
            raise ValueError("anchor_sizes needs one size per FPN level (5: P2..P6)")
        if self.stride_in_1x1 and self.backbone not in ("resnet50", "resnet101"):
            raise ValueError("stride_in_1x1 applies to bottleneck ResNets (resnet50, resnet101) only")
        if self.semantics == "detectron2" and not (self.roi_aligned and self.backbone != "mobilenet_v3_large"):
            raise ValueError("detectron2 semantics need a ResNet backbone and roi_aligned")
        if self.mask_pool_levels != 4 and self.semantics == "detectron2":
            raise ValueError("mask_pool_levels applies to torchvision semantics only")
        if self.anchor_offset and self.semantics != "detectron2":
            raise ValueError("anchor_offset needs detectron2 semantics")
        if self.mask_refiner is not None and self.semantics != "torchvision":
            raise ValueError("mask_refiner needs torchvision semantics (its crops use torchvision's mask-target grid)")
        return self


def mask_grid_offset_px(cfg: ModelConfig) -> float:
    """Where a model's M x M mask grid sits relative to its box, as training taught it.

    torchvision's mask targets (``project_masks_on_boxes``: ROIAlign with ``aligned=False``)
    sample the ground truth half a pixel right of and below the box's pixel-edge grid, so a
    network trained by nanoseg predicts masks shifted by +0.5 px in x and y; detectron2 trains with
    ROIAlignV2 (``aligned=True``), whose grid is the box's own. Mask pasting adds this offset.

    Parameters
    ----------
    cfg : ModelConfig

    Returns
    -------
    float
        Offset in px along x and y: 0.5 for torchvision semantics, 0.0 for detectron2.
    """
    return 0.0 if cfg.semantics == "detectron2" else 0.5


class FixedScaleTransform(GeneralizedRCNNTransform):
    """Normalise and batch, never resize: the frame preparation owns the pixel scale."""

    def resize(
        self, image: Tensor, target: dict[str, Tensor] | None = None
    ) -> tuple[Tensor, dict[str, Tensor] | None]:
        """Leave the image at its size (frame preparation already set the pixel scale).

        Parameters
        ----------
        image : Tensor, shape (C, H, W)
        target : dict, optional
            Training targets (boxes in px), unchanged.

        Returns
        -------
        (Tensor, dict or None)
            ``image`` and ``target`` as given.
        """
        return image, target


def _norm_layer(norm: Norm) -> Callable[[int], nn.Module]:
    if norm == "frozen_bn":
        return FrozenBatchNorm2d
    if norm == "bn":
        return nn.BatchNorm2d
    return lambda c: nn.GroupNorm(32 if c % 32 == 0 else 16, c)


def _resnet_fpn(cfg: ModelConfig) -> nn.Module:
    norm = _norm_layer(cfg.norm)
    ctor = {"resnet18": resnet18, "resnet34": resnet34, "resnet50": resnet50, "resnet101": resnet101}[cfg.backbone]
    body = ctor(weights=None, norm_layer=norm)
    if cfg.stride_in_1x1:
        for layer in (body.layer2, body.layer3, body.layer4):
            layer[0].conv1.stride, layer[0].conv2.stride = layer[0].conv2.stride, (1, 1)
    if cfg.in_channels != 3:
        body.conv1 = nn.Conv2d(cfg.in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
    c2 = 64 if cfg.backbone in ("resnet18", "resnet34") else 256
    return BackboneWithFPN(
        body,
        return_layers={"layer1": "0", "layer2": "1", "layer3": "2", "layer4": "3"},
        in_channels_list=[c2, c2 * 2, c2 * 4, c2 * 8],
        out_channels=cfg.fpn_channels,
        extra_blocks=LastLevelMaxPool(),
    )


def _mobilenet_fpn(cfg: ModelConfig) -> nn.Module:
    norm = _norm_layer(cfg.norm)
    body = mobilenet_v3_large(weights=None, norm_layer=norm).features
    if cfg.in_channels != 3:
        first = body[0][0]
        body[0][0] = nn.Conv2d(cfg.in_channels, first.out_channels, 3, 2, 1, bias=False)
    # Outputs of these blocks are at strides 4, 8, 16 and 32 in mobilenet_v3_large.features.
    idx = [3, 6, 12, 16]
    return BackboneWithFPN(
        body,
        return_layers={str(i): str(k) for k, i in enumerate(idx)},
        in_channels_list=[_out_channels(body[i]) for i in idx],
        out_channels=cfg.fpn_channels,
        extra_blocks=LastLevelMaxPool(),
    )


def _out_channels(block: nn.Module) -> int:
    if hasattr(block, "out_channels"):
        return int(block.out_channels)  # type: ignore[arg-type]
    convs = [m for m in block.modules() if isinstance(m, nn.Conv2d)]
    return int(convs[-1].out_channels)


def _pooler(cfg: ModelConfig, size: int, levels: int = 4) -> MultiScaleRoIAlign:
    if cfg.semantics == "detectron2":
        return d2.Detectron2RoIAlign(size, cfg.roi_sampling_ratio)
    cls = d2.AlignedMultiScaleRoIAlign if cfg.roi_aligned else MultiScaleRoIAlign
    return cls(featmap_names=["0", "1", "2", "3"][:levels], output_size=size, sampling_ratio=cfg.roi_sampling_ratio)


class ConvFCBoxHead(nn.Module):
    """Optional 3x3 convs followed by two fully connected layers (detectron2's FastRCNNConvFCHead)."""

    def __init__(self, in_channels: int, resolution: int, convs: int, dim: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for _ in range(convs):
            layers += [nn.Conv2d(in_channels, in_channels, 3, padding=1), nn.ReLU(inplace=True)]
        self.convs = nn.Sequential(*layers)
        self.mlp = TwoMLPHead(in_channels * resolution * resolution, dim)

    def forward(self, x: Tensor) -> Tensor:
        """Box features of pooled regions.

        Parameters
        ----------
        x : Tensor, shape (N, C, R, R)
            Pooled FPN features of N boxes.

        Returns
        -------
        Tensor, shape (N, dim)
        """
        return self.mlp(self.convs(x))


def build_model(cfg: ModelConfig) -> MaskRCNN:
    """The untrained one-class Mask R-CNN that a config describes.

    Parameters
    ----------
    cfg : ModelConfig
        Backbone, FPN, anchors (px), heads, mask refiner, and the pixel semantics (torchvision or
        detectron2).

    Returns
    -------
    torchvision.models.detection.MaskRCNN
        In training mode, float32, on the CPU; it never resizes its input (``FixedScaleTransform``).
    """
    backbone = _mobilenet_fpn(cfg) if cfg.backbone == "mobilenet_v3_large" else _resnet_fpn(cfg)
    if cfg.semantics == "detectron2":
        anchors: AnchorGenerator = d2.Detectron2AnchorGenerator(cfg.anchor_sizes, cfg.aspect_ratios, cfg.anchor_offset)
    else:
        anchors = AnchorGenerator(
            sizes=tuple((s,) for s in cfg.anchor_sizes),
            aspect_ratios=(tuple(cfg.aspect_ratios),) * len(cfg.anchor_sizes),
        )
    box_pool = _pooler(cfg, 7)
    box_head: nn.Module = (
        ConvFCBoxHead(cfg.fpn_channels, 7, cfg.box_head_convs, cfg.box_head_dim)
        if cfg.box_head_convs
        else TwoMLPHead(cfg.fpn_channels * 7 * 7, cfg.box_head_dim)
    )
    mask_head = MaskRCNNHeads(cfg.fpn_channels, list(cfg.mask_head_layers), 1)
    model = MaskRCNN(
        backbone,
        num_classes=None,
        rpn_anchor_generator=anchors,
        rpn_pre_nms_top_n_train=cfg.rpn_pre_nms_top_n_train,
        rpn_post_nms_top_n_train=cfg.rpn_post_nms_top_n_train,
        rpn_pre_nms_top_n_test=cfg.rpn_pre_nms_top_n_test,
        rpn_post_nms_top_n_test=cfg.rpn_post_nms_top_n_test,
        rpn_nms_thresh=cfg.rpn_nms_thresh,
        rpn_batch_size_per_image=cfg.rpn_batch_size_per_image,
        box_roi_pool=box_pool,
        box_head=box_head,
        box_predictor=FastRCNNPredictor(cfg.box_head_dim, 2),
        box_score_thresh=cfg.box_score_thresh,
        box_nms_thresh=cfg.box_nms_thresh,
        box_detections_per_img=cfg.detections_per_img,
        box_fg_iou_thresh=cfg.box_fg_iou_thresh,
        box_bg_iou_thresh=cfg.box_bg_iou_thresh,
        box_batch_size_per_image=cfg.box_batch_size_per_image,
        box_positive_fraction=cfg.box_positive_fraction,
        bbox_reg_weights=cfg.box_reg_weights,
        mask_roi_pool=_pooler(cfg, cfg.mask_roi_size, cfg.mask_pool_levels),
        mask_head=mask_head,
        mask_predictor=MaskRCNNPredictor(cfg.mask_head_layers[-1], cfg.mask_head_layers[-1], 2),
    )
    model.rpn.min_size = cfg.rpn_min_box_size
    if cfg.semantics == "detectron2":
        model.rpn = d2.detectron2_rpn(model.rpn, cfg.rpn_min_box_size)
        model.roi_heads = d2.detectron2_roi_heads(model.roi_heads)
    model.transform = FixedScaleTransform(
        min_size=512, max_size=4096, image_mean=list(cfg.image_mean), image_std=list(cfg.image_std)
    )
    if cfg.mask_refiner is not None:
        model.mask_refiner = MaskRefiner(cfg.mask_refiner)
    return model


def count_parameters(model: nn.Module) -> int:
    """Number of parameters of a network.

    Parameters
    ----------
    model : torch.nn.Module

    Returns
    -------
    int
        Trainable and frozen parameters together.
    """
    return sum(p.numel() for p in model.parameters())


def describe(cfg: ModelConfig) -> dict[str, Any]:
    """A short human-readable summary for model cards and manifests.

    Parameters
    ----------
    cfg : ModelConfig

    Returns
    -------
    dict
        ``architecture`` (e.g. "Mask R-CNN, resnet18-FPN(128), norm=bn"), ``in_channels`` and
        ``mask_resolution`` (M of the output mask grids).
    """
    return {"architecture": f"Mask R-CNN, {cfg.backbone}-FPN({cfg.fpn_channels}), norm={cfg.norm}",
            "in_channels": cfg.in_channels, "mask_resolution": mask_resolution(cfg)}


def mask_resolution(cfg: ModelConfig) -> int:
    """Side of the mask grids a model outputs.

    Parameters
    ----------
    cfg : ModelConfig

    Returns
    -------
    int
        M of the M x M grids, in cells: the refiner's grid, else twice the mask ROI size.
    """
    return cfg.mask_refiner.size if cfg.mask_refiner is not None else 2 * cfg.mask_roi_size
