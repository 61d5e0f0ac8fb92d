"""Frame -> model input tiles, and the model's instances -> instances on the original frame.

``prepare_frame``: convert (OD or intensity) -> resample to the model's pixel size -> map to the
0–255 gray the model was trained on -> cut into square tiles. ``instances_to_frame`` undoes the
geometry: merge tiles, then scale boxes and masks back to the frame's pixels.

Resampling is centre-aligned (as scikit-image's ``resize``): frame pixel centre r maps to model
coordinate (r + 0.5) * s - 0.5, so pixel edges map as e -> e * s, with s = model px per frame px
per axis (``PreparedFrame.scale_yx``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from numpy.typing import ArrayLike
from scipy import ndimage
from skimage.transform import rescale

from nanoseg.errors import FrameError
from nanoseg.frame_profile import BackgroundI0, FlatFieldI0, FrameProfile, ScalarI0
from nanoseg.input_check import InputCheck, background_surface, check_input
from nanoseg.input_spec import FrameMode, InputSpec
from nanoseg.instances import BoxMasks, Instances
from nanoseg.optical_density import (
    InvalidPixels,
    as_frame,
    estimate_i0,
    fill_nearest,
    intensity_image,
    optical_density,
    validate_frame,
)
from nanoseg.scale import ScaleChoice, choose_scale
from nanoseg.tiling import FrameTiles, Tile, merge_tiled_instances, plan_tiles

ScaleChooser = Callable[[np.ndarray, FrameMode], ScaleChoice]
"""Chooses a frame's ``auto`` resampling from its converted image (bright objects, dark
background, frame px) and mode (e.g. ``Segmenter.choose_scale``)."""


def to_model_input(image: np.ndarray, spec: InputSpec, mode: FrameMode = "optical_density") -> np.ndarray:
    """(H, W) float32 gray in [0, 255] as the model was trained on.

    Optical density follows ``spec.intensity_mapping`` (per-image maximum or ``spec.od_max`` ->
    255). Intensity images have no physical scale, so their maximum maps to 255 (a normalised
    intensity image, in [0, 1], is simply scaled by 255). Negative values clip to 0.
    """
    if mode == "optical_density" and spec.intensity_mapping == "fixed":
        assert spec.od_max is not None  # the spec's validator guarantees it
        top = spec.od_max
    else:
        top = float(image.max())
    if top <= 0:
        return np.zeros(image.shape, np.float32)
    out = np.multiply(image, 255.0 / top, out=np.empty(image.shape, np.float32))
    return np.clip(out, 0.0, 255.0, out=out)


def resample_to_model_scale(
    img: np.ndarray, frame_pixel_size_nm: float, spec: InputSpec
) -> tuple[np.ndarray, float]:
    """Resample so one px is ``spec.pixel_size_nm``; returns (float32 image, scale); at scale 1 a
    float32 ``img`` is returned itself, not copied.

    ``scale`` = frame_pixel_size_nm / spec.pixel_size_nm, model px per frame px (> 1: upsampled,
    e.g. STXM at 35 nm -> 8 nm is 4.375). The output shape is round(shape * scale); bilinear
    interpolation, Gaussian anti-aliasing when shrinking.
    """
    if frame_pixel_size_nm <= 0:
        raise ValueError(f"frame pixel size must be > 0 nm, got {frame_pixel_size_nm}")
    scale = frame_pixel_size_nm / spec.pixel_size_nm
    if math.isclose(scale, 1.0, rel_tol=1e-6):
        return img.astype(np.float32, copy=False), 1.0  # a float32 image itself: callers only read it
    out = rescale(img, scale, order=1, mode="edge", anti_aliasing=scale < 1, preserve_range=True)
    return out.astype(np.float32), scale


@dataclass(frozen=True, eq=False)
class PreparedFrame:
    """A frame ready for the engine, with what is needed to map instances back.

    - ``inputs``: its model inputs (``FrameTiles``: the 0-255 gray image at the model's scale and
      the tile plan; the tiles are made only when asked, ``tiles``).
    - ``frame_shape``: (H, W) of the original frame.
    - ``image``: (H, W) float32 OD (or intensity) at the original resolution, for statistics.
    - ``invalid``: replaced pixels per kind; ``reference``: scalar I0 - dark used, if any.
    - ``input_check``: what the frame looks like against what the profile expects.
    - ``pixel_size_nm``: the frame pixel size used (None: not resampled); ``auto_scale``: how it
      was chosen when the profile or caller asked for ``auto``.
    """

    inputs: FrameTiles
    frame_shape: tuple[int, int]
    image: np.ndarray
    mode: FrameMode
    invalid: InvalidPixels
    reference: float | None
    merge_iou: float
    input_check: InputCheck | None = None
    pixel_size_nm: float | None = None
    auto_scale: ScaleChoice | None = None

    @property
    def tiles(self) -> np.ndarray:
        """(T, size, size) float32 model input in [0, 255]; padding is the image's median. Made
        on first use (``FrameTiles.array``)."""
        return self.inputs.array

    @property
    def tile_plan(self) -> tuple[Tile, ...]:
        """Where each tile lies on the frame at model scale."""
        return self.inputs.plan

    @property
    def model_shape(self) -> tuple[int, int]:
        """(H, W) of the frame at the model's scale, px."""
        h, w = self.inputs.image.shape
        return h, w

    @property
    def optical_density(self) -> np.ndarray | None:
        """``image`` (H, W) float32 when the frame was prepared as optical density, else None:
        the mean-OD column's source (``particle_stats.frame_statistics``)."""
        return self.image if self.mode == "optical_density" else None

    @property
    def stated_pixel_size_nm(self) -> float | None:
        """The frame pixel size a run or profile stated, nm, for particle sizes in nm; None when
        there was none or it was chosen by ``auto`` (a resampling, not a measurement)."""
        return None if self.auto_scale is not None else self.pixel_size_nm

    @property
    def scale_yx(self) -> tuple[float, float]:
        """Model px per frame px along y and x (exact for the resampled shape)."""
        return (
            self.model_shape[0] / self.frame_shape[0],
            self.model_shape[1] / self.frame_shape[1],
        )


@dataclass(frozen=True, eq=False)
class ModelScaleImage:
    """A whole frame converted and resampled to the model's scale, before tiling.

    ``gray``: (h, w) float32 0–255 at the model's scale; ``image``: (H, W) float32 OD (or
    intensity) at the frame's; the other fields as ``PreparedFrame``'s.
    """

    gray: np.ndarray
    image: np.ndarray
    invalid: InvalidPixels
    reference: float | None
    input_check: InputCheck
    pixel_size_nm: float | None
    auto_scale: ScaleChoice | None


def to_model_scale(
    frame: ArrayLike,
    profile: FrameProfile,
    spec: InputSpec,
    *,
    flat_field: ArrayLike | None = None,
    dark_frame: ArrayLike | None = None,
    pixel_size_nm: float | Literal["auto"] | None = None,
    scale_chooser: ScaleChooser | None = None,
) -> ModelScaleImage:
    """Check, convert and resample one frame following ``profile`` (``prepare_frame`` without the
    tiles; also how ``nanoseg train`` prepares a user's own labelled images).

    The frame is checked against the profile's expected input first (``check_input``); with
    ``input: auto`` it is prepared as what it looks like. ``flat_field`` is required (and only
    allowed) when the profile's I0 policy is ``flat_field``; ``dark_frame`` replaces the profile's
    scalar dark; ``pixel_size_nm`` (nm, or ``auto``) overrides the profile's. ``auto`` asks
    ``scale_chooser`` (the converted image, bright objects on a dark background, and the mode ->
    ``ScaleChoice``; ``Segmenter.choose_scale`` asks the model), else ``nanoseg.scale.choose_scale``
    (objects' width). Raises FrameError for frames that cannot be analysed (reason codes in
    ``nanoseg.errors``).
    """
    arr = np.asarray(frame)
    check = check_input(_check_sample(arr), profile.expected_input)
    try:
        image, invalid, reference = _convert(arr, profile, check, flat_field, dark_frame)
    except FrameError as err:
        if not check.mismatch:
            raise
        raise FrameError(err.reason, f"{str(err).split(': ', 1)[-1]}; {check.message()}") from None
    px = pixel_size_nm if pixel_size_nm is not None else profile.pixel_size_nm
    auto: ScaleChoice | None = None
    if px == "auto":
        auto = scale_chooser(image, profile.mode) if scale_chooser else choose_scale(image, spec.pixel_size_nm)
        px = auto.pixel_size_nm
    if px is not None:
        _check_model_side(image.shape, px, spec, profile.max_model_side_px)
    scaled = resample_to_model_scale(image, px, spec)[0] if px is not None else image
    gray = to_model_input(scaled, spec, profile.mode)
    return ModelScaleImage(gray, image, invalid, reference, check, px, auto)


def prepare_frame(
    frame: ArrayLike,
    profile: FrameProfile,
    spec: InputSpec,
    *,
    flat_field: ArrayLike | None = None,
    dark_frame: ArrayLike | None = None,
    pixel_size_nm: float | Literal["auto"] | None = None,
    scale_chooser: ScaleChooser | None = None,
) -> PreparedFrame:
    """Check, convert, resample (``to_model_scale``, same arguments) and tile one frame following
    ``profile``, for a model described by ``spec``."""
    if profile.tile_overlap_px >= spec.size:
        raise ValueError(f"tile_overlap_px {profile.tile_overlap_px} must be < model size {spec.size}")
    m = to_model_scale(frame, profile, spec, flat_field=flat_field, dark_frame=dark_frame,
                       pixel_size_nm=pixel_size_nm, scale_chooser=scale_chooser)
    return PreparedFrame(
        inputs=FrameTiles(m.gray, tuple(plan_tiles(m.gray.shape, spec.size, profile.tile_overlap_px))),
        frame_shape=(m.image.shape[0], m.image.shape[1]),
        image=m.image,
        mode=profile.mode,
        invalid=m.invalid,
        reference=m.reference,
        merge_iou=profile.merge_iou,
        input_check=m.input_check,
        pixel_size_nm=m.pixel_size_nm,
        auto_scale=m.auto_scale,
    )


def _check_model_side(shape: tuple[int, ...], pixel_size_nm: float, spec: InputSpec, limit: int) -> None:
    """Raise FrameError ``too_large`` when a frame of ``shape`` (px) at ``pixel_size_nm`` would
    have a side over ``limit`` px at the model's pixel size (``resample_to_model_scale``'s
    rounding)."""
    scale = pixel_size_nm / spec.pixel_size_nm
    side = max(round(n * scale) for n in shape)
    if side > limit:
        raise FrameError("too_large", f"{shape[0]}x{shape[1]} px at {pixel_size_nm:g} nm would be {side} px a side "
                                      f"at the model's {spec.pixel_size_nm:g} nm (max_model_side_px {limit})")


def _check_sample(arr: np.ndarray) -> np.ndarray:
    """The finite values of a regular subsample of at most ~16 000 pixels, for ``check_input``
    (cheap on large frames; integer frames keep their dtype). Raises FrameError as
    ``validate_frame``, or ``non_finite``."""
    validate_frame(arr)
    step = max(1, math.ceil(math.sqrt(arr.size / 16384)))
    sample = arr[::step, ::step]
    if sample.dtype.kind != "f":
        return sample
    sample = sample[np.isfinite(sample)]
    if sample.size == 0:
        raise FrameError("non_finite", "every pixel is NaN or inf")
    return sample


def _convert(frame: np.ndarray, profile: FrameProfile, check: InputCheck, flat_field: ArrayLike | None,
             dark_frame: ArrayLike | None) -> tuple[np.ndarray, InvalidPixels, float | None]:
    """(image with bright objects on a dark background, replaced pixels, scalar I0 - dark used)."""
    transmission = check.used == "transmission"
    if profile.mode == "optical_density" and transmission:
        i0: float | ArrayLike | None = None
        if isinstance(profile.i0, FlatFieldI0):
            if flat_field is None:
                raise FrameError("missing_reference", f"profile {profile.name!r} needs a flat field")
            i0 = flat_field
        elif flat_field is not None:
            raise ValueError(f"profile {profile.name!r} does not use a flat field (i0: {profile.i0.policy})")
        elif isinstance(profile.i0, ScalarI0):
            i0 = profile.i0.value
        dark = dark_frame if dark_frame is not None else profile.dark
        if profile.flatten_background and isinstance(profile.i0, BackgroundI0):
            i0 = _illumination(frame, dark)
        od = optical_density(frame, i0, dark, floor=profile.transmission_floor)
        return od.od, od.invalid, od.reference
    if profile.mode == "optical_density":
        res = intensity_image(frame, invert=False, normalise=False)
    else:
        res = intensity_image(frame, transmission, profile.normalise, profile.normalise_percentiles)
    image = res.image
    if profile.flatten_background:
        # After inversion the background is dark in either case: subtract its slow variation.
        image = image - background_surface(image, bright_background=False)
        image = np.clip(image - np.percentile(image, 1.0), 0.0, None).astype(np.float32)
        if profile.mode == "intensity" and profile.normalise:
            image = np.clip(image / max(float(np.percentile(image, profile.normalise_percentiles[1])), 1e-12),
                            0.0, 1.0).astype(np.float32)
    return image, res.invalid, None


def _illumination(frame: np.ndarray, dark: float | ArrayLike) -> np.ndarray:
    """I0 of an unevenly lit transmission frame: the background surface's shape (mean 1) times
    the background's level (``estimate_i0``) in the frame divided by that shape, plus dark."""
    d = np.asarray(dark, dtype=np.float64)
    signal = as_frame(frame) - d
    good = np.isfinite(signal)
    filled = fill_nearest(np.where(good, signal, 0.0), ~good)
    surface = background_surface(filled, bright_background=True)
    mean = float(surface.mean())
    if not np.all(surface > 0) or mean <= 0:
        return np.full(frame.shape, estimate_i0(filled)) + d  # no usable shape: a flat I0
    shape = surface / mean
    return np.asarray(shape * estimate_i0(filled / shape) + d)


def instances_to_frame(per_tile: Sequence[Instances], prepared: PreparedFrame,
                       max_instances: int | None = None) -> Instances:
    """Per-tile instances (tile px, one ``Instances`` per tile, in ``tile_plan`` order) -> frame px.

    Tiles are merged at the model's scale (``merge_tiled_instances``), then boxes are divided by
    the scale and masks resampled to the frame's shape (area-weighted when shrinking, a pixel is
    in the mask when at least half of it is covered). Instances too small to cover half a frame
    pixel are dropped. ``max_instances``: only the best-scored ones are kept (after merging).
    """
    merged = merge_tiled_instances(per_tile, prepared.tile_plan, prepared.model_shape, prepared.merge_iou,
                                   max_instances)
    sy, sx = prepared.scale_yx
    h, w = prepared.frame_shape
    if (sy, sx) == (1.0, 1.0):
        return merged
    src = merged.box_masks
    offsets: list[tuple[int, int]] = []
    crops: list[np.ndarray] = []
    for (r, c), crop in zip(src.offsets, src.crops):
        off, out = _resample_crop(crop, (int(r), int(c)), (sy, sx), (h, w))
        offsets.append(off)
        crops.append(out)
    masks = BoxMasks.tight((h, w), offsets, crops)  # box-local: never N x H x W
    boxes = merged.boxes / np.array([sx, sy, sx, sy], np.float32)
    boxes = np.clip(boxes, 0, [w, h, w, h])
    keep = masks.areas() > 0
    return Instances(boxes[keep], merged.scores[keep], masks.select(keep))


def _resample_crop(mask: np.ndarray, offset: tuple[int, int], scale_yx: tuple[float, float],
                   frame_shape: tuple[int, int]) -> tuple[tuple[int, int], np.ndarray]:
    """A mask crop at model px (top-left ``offset`` (row, col)) resampled to frame px: the frame
    crop's top-left and the crop (empty when nothing covers half a frame pixel)."""
    empty = ((0, 0), np.zeros((0, 0), bool))
    if mask.size == 0 or not mask.any():
        return empty
    sy, sx = scale_yx
    sigma = (max(0.0, (sy - 1) / 2), max(0.0, (sx - 1) / 2))  # anti-aliasing, as skimage.resize
    pad = math.ceil(3 * max(sigma)) + 2
    r0, c0 = offset[0] - pad, offset[1] - pad
    crop = np.zeros((mask.shape[0] + 2 * pad, mask.shape[1] + 2 * pad), np.float32)
    crop[pad:-pad, pad:-pad] = mask
    if max(sigma) > 0:
        crop = ndimage.gaussian_filter(crop, sigma)
    # Frame pixels whose centres fall inside the crop.
    y = _frame_range(r0, r0 + crop.shape[0], sy, frame_shape[0])
    x = _frame_range(c0, c0 + crop.shape[1], sx, frame_shape[1])
    if y.size == 0 or x.size == 0:
        return empty
    yy = (y + 0.5) * sy - 0.5 - r0
    xx = (x + 0.5) * sx - 0.5 - c0
    grid = np.meshgrid(yy, xx, indexing="ij")
    vals = ndimage.map_coordinates(crop, grid, order=1, mode="constant", cval=0.0)
    return (int(y[0]), int(x[0])), vals >= 0.5


def _frame_range(lo: int, hi: int, s: float, n: int) -> np.ndarray:
    """Frame indices whose centres map into model coordinates [lo, hi)."""
    first = max(0, math.ceil((lo + 0.5) / s - 0.5))
    last = min(n - 1, math.floor((hi - 0.5) / s - 0.5))
    return np.arange(first, last + 1)
