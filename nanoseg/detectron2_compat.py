"""detectron2's inference conventions on torchvision's Mask R-CNN modules.

An imported detectron2 checkpoint (``nanoseg.detectron2_import``) reproduces detectron2's numbers
only where torchvision computes the same thing. Where it does not, the module here overrides just
that computation; the parameters (and so the state-dict keys) stay torchvision's:

* anchors: detectron2 neither rounds the cell anchors nor infers strides from the padded image
  size; it uses the backbone's strides and an ``offset`` (in strides) for the first anchor centre;
* RPN proposal selection: NMS ranks objectness *logits* (torchvision ranks sigmoid
  probabilities, which tie at 1.0 in float32 for confident anchors), non-finite proposals are
  dropped, and a proposal is kept when both sides are strictly greater than ``min_size``;
* ROI level assignment: ``floor(4 + log2(sqrt(area) / 224 + 1e-8))`` at the fixed feature
  strides 4..32 (torchvision adds its ``eps`` after the logarithm and infers the strides);
* detections: no removal of boxes under 0.01 px before NMS; empty boxes are removed after the
  top-k cut instead (detectron2's ``detector_postprocess``).

ResNet bottlenecks with the stride in the 1x1 convolution are set up in ``nanoseg.model``.
Boxes are xyxy in input pixels (pixel-edge coordinates, y down) throughout.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.models.detection.rpn import RegionProposalNetwork
from torchvision.ops import MultiScaleRoIAlign, poolers
from torchvision.ops import boxes as box_ops
from torchvision.ops.poolers import LevelMapper

FPN_STRIDES = (4, 8, 16, 32, 64)
"""Strides of P2..P6, px."""


class AlignedMultiScaleRoIAlign(MultiScaleRoIAlign):
    """MultiScaleRoIAlign with ``aligned=True`` (pixel model of detectron2's ROIAlignV2)."""

    def forward(self, x: dict[str, Tensor], boxes: list[Tensor], image_shapes: list[tuple[int, int]]) -> Tensor:
        """Pool each box from its FPN level with ``aligned=True`` (detectron2's ROIAlignV2 pixel model).

        Parameters
        ----------
        x : dict of str to Tensor
            FPN feature maps, (B, C, H_l, W_l) each.
        boxes : list of Tensor, shape (N_b, 4)
            Per image, xyxy px in input coordinates.
        image_shapes : list of (int, int)
            Per image, (H, W) of the input in px.

        Returns
        -------
        Tensor, shape (sum N_b, C, R, R)
            R = ``output_size``.
        """
        x_filtered = poolers._filter_input(x, self.featmap_names)
        if self.scales is None or self.map_levels is None:  # type: ignore[has-type]
            self.scales, self.map_levels = poolers._setup_scales(
                x_filtered, image_shapes, self.canonical_scale, self.canonical_level
            )
        rois = poolers._convert_to_roi_format(boxes)
        if len(x_filtered) == 1:
            return torch.ops.torchvision.roi_align(
                x_filtered[0], rois, self.scales[0], self.output_size[0], self.output_size[1],
                self.sampling_ratio, True,
            )
        levels = self.map_levels(boxes)
        num_rois = rois.shape[0]  # traced: ``len`` would freeze the trace image's proposal count
        c = x_filtered[0].shape[1]
        result = torch.zeros((num_rois, c, *self.output_size), dtype=x_filtered[0].dtype, device=rois.device)
        for level, (feat, scale) in enumerate(zip(x_filtered, self.scales)):
            idx = torch.where(levels == level)[0]
            result[idx] = torch.ops.torchvision.roi_align(
                feat, rois[idx], scale, self.output_size[0], self.output_size[1], self.sampling_ratio, True
            ).to(result.dtype)
        return result


class Detectron2AnchorGenerator(AnchorGenerator):
    """detectron2's DefaultAnchorGenerator: one size per level, unrounded, fixed strides."""

    def __init__(self, sizes: tuple[int, ...], aspect_ratios: tuple[float, ...], offset: float) -> None:
        super().__init__(tuple((s,) for s in sizes), (tuple(aspect_ratios),) * len(sizes))
        self.offset = offset

    def generate_anchors(
        self,
        scales: list[int],
        aspect_ratios: list[float],
        dtype: torch.dtype = torch.float32,
        device: torch.device | None = None,
    ) -> Tensor:
        # In double precision, then rounded once to float32, as detectron2 does.
        """Cell anchors of one level, as detectron2 computes them (double precision, rounded once).

        Parameters
        ----------
        scales : list of int
            Anchor sizes in px (square root of the area).
        aspect_ratios : list of float
            Height / width.
        dtype : torch.dtype, optional
        device : torch.device, optional

        Returns
        -------
        Tensor, shape (len(scales) * len(aspect_ratios), 4)
            xyxy px around (0, 0), unrounded.
        """
        cells = []
        for size in scales:
            for ratio in aspect_ratios:
                w = math.sqrt(size * size / ratio)
                h = ratio * w
                cells.append([-w / 2.0, -h / 2.0, w / 2.0, h / 2.0])
        return torch.tensor(cells, dtype=dtype, device=device)

    def forward(self, image_list: ImageList, feature_maps: list[Tensor]) -> list[Tensor]:
        """Anchors of every FPN level over the feature maps, at detectron2's fixed strides and offset.

        Parameters
        ----------
        image_list : ImageList
        feature_maps : list of Tensor
            One per level, (B, C, H_l, W_l).

        Returns
        -------
        list of Tensor
            One (A, 4) xyxy px tensor per image (the same anchors for each).
        """
        dtype, device = feature_maps[0].dtype, feature_maps[0].device
        self.set_cell_anchors(dtype, device)
        per_level = []
        for fmap, stride, cell in zip(feature_maps, FPN_STRIDES, self.cell_anchors):
            h, w = fmap.shape[-2:]
            xs = (torch.arange(w, dtype=torch.float32, device=device) + self.offset) * stride
            ys = (torch.arange(h, dtype=torch.float32, device=device) + self.offset) * stride
            sy, sx = torch.meshgrid(ys, xs, indexing="ij")
            shifts = torch.stack((sx.reshape(-1), sy.reshape(-1), sx.reshape(-1), sy.reshape(-1)), dim=1)
            per_level.append((shifts.view(-1, 1, 4) + cell.view(1, -1, 4)).reshape(-1, 4).to(dtype))
        anchors = torch.cat(per_level)
        return [anchors for _ in image_list.image_sizes]


class Detectron2RPN(RegionProposalNetwork):
    """RPN whose test-time proposal selection is detectron2's ``find_top_rpn_proposals``.

    The scores returned with the proposals are objectness logits (torchvision: probabilities).
    """

    def filter_proposals(
        self,
        proposals: Tensor,
        objectness: Tensor,
        image_shapes: list[tuple[int, int]],
        num_anchors_per_level: list[int],
    ) -> tuple[list[Tensor], list[Tensor]]:
        """detectron2's ``find_top_rpn_proposals``: top-k per level, clip, drop small, NMS per level.

        Parameters
        ----------
        proposals : Tensor, shape (B, A, 4)
            Decoded boxes, xyxy px.
        objectness : Tensor
            Objectness logits, B x A.
        image_shapes : list of (int, int)
            Per image, (H, W) in px.
        num_anchors_per_level : list of int

        Returns
        -------
        boxes : list of Tensor
            Per image, (P, 4) xyxy px, at most ``post_nms_top_n``.
        scores : list of Tensor
            Per image, (P,) objectness logits (torchvision returns probabilities).
        """
        num_images = proposals.shape[0]
        device = proposals.device
        objectness = objectness.detach().reshape(num_images, -1)
        levels = torch.cat(
            [torch.full((n,), i, dtype=torch.int64, device=device) for i, n in enumerate(num_anchors_per_level)]
        ).reshape(1, -1).expand_as(objectness)
        top_n_idx = self._get_top_n_idx(objectness, num_anchors_per_level)
        batch_idx = torch.arange(num_images, device=device)[:, None]
        objectness = objectness[batch_idx, top_n_idx]
        levels = levels[batch_idx, top_n_idx]
        proposals = proposals[batch_idx, top_n_idx]

        final_boxes, final_scores = [], []
        for boxes, logits, lvl, img_shape in zip(proposals, objectness, levels, image_shapes):
            keep = torch.where(torch.isfinite(boxes).all(dim=1) & torch.isfinite(logits))[0]
            boxes = box_ops.clip_boxes_to_image(boxes[keep], img_shape)
            logits, lvl = logits[keep], lvl[keep]
            wh = boxes[:, 2:] - boxes[:, :2]
            keep = torch.where((wh > self.min_size).all(dim=1))[0]
            boxes, logits, lvl = boxes[keep], logits[keep], lvl[keep]
            keep = box_ops.batched_nms(boxes, logits, lvl, self.nms_thresh)[: self.post_nms_top_n()]
            final_boxes.append(boxes[keep])
            final_scores.append(logits[keep])
        return final_boxes, final_scores


class Detectron2LevelMapper(LevelMapper):
    """detectron2's ``assign_boxes_to_levels`` (canonical box size 224 px at level 4)."""

    def __call__(self, boxlists: list[Tensor]) -> Tensor:
        sizes = torch.sqrt(torch.cat([box_ops.box_area(b) for b in boxlists]))
        levels = torch.floor(self.lvl0 + torch.log2(sizes / self.s0 + 1e-8))
        return torch.clamp(levels, min=self.k_min, max=self.k_max).to(torch.int64) - self.k_min


class Detectron2RoIAlign(AlignedMultiScaleRoIAlign):
    """ROIAlignV2 over P2..P5 at detectron2's fixed scales and level assignment."""

    def __init__(self, output_size: int, sampling_ratio: int) -> None:
        super().__init__(featmap_names=["0", "1", "2", "3"], output_size=output_size, sampling_ratio=sampling_ratio)
        self.scales = [1.0 / s for s in FPN_STRIDES[:4]]
        self.map_levels = Detectron2LevelMapper(2, 5)


class Detectron2RoIHeads(RoIHeads):
    """RoIHeads whose detection filtering is detectron2's ``fast_rcnn_inference``."""

    def postprocess_detections(
        self,
        class_logits: Tensor,
        box_regression: Tensor,
        proposals: list[Tensor],
        image_shapes: list[tuple[int, int]],
    ) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        """detectron2's ``fast_rcnn_inference``: per-class boxes, score threshold, NMS, top detections.

        Parameters
        ----------
        class_logits : Tensor, shape (sum N, classes + 1)
        box_regression : Tensor, shape (sum N, 4 * (classes + 1))
        proposals : list of Tensor
            Per image, (N, 4) xyxy px.
        image_shapes : list of (int, int)
            Per image, (H, W) in px.

        Returns
        -------
        boxes : list of Tensor
            Per image, (D, 4) xyxy px, clipped, non-empty.
        scores : list of Tensor
            Per image, (D,) class probabilities.
        labels : list of Tensor
            Per image, (D,) int64 class labels (1-based).
        """
        per_image = [p.shape[0] for p in proposals]
        pred_boxes = self.box_coder.decode(box_regression, proposals).split(per_image, 0)
        pred_scores = F.softmax(class_logits, -1).split(per_image, 0)
        all_boxes, all_scores, all_labels = [], [], []
        for boxes, scores, image_shape in zip(pred_boxes, pred_scores, image_shapes):
            finite = torch.where(torch.isfinite(boxes).all(dim=2).all(dim=1) & torch.isfinite(scores).all(dim=1))[0]
            boxes = box_ops.clip_boxes_to_image(boxes[finite], image_shape)[:, 1:].reshape(-1, 4)
            labels = torch.arange(1, scores.shape[1], device=scores.device).repeat(finite.numel())
            scores = scores[finite][:, 1:].reshape(-1)
            keep = torch.where(scores > self.score_thresh)[0]
            boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
            keep = box_ops.batched_nms(boxes, scores, labels, self.nms_thresh)[: self.detections_per_img]
            boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
            wh = boxes[:, 2:] - boxes[:, :2]
            keep = torch.where((wh > 0).all(dim=1))[0]
            all_boxes.append(boxes[keep])
            all_scores.append(scores[keep])
            all_labels.append(labels[keep])
        return all_boxes, all_scores, all_labels


def detectron2_rpn(rpn: RegionProposalNetwork, min_size: float) -> Detectron2RPN:
    """An RPN with ``rpn``'s modules and settings and detectron2's proposal selection.

    Parameters
    ----------
    rpn : RegionProposalNetwork
    min_size : float
        Proposals with a side at or below it (px) are dropped.

    Returns
    -------
    Detectron2RPN
    """
    out = Detectron2RPN(
        rpn.anchor_generator, rpn.head,
        rpn.proposal_matcher.high_threshold, rpn.proposal_matcher.low_threshold,
        rpn.fg_bg_sampler.batch_size_per_image, rpn.fg_bg_sampler.positive_fraction,
        dict(rpn._pre_nms_top_n), dict(rpn._post_nms_top_n), rpn.nms_thresh, rpn.score_thresh,
    )
    out.min_size = min_size
    return out


def detectron2_roi_heads(heads: RoIHeads) -> Detectron2RoIHeads:
    """ROI heads with ``heads``' modules and settings and detectron2's detection filtering.

    Parameters
    ----------
    heads : RoIHeads

    Returns
    -------
    Detectron2RoIHeads
        Sharing ``heads``' modules (not copies), in the same train/eval mode.
    """
    return rebuilt_roi_heads(heads, Detectron2RoIHeads)


def rebuilt_roi_heads(heads: RoIHeads, cls: type[RoIHeads] | None = None, masks: bool = True) -> RoIHeads:
    """ROI heads rebuilt from another's modules (shared, not copied), settings and train/eval mode.

    Parameters
    ----------
    heads : RoIHeads
    cls : type of RoIHeads, optional
        The class to build; default ``heads``' own.
    masks : bool, optional
        False leaves the mask branch out (detection only).

    Returns
    -------
    RoIHeads
        An instance of ``cls``.
    """
    branch = ({"mask_roi_pool": heads.mask_roi_pool, "mask_head": heads.mask_head,
               "mask_predictor": heads.mask_predictor} if masks else {})
    out = (cls or type(heads))(
        heads.box_roi_pool, heads.box_head, heads.box_predictor,
        heads.proposal_matcher.high_threshold, heads.proposal_matcher.low_threshold,
        heads.fg_bg_sampler.batch_size_per_image, heads.fg_bg_sampler.positive_fraction,
        heads.box_coder.weights, heads.score_thresh, heads.nms_thresh, heads.detections_per_img,
        **branch,
    )
    return out.train(heads.training)
