"""Domain randomisation: what real instruments and published figures add to a clean scene.

Each effect is a field of the preset's ``rendering.artefacts`` with a probability; an effect
that is off draws nothing from the random stream, so presets without artefacts render exactly as
before. Amplitudes are fractions of the image's signal range (``signal_span``), so the same preset
works for optical density and SEM signals. Nothing here changes the labels: halos, texture,
debris, streaks and figure marks are all background.
"""

from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage

from nanoseg_training.scene import Scene, draw, draw_int
from nanoseg_training.synthetic_config import Artefacts, Probability

SCALE_BAR_LABELS = ("50 nm", "100 nm", "200 nm", "500 nm", "1 µm", "2 µm", "5 nm", "20 nm")
PANEL_LETTERS = "abcdefghiABCDEFGHI"


def happens(p: Probability, rng: np.random.Generator) -> bool:
    """Whether an effect applies to this image; draws nothing when its probability is 0."""
    return p.probability > 0 and bool(rng.uniform() < p.probability)


def signal_span(img: np.ndarray) -> float:
    """The image's signal range (max - min), 1.0 for a flat image."""
    span = float(img.max() - img.min())
    return span if span > 0 else 1.0


def band_noise(shape: tuple[int, int], grain_px: float, rng: np.random.Generator) -> np.ndarray:
    """Unit-variance Gaussian noise correlated over ``grain_px`` px (float32)."""
    sigma = max(grain_px / 2.0, 0.3)
    field = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma)
    return field / max(float(field.std()), 1e-6)


def halo(material: np.ndarray, width_px: float) -> np.ndarray:
    """A rim just outside the objects' edges, peak ~1, zero inside the objects."""
    blurred = ndimage.gaussian_filter(material, width_px)
    return np.clip(blurred - material, 0.0, None) * 2.0


def gradient(shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """A random linear ramp plus vignetting, peak-to-peak ~1."""
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    t = rng.uniform(0.0, 2.0 * math.pi)
    ramp = (xx * math.cos(t) + yy * math.sin(t)) / max(h, w)
    cy, cx = rng.uniform(0, h), rng.uniform(0, w)
    vignette = -((yy - cy) ** 2 + (xx - cx) ** 2) / float(h * h + w * w)
    mix = rng.uniform(0.0, 1.0)
    field = mix * ramp + (1.0 - mix) * vignette
    return (field / max(float(np.ptp(field)), 1e-6)).astype(np.float32)


def debris(shape: tuple[int, int], count: int, size_px: tuple[float, float],
           rng: np.random.Generator) -> np.ndarray:
    """Small irregular blobs (unions of 1-3 discs), 0/1 float32 map."""
    h, w = shape
    out = np.zeros(shape, dtype=np.float32)
    for _ in range(count):
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        for _part in range(int(rng.integers(1, 4))):
            r = rng.uniform(*size_px) / 2.0
            oy, ox = cy + rng.normal(0, r), cx + rng.normal(0, r)
            y0, y1 = max(int(oy - r - 1), 0), min(int(oy + r + 2), h)
            x0, x1 = max(int(ox - r - 1), 0), min(int(ox + r + 2), w)
            if y0 >= y1 or x0 >= x1:
                continue
            yy, xx = np.mgrid[y0:y1, x0:x1]
            out[y0:y1, x0:x1][(yy + 0.5 - oy) ** 2 + (xx + 0.5 - ox) ** 2 <= r * r] = 1.0
    return out


def charging_streaks(scene: Scene, streaks: int, rng: np.random.Generator) -> np.ndarray:
    """Bright horizontal streaks starting on wires and fading along the scan (x), peak 1."""
    h, w = scene.shape
    out = np.zeros((h, w), dtype=np.float32)
    if not scene.wires:
        return out
    xs = np.arange(w, dtype=np.float32)
    for _ in range(streaks):
        wire = scene.wires[int(rng.integers(len(scene.wires)))]
        y0, y1, x0, x1 = wire.box
        row = int(rng.integers(y0, y1))
        thick = int(rng.integers(1, 4))
        start = float(rng.uniform(x0, x1))
        decay = float(rng.uniform(20.0, 200.0))
        profile = np.where(xs >= start, np.exp(-(xs - start) / decay), 0.0)
        out[row : min(row + thick, h)] = np.maximum(out[row : min(row + thick, h)], profile)
    return out


def apply_before_blur(img: np.ndarray, scene: Scene, a: Artefacts, look: str, span: float,
                      rng: np.random.Generator) -> np.ndarray:
    """Specimen and instrument effects, added to the signal before the optics' blur."""
    img = img.astype(np.float32, copy=True)
    if happens(a.halo, rng):
        sign = 1.0 if rng.uniform() < 0.5 else -1.0
        rim = halo((scene.thickness > 0).astype(np.float32), draw(a.halo.width_px, rng))
        img += np.float32(sign * draw(a.halo.amplitude, rng) * span) * rim
    if happens(a.texture, rng):
        img += np.float32(draw(a.texture.amplitude, rng) * span) * band_noise(
            img.shape, draw(a.texture.grain_px, rng), rng)
    if happens(a.debris, rng):
        size = (a.debris.size_px.low, a.debris.size_px.high)
        blobs = debris(img.shape, draw_int(a.debris.count, rng), size, rng)
        img += np.float32(draw(a.debris.amplitude, rng) * span) * blobs
    if happens(a.gradient, rng):
        img += np.float32(draw(a.gradient.amplitude, rng) * span) * gradient(img.shape, rng)
    if look == "sem" and happens(a.charging, rng):
        img += np.float32(draw(a.charging.amplitude, rng) * span) * charging_streaks(
            scene, draw_int(a.charging.streaks, rng), rng)
    return img


def apply_after_blur(img: np.ndarray, a: Artefacts, span: float, rng: np.random.Generator) -> np.ndarray:
    """Detector noise and contrast inversion, on the blurred signal."""
    if a.gaussian_noise is not None:
        std = draw(a.gaussian_noise, rng) * span
        if std > 0:
            img = img + rng.normal(0.0, std, img.shape).astype(np.float32)
    if happens(a.invert, rng):
        img = np.float32(img.max()) - img
    return img


def font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """Pillow's bundled font at ``size`` px (the bitmap default where FreeType is missing)."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType
        return ImageFont.load_default()


def figure_marks(gray: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A scale bar with its label, a panel letter and sometimes a border, black or white."""
    h, w = gray.shape
    im = Image.fromarray(gray, mode="L")
    d = ImageDraw.Draw(im)
    ink = 0 if rng.uniform() < 0.5 else 255
    size = int(rng.integers(12, 36))
    f = font(size)
    # scale bar in a bottom corner, its label above or beside it
    bar_w, bar_h = int(rng.integers(w // 12, w // 3)), int(rng.integers(2, 9))
    right = rng.uniform() < 0.5
    x0 = int(w - bar_w - rng.integers(8, 40)) if right else int(rng.integers(8, 40))
    y0 = int(h - bar_h - rng.integers(8, 40))
    if rng.uniform() < 0.4:  # a plate behind the bar, as many figures have
        d.rectangle([x0 - 6, y0 - size - 10, x0 + bar_w + 6, h - 1], fill=255 - ink)
    d.rectangle([x0, y0, x0 + bar_w, y0 + bar_h], fill=ink)
    label = SCALE_BAR_LABELS[int(rng.integers(len(SCALE_BAR_LABELS)))]
    d.text((x0, y0 - size - 4), label, fill=ink, font=f)
    if rng.uniform() < 0.7:
        letter = PANEL_LETTERS[int(rng.integers(len(PANEL_LETTERS)))]
        text = f"({letter})" if rng.uniform() < 0.5 else letter
        d.text((int(rng.integers(4, 30)), int(rng.integers(4, 30))), text, fill=ink, font=f)
    if rng.uniform() < 0.3:
        t = int(rng.integers(1, 5))
        side = int(rng.integers(4))
        box = [(0, 0, w - 1, t), (0, h - t, w - 1, h - 1), (0, 0, t, h - 1), (w - t, 0, w - 1, h - 1)][side]
        d.rectangle(box, fill=ink)
    return np.asarray(im, dtype=np.uint8).copy()


def jpeg(gray: np.ndarray, quality: int) -> np.ndarray:
    """``gray`` after a JPEG round trip at ``quality`` (1-95)."""
    buf = io.BytesIO()
    Image.fromarray(gray, mode="L").save(buf, format="JPEG", quality=quality)
    buf.seek(0)
    return np.asarray(Image.open(buf).convert("L"), dtype=np.uint8).copy()


def apply_to_gray(gray: np.ndarray, a: Artefacts, rng: np.random.Generator) -> np.ndarray:
    """What happens to an image that became a figure: JPEG compression, then figure marks."""
    if happens(a.jpeg, rng):
        gray = jpeg(gray, draw_int(a.jpeg.quality, rng))
    if happens(a.figure_marks, rng):
        gray = figure_marks(gray, rng)
    return gray
