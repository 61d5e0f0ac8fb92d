"""Optical-density and SEM rendering of deposited scenes."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from scipy import ndimage

from nanoseg_training.rendering import render, smooth_background, to_gray, zoom_linear
from nanoseg_training.scene import Scene, deposit, generate_scene
from nanoseg_training.synthetic_config import Background
from nanoseg_training.wire_geometry import WireGeometry

# Two crossing rectangles of the same thickness (8 voxels each) in a 64 x 64 x 60 domain.
HORIZONTAL = WireGeometry((4.3, 32.2), 0.0, 55.0, 10.4, 8.3)
VERTICAL = WireGeometry((30.7, 60.1), 90.0, 55.0, 9.2, 8.3)


def crossing_scene(small_config, **rendering: Any) -> Scene:
    return deposit(small_config(rendering={"blur_sigma": 0.0, **rendering}), [HORIZONTAL, VERTICAL])


def rng() -> np.random.Generator:
    return np.random.default_rng(11)


def test_overlaps_are_brighter_than_single_wires(small_config) -> None:
    scene = crossing_scene(small_config)
    img = render(scene, rng())
    a, b = (w.full_mask(scene.shape) for w in scene.wires)
    # OD = voxels / domain height (the paper's sum / total thickness).
    assert img.od[a & ~b].tolist() == pytest.approx([8 / 60] * int((a & ~b).sum()))
    assert img.od[a & b].tolist() == pytest.approx([16 / 60] * int((a & b).sum()))
    assert img.od[~(a | b)].max() == 0.0
    # 8 bits by the image maximum: the crossing is 255, single wires half of it.
    assert set(img.gray[a & b].tolist()) == {255}
    assert set(img.gray[a ^ b].tolist()) == {128}
    assert set(img.gray[~(a | b)].tolist()) == {0}


def test_domain_height_normalisation_maps_the_full_height_to_255(small_config) -> None:
    img = render(crossing_scene(small_config, normalisation="domain_height"), rng())
    assert img.gray.max() == round(16 / 60 * 255)  # 68: the crossing, 16 of 60 voxels


def test_blur_spreads_edges_and_conserves_optical_density(small_config) -> None:
    sharp = render(crossing_scene(small_config, blur_sigma=0.0), rng())
    blurred = render(crossing_scene(small_config, blur_sigma=2.0), rng())
    assert sharp.blur_sigma == 0.0 and blurred.blur_sigma == 2.0
    # Reflecting borders: the filter only moves optical density around.
    assert blurred.od.sum() == pytest.approx(sharp.od.sum(), rel=1e-4)
    assert blurred.od.max() < sharp.od.max()
    # Row 24 lies 3 px above the horizontal wire's edge (rows 27..36) and clear of the other.
    assert sharp.od[24, 5:20].max() == 0.0
    assert blurred.od[24, 5:20].min() > 0.002
    # Both images still use the full 8-bit range.
    assert sharp.gray.max() == blurred.gray.max() == 255
    # Inside the horizontal wire, 4.5 and 5.5 px from its edges, the blur takes ~1.5 %.
    assert blurred.od[32, 10:20] == pytest.approx(sharp.od[32, 10:20], rel=0.03)
    assert blurred.od[32, 10:20].max() < sharp.od[32, 10]


def test_blur_jitter_draws_sigma_within_the_range(small_config) -> None:
    sigmas = {
        render(crossing_scene(small_config, blur_sigma=2.0, blur_sigma_jitter=1.0), np.random.default_rng(s)).blur_sigma
        for s in range(20)
    }
    assert len(sigmas) == 20 and min(sigmas) >= 1.0 and max(sigmas) <= 3.0


def test_photon_noise_changes_pixels_but_keeps_mean_optical_density(small_config) -> None:
    clean = render(crossing_scene(small_config), rng())
    noise = {"enabled": True, "dose": {"low": 5000, "high": 5000}, "read_noise": {"low": 0, "high": 0}}
    noisy = render(crossing_scene(small_config, noise=noise), rng())
    assert noisy.dose == 5000.0 and clean.dose is None
    diff = noisy.od - clean.od
    assert np.mean(diff != 0) > 0.9
    assert abs(float(diff.mean())) < 0.002
    # On bare substrate OD noise is ~ 1/sqrt(dose) (Poisson counts around the dose).
    bare = clean.od == 0
    assert float(diff[bare].std()) == pytest.approx(1 / np.sqrt(5000), rel=0.1)
    # Through 16 voxels (OD 0.267) the transmitted count is lower, so the noise is larger.
    crossing = clean.od == clean.od.max()
    assert float(diff[crossing].std()) > float(diff[bare].std())


def test_background_adds_its_offset_everywhere(small_config) -> None:
    clean = render(crossing_scene(small_config), rng())
    background = {
        "enabled": True, "offset_od": {"low": 0.1, "high": 0.1},
        "amplitude_od": {"low": 0.0, "high": 0.0},
    }
    shifted = render(crossing_scene(small_config, background=background), rng())
    np.testing.assert_allclose(shifted.od - clean.od, 0.1, atol=1e-6)


def test_image_max_normalisation_reaches_255_on_random_scenes(small_config) -> None:
    cfg = small_config(rendering={"blur_sigma": 2.0})
    for seed in range(5):
        r = np.random.default_rng(seed)
        img = render(generate_scene(cfg, r), r)
        assert img.gray.dtype == np.uint8 and img.gray.max() == 255
        np.testing.assert_array_equal(img.gray, np.rint(img.od / img.od.max() * 255).astype(np.uint8))


def test_to_gray_clips_and_handles_empty_images() -> None:
    assert to_gray(np.zeros((4, 4), np.float32), None).max() == 0
    assert to_gray(np.array([[-1.0, 0.5, 2.0]]), 1.0).tolist() == [[0, 128, 255]]


def test_sem_mode_shows_surfaces_with_bright_edges(small_config) -> None:
    scene = crossing_scene(small_config, mode="sem")
    img = render(scene, rng())
    assert img.gray.max() == 255
    a, b = (w.full_mask(scene.shape) for w in scene.wires)
    assert not (a | b)[44:, :14].any()
    assert img.gray[44:, :14].max() == 0  # bare substrate, >= 8 px from any wire
    centre_of_top = img.od[32, 8:18].mean()  # flat top of the horizontal wire
    edge = img.od[27, 8:18].mean()  # its edge row
    assert edge > 1.5 * centre_of_top > 0
    # Not additive: unlike optical density the crossing is not twice as bright as a single wire.
    assert img.od[32, 30] < 1.5 * img.od[32, 12]


@pytest.mark.parametrize(("size", "length_scale"), [(64, 250.0), (96, 60.0), (256, 40.0)])
def test_background_has_the_configured_amplitude_at_any_image_size(size: int, length_scale: float) -> None:
    """RMS of the smooth field ~ amplitude_od, whether the image is larger or smaller than the
    correlation length (a nearly flat field must not be scaled up to the amplitude)."""
    cfg = Background(
        enabled=True, offset_od={"low": 0.05, "high": 0.05}, amplitude_od={"low": 0.1, "high": 0.1},
        length_scale={"low": length_scale, "high": length_scale},
    )
    fields = [smooth_background((size, size), cfg, np.random.default_rng(s)) - 0.05 for s in range(60)]
    rms = float(np.sqrt(np.mean([np.mean(f**2) for f in fields])))
    assert 0.07 < rms < 0.13  # +-30 %: 3 sigma with ~60 independent values for 64 px
    assert max(float(np.abs(f).max()) for f in fields) < 0.6
    # Smooth: neighbouring pixels differ by far less than the amplitude.
    assert max(float(np.abs(np.diff(f, axis=1)).max()) for f in fields) < 0.05


@pytest.mark.parametrize("step", [1, 2, 7, 12, 20, 37])
@pytest.mark.parametrize("shape", [(96, 96), (512, 512), (200, 333)])
def test_zoom_linear_equals_ndimage_zoom_bit_for_bit(step: int, shape: tuple[int, int]) -> None:
    """The background's separable zoom gives ndimage's values exactly (sign of zero included),
    on the coarse grids ``smooth_background`` makes (2 cells more than the image needs)."""
    field = np.random.default_rng(step).normal(size=(shape[0] // step + 2, shape[1] // step + 2))
    expected = ndimage.zoom(field, step, order=1)[: shape[0], : shape[1]]
    got = zoom_linear(field, step, shape)
    assert got.shape == expected.shape == shape
    np.testing.assert_array_equal(got.view(np.int64), expected.view(np.int64))
