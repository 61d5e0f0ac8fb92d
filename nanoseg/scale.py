"""``pixel_size_nm: auto``: the resampling at which a frame's objects are as wide as the model's.

A frame of unknown pixel size is resampled so its objects' typical width becomes the typical
width of the objects the model was trained on. The width is measured the same way on both: the
median, over the skeleton of an Otsu foreground, of twice the distance to the background
(``object_width_px``). The estimate scales with the frame: resampling a frame by s multiplies it
by s (to within a pixel of discretisation), which is what makes the choice of scale right
whatever the estimator's own bias, as long as the model's typical width (``MODEL_WIDTH_PX``) is
measured by the same estimator.

Widths in px of the image given; scale = model px per frame px (> 1: upsampled).
"""

from __future__ import annotations

from dataclasses import dataclass

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
      when it has no objects: then ``scale`` is 1); ``limited``: the scale hit ``SCALE_LIMITS``.
    """

    pixel_size_nm: float
    scale: float
    object_width_px: float | None
    limited: bool


def choose_scale(image: np.ndarray, model_pixel_size_nm: float,
                 model_width_px: float = MODEL_WIDTH_PX) -> ScaleChoice:
    """The resampling that makes ``image``'s objects (bright, dark background) ``model_width_px`` wide."""
    width = object_width_px(image)
    if width is None or width <= 0:
        return ScaleChoice(model_pixel_size_nm, 1.0, None, False)
    raw = model_width_px / width
    scale = float(np.clip(raw, *SCALE_LIMITS))
    return ScaleChoice(model_pixel_size_nm * scale, scale, width, scale != raw)

