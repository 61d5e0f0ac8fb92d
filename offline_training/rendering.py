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
    field = zoom_linear(field, step, shape)
    return (offset + amp * field).astype(np.float32)


def zoom_linear(field: np.ndarray, step: int, shape: tuple[int, int]) -> np.ndarray:
    """``ndimage.zoom(field, step, order=1)[:shape[0], :shape[1]]``, bit for bit, in about half the time.

    Linear interpolation is separable: each row of the output mixes two rows of the coarse
    ``field`` (float64), each column two columns. The products and sums are taken in
    ``ndimage``'s own order, ((d00 wy0) wx0 + (d01 wy0) wx1) + (d10 wy1) wx0 + (d11 wy1) wx1,
    with its weights (1 - frac, then 1 minus that) on its coordinates (output index times
    (coarse size - 1) / (zoomed size - 1)), so the values are identical; ``ndimage`` loops over
    every output pixel and computes the columns it then crops away. Falls back to ``ndimage``
    where the kept part reaches the coarse grid's last row or column (its border rule applies).
    """
    axes = []
    for n_in, n_keep in zip(field.shape, shape):
        n_out = n_in * step
        factor = (n_in - 1) / (n_out - 1) if n_out > 1 else 1.0
        cc = np.arange(n_keep, dtype=np.float64) * factor
        start = np.floor(cc)
        w0 = 1.0 - (cc - start)
        index = start.astype(np.intp)
        if n_keep > n_out or index[-1] + 1 >= n_in:
            return ndimage.zoom(field, step, order=1)[: shape[0], : shape[1]]
        axes.append((index, w0, 1.0 - w0))
    (iy, wy0, wy1), (ix, wx0, wx1) = axes
    upper = field[iy] * wy0[:, None]  # (rows kept, coarse columns): d wy, for both columns
    lower = field[iy + 1] * wy1[:, None]
    out = np.take(upper, ix, axis=1)
    out *= wx0
    out += 0.0  # ndimage starts its sum at 0.0: -0.0 becomes 0.0 as there
    term = np.empty_like(out)  # one buffer for the other three products
    for rows, cols, weight in ((upper, ix + 1, wx1), (lower, ix, wx0), (lower, ix + 1, wx1)):
        np.take(rows, cols, axis=1, out=term)
        term *= weight
        out += term
    return out


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
    expected = od.astype(np.float64)  # in place from here on: the same values, fewer full-frame copies
    np.negative(expected, out=expected)
    np.exp(expected, out=expected)
    expected *= dose
    counts = rng.poisson(expected).astype(np.float64)
    counts += dark
    if read_noise > 0:
        counts += rng.normal(0.0, read_noise, size=od.shape)
    return counts


def noisy_od(od: np.ndarray, cfg: Noise, rng: np.random.Generator) -> tuple[np.ndarray, float]:
    """Simulate counting statistics and convert back with OD = -ln(I / I0), floor at half a photon."""
    dose = draw(cfg.dose, rng)
    counts = transmission_counts(od, dose, draw(cfg.read_noise, rng), rng)
    np.maximum(counts, 0.5, out=counts)
    counts /= dose
    np.log(counts, out=counts)
    return np.negative(counts, out=counts).astype(np.float32), dose


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
