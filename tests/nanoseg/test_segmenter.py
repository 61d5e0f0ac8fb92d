"""Segmenter.detect_frames: several frames' tiles through the engine together, as each alone."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from nanoseg.checkpoint import load_checkpoint
from nanoseg.engines.factory import engine_from_checkpoint
from nanoseg.postprocess import PostprocessConfig
from nanoseg.segmenter import Segmenter


def test_frames_batched_together_give_each_frames_own_detections(trained_model_path: Path,
                                                                   paper_samples: list) -> None:
    ckpt = load_checkpoint(trained_model_path)
    seg = Segmenter.for_checkpoint(engine_from_checkpoint(ckpt, "torch", threads=2), ckpt, PostprocessConfig())
    assert seg.engine.max_batch == 4
    grays = [g.astype(np.float32) for g, _ in paper_samples]
    a, b = np.stack(grays), np.stack(grays[::-1][:2])  # 3 tiles and 2: one engine call holds both frames
    together = seg.detect_frames([a, b])
    assert [len(t) for t in together] == [3, 2]
    for batched, alone in zip(together, (seg.detect_tiles(a), seg.detect_tiles(b))):
        for x, y in zip(batched, alone):
            assert len(x) == len(y) > 0
            np.testing.assert_allclose(x.boxes, y.boxes, atol=1e-3)
            np.testing.assert_allclose(x.scores, y.scores, atol=1e-5)
    # the same scene in both frames' tiles gives the same detections wherever it sits in the batch
    np.testing.assert_allclose(together[0][2].boxes, together[1][0].boxes, atol=1e-3)
