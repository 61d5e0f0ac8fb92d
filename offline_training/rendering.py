"""Render a deposited scene as an image: optical density (paper) or an SEM-like surface image.

Optical density (OD) follows the paper: voxels are summed along z and scaled (by default divided
by the domain height, so OD in [0, 1]); overlaps are brighter because they are thicker. Optional
extras act in physical order: background is added to the OD, the measurement is simulated as
transmitted photon counts (Poisson + read noise) and converted back to OD, the image is blurred
(Gaussian, sigma in px) and finally mapped to 8 bits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
from scipy import ndimage

from nanoseg_training.artefacts import (
    apply_after_blur,
    apply_before_blur,
    apply_to_gray,
    signal_span,
)
from nanoseg_training.scene import Scene, draw
from nanoseg_training.synthetic_config import Background, Noise, SceneConfig

Look = Literal["optical_density", "sem"]


@dataclass(frozen=True)
class RenderedImage:
    od: np.ndarray  # float32 (H, W): OD (or SEM signal), blurred and noisy, before 8-bit mapping
    gray: np.ndarray  # uint8 (H, W): the image written to PNG
    blur_sigma: float
    dose: float | None  # photons per pixel when noise was simulated


def smooth_background(shape: tuple[int, int], cfg: Background, rng: np.random.Generator) -> np.ndarray:
    """Offset plus a smooth random field of standard deviation ``amplitude_od``, OD.

    The field is white noise filtered by a Gaussian of sigma ``length_scale / 2`` px. It is
    normalised by the standard deviation that filter gives in theory, not by the image's own:
    on an image not much larger than the length scale the field is nearly flat, and dividing
    by its tiny sample deviation would blow it up (thousands of OD on a 96 px image).
    """
    offset = draw(cfg.offset_od, rng)
    amp = draw(cfg.amplitude_od, rng)
    scale = draw(cfg.length_scale, rng)
    # Filter a coarse grid then zoom: same field statistics, far cheaper than filtering full size.
    step = max(int(scale // 8), 1)
    sigma = scale / step / 2
    pad = math.ceil(4 * sigma)  # the filter's reach: the kept interior sees no border effects
    coarse_shape = (shape[0] // step + 2 + 2 * pad, shape[1] // step + 2 + 2 * pad)
    field = ndimage.gaussian_filter(rng.normal(size=coarse_shape), sigma, mode="constant", truncate=4.0)
    field = field[pad:-pad, pad:-pad] / filtered_noise_std(sigma)
    field = ndimage.zoom(field, step, order=1)[: shape[0], : shape[1]]
    return (offset + amp * field).astype(np.float32)


def filtered_noise_std(sigma: float) -> float:
    """Standard deviation of unit 2-D white noise after ``ndimage.gaussian_filter(sigma)``."""
    radius = int(4.0 * sigma + 0.5)
    impulse = np.zeros(2 * radius + 1)
    impulse[radius] = 1.0
    weights = ndimage.gaussian_filter1d(impulse, sigma, mode="constant", truncate=4.0)
    return float(np.sum(weights**2))  # separable: the 2-D variance is the 1-D one squared


def transmission_counts(
    od: np.ndarray, dose: float, read_noise: float, rng: np.random.Generator, dark: float = 0.0
) -> np.ndarray:
    """Detector counts for a transmission measurement: Poisson(dose * exp(-OD)) + dark + N(0, read).

    The shared physics of the generator's noise and the simulated microscope's camera.
    """
    expected = dose * np.exp(-od.astype(np.float64))
    counts = rng.poisson(expected).astype(np.float64) + dark
    if read_noise > 0:
        counts += rng.normal(0.0, read_noise, size=od.shape)
    return counts


def noisy_od(od: np.ndarray, cfg: Noise, rng: np.random.Generator) -> tuple[np.ndarray, float]:
    """Simulate counting statistics and convert back with OD = -ln(I / I0), floor at half a photon."""
    dose = draw(cfg.dose, rng)
    counts = transmission_counts(od, dose, draw(cfg.read_noise, rng), rng)
    return (-np.log(np.maximum(counts, 0.5) / dose)).astype(np.float32), dose


def sem_signal(scene: Scene, edge_gain: float) -> np.ndarray:
    """Surface image: material brightness plus slope (edge) contrast of the top surface."""
    surface = ndimage.gaussian_filter(scene.top.astype(np.float32), 2.0)
    gy, gx = np.gradient(surface)
    slope = np.hypot(gx, gy)
    material = (scene.top > 0).astype(np.float32)
    return 0.4 * material + edge_gain * 0.2 * np.tanh(slope)


def draw_look(cfg: SceneConfig, rng: np.random.Generator) -> Look:
    """The image's look: the preset's mode, or drawn by ``looks`` weights in ``mixed`` mode.

    Draws nothing unless the mode is ``mixed``, so other presets keep their random stream.
    """
    r = cfg.rendering
    if r.mode != "mixed":
        return r.mode
    return "sem" if rng.uniform(0.0, r.looks.optical_density + r.looks.sem) >= r.looks.optical_density else "optical_density"


def percentile_gray(img: np.ndarray, low_pct: float, high_pct: float) -> np.ndarray:
    """Map the ``low_pct`` / ``high_pct`` percentiles to 0 / 255, clipping outside (uint8)."""
    lo, hi = np.percentile(img, [low_pct, high_pct])
    if hi <= lo:
        return np.zeros(img.shape, dtype=np.uint8)
    return np.clip(np.rint((img - lo) * (255.0 / (hi - lo))), 0, 255).astype(np.uint8)


def to_gray(img: np.ndarray, scale_max: float | None) -> np.ndarray:
    """Map to 0–255: ``scale_max`` -> 255 (None: the image maximum). Negative values clip to 0."""
    top = float(img.max()) if scale_max is None else scale_max
    if top <= 0:
        return np.zeros(img.shape, dtype=np.uint8)
    return np.clip(np.rint(img * (255.0 / top)), 0, 255).astype(np.uint8)


def render(scene: Scene, rng: np.random.Generator, look: Look | None = None) -> RenderedImage:
    """Render ``scene`` in ``look`` (default: the preset's mode, which must not be ``mixed``).

    Order: signal (OD or SEM surface), background, photon noise, the artefacts that belong to
    the specimen and the instrument (halo, texture, debris, gradient, charging), blur, additive
    noise and inversion, 8-bit mapping, then what happens to a figure (JPEG, figure marks).
    """
    cfg: SceneConfig = scene.config
    r = cfg.rendering
    look = look or draw_look(cfg, rng)
    dose = None
    if look == "sem":
        gain = r.sem_edge_gain
        if r.sem_edge_gain_jitter > 0:
            gain = max(0.0, float(rng.uniform(gain - r.sem_edge_gain_jitter, gain + r.sem_edge_gain_jitter)))
        img = sem_signal(scene, gain)
        scale_max = None
    else:
        img = scene.thickness.astype(np.float32) * np.float32(cfg.od_per_voxel)
        scale_max = None if r.normalisation == "image_max" else cfg.domain.height * cfg.od_per_voxel
    if r.background.enabled:
        img = img + smooth_background(img.shape, r.background, rng)
    if r.noise.enabled:
        img, dose = noisy_od(img, r.noise, rng)
    a = r.artefacts
    span = signal_span(img)
    img = apply_before_blur(img, scene, a, look, span, rng)
    sigma = float(rng.uniform(max(r.blur_sigma - r.blur_sigma_jitter, 0.0), r.blur_sigma + r.blur_sigma_jitter))
    if sigma > 0:
        img = ndimage.gaussian_filter(img, sigma)
    img = apply_after_blur(img.astype(np.float32), a, span, rng)
    if r.normalisation == "percentile":
        gray = percentile_gray(img, draw(r.percentile_low, rng), draw(r.percentile_high, rng))
    else:
        gray = to_gray(img, scale_max)
    gray = apply_to_gray(gray, a, rng)
    return RenderedImage(od=img, gray=gray, blur_sigma=sigma, dose=dose)
