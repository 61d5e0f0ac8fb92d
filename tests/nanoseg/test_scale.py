"""``pixel_size_nm: auto``: the resampling at which the model reads a frame's objects best (by its
confidence), or at which they are as wide as the model's (by width, without a model)."""

from __future__ import annotations

import numpy as np
import pytest
from skimage.transform import rescale

from nanoseg.config_io import load_yaml
from nanoseg.frame_profile import FrameProfile
from nanoseg.input_spec import InputSpec
from nanoseg.paths import CONFIGS
from nanoseg.prepare import prepare_frame
from nanoseg.scale import (
    CONFIDENCE_SCALES,
    MODEL_WIDTH_PX,
    SCALE_LIMITS,
    choose_scale,
    object_width_px,
    pick_confident_scale,
    top_k_confidence,
)

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


def test_top_k_confidence_and_the_pick() -> None:
    assert top_k_confidence(np.array([0.9, 0.1, 0.8, 0.7, 0.95, 0.85, 0.2])) == pytest.approx(0.84)
    assert top_k_confidence(np.array([0.6, 0.4])) == pytest.approx(0.5)  # fewer than k: all count
    assert top_k_confidence(np.array([])) == 0.0
    scales = [0.5, 1.0, 2.0, 4.0]
    lone = pick_confident_scale(scales, [0.2, 0.5, 0.9, 0.3], 8.0)  # one scale on the plateau
    assert (lone.scale, lone.pixel_size_nm, lone.method, lone.confidence) == (2.0, 16.0, "confidence", 0.9)
    # a plateau of two equal scales: its centre in log scale
    assert pick_confident_scale(scales, [0.1, 0.9, 0.9, 0.1], 8.0).scale == pytest.approx(2 ** 0.5)
    # weights: 0.05 and 0.025 above (0.95 - 0.05): log2 scale (0.05 * 1 + 0.025 * 2) / 0.075
    assert pick_confident_scale(scales, [0.1, 0.3, 0.95, 0.925], 8.0).scale == pytest.approx(2 ** (4 / 3))
    assert pick_confident_scale(scales, [0.0] * 4, 8.0).scale == 1.0  # nothing found anywhere
    with pytest.raises(ValueError, match="one confidence per scale"):
        pick_confident_scale(scales, [0.5], 8.0)


@pytest.fixture(scope="module")
def segmenter(trained_model_path):  # type: ignore[no-untyped-def]
    from nanoseg.checkpoint import load_checkpoint
    from nanoseg.engines.factory import engine_from_checkpoint
    from nanoseg.postprocess import PostprocessConfig
    from nanoseg.segmenter import Segmenter

    ckpt = load_checkpoint(trained_model_path)
    return Segmenter.for_checkpoint(engine_from_checkpoint(ckpt, "onnxruntime", threads=2), ckpt, PostprocessConfig())


@pytest.mark.parametrize("factor", [0.5, 2.0])
def test_confidence_recovers_a_known_resampling(segmenter, paper_samples: list, factor: float) -> None:  # type: ignore[no-untyped-def]
    """A model-scale scene shrunk or grown by ``factor`` is read back at about 1 / factor: within
    half an octave (the grid's step), as for all 36 frames the rule was designed on."""
    gray = paper_samples[0][0]
    frame = rescale(gray, factor, order=1, anti_aliasing=factor < 1, preserve_range=True).astype(np.float32)
    choice = segmenter.choose_scale(frame, "intensity")
    assert choice.method == "confidence" and choice.confidence is not None and choice.confidence > 0.5
    assert abs(np.log2(choice.scale * factor)) <= 0.51
    assert CONFIDENCE_SCALES[0] <= choice.scale <= CONFIDENCE_SCALES[-1]
    assert choice.pixel_size_nm == pytest.approx(8.0 * choice.scale)


def test_segmenter_prepare_chooses_auto_by_confidence(segmenter, paper_samples: list) -> None:  # type: ignore[no-untyped-def]
    gray = paper_samples[0][0]
    small = rescale(gray, 0.5, order=1, anti_aliasing=True, preserve_range=True)
    od = load_yaml(CONFIGS / "profiles" / "ptychography_od.yaml", FrameProfile)
    prepared = segmenter.prepare(small, od, pixel_size_nm="auto")
    assert prepared.auto_scale is not None and prepared.auto_scale.method == "confidence"
    assert prepared.pixel_size_nm == prepared.auto_scale.pixel_size_nm
    assert prepared.scale_yx[0] == pytest.approx(prepared.auto_scale.scale, rel=0.01)
    assert prepared.stated_pixel_size_nm is None  # a resampling, not a measurement: no nm sizes
    fixed = segmenter.prepare(small, od)  # the profile's 6 nm: no search
    assert fixed.auto_scale is None and fixed.pixel_size_nm == 6.0
