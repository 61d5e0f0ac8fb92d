"""Eager PyTorch engine (CPU or CUDA)."""

from __future__ import annotations

import numpy as np
import torch
from torchvision.models.detection import MaskRCNN

from nanoseg.engines import RawDetections, split_outputs
from nanoseg.engines.detection_core import DetectionCore
from nanoseg.mask_decoding import MaskDecoding
from nanoseg.model import ModelConfig


class TorchEngine:
    name = "torch"

    def __init__(self, model: MaskRCNN, input_shape: tuple[int, int, int], device: str = "cpu",
                 max_batch: int = 4, threads: int | None = None, decoding: MaskDecoding | None = None,
                 model_config: ModelConfig | None = None) -> None:
        if threads:
            torch.set_num_threads(threads)
        self.device = device
        self.input_shape = input_shape
        self.max_batch = max_batch
        self.core = DetectionCore(model, decoding, model_config).to(device).eval()
        self.mask_decoding = self.core.decoding

    @torch.inference_mode()
    def infer(self, batch: np.ndarray) -> list[RawDetections]:
        """Run ``DetectionCore`` on the whole batch on the engine's device. See ``Engine.infer``."""
        boxes, scores, masks, num = self.infer_device(batch)
        return split_outputs(boxes.cpu().numpy(), scores.cpu().numpy(), masks.cpu().numpy(), num.cpu().numpy())

    @torch.inference_mode()
    def infer_device(self, batch: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``DetectionCore``'s padded outputs, left on the engine's device for ``nanoseg.device_postprocess``.

        Parameters
        ----------
        batch : ndarray, shape (B, C, H, W), float32
            As for ``Engine.infer``.

        Returns
        -------
        boxes, scores, mask_probs, num : Tensor
            (B, K, 4) xyxy input px, (B, K), (B, K, M, M) probabilities, (B,) real detections
            per image (``engines.split_outputs``'s inputs), on the engine's device.
        """
        x = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)).to(self.device)
        boxes, scores, masks, num = self.core(x)
        return boxes, scores, masks, num
