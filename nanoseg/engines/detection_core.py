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
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torchvision.models.detection import MaskRCNN

INPUT_NAME = "image"
OUTPUT_NAMES = ("boxes", "scores", "mask_probs", "num_detections")


class DetectionCore(nn.Module):
    def __init__(self, model: MaskRCNN) -> None:
        super().__init__()
        self.model = model.eval()
        self.k = int(model.roi_heads.detections_per_img)
        pool = model.roi_heads.mask_roi_pool
        assert pool is not None
        self.m = 2 * int(pool.output_size[0])

    def forward(self, image: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        m = self.model
        images, _ = m.transform([im for im in image])
        features = m.backbone(images.tensors)
        proposals, _ = m.rpn(images, features)
        detections, _ = m.roi_heads(features, proposals, images.image_sizes)
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
