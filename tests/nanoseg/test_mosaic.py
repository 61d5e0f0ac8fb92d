"""Small frames packed several to a model input (``nanoseg.mosaic``): layout, and the same
instances as for each frame alone where the detector sees only local content."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from nanoseg.checkpoint import load_checkpoint
from nanoseg.engines import RawDetections
from nanoseg.frame_profile import FrameProfile
from nanoseg.mask_decoding import MaskDecoding
from nanoseg.mosaic import Mosaic, pack_mosaic, plan_mosaics, split_detections
from nanoseg.postprocess import PostprocessConfig
from nanoseg.segmenter import Segmenter

M = 28


class BlobEngine:
    """A detector that sees only local content: each 8-connected blob of gray > 128 is one
    detection, its box the blob's pixel-edge extent, its mask the blob sampled on an M x M grid
    (``Engine`` interface; a stand-in for the network so that geometry can be compared exactly)."""

    name = "blob"
    device = "cpu"
    max_batch = 4

    def __init__(self, size: int) -> None:
        self.input_shape = (3, size, size)
        self.mask_decoding = MaskDecoding()

    def infer(self, batch: np.ndarray) -> list[RawDetections]:
        out = []
        for image in batch[:, 0]:
            labels, n = ndimage.label(image > 128, structure=np.ones((3, 3)))
            boxes, probs = [], []
            for k, sl in enumerate(ndimage.find_objects(labels), start=1):
                y, x = sl
                boxes.append([x.start, y.start, x.stop, y.stop])
                blob = (labels[sl] == k).astype(np.float32)
                ry = ((np.arange(M) + 0.5) * blob.shape[0] / M).astype(int)
                rx = ((np.arange(M) + 0.5) * blob.shape[1] / M).astype(int)
                probs.append(blob[np.ix_(ry, rx)])
            out.append(RawDetections(np.asarray(boxes, np.float32).reshape(-1, 4), np.full(n, 0.9, np.float32),
                                     np.asarray(probs, np.float32).reshape(-1, M, M)))
        return out


def test_frames_that_fit_share_inputs_on_a_grid() -> None:
    shapes: list[tuple[int, int] | None] = [(128, 128)] * 10 + [None, (400, 400), (100, 60)]
    plans = plan_mosaics(shapes, 512, 32)
    assert [m.frames for m in plans] == [tuple(range(9)), (9, 12)]  # 3 x 3 cells of 170 px
    assert {(m.k, m.cell) for m in plans} == {(3, 170)}
    assert plan_mosaics([(64, 64), (300, 300)], 512, 32) == []  # one frame that fits: it runs alone
    assert plan_mosaics([(90, 90)] * 20, 512, 32)[0].k == 4  # 16 to an input


def test_detections_go_to_the_frame_whose_cell_holds_their_centre() -> None:
    m = Mosaic((4, 7, 9), k=2, cell=256, size=512)
    tiles = [np.full((1, 512, 512), v, np.float32) for v in (10.0, 20.0, 30.0)]
    canvas = pack_mosaic(m, tiles)
    assert canvas[0, 0] == 10 and canvas[0, 300] == 20 and canvas[300, 0] == 30 and canvas[300, 300] == 10
    raw = RawDetections(np.array([[10, 10, 50, 30], [250, 20, 300, 40], [20, 270, 60, 290], [300, 300, 320, 320]],
                                 np.float32), np.array([0.9, 0.8, 0.7, 0.6], np.float32), np.zeros((4, M, M), np.float32))
    split = split_detections(m, raw)
    assert [d.scores.tolist() for d in split] == [[pytest.approx(0.9)], [pytest.approx(0.8)], [pytest.approx(0.7)]]
    assert split[1].boxes.tolist() == [[-6.0, 20.0, 44.0, 40.0]]  # reaches past its cell's left edge: kept
    assert split[2].boxes.tolist() == [[20.0, 14.0, 60.0, 34.0]]  # the empty fourth cell's detection: nobody's


def test_packed_frames_get_the_instances_they_get_alone(trained_model_path) -> None:  # type: ignore[no-untyped-def]
    ckpt = load_checkpoint(trained_model_path)
    size = int(ckpt.input_spec["size"])
    seg = Segmenter.for_checkpoint(BlobEngine(size), ckpt, PostprocessConfig(score_threshold=0.5))
    profile = FrameProfile(name="gray", mode="intensity", normalise=False, input="optical_density")
    rng = np.random.default_rng(0)
    frames = []
    for i in range(11):
        img = np.zeros((96 + 8 * (i % 3), 120), np.float32)
        for _ in range(4):  # rods, some at the frame's edges
            y, x = rng.integers(0, img.shape[0] - 6), rng.integers(0, 100)
            img[y: y + 5, x: x + int(rng.integers(8, 40))] = 1.0
        img[0, 0] = 1.0
        frames.append(seg.prepare(img, profile))
    tiles = [p.tiles for p in frames]
    alone = seg.detect_frames(tiles)
    packed = seg.detect_packed(tiles, [p.model_shape for p in frames], gap=32)
    assert sum(len(r[0]) for r in alone) > 30
    for p, a, b in zip(frames, alone, packed):
        ia, ib = seg.analyse(p, None, detections=a).instances, seg.analyse(p, None, detections=b).instances
        assert len(ia) == len(ib) and np.array_equal(ia.boxes, ib.boxes)
        assert np.array_equal(ia.box_masks.dense(), ib.box_masks.dense())
