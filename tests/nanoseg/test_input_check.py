"""Is a frame a transmission image or an OD map? And uneven illumination removed (tem, sem)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from nanoseg.config_io import load_yaml
from nanoseg.frame_profile import FrameProfile
from nanoseg.input_check import background_surface, check_input
from nanoseg.input_spec import InputSpec
from nanoseg.paths import CONFIGS
from nanoseg.prepare import prepare_frame

SPEC = InputSpec(pixel_size_nm=8.0)
PROFILES = CONFIGS / "profiles"


def profile(name: str, **update: object) -> FrameProfile:
    return load_yaml(PROFILES / f"{name}.yaml", FrameProfile).model_copy(update=update)


def transmission(od_gray: np.ndarray, i0: float | np.ndarray = 1000.0, seed: int = 0) -> np.ndarray:
    """Counts of a transmission frame whose OD is the generator's gray / 255 x 1.5, Poisson noise."""
    rng = np.random.default_rng(seed)
    return rng.poisson(i0 * np.exp(-1.5 * od_gray / 255.0)).astype(np.float64)


def test_transmission_frames_and_od_maps_are_told_apart(paper_samples: list) -> None:
    for gray, _ in paper_samples:
        t = check_input(transmission(gray))
        od = check_input(gray)
        assert t.looks_like == "transmission" and t.background_position > 0.5
        assert od.looks_like == "optical_density" and od.background_position < 0.5
        # inverted 8-bit frames as a camera writes them: a bright background
        assert check_input(255.0 - gray).looks_like == "transmission"
    assert check_input(np.full((8, 8), 3.0)).looks_like == "optical_density"  # no contrast: no objects


def test_a_profile_says_when_a_frame_is_not_what_it_expects(paper_samples: list) -> None:
    gray = paper_samples[0][0]
    tem = profile("tem")
    ok = prepare_frame(transmission(gray), tem, SPEC)
    assert ok.input_check is not None and not ok.input_check.mismatch
    wrong = prepare_frame(gray + 1.0, tem, SPEC)  # an OD map given to the TEM profile
    assert wrong.input_check is not None and wrong.input_check.mismatch
    assert "expects transmission" in wrong.input_check.message()
    sem = prepare_frame(transmission(gray), profile("sem"), SPEC)  # a TEM frame given to the SEM profile
    assert sem.input_check is not None and sem.input_check.mismatch


def test_auto_input_prepares_either_kind_as_the_same_od_map(paper_samples: list) -> None:
    """``input: auto``: a transmission frame becomes the OD map the OD frame already is."""
    gray = paper_samples[1][0]
    em = profile("em", flatten_background=False)
    from_t = prepare_frame(transmission(gray, 5000.0), em, SPEC)
    from_od = prepare_frame(gray * (1.5 / 255.0), em, SPEC)
    assert from_t.input_check is not None and from_t.input_check.used == "transmission"
    assert from_od.input_check is not None and from_od.input_check.used == "optical_density"
    a, b = from_t.tiles[0], from_od.tiles[0]
    # both map their maximum to 255; Poisson noise at 5000 counts is ~1.4 % of I0, i.e. ~0.014 OD
    # (~2.4 gray levels at OD 1.5 = 255): the mean difference stays well under that.
    assert np.abs(a - b).mean() < 3.0
    assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.97


def test_uneven_illumination_is_removed(paper_samples: list) -> None:
    """A TEM frame lit 1.6x brighter on one side than the other gives the same OD as an even one."""
    gray = paper_samples[2][0]
    h, w = gray.shape
    ramp = 800.0 * (1.0 + 0.6 * np.linspace(0, 1, w)[None, :] + 0.2 * np.linspace(-1, 1, h)[:, None] ** 2)
    frame = transmission(gray, ramp, seed=3)
    truth = 1.5 * gray / 255.0
    background = gray == 0
    flat = prepare_frame(frame, profile("tem"), SPEC).image
    plain = prepare_frame(frame, profile("tem", flatten_background=False), SPEC).image
    # Without flattening the background's OD runs from ~ +0.2 to -0.3 across the frame; with it,
    # the mean absolute OD error is at the noise level (1/sqrt(800) ~ 0.035 OD per pixel).
    err_flat = np.abs(flat - truth)[background].mean()
    err_plain = np.abs(plain - truth)[background].mean()
    assert err_flat < 0.05 < err_plain
    assert err_flat < err_plain / 3


@pytest.mark.parametrize("bright", [True, False])
def test_background_surface_recovers_a_quadratic_under_objects(bright: bool) -> None:
    yy, xx = np.mgrid[0:200, 0:300] / 100.0
    surface = 100 + 20 * xx - 10 * yy + 5 * xx * yy
    img = surface.copy()
    img[40:80, 20:280] += -60 if bright else 60  # an object covering a fifth of the frame
    img[120:180, 100:140] += -60 if bright else 60
    fit = background_surface(img, bright_background=bright)
    assert np.abs(fit - surface).max() < 3.0  # of a 100-180 background; the objects are 60 off it


def _reference_check(values: np.ndarray) -> tuple[float, str]:
    """The check as first written: float64, np.percentile, a boolean selection, densest_mode's own sort."""
    from nanoseg.optical_density import densest_mode

    img = np.asarray(values, np.float64).ravel()
    lo, hi = np.percentile(img, (1.0, 99.0))
    if hi <= lo:
        return 0.0, "optical_density"
    position = float(np.clip((densest_mode(img[(img >= lo) & (img <= hi)]) - lo) / (hi - lo), 0.0, 1.0))
    return position, "transmission" if position >= 0.5 else "optical_density"


@pytest.mark.parametrize("lam", [3, 4000, 60000])
@pytest.mark.parametrize("dtype", [np.uint16, np.int32, np.float64])
def test_the_input_check_on_counts_is_the_float_check(lam: int, dtype: type) -> None:
    """Counts of any dtype take the fast path (sorted once, as uint16); the result is the float64
    reference's, bit for bit."""
    rng = np.random.default_rng(lam)
    counts = np.minimum(rng.poisson(lam, (128, 128)), 65535)
    counts[:40] //= 2  # darker objects on a bright background
    check = check_input(counts.astype(dtype))
    assert (check.background_position, check.looks_like) == _reference_check(counts)


@pytest.mark.parametrize("seed", range(6))
def test_the_input_check_on_real_values_is_the_reference(seed: int) -> None:
    rng = np.random.default_rng(seed)
    img = rng.gamma(2.0, 1.0, size=int(rng.integers(1, 20000))) * rng.choice([1e-3, 1.0, 1e4])
    if seed % 2:
        img = -img  # negative values: not counts
    check = check_input(img)
    assert (check.background_position, check.looks_like) == _reference_check(img)


def test_sorted_percentiles_are_numpys() -> None:
    from nanoseg.input_check import sorted_percentiles

    rng = np.random.default_rng(3)
    for n in (1, 2, 3, 7, 100, 101, 16384, 16385):
        for x in (np.sort(rng.integers(0, 65536, n).astype(np.uint16)), np.sort(rng.normal(0, 1e3, n)),
                  np.sort(rng.integers(0, 256, n).astype(np.uint8)), np.sort(rng.normal(0, 1e3, n).astype(np.float32)),
                  np.sort(rng.normal(0, 1e3, n).astype(np.float16)), np.sort(rng.integers(-2**40, 2**40, n))):
            q = (0.0, 0.5, 1.0, 12.5, 50.0, 99.0, 99.5, 100.0)
            assert sorted_percentiles(x, q) == tuple(float(v) for v in np.percentile(x, q))


@pytest.mark.parametrize("span", [0, 1, 600, 65535])
@pytest.mark.parametrize("n", [1, 5, 16384])
def test_counts_are_sorted_as_numpy_sorts_them(span: int, n: int) -> None:
    """The counting sort of narrow uint16 samples (and numpy's sort of wide ones) is numpy's."""
    from nanoseg.input_check import _sorted

    rng = np.random.default_rng(span + n)
    x = (rng.integers(0, span + 1, n) + (65535 - span) // 2).astype(np.uint16)
    got = _sorted(x)
    assert got.dtype == np.uint16 and np.array_equal(got, np.sort(x))


def test_a_frame_of_two_values_is_checked() -> None:
    """Both percentiles between the only two values leave no value inside the range: the mode of
    nothing is NaN, as numpy's mean of nothing, not an error (a frame of two finite pixels)."""
    check = check_input(np.array([[100, 900]], np.uint16))
    assert check.looks_like == "optical_density" and math.isnan(check.background_position)
