"""Tiles over a frame, and instances merged across tile borders (generated wires as oracle)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from nanoseg.instances import Instances, mask_boxes
from nanoseg.tiling import Tile, merge_tiled_instances, plan_tiles
from nanoseg_training.wire_geometry import WireGeometry, rasterise


def wire(shape: tuple[int, int], centre: tuple[float, float], angle: float, length: float, width: float) -> np.ndarray:
    a = math.radians(angle)
    ux, uy = math.cos(a), -math.sin(a)
    start = (centre[0] - length / 2 * ux, centre[1] - length / 2 * uy)
    cols = rasterise(WireGeometry(start=start, angle_deg=angle, length=length, width=width, thickness=8), shape)
    m = np.zeros(shape, bool)
    assert cols is not None
    y0, y1, x0, x1 = cols.box
    m[y0:y1, x0:x1] = cols.thickness > 0
    return m


def oracle_engine(truth: np.ndarray, scores: list[float], tile: Tile, erode_edge: int = 0) -> Instances:
    """What a perfect model sees in one tile: the true masks cut to the tile (optionally losing
    ``erode_edge`` px at the tile's inner borders, as real predictions do)."""
    size = tile.size
    masks = np.zeros((len(truth), size, size), bool)
    masks[:, : tile.valid_height, : tile.valid_width] = truth[(slice(None), *tile.frame_slices)]
    if erode_edge:
        masks[:, :erode_edge] = masks[:, -erode_edge:] = False
        masks[:, :, :erode_edge] = masks[:, :, -erode_edge:] = False
    keep = masks.any(axis=(1, 2))
    return Instances(mask_boxes(masks), np.array(scores, np.float32), masks).select(keep)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / (a | b).sum())


def test_plan_covers_the_frame_with_the_requested_overlap() -> None:
    tiles = plan_tiles((957, 1280), tile=512, overlap=64)
    assert len(tiles) == 6
    cover = np.zeros((957, 1280), np.int32)
    for t in tiles:
        assert (t.valid_height, t.valid_width) == (512, 512)
        cover[t.frame_slices] += 1
    assert cover.min() >= 1
    xs = sorted({t.x0 for t in tiles})
    ys = sorted({t.y0 for t in tiles})
    assert xs[0] == 0 and xs[-1] + 512 == 1280 and ys[-1] + 512 == 957
    assert all(b - a <= 512 - 64 for a, b in itertools.pairwise(xs))
    assert all(b - a <= 512 - 64 for a, b in itertools.pairwise(ys))


def test_small_frames_get_one_padded_tile() -> None:
    (t,) = plan_tiles((438, 300), tile=512, overlap=64)
    assert (t.y0, t.x0, t.size, t.valid_height, t.valid_width) == (0, 0, 512, 438, 300)
    assert len(plan_tiles((512, 512), 512, 64)) == 1
    assert len(plan_tiles((513, 512), 512, 64)) == 2
    with pytest.raises(ValueError):
        plan_tiles((100, 100), 64, 64)


def test_wire_crossing_tile_borders_is_one_instance() -> None:
    shape = (200, 300)
    truth = np.stack(
        [
            wire(shape, (150, 100), 20.0, 260, 14),  # crosses both vertical borders
            wire(shape, (40, 60), 80.0, 60, 10),  # inside the first tile only
        ]
    )
    tiles = plan_tiles(shape, tile=128, overlap=32)
    assert len(tiles) == 6
    per_tile = [oracle_engine(truth, [0.6 + 0.05 * k, 0.8], t) for k, t in enumerate(tiles)]
    assert sum(len(p) for p in per_tile) > 3
    merged = merge_tiled_instances(per_tile, tiles, shape, iou_threshold=0.5)
    assert len(merged) == 2
    long = int(np.argmax(merged.masks.sum(axis=(1, 2))))
    assert iou(merged.masks[long], truth[0]) == 1.0
    np.testing.assert_allclose(merged.boxes[long], mask_boxes(truth[:1])[0])
    assert merged.scores[long] == pytest.approx(max(0.6 + 0.05 * k for k in range(6) if per_tile[k].masks.any()))
    assert merged.scores[0] >= merged.scores[1]  # sorted by score


def test_imperfect_predictions_at_tile_edges_still_merge() -> None:
    shape = (128, 300)
    truth = wire(shape, (150, 64), 0.0, 280, 16)[None]
    tiles = plan_tiles(shape, tile=128, overlap=48)
    per_tile = [oracle_engine(truth, [0.9], t, erode_edge=6) for t in tiles]
    merged = merge_tiled_instances(per_tile, tiles, shape)
    assert len(merged) == 1
    assert iou(merged.masks[0], truth[0]) > 0.85


def test_crossing_wires_in_the_overlap_stay_apart_and_duplicates_merge() -> None:
    shape = (128, 240)
    tiles = plan_tiles(shape, tile=128, overlap=16)  # overlap columns 112..128
    assert len(tiles) == 2
    truth = np.stack(
        [
            wire(shape, (120, 64), 60.0, 140, 10),
            wire(shape, (120, 64), 120.0, 140, 10),
            wire(shape, (120, 20), 0.0, 10, 6),  # small, entirely inside the overlap
        ]
    )
    per_tile = [oracle_engine(truth, [0.9, 0.8, 0.7], t) for t in tiles]
    merged = merge_tiled_instances(per_tile, tiles, shape)
    assert len(merged) == 3
    for m in truth:
        assert max(iou(m, k) for k in merged.masks) == 1.0


def test_nothing_detected_gives_empty_frame_instances() -> None:
    tiles = plan_tiles((100, 200), 64, 16)
    merged = merge_tiled_instances([Instances.empty(64, 64) for _ in tiles], tiles, (100, 200))
    assert len(merged) == 0 and merged.image_shape == (100, 200)


def test_max_instances_keeps_the_best_scored_after_merging() -> None:
    tiles = plan_tiles((64, 100), 64, 28)
    per_tile = []
    for k in range(len(tiles)):
        masks = np.zeros((3, 64, 64), bool)
        for j in range(3):
            masks[j, 4 + 20 * j: 14 + 20 * j, 4:14] = True  # three small squares in each tile
        per_tile.append(Instances(mask_boxes(masks), np.array([0.9, 0.5, 0.2 + 0.1 * k], np.float32), masks))
    everything = merge_tiled_instances(per_tile, tiles, (64, 100))
    best = merge_tiled_instances(per_tile, tiles, (64, 100), max_instances=2)
    assert len(best) == 2 < len(everything)
    np.testing.assert_array_equal(best.scores, everything.scores[:2])
    np.testing.assert_array_equal(best.masks, everything.masks[:2])
