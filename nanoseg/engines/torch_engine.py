"""Eager PyTorch engine (CPU or CUDA).

On CUDA each engine runs the network on a stream of its own and hands its outputs to the
caller's stream, so that several engines of one model (the daemon's ``model.instances``), each
called from its own thread, run their kernels at the same time; the caller's later work on the
outputs (``nanoseg.device_postprocess``) waits for them. Not yet run on a GPU here.
"""

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
        self.stream = torch.cuda.Stream(device=device) if str(device).startswith("cuda") else None

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
        x = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32))
        if self.stream is None:
            boxes, scores, masks, num = self.core(x.to(self.device))
            return boxes, scores, masks, num
        caller = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(caller)  # whatever the caller queued before (weights, inputs) first
        with torch.cuda.stream(self.stream):
            outputs = self.core(x.to(self.device))
        caller.wait_stream(self.stream)  # the caller's next work on the outputs waits for them
        for t in outputs:
            t.record_stream(caller)  # their memory is not reused before the caller is done with them
        boxes, scores, masks, num = outputs
        return boxes, scores, masks, num
