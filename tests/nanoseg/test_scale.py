"""``pixel_size_nm: auto``: the resampling that gives a frame's objects the model's width."""

from __future__ import annotations

import numpy as np
import pytest
from skimage.transform import rescale

from nanoseg.config_io import load_yaml
from nanoseg.frame_profile import FrameProfile
from nanoseg.input_spec import InputSpec
from nanoseg.paths import CONFIGS
from nanoseg.prepare import prepare_frame
from nanoseg.scale import MODEL_WIDTH_PX, SCALE_LIMITS, choose_scale, object_width_px

SPEC = InputSpec(pixel_size_nm=8.0)

# Tolerance: on 10 generated frames resampled by 0.5-2 the width ratio was within 10 % of the
# factor for every frame (``MODEL_WIDTH_PX``'s docstring); a frame holds 5-20 wires, so one
# frame's estimate is a median over a few hundred skeleton pixels of a handful of objects.
# 15 % leaves room for another draw; the model's training widths span 12-50 px (a factor of 4),
# so a 15 % error keeps the frame's wires well inside what the model has seen.
TOLERANCE = 0.15


@pytest.mark.parametrize("factor", [0.5, 2.0])
def test_auto_scale_recovers_a_known_resampling(paper_samples: list, factor: float) -> None:
    for gray, _ in paper_samples:
        native = object_width_px(gray)
        assert native is not None and 12 <= native <= 50  # the model's training widths
        frame = rescale(gray, factor, order=1, anti_aliasing=factor < 1, preserve_range=True)
        # The frame's pixels are 8 / factor nm: auto must undo the factor, relative to the native frame.
        choice = choose_scale(frame, SPEC.pixel_size_nm, model_width_px=native)
        assert choice.scale == pytest.approx(1 / factor, rel=TOLERANCE)
        assert choice.pixel_size_nm == pytest.approx(8.0 / factor, rel=TOLERANCE)


def test_prepare_with_auto_pixel_size(paper_samples: list) -> None:
    gray = paper_samples[0][0]
    small = rescale(gray, 0.5, order=1, anti_aliasing=True, preserve_range=True)
    od = load_yaml(CONFIGS / "profiles" / "ptychography_od.yaml", FrameProfile)
    prepared = prepare_frame(small, od, SPEC, pixel_size_nm="auto")
    assert prepared.auto_scale is not None and prepared.pixel_size_nm == prepared.auto_scale.pixel_size_nm
    # the half-size frame is grown until its objects are MODEL_WIDTH_PX wide
    width = object_width_px(gray)
    assert width is not None
    expected = MODEL_WIDTH_PX / (width / 2)
    assert prepared.scale_yx[0] == pytest.approx(expected, rel=TOLERANCE)
    fixed = prepare_frame(small, od, SPEC)  # the profile's 6 nm, no estimate
    assert fixed.auto_scale is None and fixed.pixel_size_nm == 6.0


def test_auto_scale_without_objects_or_beyond_the_limits() -> None:
    flat = choose_scale(np.zeros((64, 64)), 8.0)
    assert (flat.scale, flat.object_width_px, flat.pixel_size_nm) == (1.0, None, 8.0)
    img = np.zeros((128, 128))
    img[20:100, 60:63] = 1.0  # a 3 px wide line: 24 / 3 = 8x, kept at the upper limit
    thin = choose_scale(img, 8.0, model_width_px=24.0)
    assert thin.limited and thin.scale == SCALE_LIMITS[1]
