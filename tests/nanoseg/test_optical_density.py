"""Transmission -> optical density, with the synthetic generator's physics as the oracle."""

from __future__ import annotations

import math

import numpy as np
import pytest

from nanoseg.config_io import load_yaml
from nanoseg.errors import FrameError
from nanoseg.optical_density import densest_mode, intensity_image, optical_density
from nanoseg.paths import CONFIGS
from nanoseg_training.rendering import transmission_counts
from nanoseg_training.scene import generate_scene
from nanoseg_training.synthetic_config import SceneConfig


def _paper_scene_od(seed: int, size: int = 256) -> np.ndarray:
    cfg = load_yaml(CONFIGS / "synthetic" / "paper.yaml", SceneConfig)
    cfg = cfg.model_copy(update={"domain": cfg.domain.model_copy(update={"width": size, "depth": size})})
    scene = generate_scene(cfg, np.random.default_rng(seed))
    return scene.thickness * cfg.od_per_voxel


def test_scalar_i0_and_dark_give_the_exact_od() -> None:
    rng = np.random.default_rng(0)
    od = rng.uniform(0.0, 3.0, (40, 30))
    frame = 50.0 + 1000.0 * np.exp(-od)
    res = optical_density(frame, i0=1050.0, dark=50.0)
    np.testing.assert_allclose(res.od, od, atol=1e-5)
    assert res.od.dtype == np.float32
    assert res.reference == pytest.approx(1000.0)
    assert res.invalid.total == 0 and not res.replaced.any()


def test_flat_field_and_dark_frame_correct_uneven_illumination() -> None:
    rng = np.random.default_rng(1)
    od = rng.uniform(0.0, 1.0, (32, 48))
    flat = np.linspace(500.0, 1500.0, 48)[None, :] * np.ones((32, 1))
    dark = rng.uniform(10.0, 20.0, (32, 48))
    frame = dark + (flat - dark) * np.exp(-od)
    res = optical_density(frame, i0=flat, dark=dark)
    np.testing.assert_allclose(res.od, od, atol=1e-5)
    assert res.reference is None


def test_integer_frames_are_accepted() -> None:
    frame = np.array([[1000, 500], [250, 1000]], dtype=np.uint16)
    res = optical_density(frame, i0=1000)
    np.testing.assert_allclose(res.od, [[0.0, math.log(2)], [math.log(4), 0.0]], atol=1e-6)


def test_background_i0_recovers_the_generated_optical_density() -> None:
    od = _paper_scene_od(seed=1)
    dose, dark = 2000.0, 100.0
    counts = transmission_counts(od, dose, read_noise=2.0, rng=np.random.default_rng(2), dark=dark)
    res = optical_density(counts, "background", dark=dark)
    assert res.reference == pytest.approx(dose, rel=0.01)
    substrate = od == 0
    assert 0.2 < 1 - substrate.mean() < 0.8  # a scene with both wires and substrate
    err = res.od - od
    assert abs(float(np.median(err[substrate]))) < 0.01
    assert abs(float(np.median(err[~substrate]))) < 0.01
    # photon noise alone: sd(OD) ~ 1 / sqrt(dose * T)
    expected = math.sqrt(float(np.mean(1.0 / (dose * np.exp(-od)))))
    assert float(np.sqrt(np.mean(err**2))) < 1.2 * expected


def test_background_estimate_is_unbiased_on_integer_counts() -> None:
    # Poisson counts are integers with many ties; a mode search that breaks ties to the left
    # would come out several counts low.
    counts = np.random.default_rng(3).poisson(100.0, (256, 256))
    assert densest_mode(counts.astype(np.float64)) == pytest.approx(100.0, rel=0.015)
    assert optical_density(counts).reference == pytest.approx(100.0, rel=0.015)


def test_invalid_pixels_are_counted_by_kind_and_replaced() -> None:
    od = np.zeros((20, 20))
    od[5:15, 5:15] = 0.5
    frame = 1000.0 * np.exp(-od)
    frame[8, 8] = frame[9, 9] = frame[10, 10] = np.nan  # inside the OD 0.5 block
    frame[0, 0], frame[0, 1], frame[19, 19] = np.inf, -np.inf, np.inf
    frame[1, 5:9] = 0.0
    frame[2, 5:7] = -3.0
    frame[3, 5] = 0.5  # T = 5e-4 < floor 1e-3
    res = optical_density(frame, i0=1000.0, floor=1e-3)
    inv = res.invalid
    assert (inv.nan, inv.inf, inv.non_positive, inv.below_floor, inv.bad_reference) == (3, 3, 6, 1, 0)
    assert inv.total == 13 == int(res.replaced.sum())
    assert np.isfinite(res.od).all()
    cap = -math.log(1e-3)
    assert np.allclose(res.od[1, 5:9], cap) and np.allclose(res.od[2, 5:7], cap) and res.od[3, 5] == pytest.approx(cap)
    # NaN pixels take the nearest measured value: the block's OD, not a hole or a spike
    assert np.allclose(res.od[[8, 9, 10], [8, 9, 10]], 0.5, atol=1e-6)
    assert np.allclose(res.od[0, :2], 0.0, atol=1e-6) and res.od[19, 19] == pytest.approx(0.0, abs=1e-6)
    assert inv.to_dict() == {"nan": 3, "inf": 3, "non_positive": 6, "below_floor": 1, "bad_reference": 0}


def test_bad_flat_field_pixels_are_counted_and_filled() -> None:
    flat = np.full((10, 10), 800.0)
    flat[4, 4] = 0.0
    flat[6, 2] = np.nan
    frame = flat * np.exp(-0.3)
    frame[6, 2] = 240.0
    res = optical_density(frame, i0=flat)
    assert res.invalid.bad_reference == 2 and res.invalid.nan == 0
    assert np.allclose(res.od, 0.3, atol=1e-6)


@pytest.mark.parametrize(
    ("frame", "kwargs", "reason"),
    [
        (np.zeros((0, 5)), {}, "empty_frame"),
        (np.ones(10), {}, "bad_shape"),
        (np.ones((4, 4, 3)), {}, "bad_shape"),
        (np.ones((4, 4), dtype=bool), {}, "bad_dtype"),
        (np.ones((4, 4), dtype=np.complex64), {}, "bad_dtype"),
        (np.full((4, 4), 1.0, dtype=object), {}, "bad_dtype"),
        (np.full((4, 4), np.nan), {}, "non_finite"),
        (np.zeros((4, 4)), {"i0": 100.0}, "no_signal"),
        (np.zeros((4, 4)), {}, "non_positive_reference"),
        (np.ones((4, 4)), {"i0": 5.0, "dark": 5.0}, "non_positive_reference"),
        (np.ones((4, 4)), {"i0": np.zeros((4, 4))}, "non_positive_reference"),
        (np.ones((4, 4)), {"i0": np.ones((4, 5))}, "bad_shape"),
        (np.ones((4, 4)), {"dark": np.ones((3, 4))}, "bad_shape"),
    ],
)
def test_unusable_frames_raise_frame_error_with_reason(frame: np.ndarray, kwargs: dict, reason: str) -> None:
    with pytest.raises(FrameError) as info:
        optical_density(frame, **kwargs)
    assert info.value.reason == reason
    assert isinstance(info.value, ValueError)


def test_intensity_image_normalises_inverts_and_fills() -> None:
    frame = np.tile(np.arange(100, dtype=np.uint8), (10, 1))
    res = intensity_image(frame, invert=False, normalise=True, percentiles=(10.0, 90.0))
    lo, hi = np.percentile(np.arange(100), [10, 90])
    assert res.image[0, 50] == pytest.approx((50 - lo) / (hi - lo))
    assert res.image.min() == 0.0 and res.image.max() == 1.0
    inv = intensity_image(frame, invert=True, normalise=False)
    assert inv.image[0, 0] == 99.0 and inv.image[0, 99] == 0.0
    f = frame.astype(np.float32)
    f[5, 40] = np.nan
    f[0, 0] = -np.inf
    res = intensity_image(f, normalise=False)
    assert (res.invalid.nan, res.invalid.inf) == (1, 1)
    assert res.image[5, 40] in (39.0, 40.0, 41.0) and res.image[0, 0] in (0.0, 1.0)
    assert not intensity_image(np.full((5, 5), 7.0)).image.any()
    with pytest.raises(FrameError, match="bad_dtype"):
        intensity_image(np.ones((3, 3), dtype=np.complex128))


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
@pytest.mark.parametrize(("i0", "dark", "floor"), [(1000, None, 1e-3), (220.0, 3.5, 0.05), (60000, 100, 1e-3)])
@pytest.mark.parametrize("shape", [(64, 80), (1030, 1100)])  # the second looked up in chunks
def test_counting_frames_by_table_are_computed_frames(dtype: type, i0: float, dark: float | None, floor: float,
                                                      shape: tuple[int, int]) -> None:
    """8- and 16-bit frames with scalar I0 and dark are converted by a table of every count's
    OD: the same values, masks and counts as the same frame as float64, computed per pixel."""
    rng = np.random.default_rng(int(i0))
    top = np.iinfo(dtype).max
    counts = np.minimum(rng.poisson(min(i0, top) * rng.uniform(0.0005, 1.2, shape)), top).astype(dtype)
    counts[0, :5] = 0  # no signal
    bright = np.maximum(counts, np.asarray(min(i0, top) // 2, dtype))  # no pixel below the floor
    for frame in (counts, counts.T, bright):  # .T: not C-contiguous
        fast = optical_density(frame, i0, dark, floor=floor)
        slow = optical_density(frame.astype(np.float64), i0, dark, floor=floor)
        assert fast.od.dtype == slow.od.dtype == np.float32
        assert np.array_equal(fast.od, slow.od) and np.array_equal(fast.replaced, slow.replaced)
        assert fast.invalid == slow.invalid and fast.reference == slow.reference
    assert optical_density(counts, i0, dark, floor=floor).invalid.non_positive >= 5
    if (min(i0, top) // 2 - (dark or 0)) / (i0 - (dark or 0)) > floor:  # the dtype holds counts above the floor
        assert optical_density(bright, i0, dark, floor=floor).invalid.total == 0
    with pytest.raises(FrameError, match="no_signal"):
        optical_density(np.zeros((4, 4), dtype), i0, dark, floor=floor)


def test_invalid_pixel_counts_as_a_dict_name_every_kind() -> None:
    import dataclasses

    from nanoseg.optical_density import InvalidPixels

    counts = InvalidPixels(nan=1, inf=2, non_positive=3, below_floor=4, bad_reference=5)
    assert counts.to_dict() == dataclasses.asdict(counts)
