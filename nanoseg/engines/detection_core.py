"""The network as every engine runs it: fixed-shape outputs, masks stopped at M x M probabilities.

``DetectionCore`` wraps a torchvision Mask R-CNN so that its outputs have a static shape: the
detections are padded to ``K`` (the model's ``detections_per_img``) and ``num_detections`` says
how many are real. The graph stops at the per-detection M x M mask probabilities; pasting them
into the frame happens in numpy (``nanoseg.postprocess``), as every deployed Mask R-CNN export
does, which keeps the ONNX graph free of per-box resize loops and TensorRT-friendly.

Inputs and outputs (B = batch, C = channels, K = detections, M = mask resolution):

* ``image``: (B, C, H, W) float32, 0–255 at the model's pixel scale;
* ``boxes``: (B, K, 4) float32 xyxy px in input coordinates; ``scores``: (B, K) float32;
* ``mask_probs``: (B, K, M, M) float32 in [0, 1]; ``num_detections``: (B,) int64.

A ``MaskDecoding`` other than the plain one (margin, mask TTA, box refinement:
``nanoseg.mask_decoding``) recomputes the masks of the detections: the backbone runs once on the
image and its views, detection uses the image's features, the box head (with ``refine_boxes``)
and the mask head run on every view. A model with a ``mask_refiner`` (``nanoseg.mask_refiner``)
then refines the (view-averaged) masks from the image: M is the refiner's grid.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import Tensor, nn
from torchvision.models.detection import MaskRCNN

from nanoseg.detectron2_compat import rebuilt_roi_heads
from nanoseg.mask_decoding import (
    VIEWS,
    MaskDecoding,
    grow_boxes,
    unview_boxes,
    unview_grids,
    view_boxes,
    view_image,
    view_size,
)
from nanoseg.mask_refiner import MaskRefiner, image_crops
from nanoseg.model import ModelConfig, mask_grid_offset_px

INPUT_NAME = "image"
OUTPUT_NAMES = ("boxes", "scores", "mask_probs", "num_detections")


class DetectionCore(nn.Module):
    def __init__(self, model: MaskRCNN, decoding: MaskDecoding | None = None,
                 model_config: ModelConfig | None = None) -> None:
        """``model_config`` gives the pixel convention mask TTA mirrors boxes in (default:
        torchvision's)."""
        super().__init__()
        self.model = model.eval()
        self.decoding = decoding or MaskDecoding()
        cfg = model_config or ModelConfig()
        if self.decoding.refine_boxes and cfg.semantics != "torchvision":
            raise ValueError("refine_boxes needs a torchvision-semantics model (detectron2's box head "
                             "orders its classes differently)")
        self.offset_px = mask_grid_offset_px(cfg)
        self.refiner: MaskRefiner | None = getattr(model, "mask_refiner", None)
        # A decoding or a refiner predicts the masks itself: detect without torchvision's mask branch
        # (it would run the mask head a second time on every detection, ~1.3 ms each on 2 CPU cores).
        self.recompute = not self.decoding.is_plain or self.refiner is not None
        self.detector = rebuilt_roi_heads(model.roi_heads, masks=False) if self.recompute else model.roi_heads
        self.k = int(model.roi_heads.detections_per_img)
        pool = model.roi_heads.mask_roi_pool
        assert pool is not None
        self.m = self.refiner.size if self.refiner is not None else 2 * int(pool.output_size[0])

    def forward(self, image: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Detect, decode the masks, and pad every output to K detections.

        Parameters
        ----------
        image : Tensor, shape (B, C, H, W), float32
            Model inputs, 0–255 at the model's pixel scale.

        Returns
        -------
        boxes : Tensor, shape (B, K, 4), float32
            xyxy px in input coordinates, y down (zeros past ``num_detections``).
        scores : Tensor, shape (B, K), float32
        mask_probs : Tensor, shape (B, K, M, M), float32
            Mask probabilities in [0, 1] on each (grown) box's grid.
        num_detections : Tensor, shape (B,), int64
        """
        m = self.model
        images, _ = m.transform([im for im in image])
        x = images.tensors
        views = VIEWS[: self.decoding.tta]
        features = m.backbone(torch.cat([view_image(x, v) for v in views]) if len(views) > 1 else x)
        b = x.shape[0]
        own = features if len(views) == 1 else OrderedDict((k, f[:b]) for k, f in features.items())
        proposals, _ = m.rpn(images, own)
        detections, _ = self.detector(own, proposals, images.image_sizes)
        if self.recompute:
            hw = (int(x.shape[-2]), int(x.shape[-1]))
            for i in range(self.decoding.refine_boxes):
                refined = self._refine(features, [d["boxes"] for d in detections], hw)
                for det, (bx, sc) in zip(detections, refined):
                    det["boxes"] = bx
                    if i == 0:  # the class scores of the box head on the detector's own boxes
                        det["scores"] = sc
            grown = [grow_boxes(d["boxes"], self.decoding.margin_px) for d in detections]
            probs = self._mask_probs(features, grown, hw)
            if self.refiner is not None:
                crops = image_crops(x, grown, self.refiner.size)
                probs = _split(torch.sigmoid(self.refiner(crops, torch.cat(probs), torch.cat(grown))), grown)
            for det, p in zip(detections, probs):
                det["masks"] = p[:, None]
        boxes, scores, masks, counts = [], [], [], []
        for det in detections:
            n = det["boxes"].shape[0]
            probs = det["masks"][:, 0] if "masks" in det else det["boxes"].new_zeros((n, self.m, self.m))
            # Append K zero rows, keep the first K: always exactly K rows (n <= K), static in ONNX.
            boxes.append(torch.cat([det["boxes"], det["boxes"].new_zeros((self.k, 4))])[: self.k])
            scores.append(torch.cat([det["scores"], det["scores"].new_zeros((self.k,))])[: self.k])
            masks.append(torch.cat([probs, probs.new_zeros((self.k, self.m, self.m))])[: self.k])
            # Counted from a tensor (not the Python int n) so a traced graph keeps it dynamic.
            counts.append(torch.ones_like(det["scores"], dtype=torch.int64).sum().reshape(1))
        return torch.stack(boxes), torch.stack(scores), torch.stack(masks), torch.cat(counts)

    def _refine(self, features: dict[str, Tensor], boxes: list[Tensor], hw: tuple[int, int]
                ) -> list[tuple[Tensor, Tensor]]:
        """Per image, the (N, 4) boxes and (N,) class scores of the box head run on ``boxes`` in
        every view, mapped back and averaged (boxes clipped to the image)."""
        heads = self.model.roi_heads
        views = VIEWS[: self.decoding.tta]
        rois = [view_boxes(bx, hw, v, self.offset_px) for v in views for bx in boxes]
        sizes = [view_size(hw, v) for v in views for _ in boxes]
        logits, deltas = heads.box_predictor(heads.box_head(heads.box_roi_pool(features, rois, sizes)))
        scores = torch.softmax(logits, -1)[:, -1].reshape(len(views), -1)  # [background, wire]
        # decode_single on the wire class's deltas: BoxCoder.decode reshapes (N, 8) to (N, -1), which
        # ONNX Runtime cannot do for N = 0 (a frame without detections).
        decoded = heads.box_coder.decode_single(deltas[:, -4:], torch.cat(rois)).reshape(len(views), -1, 4)
        mean = torch.stack([unview_boxes(decoded[i], hw, v, self.offset_px) for i, v in enumerate(views)]).mean(0)
        # clipped to the image as box_ops.clip_boxes_to_image clips, without its stack and reshape:
        # ONNX Runtime's optimised int8 graph cannot reshape that stack for a frame without detections
        mean = torch.min(torch.max(mean, mean.new_zeros(4)), mean.new_tensor([hw[1], hw[0], hw[1], hw[0]]))
        score = scores.mean(0)
        if len(boxes) == 1:
            return [(mean, score)]
        counts = [bx.shape[0] for bx in boxes]  # traced sizes: a batched graph splits by the real counts
        return list(zip(mean.split(counts), score.split(counts)))

    def _mask_probs(self, features: dict[str, Tensor], grown: list[Tensor], hw: tuple[int, int]) -> list[Tensor]:
        """Per image, (N, m, m) mask-head probabilities of the ``grown`` boxes (the detections grown
        by the margin), averaged over the views; ``features`` hold the views' batches one after
        another."""
        heads = self.model.roi_heads
        assert heads.mask_roi_pool is not None and heads.mask_head is not None and heads.mask_predictor is not None
        views = VIEWS[: self.decoding.tta]
        rois = [view_boxes(g, hw, v, self.offset_px) for v in views for g in grown]
        sizes = [view_size(hw, v) for v in views for _ in grown]
        logits = heads.mask_predictor(heads.mask_head(heads.mask_roi_pool(features, rois, sizes)))
        fg = torch.sigmoid(logits[:, -1])  # one foreground class: the last channel (class-agnostic: the only one)
        m = int(fg.shape[-1])  # the mask head's grid (a refiner's M is finer)
        per_view = fg.reshape(len(views), -1, m, m)
        mean = torch.stack([unview_grids(per_view[i], v) for i, v in enumerate(views)]).mean(0)
        return _split(mean, grown)


def _split(rows: Tensor, boxes: list[Tensor]) -> list[Tensor]:
    """``rows`` (one per box, images one after another) split per image."""
    if len(boxes) == 1:
        return [rows]
    # ``shape[0]``, not ``len``: the tracer records the sizes, so an exported batch splits by each
    # image's real count (``len`` would freeze the trace image's counts into the graph).
    return list(rows.split([bx.shape[0] for bx in boxes]))
