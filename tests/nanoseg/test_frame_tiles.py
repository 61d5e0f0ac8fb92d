"""Model inputs made only when asked (``FrameTiles``), written straight into lent batch buffers."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from nanoseg.engines import RawDetections
from nanoseg.mask_decoding import MaskDecoding
from nanoseg.mosaic import Mosaic, pack_mosaic
from nanoseg.postprocess import PostprocessConfig
from nanoseg.segmenter import Segmenter
from nanoseg.summary_stats import median_all
from nanoseg.tiling import FrameTiles, extract_tiles, plan_tiles

SIZE = 64


class RecordingEngine:
    """Keeps a copy of every batch it is given, and the buffer it came in; one detection per
    input whose score is the input's mean (so results depend on the pixels)."""

    device = "cpu"

    def __init__(self, channels: int = 1, max_batch: int = 4, pause_s: float = 0.0) -> None:
        self.input_shape = (channels, SIZE, SIZE)
        self.max_batch = max_batch
        self.mask_decoding = MaskDecoding()
        self.pause_s = pause_s
        self.seen: list[np.ndarray] = []
        self.bases: list[int] = []
        self.lock = threading.Lock()

    def infer(self, batch: np.ndarray) -> list[RawDetections]:
        before = batch.copy()
        threading.Event().wait(self.pause_s)  # another thread's batch may be written meanwhile
        np.testing.assert_array_equal(batch, before)  # nobody wrote into the batch during the call
        with self.lock:
            self.seen.append(before)
            self.bases.append(id(batch.base if batch.base is not None else batch))
        box = np.array([[1, 1, 9, 9]], np.float32)
        return [RawDetections(box, np.array([float(x.mean()) / 255], np.float32), np.ones((1, 28, 28), np.float32))
                for x in batch]


def gray(h: int, w: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 255, (h, w)).astype(np.float32)


@pytest.mark.parametrize("shape", [(40, 30), (64, 64), (100, 150), (64, 90)])
def test_described_tiles_are_the_tiles_extract_tiles_makes(shape: tuple[int, int]) -> None:
    image = gray(*shape, seed=1)
    plan = tuple(plan_tiles(shape, SIZE, 8))
    tiles = FrameTiles(image, plan)
    padded = any(t.valid_height < SIZE or t.valid_width < SIZE for t in plan)
    made = extract_tiles(image, plan, median_all(image) if padded else 0.0)
    assert tiles.shape == made.shape and len(tiles) == len(plan)
    for t in range(len(tiles)):
        for rows, cols in ((SIZE, SIZE), (50, 37)):  # a whole tile, or cut to a mosaic's cell
            out = np.full((rows, cols), -1.0, np.float32)
            tiles.write_tile(t, out)
            np.testing.assert_array_equal(out, made[t, :rows, :cols])
    np.testing.assert_array_equal(tiles.array, made)
    assert tiles.whole == (shape == (SIZE, SIZE))
    if tiles.whole:
        assert np.shares_memory(tiles.array, image)  # one unpadded tile: the image itself


def test_batches_are_written_into_one_reused_buffer_and_equal_the_stacked_tiles() -> None:
    engine = RecordingEngine(max_batch=4)
    seg = Segmenter(engine, None, PostprocessConfig())  # type: ignore[arg-type]  # spec unused by detect_frames
    frames = [FrameTiles(gray(h, w, seed=k), tuple(plan_tiles((h, w), SIZE, 8)))
              for k, (h, w) in enumerate([(30, 40), (100, 120), (64, 64), (20, 20), (70, 50)])]
    stacked = np.concatenate([f.array for f in frames])  # made here, from fresh descriptions below
    described = [FrameTiles(f.image, f.plan) for f in frames]
    raws = seg.detect_frames(described)
    assert [len(r) for r in raws] == [len(f) for f in frames]
    np.testing.assert_array_equal(np.concatenate(engine.seen)[:, 0], stacked)
    assert len(set(engine.bases)) == 1  # every batch in the same buffer
    assert all("array" not in f.__dict__ for f in described)  # no frame's tiles were made
    again = seg.detect_frames([f.array for f in frames])  # made tiles give the same detections
    assert [[d.scores.tolist() for d in r] for r in raws] == [[d.scores.tolist() for d in r] for r in again]


def test_several_channels_repeat_the_gray_image() -> None:
    engine = RecordingEngine(channels=3, max_batch=2)
    seg = Segmenter(engine, None, PostprocessConfig())  # type: ignore[arg-type]
    frame = FrameTiles(gray(30, 30, seed=3), tuple(plan_tiles((30, 30), SIZE, 8)))
    seg.detect_frames([frame, frame, frame])
    batch = np.concatenate(engine.seen)
    assert batch.shape == (3, 3, SIZE, SIZE)
    for c in (1, 2):
        np.testing.assert_array_equal(batch[:, c], batch[:, 0])
    np.testing.assert_array_equal(batch[0, 0], frame.array[0])


def test_threads_sharing_a_segmenter_never_share_a_buffer() -> None:
    engine = RecordingEngine(max_batch=2, pause_s=0.02)
    seg = Segmenter(engine, None, PostprocessConfig())  # type: ignore[arg-type]
    per_thread = [[FrameTiles(gray(40, 40, seed=10 * k + i), tuple(plan_tiles((40, 40), SIZE, 8))) for i in range(6)]
                  for k in range(3)]
    results: dict[int, list[float]] = {}

    def run(k: int) -> None:
        raws = seg.detect_frames(per_thread[k])
        results[k] = [float(r[0].scores[0]) for r in raws]

    threads = [threading.Thread(target=run, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for k in range(3):  # each frame's detection from its own pixels
        assert results[k] == pytest.approx([float(f.array.mean()) / 255 for f in per_thread[k]], rel=1e-6)


def test_a_mosaic_from_described_tiles_equals_one_from_made_tiles() -> None:
    m = Mosaic((0, 1, 2), k=2, cell=32, size=SIZE)
    frames = [FrameTiles(gray(h, w, seed=20 + h), tuple(plan_tiles((h, w), SIZE, 8))) for h, w in ((20, 25), (30, 12), (8, 8))]
    from_made = pack_mosaic(m, [f.array for f in frames])
    from_described = pack_mosaic(m, [FrameTiles(f.image, f.plan) for f in frames])
    np.testing.assert_array_equal(from_described, from_made)
    assert from_made[SIZE - 1, SIZE - 1] == np.float32(frames[0].fill)  # the empty cell: the first frame's fill


def test_buffers_fit_the_call_and_few_are_kept() -> None:
    engine = RecordingEngine(max_batch=64)
    seg = Segmenter(engine, None, PostprocessConfig())  # type: ignore[arg-type]
    frame = FrameTiles(gray(30, 30, seed=5), tuple(plan_tiles((30, 30), SIZE, 8)))
    for n in (2, 5, 3, 5, 1):
        seg.detect_frames([frame] * n)
    sizes = [len(b) for b in seg._buffers._free]
    assert sizes and max(sizes) == 5 and len(sizes) <= 2  # sized to the calls, not to max_batch 64
    assert engine.bases[1] == engine.bases[2] == engine.bases[3]  # 3 and 5 inputs: the 5-input buffer again
    assert engine.bases[4] == engine.bases[0]  # 1 input: the smallest that fits


def test_tiles_of_another_size_than_the_engine_takes_are_refused() -> None:
    seg = Segmenter(RecordingEngine(), None, PostprocessConfig())  # type: ignore[arg-type]
    small = FrameTiles(gray(20, 20, seed=6), tuple(plan_tiles((20, 20), SIZE // 2, 4)))
    with pytest.raises(ValueError, match="32 x 32 px for an engine taking 64 x 64"):
        seg.detect_frames([small])
