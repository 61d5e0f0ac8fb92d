"""Inference engines behind one interface: torch, ONNX Runtime, TensorRT (and Triton, remote).

Every engine runs the same ``DetectionCore`` graph and returns ``RawDetections`` per image, in
model-input pixel coordinates; ``nanoseg.postprocess`` turns them into frame ``Instances``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from nanoseg.mask_decoding import MaskDecoding


@dataclass(frozen=True)
class RawDetections:
    """Detections of one model input: boxes (K, 4) xyxy px, scores (K,), mask_probs (K, M, M)."""

    boxes: np.ndarray
    scores: np.ndarray
    mask_probs: np.ndarray

    def __len__(self) -> int:
        return int(self.scores.shape[0])


class Engine(Protocol):
    """Runs the network on a batch of prepared model inputs."""

    name: str
    device: str
    input_shape: tuple[int, int, int]
    """(C, H, W) the engine accepts."""
    max_batch: int
    mask_decoding: MaskDecoding
    """How the graph predicts masks (``nanoseg.mask_decoding``); mask pasting follows it."""

    def infer(self, batch: np.ndarray) -> list[RawDetections]:
        """Run the network on a batch of prepared model inputs.

        Parameters
        ----------
        batch : ndarray, shape (B, C, H, W), float32
            Model inputs at the model's pixel scale, values 0–255, (C, H, W) = ``input_shape``,
            B <= ``max_batch``. Lent for the call: an engine keeps no reference to it (nor a view)
            once ``infer`` returns, as the caller writes the next batch into the same buffer.

        Returns
        -------
        list of RawDetections
            One per image, boxes in input px (xyxy, y down), mask probabilities on the M x M grid.

        Raises
        ------
        EngineError
            If the engine cannot run the batch.
        """
        ...


def split_outputs(boxes: np.ndarray, scores: np.ndarray, mask_probs: np.ndarray,
                  num: np.ndarray) -> list[RawDetections]:
    """Un-pad the graph's fixed-shape outputs into one ``RawDetections`` per image.

    Parameters
    ----------
    boxes : ndarray, shape (B, K, 4)
        xyxy px in input coordinates.
    scores : ndarray, shape (B, K)
    mask_probs : ndarray, shape (B, K, M, M)
        Probabilities in [0, 1].
    num : ndarray, shape (B,)
        Real detections per image (the first ``num[b]`` rows; the rest is padding).

    Returns
    -------
    list of RawDetections
        Length B, arrays float32.
    """
    out = []
    for b in range(boxes.shape[0]):
        n = int(num[b])
        out.append(RawDetections(boxes[b, :n].astype(np.float32), scores[b, :n].astype(np.float32),
                                 mask_probs[b, :n].astype(np.float32)))
    return out


class EngineError(RuntimeError):
    """An engine could not be created or could not run (names the engine and the reason)."""
