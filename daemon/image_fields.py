"""What an image field of a bluesky event holds, checked against its descriptor's data key.

A descriptor's data key declares the shape of one event's value. The image layouts understood:

- ``[H, W]``: one gray frame;
- ``[1, H, W]`` or ``[N, H, W]``: N gray frames (ophyd and ophyd-async put a leading 1);
- ``[H, W, 3]`` / ``[H, W, 4]`` (and ``[1, H, W, C]`` / ``[N, H, W, C]``): RGB / RGBA frames.

A value whose shape is not the declared one is refused (``shape_mismatch``); a leading axis of
length 1 on either side is ignored, and a declared dimension that is not a positive integer
(areaDetector often says 0 for "unknown") matches any length. A colour frame becomes luminance,
``0.299 R + 0.587 G + 0.114 B`` (ITU-R BT.601; alpha ignored), as float32, or is refused
(``color_frame``) when so configured. Each frame is held to the input's size limit (``oversize``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from nanoseg_daemon.ingest_config import FrameSizeLimits
from nanoseg_daemon.wire import RejectReason

Shape = tuple[int | None, ...]
"""A declared shape; None where the descriptor does not say (any length matches)."""

_COLOR_CHANNELS = (3, 4)
_BT601 = np.array([0.299, 0.587, 0.114], np.float32)


class ImageRejected(Exception):
    """An image value refused; ``reason`` is a metric label."""

    def __init__(self, reason: RejectReason, detail: str) -> None:
        super().__init__(detail)
        self.reason: RejectReason = reason
        self.detail = detail


@dataclass(frozen=True)
class Frame:
    """One 2-D frame of an event's value: ``index`` within the value (None for a single frame);
    ``converted`` names a conversion made (``rgb_to_gray``, ``rgba_to_gray``), else None."""

    index: int | None
    pixels: np.ndarray
    converted: str | None = None


def declared_shape(data_key: Mapping[str, Any]) -> Shape | None:
    """The data key's shape, None when it declares none (no list, or not 2 to 4 axes). Trailing
    unknown axes beyond two are dropped (ophyd's area detectors may say [H, W, 0])."""
    shape = data_key.get("shape")
    if not isinstance(shape, list | tuple) or not 2 <= len(shape) <= 4:
        return None
    out = [int(d) if isinstance(d, int) and not isinstance(d, bool) and d > 0 else None for d in shape]
    while len(out) > 2 and out[-1] is None:
        out.pop()
    return tuple(out)


def _is_color(shape: Sequence[int | None]) -> bool:
    """``[H, W, C]`` or ``[N, H, W, C]`` with C in 3, 4 (``[N, H, 3]`` reads as colour too)."""
    return len(shape) in (3, 4) and shape[-1] in _COLOR_CHANNELS and (len(shape) == 4 or shape[0] != 1)


def is_image_data_key(data_key: Mapping[str, Any]) -> bool:
    """A descriptor data key holding images: gray ``[H, W]``, ``[1, H, W]``, or colour
    ``[H, W, 3|4]``, ``[1, H, W, 3|4]``."""
    shape = declared_shape(data_key)
    if shape is None:
        return False
    if len(shape) == 2:
        return True
    if len(shape) == 3:
        return shape[0] == 1 or _is_color(shape)
    return shape[0] == 1 and _is_color(shape)


def frame_axis(shape: Shape | None) -> tuple[int, Shape | None]:
    """(frames per event value, the declared shape of one frame) of a declared shape:
    ``[N, H, W]`` and ``[N, H, W, C]`` have N (unknown N counts as 1), ``[H, W]`` and
    ``[H, W, C]`` have 1."""
    if shape is None or len(shape) == 2 or (len(shape) == 3 and _is_color(shape)):
        return 1, shape
    return shape[0] or 1, shape[1:]


def _squeeze_leading(shape: Sequence[int | None]) -> tuple[int | None, ...]:
    return tuple(shape[1:]) if len(shape) > 2 and shape[0] == 1 else tuple(shape)


def _matches(actual: tuple[int, ...], declared: Shape) -> bool:
    a, d = _squeeze_leading(actual), _squeeze_leading(declared)
    return len(a) == len(d) and all(x is None or x == y for x, y in zip(d, a))


def to_gray(color: np.ndarray) -> np.ndarray:
    """(H, W) float32 luminance of an (H, W, 3|4) RGB(A) frame; alpha is ignored."""
    return np.tensordot(color[..., :3].astype(np.float32, copy=False), _BT601, axes=([2], [0]))


def frames_of(value: Any, declared: Shape | None, limits: FrameSizeLimits,
              color: Literal["gray", "refuse"] = "gray") -> list[Frame]:
    """The 2-D frames of one event's image value; raises ``ImageRejected`` for the whole value.

    Parameters
    ----------
    value
        The event's value (array-like; pixels row-major, y down).
    declared
        The descriptor's shape for it (``declared_shape``), None when it declares none (the value's
        own shape then decides: 2-D gray, 3-D with last axis 3 or 4 colour, other 3-D a stack).
    limits
        Largest frame accepted (each frame of a stack is checked, colour before conversion).
    color
        ``gray`` converts colour frames to luminance, ``refuse`` rejects them.
    """
    try:
        arr = np.asarray(value)
    except (ValueError, TypeError):
        raise ImageRejected("bad_shape", "image is not an array") from None
    if arr.dtype.kind not in "biuf":
        raise ImageRejected("bad_dtype", f"image dtype {arr.dtype} is not numeric")
    if not 2 <= arr.ndim <= 4 or arr.size == 0 or (arr.ndim == 4 and arr.shape[-1] not in _COLOR_CHANNELS):
        raise ImageRejected("bad_shape", f"image shape {arr.shape} is not 2-D, N x H x W or H x W x C")
    if declared is not None and not _matches(arr.shape, declared):
        shown = [d if d is not None else "?" for d in declared]
        raise ImageRejected("shape_mismatch", f"image shape {list(arr.shape)}, descriptor says {shown}")
    is_color = _is_color(_squeeze_leading(declared if declared is not None else arr.shape))
    if is_color:
        stack = arr[None] if arr.ndim == 3 else arr
    elif arr.ndim == 4:
        raise ImageRejected("shape_mismatch", f"colour image {list(arr.shape)}, descriptor says gray")
    else:
        stack = arr[None] if arr.ndim == 2 else arr
    if is_color and color == "refuse":
        raise ImageRejected("color_frame", f"colour image {list(arr.shape)} refused (color_frames: refuse)")
    frames: list[Frame] = []
    single = len(stack) == 1
    for k, pixels in enumerate(stack):
        h, w = pixels.shape[:2]
        if (why := limits.oversize(h, w, pixels.nbytes)) is not None:
            raise ImageRejected("oversize", why)
        if is_color:
            kind = "rgb_to_gray" if pixels.shape[-1] == 3 else "rgba_to_gray"
            frames.append(Frame(None if single else k, to_gray(pixels), kind))
        else:
            frames.append(Frame(None if single else k, pixels))
    return frames
