"""The null engine: fixed detections at once, no network; for measuring everything around the engine.

``nanoseg_daemon``'s ingest benchmark (``benchmarks/bench_daemon.py --engine null``) runs the
daemon with it, so decoding, optical density, tiling, mask pasting, statistics, the store and
publishing do their real work on every frame while inference costs nothing.

Every model input gets the same ``DETECTIONS`` wires (or the first N of them, ``detections``; 0:
none, which measures the path without per-particle work): thin rods of several orientations and
lengths in the input's top-left 128 x 128 px (so a 128 x 128 frame shows all of them), each with
an M x M grid of mask probabilities that is high along the rod's axis and falls off across it.
"""

from __future__ import annotations

import numpy as np

from nanoseg.engines import EngineError, RawDetections
from nanoseg.mask_decoding import MaskDecoding

DETECTIONS: tuple[tuple[float, float, float, float, float], ...] = (
    # x0, y0, x1, y1 (px, input coordinates, y down), score; the rod runs corner to corner
    (8.0, 10.0, 70.0, 22.0, 0.98),
    (80.0, 6.0, 92.0, 90.0, 0.95),
    (20.0, 40.0, 60.0, 80.0, 0.91),
    (66.0, 96.0, 122.0, 120.0, 0.87),
    (6.0, 92.0, 40.0, 124.0, 0.74),
    (100.0, 30.0, 124.0, 60.0, 0.62),
)


def rod_probabilities(m: int, diagonal: bool, width: float = 0.18) -> np.ndarray:
    """An M x M grid of mask probabilities for a rod filling its box: along the long axis of the
    box, or along its main diagonal (``diagonal``), with a Gaussian profile across it whose
    sigma is ``width`` of the grid. Returns float32 in [0, 1], rows along y."""
    c = (np.arange(m, dtype=np.float32) + 0.5) / m
    y, x = np.meshgrid(c, c, indexing="ij")
    dist = np.abs(x - y) / np.sqrt(2.0) if diagonal else np.abs(y - 0.5)
    return np.exp(-0.5 * (dist / width) ** 2).astype(np.float32)


class NullEngine:
    """Returns ``DETECTIONS`` (the first ``detections`` of them) for every input, with no
    computation (``Engine`` interface).

    Parameters
    ----------
    input_shape : (int, int, int)
        (C, H, W) the engine accepts, px; the model's, so frames are prepared as for it.
    mask_resolution : int, optional
        M of the mask grids.
    max_batch : int, optional
        Most inputs per ``infer`` call.
    detections : int, optional
        How many of the ``DETECTIONS`` rods each input gets, 0 to ``len(DETECTIONS)`` (default: all).
    """

    name = "null"

    def __init__(self, input_shape: tuple[int, int, int], mask_resolution: int = 28, max_batch: int = 64,
                 detections: int = len(DETECTIONS)) -> None:
        if not 0 <= detections <= len(DETECTIONS):
            raise EngineError(f"null engine: detections must be 0 to {len(DETECTIONS)}, got {detections}")
        self.device = "cpu"
        self.input_shape = input_shape
        self.max_batch = max_batch
        self.mask_decoding = MaskDecoding()
        scale = min(input_shape[1], input_shape[2]) / 128.0 if min(input_shape[1:]) < 128 else 1.0
        table = np.asarray(DETECTIONS, np.float32)[:detections]
        boxes = table[:, :4] * scale
        probs = []
        for x0, y0, x1, y1 in boxes:
            w, h = x1 - x0, y1 - y0
            grid = rod_probabilities(mask_resolution, diagonal=max(w, h) < 3 * min(w, h))
            probs.append(grid if h <= w else grid.T)
        arrays = (boxes, table[:, 4].copy(),
                  np.stack(probs) if probs else np.zeros((0, mask_resolution, mask_resolution), np.float32))
        for a in arrays:
            a.flags.writeable = False  # shared by every result: nothing may change them in place
        self._detections = RawDetections(*arrays)

    def infer(self, batch: np.ndarray) -> list[RawDetections]:
        """The fixed detections for each input of ``batch`` (B, C, H, W). See ``Engine.infer``."""
        if batch.ndim != 4 or tuple(batch.shape[1:]) != self.input_shape:
            raise EngineError(f"null engine takes (B, {', '.join(map(str, self.input_shape))}), got {batch.shape}")
        return [self._detections] * batch.shape[0]
