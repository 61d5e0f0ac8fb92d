"""Frame preparation (scale, gray mapping, tiles) and the inverse mapping of instances."""

from __future__ import annotations

import math

import numpy as np
import pytest

from nanoseg.errors import FrameError
from nanoseg.frame_profile import FrameProfile
from nanoseg.input_spec import InputSpec
from nanoseg.instances import Instances, mask_boxes
from nanoseg.prepare import (
    instances_to_frame,
    prepare_frame,
    resample_to_model_scale,
    to_model_input,
)
from nanoseg.tiling import Tile
from nanoseg_training.wire_geometry import WireGeometry, rasterise


def wire_footprints(shape: tuple[int, int], wires: list[tuple[float, float, float, float, float]], scale: float) -> np.ndarray:
    """Generator footprints of wires (cx, cy, angle, length, width in frame px) drawn at ``scale``."""
    out = np.zeros((len(wires), *shape), bool)
    for i, (cx, cy, angle, length, width) in enumerate(wires):
        a = math.radians(angle)
        ux, uy = math.cos(a), -math.sin(a)
        start = (scale * cx - scale * length / 2 * ux, scale * cy - scale * length / 2 * uy)
        g = WireGeometry(start=start, angle_deg=angle, length=scale * length, width=scale * width, thickness=8)
        cols = rasterise(g, shape)
        assert cols is not None
        y0, y1, x0, x1 = cols.box
        out[i, y0:y1, x0:x1] = cols.thickness > 0
    return out


def oracle(truth: np.ndarray, tile: Tile) -> Instances:
    masks = np.zeros((len(truth), tile.size, tile.size), bool)
    masks[:, : tile.valid_height, : tile.valid_width] = truth[(slice(None), *tile.frame_slices)]
    keep = masks.any(axis=(1, 2))
    return Instances(mask_boxes(masks), np.full(len(truth), 0.9), masks).select(keep)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / (a | b).sum())


def test_model_input_mappings() -> None:
    od = np.array([[0.0, 0.1], [0.2, -0.05]])
    np.testing.assert_allclose(to_model_input(od, InputSpec(pixel_size_nm=8)), [[0, 127.5], [255, 0]])
    fixed = InputSpec(pixel_size_nm=8, intensity_mapping="fixed", od_max=0.4)
    np.testing.assert_allclose(to_model_input(od, fixed), [[0, 63.75], [127.5, 0]])
    np.testing.assert_allclose(to_model_input(od * 10, fixed), [[0, 255], [255, 0]])  # clipped
    # intensity images have no physical scale: their maximum is white even with a fixed OD map
    np.testing.assert_allclose(to_model_input(od, fixed, "intensity"), [[0, 127.5], [255, 0]])
    assert not to_model_input(np.zeros((3, 3)), InputSpec(pixel_size_nm=8)).any()


def test_resample_upsamples_stxm_and_antialiases_when_shrinking() -> None:
    spec = InputSpec(pixel_size_nm=8.0)
    img, scale = resample_to_model_scale(np.ones((100, 100)), 35.0, spec)
    assert scale == pytest.approx(4.375) and img.shape == (438, 438) and img.dtype == np.float32
    same, s1 = resample_to_model_scale(np.eye(5), 8.0, spec)
    assert s1 == 1.0 and np.array_equal(same, np.eye(5))
    checker = (np.indices((64, 64)).sum(axis=0) % 2).astype(np.float64)
    small, s = resample_to_model_scale(checker, 4.0, spec)
    assert s == 0.5 and small.shape == (32, 32)
    assert float(small[4:-4, 4:-4].std()) < 0.05  # aliasing would keep full contrast
    assert float(small.mean()) == pytest.approx(0.5, abs=0.02)


def test_stxm_like_frame_round_trip() -> None:
    """A 100 x 90 frame at 16 nm -> 2x upsampled, padded into one 256 tile -> masks back."""
    wires = [(30.0, 40.0, 20.0, 50.0, 8.0), (60.0, 50.0, 110.0, 70.0, 10.0)]
    frame_truth = wire_footprints((100, 90), wires, 1.0)
    od = 0.3 * frame_truth.sum(axis=0)
    frame = 1000.0 * np.exp(-od)
    profile = FrameProfile(name="t", mode="optical_density", pixel_size_nm=16.0, tile_overlap_px=32)
    spec = InputSpec(pixel_size_nm=8.0, size=256)
    prep = prepare_frame(frame, profile, spec)
    assert prep.tiles.shape == (1, 256, 256) and prep.model_shape == (200, 180)
    assert prep.scale_yx == (2.0, 2.0) and prep.reference == pytest.approx(1000.0)
    np.testing.assert_allclose(prep.image, od, atol=1e-5)
    assert prep.tiles[0].max() == pytest.approx(255.0)
    assert np.all(prep.tiles[0, 200:, :] == prep.tiles[0, 199, 0])  # padding: the median (substrate)
    model_truth = wire_footprints(prep.model_shape, wires, 2.0)
    back = instances_to_frame([oracle(model_truth, prep.tile_plan[0])], prep)
    assert len(back) == 2 and back.image_shape == (100, 90)
    for m in frame_truth:
        assert max(iou(m, k) for k in back.masks) > 0.85
    np.testing.assert_allclose(np.sort(back.boxes, axis=0), np.sort(mask_boxes(frame_truth), axis=0), atol=1.5)


def test_sem_like_frame_is_tiled_and_merged_back() -> None:
    """An intensity frame at 4 nm (shrunk x0.5) larger than the model input: tiles, one wire."""
    wires = [(250.0, 150.0, 10.0, 420.0, 20.0), (80.0, 60.0, 70.0, 60.0, 14.0)]
    frame_truth = wire_footprints((300, 500), wires, 1.0)
    frame = 20.0 + 100.0 * frame_truth.any(axis=0)
    profile = FrameProfile(name="s", mode="intensity", pixel_size_nm=4.0, tile_overlap_px=32)
    spec = InputSpec(pixel_size_nm=8.0, size=128)
    prep = prepare_frame(frame.astype(np.uint16), profile, spec)
    assert prep.model_shape == (150, 250) and len(prep.tile_plan) == 6
    assert prep.tiles.min() >= 0 and prep.tiles.max() == pytest.approx(255.0)
    model_truth = wire_footprints(prep.model_shape, wires, 0.5)
    per_tile = [oracle(model_truth, t) for t in prep.tile_plan]
    assert sum(len(p) for p in per_tile) >= 4
    back = instances_to_frame(per_tile, prep)
    assert len(back) == 2
    for m in frame_truth:
        assert max(iou(m, k) for k in back.masks) > 0.85


def test_flat_field_profile_needs_a_flat_field() -> None:
    spec = InputSpec(pixel_size_nm=8.0, size=64)
    profile = FrameProfile.model_validate(
        {"name": "f", "mode": "optical_density", "i0": {"policy": "flat_field"}, "tile_overlap_px": 16}
    )
    frame = np.full((32, 32), 500.0)
    with pytest.raises(FrameError) as info:
        prepare_frame(frame, profile, spec)
    assert info.value.reason == "missing_reference"
    prep = prepare_frame(frame, profile, spec, flat_field=np.full((32, 32), 1000.0))
    np.testing.assert_allclose(prep.image, math.log(2), atol=1e-6)
    with pytest.raises(FrameError, match="bad_dtype"):
        prepare_frame(frame.astype(bool), profile, spec, flat_field=np.ones((32, 32)))
    with pytest.raises(ValueError, match="tile_overlap_px"):
        prepare_frame(frame, profile.model_copy(update={"tile_overlap_px": 64}), spec, flat_field=frame)


def test_a_frame_that_would_resample_beyond_the_limit_is_refused_before_any_work() -> None:
    """8 kB of frame at 512 nm would be 4096 px a side at 8 nm: refused (``too_large``) by a
    profile's ``max_model_side_px``; within it the frame is prepared."""
    spec = InputSpec(pixel_size_nm=8.0, size=64)
    profile = FrameProfile.model_validate({"name": "f", "mode": "optical_density", "tile_overlap_px": 16,
                                           "max_model_side_px": 2048})
    frame = np.random.default_rng(0).uniform(500, 1000, (64, 64))
    with pytest.raises(FrameError) as info:
        prepare_frame(frame, profile, spec, pixel_size_nm=512.0)
    assert info.value.reason == "too_large" and "4096 px" in str(info.value)
    prep = prepare_frame(frame, profile, spec, pixel_size_nm=256.0)
    assert prep.model_shape == (2048, 2048)
    assert FrameProfile.model_validate({"name": "f", "mode": "intensity"}).max_model_side_px == 16384
