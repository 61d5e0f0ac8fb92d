"""``pixel_size_nm: auto``: the resampling at which a frame's objects look like the model's.

Two ways to choose, one result (``ScaleChoice``):

- **confidence** (where a model is at hand: ``nanoseg segment``, ``nanoseg evaluate``, the
  daemon; ``Segmenter.choose_scale``): the model looks at the centre of the frame at each of
  ``CONFIDENCE_SCALES`` (half octaves from 1/4 to 4); a model trained with scale jitter is
  about equally confident over a plateau of scales, and the centre of that plateau (the
  confidence-weighted mean log scale of the scales within ``CONFIDENCE_PLATEAU`` of the best)
  is chosen (``pick_confident_scale``). Designed on synthetic frames of known scale (``paper``
  validation and generator frames resampled by 0.5-2, read by ``models/generalist`` and
  ``models/default``): within half an octave of the true scale for all 36 frames, mean error
  0.27 octave; the single most confident scale was within half an octave for 28.
- **width** (no model: preparing a user's labelled images for training): the frame is
  resampled so its objects' typical width becomes the typical width of the objects the model was
  trained on. The width is measured the same way on both: the
median, over the skeleton of an Otsu foreground, of twice the distance to the background
(``object_width_px``). The estimate scales with the frame: resampling a frame by s multiplies it
by s (to within a pixel of discretisation), which is what makes the choice of scale right
whatever the estimator's own bias, as long as the model's typical width (``MODEL_WIDTH_PX``) is
measured by the same estimator.

Widths in px of the image given; scale = model px per frame px (> 1: upsampled).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from scipy import ndimage
from skimage.filters import threshold_otsu
from skimage.morphology import remove_small_objects, skeletonize

MODEL_WIDTH_PX = 24.0
"""``object_width_px`` of the generator's ``paper`` frames at the model's 8 nm/px (the kind of
images ``models/default`` was trained on): median 24.2 px over 50 frames (``nanoseg generate
paper --count 50 --seed 7``; interquartile range of the per-frame values 21.5-27.8 px). The
same frames resampled by 0.5, 0.7, 1.5 and 2 give widths 0.52, 0.71, 1.49 and 1.99 times the
original (medians of 10 frames; every frame within 10 %)."""
SCALE_LIMITS = (0.25, 4.0)
"""The auto scale is kept within these (model px per frame px): a frame is never shrunk or grown
more than 4x, which bounds the tiles (and the time) one frame can cost."""
_MAX_SIDE_PX = 1024
"""Frames larger than this are measured on a block-averaged copy (then scaled back): the width
of objects a few px wide is lost there, but those frames are upsampled anyway."""


def object_width_px(image: np.ndarray) -> float | None:
    """Typical width (px) of the bright objects of ``image`` (dark background); None without any.

    Otsu threshold of the image smoothed by a 1 px Gaussian, holes filled (a secondary-electron
    particle with bright edges counts whole), specks under 16 px dropped; then the median of
    2 x (distance to the background) over the foreground's skeleton.
    """
    img = np.asarray(image, dtype=np.float64)
    factor = max(1, int(np.ceil(max(img.shape) / _MAX_SIDE_PX)))
    if factor > 1:
        h, w = (img.shape[0] // factor) * factor, (img.shape[1] // factor) * factor
        img = img[:h, :w].reshape(h // factor, factor, w // factor, factor).mean(axis=(1, 3))
    smooth = ndimage.gaussian_filter(img, 1.0)
    if float(smooth.max()) <= float(smooth.min()):
        return None
    fg = smooth > threshold_otsu(smooth)
    fg = remove_small_objects(ndimage.binary_fill_holes(fg), max_size=15)
    if not fg.any():
        return None
    dist = ndimage.distance_transform_edt(fg)
    ridge = dist[skeletonize(fg)]
    if ridge.size == 0:
        return None
    return float(2.0 * np.median(ridge) * factor)


@dataclass(frozen=True)
class ScaleChoice:
    """The resampling chosen for one frame.

    - ``pixel_size_nm``: the frame's pixel size this amounts to (model pixel size x ``scale``).
    - ``scale``: model px per frame px; ``object_width_px``: the frame's measured width (None
      when it has no objects, or chosen by confidence); ``limited``: the scale hit
      ``SCALE_LIMITS``.
    - ``method``: ``width`` or ``confidence``; ``confidence``: with ``confidence``, the model's
      top-k mean score at the chosen scale (0-1; 0 when it found nothing at any scale, then
      ``scale`` is 1).
    """

    pixel_size_nm: float
    scale: float
    object_width_px: float | None
    limited: bool
    method: Literal["width", "confidence"] = "width"
    confidence: float | None = None


def choose_scale(image: np.ndarray, model_pixel_size_nm: float,
                 model_width_px: float = MODEL_WIDTH_PX) -> ScaleChoice:
    """The resampling that makes ``image``'s objects (bright, dark background) ``model_width_px`` wide."""
    width = object_width_px(image)
    if width is None or width <= 0:
        return ScaleChoice(model_pixel_size_nm, 1.0, None, False)
    raw = model_width_px / width
    scale = float(np.clip(raw, *SCALE_LIMITS))
    return ScaleChoice(model_pixel_size_nm * scale, scale, width, scale != raw)



CONFIDENCE_SCALES: tuple[float, ...] = tuple(2.0 ** (k / 2) for k in range(-4, 5))
"""Scales the confidence search tries (model px per frame px): half octaves, 0.25 to 4 (within
``SCALE_LIMITS``). A model trained with scale jitter reads objects within about half an octave
of their trained size, so a finer grid gains little and costs a model pass per step."""
CONFIDENCE_TOP_K = 5
"""The confidence at one scale is the mean score of the model's ``CONFIDENCE_TOP_K`` best
detections there: the few clearest objects decide, not how many fit in the view."""
CONFIDENCE_PLATEAU = 0.05
"""Scales whose confidence is within this of the best one form the plateau whose centre is
chosen (weighted by how far above ``best - CONFIDENCE_PLATEAU`` each is)."""


def top_k_confidence(scores: np.ndarray, k: int = CONFIDENCE_TOP_K) -> float:
    """Mean of the ``k`` highest of ``scores`` (all of them when fewer; 0 when none).

    Parameters
    ----------
    scores : ndarray, shape (N,)
        Instance scores, 0-1, of one model input.
    k : int
        How many of the best count.

    Returns
    -------
    float
        0-1.
    """
    s = np.asarray(scores, dtype=np.float64).ravel()
    if s.size == 0:
        return 0.0
    return float(np.sort(s)[::-1][:k].mean())


def pick_confident_scale(scales: Sequence[float], confidences: Sequence[float],
                         model_pixel_size_nm: float) -> ScaleChoice:
    """The centre of the plateau of confident scales.

    The scales within ``CONFIDENCE_PLATEAU`` of the best confidence are averaged in log scale,
    each weighted by its confidence minus (best - ``CONFIDENCE_PLATEAU``).

    Parameters
    ----------
    scales : sequence of float
        Model px per frame px tried (e.g. ``CONFIDENCE_SCALES``).
    confidences : sequence of float
        ``top_k_confidence`` of the model's detections at each scale, 0-1.
    model_pixel_size_nm : float
        The model's pixel size, nm: the chosen frame pixel size is this times the scale.

    Returns
    -------
    ScaleChoice
        ``method`` ``confidence``, ``confidence`` the best one; scale 1 when the model found
        nothing at any scale.
    """
    s = np.asarray(scales, dtype=np.float64)
    c = np.asarray(confidences, dtype=np.float64)
    if s.shape != c.shape or s.size == 0:
        raise ValueError(f"{s.size} scales and {c.size} confidences: one confidence per scale")
    best = float(c.max())
    if best <= 0:
        return ScaleChoice(model_pixel_size_nm, 1.0, None, False, "confidence", 0.0)
    w = np.clip(c - (best - CONFIDENCE_PLATEAU), 0.0, None)
    raw = float(2.0 ** (np.sum(w * np.log2(s)) / np.sum(w)))
    scale = float(np.clip(raw, *SCALE_LIMITS))
    return ScaleChoice(model_pixel_size_nm * scale, scale, None, scale != raw, "confidence", best)
