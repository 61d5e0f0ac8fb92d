"""Exceptions raised at the boundary of the pure core, each with a reason code for metrics."""

from __future__ import annotations

from typing import Literal

FrameErrorReason = Literal[
    "empty_frame",  # zero pixels
    "bad_shape",  # not 2-D, or a reference/dark array whose shape differs from the frame's
    "bad_dtype",  # not an integer or real floating-point array (bool, complex, object, str, ...)
    "non_finite",  # no finite pixel at all
    "no_signal",  # no pixel above the dark level: nothing to take a logarithm of
    "non_positive_reference",  # I0 - dark <= 0 (scalar, estimate, or every flat-field pixel)
    "missing_reference",  # the profile asks for a flat field and none was supplied
    "unknown_profile",  # the frame names a profile that cannot be loaded (the daemon's profile book)
    "too_large",  # resampled to the model's pixel size, a side would exceed the profile's max_model_side_px
]


class FrameError(ValueError):
    """A frame was rejected before analysis.

    ``reason`` is a short, stable code (one of ``FrameErrorReason``) that becomes a metric label,
    e.g. ``frames_failed_total{reason="bad_dtype"}``; the message says what was wrong.
    """

    def __init__(self, reason: FrameErrorReason, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason: FrameErrorReason = reason
