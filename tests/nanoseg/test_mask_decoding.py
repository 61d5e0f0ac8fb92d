"""Mask decoding: box margin and mask TTA, in the graph (torch and ONNX) and in mask pasting."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.ops import roi_align

from nanoseg.checkpoint import Checkpoint, load_checkpoint, save_checkpoint, without_refiner
from nanoseg.engines import Engine, EngineError
from nanoseg.engines.detection_core import DetectionCore
from nanoseg.engines.factory import engine_from_checkpoint, load_engine
from nanoseg.export import export_checkpoint_onnx, read_onnx_metadata
from nanoseg.mask_decoding import (
    VIEWS,
    MaskDecoding,
    decoding_from_metadata,
    grow_boxes,
    unview_boxes,
    unview_grids,
    view_boxes,
    view_image,
    with_decoding,
)
from nanoseg.postprocess import PostprocessConfig, paste_mask
from nanoseg.segmenter import Segmenter

M = 28


def mask_targets(mask: torch.Tensor, boxes: torch.Tensor, aligned: bool) -> torch.Tensor:
    """M x M targets of a (H, W) mask in ``boxes`` as training makes them (torchvision's
    ``project_masks_on_boxes``: ROIAlign at scale 1; detectron2: ``aligned=True``)."""
    rois = torch.cat([torch.zeros(len(boxes), 1), boxes], 1)
    return roi_align(mask[None, None].float(), rois, (M, M), 1.0, 2, aligned)[:, 0]


@pytest.mark.parametrize("view", VIEWS)
@pytest.mark.parametrize(("aligned", "offset"), [(False, 0.5), (True, 0.0)])
def test_views_map_training_targets_onto_each_other(view: tuple[bool, bool, bool], aligned: bool,
                                                    offset: float) -> None:
    """What the mask head learns for a box in the image is, mapped back, what it learns for the
    box's view in the viewed image: the mirror convention is the training targets' pixel model."""
    rng = np.random.default_rng(0)
    h, w = 48, 64  # not square: transposes swap the sides
    mask = torch.from_numpy(rng.random((h, w)) < 0.5)
    boxes = torch.tensor([[3.0, 5.0, 40.5, 20.0], [10.25, 2.0, 61.0, 45.5], [0.0, 0.0, 64.0, 48.0]])
    seen = view_image(mask, view)
    assert seen.shape == ((w, h) if view[0] else (h, w))
    direct = mask_targets(mask, boxes, aligned)
    via_view = unview_grids(mask_targets(seen, view_boxes(boxes, (h, w), view, offset), aligned), view)
    torch.testing.assert_close(via_view, direct, atol=1e-5, rtol=0)


def test_a_wrong_mirror_convention_is_caught() -> None:
    """The test above can fail: mirroring detectron2-style (offset 0) a torchvision model's boxes
    shifts its targets by a pixel."""
    mask = torch.zeros(32, 32, dtype=torch.bool)
    mask[:, 8:13] = True
    boxes = torch.tensor([[6.0, 0.0, 15.0, 32.0]])
    view = VIEWS[1]
    direct = mask_targets(mask, boxes, aligned=False)
    wrong = unview_grids(mask_targets(view_image(mask, view), view_boxes(boxes, (32, 32), view, 0.0), False), view)
    assert (wrong - direct).abs().max() > 0.2


@pytest.mark.parametrize("view", VIEWS)
def test_unview_inverts_view(view: tuple[bool, bool, bool]) -> None:
    grids = torch.arange(2 * 5 * 5, dtype=torch.float32).reshape(2, 5, 5)
    assert torch.equal(unview_grids(view_image(grids, view), view), grids)
    boxes = torch.tensor([[3.0, 5.0, 40.5, 20.0], [10.25, 2.0, 61.0, 45.5]])
    seen = view_boxes(boxes, (48, 64), view, 0.5)
    assert torch.equal(unview_boxes(seen, (48, 64), view, 0.5), boxes)
    assert (seen[:, 2:] > seen[:, :2]).all()  # still x0 < x1, y0 < y1


def test_decoding_fields_and_overrides() -> None:
    dec = MaskDecoding(margin_px=1.0, tta=4)
    assert not dec.is_plain and MaskDecoding().is_plain
    assert with_decoding(dec) is dec
    assert with_decoding(dec, tta=8) == MaskDecoding(margin_px=1.0, tta=8)
    assert with_decoding(dec, margin_px=0.0, tta=1).is_plain
    assert not with_decoding(dec, margin_px=0.0, tta=1, refine_boxes=1).is_plain
    assert "8 flipped/transposed views" in with_decoding(dec, tta=8).describe()
    with pytest.raises(ValueError, match="tta"):
        with_decoding(dec, tta=3)
    with pytest.raises(ValueError, match="margin_px"):
        MaskDecoding(margin_px=-1)
    assert decoding_from_metadata({}) == MaskDecoding()  # files exported before decodings existed
    assert decoding_from_metadata({"nanoseg.mask_decoding": dec.model_dump_json()}) == dec
    boxes = torch.tensor([[10.0, 20.0, 30.0, 40.0]])
    assert grow_boxes(boxes, 1.5).tolist() == [[8.5, 18.5, 31.5, 41.5]]


def test_paste_with_a_margin_is_paste_over_the_grown_box() -> None:
    probs = np.random.default_rng(1).random((M, M)).astype(np.float32)
    box = np.array([12.3, 40.0, 90.7, 61.2], np.float32)
    grown = box + np.array([-2, -2, 2, 2], np.float32)
    a = paste_mask(probs, box, (128, 128), 0.5, 0.5, margin_px=2.0)
    assert a.any() and np.array_equal(a, paste_mask(probs, grown, (128, 128), 0.5, 0.5))


@pytest.fixture(scope="module")
def checkpoint(trained_model_path: Path) -> Checkpoint:
    """The shipped network with the plain decoding and without its mask refiner (the mask head's
    own M x M grids: ``test_mask_refiner.py`` covers the refiner)."""
    ckpt = without_refiner(load_checkpoint(trained_model_path))
    plain = {**ckpt.meta.get("operating_point", {"score_threshold": 0.5, "mask_threshold": 0.5}),
             "mask_decoding": MaskDecoding().model_dump()}
    return replace(ckpt, meta={**ckpt.meta, "operating_point": plain})


@pytest.fixture(scope="module")
def engine_of(checkpoint: Checkpoint) -> Callable[[str, MaskDecoding], Engine]:
    """``engine_of(kind, decoding)``: the checkpoint's engine, made once per module for each kind and
    decoding (an ONNX engine is an export of the graph, ~10 s; engines keep no state between calls)."""
    made: dict[tuple[str, str], Engine] = {}

    def get(kind: str, decoding: MaskDecoding) -> Engine:
        key = (kind, decoding.model_dump_json())
        if key not in made:
            made[key] = engine_from_checkpoint(checkpoint, kind, threads=2, decoding=decoding)  # type: ignore[arg-type]
        return made[key]

    return get


def test_plain_recompute_reproduces_the_networks_masks(checkpoint: Checkpoint, paper_samples: list) -> None:
    """The recomputing path with no margin and one view gives torchvision's own mask output."""
    gray = paper_samples[0][0]
    x = torch.from_numpy(gray.astype(np.float32))[None, None]
    core = DetectionCore(checkpoint.build(), MaskDecoding(), checkpoint.model_config)
    with torch.inference_mode():
        boxes, _, masks, num = core(x)
        m = core.model
        images, _ = m.transform([x[0]])
        feats = m.backbone(images.tensors)
        again = core._mask_probs(feats, [boxes[0, : int(num[0])]], (512, 512))[0]
    assert int(num[0]) > 0
    torch.testing.assert_close(again, masks[0, : int(num[0])], atol=1e-5, rtol=0)


@pytest.mark.parametrize("refine", [0, 2])
def test_tta_and_margin_in_onnx_match_torch(checkpoint: Checkpoint, engine_of: Callable[[str, MaskDecoding], Engine],
                                            paper_samples: list, refine: int) -> None:
    """The exported graph carries the decoding (ops, metadata) and reproduces torch."""
    dec = MaskDecoding(margin_px=1.0, tta=8, refine_boxes=refine)
    gray = paper_samples[0][0]
    t, o = engine_of("torch", dec), engine_of("onnxruntime", dec)
    assert t.mask_decoding == o.mask_decoding == dec
    x = gray[None, None].astype(np.float32)
    a, b = t.infer(x)[0], o.infer(x)[0]
    plain = engine_from_checkpoint(checkpoint, "torch", threads=2).infer(x)[0]
    assert len(a) == len(b) == len(plain) > 0
    np.testing.assert_allclose(b.boxes, a.boxes, atol=1e-2)
    np.testing.assert_allclose(b.mask_probs, a.mask_probs, atol=1e-3)
    np.testing.assert_allclose(b.scores, a.scores, atol=1e-4)
    assert np.abs(a.mask_probs - plain.mask_probs).mean() > 1e-3  # the masks are the views' mean
    if not refine:  # detections come from the image as it is
        np.testing.assert_array_equal(a.boxes, plain.boxes)
        np.testing.assert_array_equal(a.scores, plain.scores)
    else:  # refined: moved a little (a pixel or so), not replaced
        shift = np.abs(a.boxes - plain.boxes)
        assert shift.max() > 0.01 and np.median(shift) < 2.0
        assert np.abs(a.scores - plain.scores).max() > 1e-4


def test_refinement_needs_torchvision_semantics(checkpoint: Checkpoint) -> None:
    d2 = checkpoint.model_config.model_copy(update={"semantics": "detectron2", "roi_aligned": True})
    with pytest.raises(ValueError, match="refine_boxes needs a torchvision"):
        DetectionCore(checkpoint.build(), MaskDecoding(refine_boxes=1), d2)


def test_segmenter_pastes_with_the_engines_margin(checkpoint: Checkpoint, paper_samples: list) -> None:
    post = PostprocessConfig(score_threshold=0.5, min_area_px=0)
    eng = engine_from_checkpoint(checkpoint, "torch", threads=2, decoding=MaskDecoding(margin_px=2.0))
    seg = Segmenter.for_checkpoint(eng, checkpoint, post)
    assert seg.mask_margin_px == 2.0 and seg.with_post(post).mask_margin_px == 2.0
    inst = seg.segment_gray(paper_samples[0][0])
    assert len(inst) > 0
    # Some mask reaches beyond its own box (by more than the 0.5 px grid offset): the grid covers
    # the grown box.
    def beyond(mask: np.ndarray, box: np.ndarray) -> bool:
        ys, xs = np.nonzero(mask)
        return bool(xs.min() < box[0] - 0.5 or xs.max() + 1 > box[2] + 1 or ys.min() < box[1] - 0.5
                    or ys.max() + 1 > box[3] + 1)

    assert any(beyond(m, b) for m, b in zip(inst.masks, inst.boxes) if m.any())


def test_stored_decoding_is_used_and_an_onnx_file_must_match_it(checkpoint: Checkpoint, tmp_path: Path) -> None:
    point = {**checkpoint.meta["operating_point"], "mask_decoding": {"margin_px": 1.0, "tta": 2}}
    stored = save_checkpoint(replace(checkpoint, meta={**checkpoint.meta, "operating_point": point}),
                             tmp_path / "m.pt", half=True)
    ckpt = load_checkpoint(stored)
    assert ckpt.mask_decoding == MaskDecoding(margin_px=1.0, tta=2)
    eng, _ = load_engine(stored, "torch", threads=1)
    assert eng.mask_decoding == ckpt.mask_decoding
    eng, _ = load_engine(stored, "torch", threads=1, mask_tta=1)
    assert eng.mask_decoding == MaskDecoding(margin_px=1.0, tta=1)
    plain_onnx = tmp_path / "plain.onnx"
    plain_onnx.write_bytes(export_checkpoint_onnx(ckpt, MaskDecoding()))
    assert decoding_from_metadata(read_onnx_metadata(plain_onnx.read_bytes())) == MaskDecoding()
    with pytest.raises(EngineError, match="exported with mask decoding"):
        engine_from_checkpoint(ckpt, "onnxruntime", onnx_path=plain_onnx)
    ok = engine_from_checkpoint(ckpt, "onnxruntime", onnx_path=plain_onnx, decoding=MaskDecoding())
    assert ok.mask_decoding == MaskDecoding()


def test_a_batch_decodes_as_its_images_alone(checkpoint: Checkpoint, paper_samples: list) -> None:
    """Views are batched view-major; each image's detections get its own views' masks."""
    eng = engine_from_checkpoint(checkpoint, "torch", threads=2,
                                 decoding=MaskDecoding(margin_px=1.0, tta=2, refine_boxes=2))
    batch = np.stack([paper_samples[0][0], paper_samples[1][0]])[:, None].astype(np.float32)
    together = eng.infer(batch)
    for image, joint in zip(batch, together):
        alone = eng.infer(image[None])[0]
        assert len(alone) == len(joint) > 0
        np.testing.assert_allclose(joint.boxes, alone.boxes, atol=1e-3)
        np.testing.assert_allclose(joint.scores, alone.scores, atol=1e-5)
        np.testing.assert_allclose(joint.mask_probs, alone.mask_probs, atol=1e-4)


@pytest.mark.parametrize("kind", ["torch", "onnxruntime"])
def test_a_frame_without_detections_decodes_to_nothing(engine_of: Callable[[str, MaskDecoding], Engine],
                                                       kind: str) -> None:
    """Every decoding step copes with zero detections (an empty frame warms the daemon up)."""
    eng = engine_of(kind, MaskDecoding(margin_px=1.0, tta=8, refine_boxes=2))
    (raw,) = eng.infer(np.zeros((1, 1, 512, 512), np.float32))
    assert len(raw) == 0 and raw.mask_probs.shape[1:] == (M, M)


def test_a_decoding_detects_without_the_mask_branch(checkpoint: Checkpoint) -> None:
    """The decoding predicts masks itself, so detection skips torchvision's mask branch; the box
    stage is the model's own (shared modules, eval mode), not a copy."""
    model = checkpoint.build()
    assert DetectionCore(model).detector is model.roi_heads
    core = DetectionCore(model, MaskDecoding(margin_px=1.0), checkpoint.model_config)
    assert not core.detector.has_mask() and not core.detector.training
    assert core.detector.box_head is model.roi_heads.box_head
    assert core.detector.box_predictor is model.roi_heads.box_predictor
    assert core.detector.nms_thresh == model.roi_heads.nms_thresh
