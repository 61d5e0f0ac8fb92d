"""Mask refiner: its grid convention, an untrained refiner changes nothing, torch and ONNX agree."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torchvision.models.detection.roi_heads import project_masks_on_boxes

from nanoseg.checkpoint import Checkpoint, load_checkpoint, without_refiner
from nanoseg.engines.detection_core import DetectionCore
from nanoseg.engines.factory import engine_from_checkpoint
from nanoseg.mask_decoding import MaskDecoding
from nanoseg.mask_refiner import MaskRefiner, MaskRefinerConfig, image_crops
from nanoseg.model import describe, mask_resolution
from nanoseg.postprocess import paste_mask
from nanoseg_training.train_refiner import with_refiner

S = 56


def with_fresh_refiner(ckpt: Checkpoint, zero_output: bool = True, seed: int = 0) -> Checkpoint:
    """``ckpt`` (its refiner dropped) with a newly initialised refiner; ``zero_output=False``
    randomises the output layer so the refiner changes the masks."""
    torch.manual_seed(seed)
    cfg = MaskRefinerConfig(size=S)
    net = MaskRefiner(cfg)
    if not zero_output:
        torch.nn.init.normal_(net.out.weight, std=2.0)
    return with_refiner(ckpt, cfg, net.state_dict(), {"test": "fresh"})


@pytest.fixture(scope="module")
def plain(trained_model_path: Path) -> Checkpoint:
    return without_refiner(load_checkpoint(trained_model_path))


def test_crops_sample_where_the_mask_targets_do() -> None:
    """The crop's S x S bins sit where torchvision's mask targets (``project_masks_on_boxes``) put
    theirs, so the refined grid is pasted with the mask head's convention (offset, margin). On a
    linear ramp every bin's mean is its centre's value, whatever the samples per bin."""
    h, w = 64, 80
    yy, xx = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    ramp = xx + 2.0 * yy
    boxes = torch.tensor([[3.0, 5.0, 40.5, 20.0], [10.25, 2.0, 78.0, 62.5], [20.0, 30.0, 21.5, 60.0]])
    crops = image_crops(ramp[None, None], [boxes], S)[:, 0]
    targets = project_masks_on_boxes(ramp[None].expand(3, h, w), boxes, torch.zeros(3, dtype=torch.int64), S)
    torch.testing.assert_close(crops, targets, atol=1e-3, rtol=0)
    shifted = image_crops(ramp[None, None], [boxes + 0.5], S)[:, 0]
    assert (shifted - targets).abs().min() > 1.0  # half a pixel is 1.5 on this ramp: it would show


def test_a_target_grid_pastes_back_onto_its_wire(paper_samples: list) -> None:
    """The S x S target of a wire, pasted over its grown box with the model's offset, covers the
    wire (IoU >= 0.93 for every wire of a scene); without the offset it covers it less well."""
    _, masks = paper_samples[0]
    ious, shifted = [], []
    for m in masks:
        ys, xs = np.nonzero(m)
        box = np.array([xs.min() - 1.0, ys.min() - 1.0, xs.max() + 2.0, ys.max() + 2.0], np.float32)  # grown 1 px
        grid = image_crops(torch.from_numpy(m).float()[None, None], [torch.from_numpy(box)[None]], S)[0, 0].numpy()
        for offset, out in ((0.5, ious), (0.0, shifted)):
            p = paste_mask(grid, box, m.shape, 0.5, offset)
            out.append((p & m).sum() / (p | m).sum())
    assert min(ious) >= 0.93
    assert np.mean(shifted) < np.mean(ious) - 0.02


def test_an_untrained_refiner_returns_the_coarse_masks(plain: Checkpoint, paper_samples: list) -> None:
    """Zero-initialised output: the refined grid is the mask head's grid upsampled (bilinear, cell
    centres kept); boxes and scores are untouched."""
    x = torch.from_numpy(paper_samples[0][0])[None, None]
    dec = MaskDecoding(margin_px=1.0, refine_boxes=1)
    refined_ckpt = with_fresh_refiner(plain)
    assert mask_resolution(refined_ckpt.model_config) == S == describe(refined_ckpt.model_config)["mask_resolution"]
    with torch.inference_mode():
        b0, s0, m0, n0 = DetectionCore(plain.build(), dec, plain.model_config)(x)
        b1, s1, m1, n1 = DetectionCore(refined_ckpt.build(), dec, refined_ckpt.model_config)(x)
    n = int(n0[0])
    assert n > 0 and int(n1[0]) == n and m1.shape[-2:] == (S, S)
    torch.testing.assert_close(b1, b0)
    torch.testing.assert_close(s1, s0)
    up = F.interpolate(m0[0, :n, None], size=(S, S), mode="bilinear", align_corners=False)[:, 0]
    torch.testing.assert_close(m1[0, :n], up, atol=2e-4, rtol=0)


def test_refiner_in_onnx_matches_torch(plain: Checkpoint, paper_samples: list) -> None:
    """The refiner (ROIAlign of the image, resize, dilated convs) exports and reproduces torch."""
    ckpt = with_fresh_refiner(plain, zero_output=False)
    dec = MaskDecoding(margin_px=1.0, tta=2, refine_boxes=1)
    x = paper_samples[1][0][None, None].astype(np.float32)
    t = engine_from_checkpoint(ckpt, "torch", threads=2, decoding=dec).infer(x)[0]
    o = engine_from_checkpoint(ckpt, "onnxruntime", threads=2, decoding=dec).infer(x)[0]
    coarse = engine_from_checkpoint(plain, "torch", threads=2, decoding=dec).infer(x)[0]
    assert len(t) == len(o) > 0 and t.mask_probs.shape[1:] == (S, S)
    np.testing.assert_allclose(o.boxes, t.boxes, atol=1e-2)
    np.testing.assert_allclose(o.mask_probs, t.mask_probs, atol=1e-3)
    up = F.interpolate(torch.from_numpy(coarse.mask_probs)[:, None], size=(S, S), mode="bilinear")[:, 0].numpy()
    assert np.abs(t.mask_probs - up).mean() > 3e-3  # the refiner did change the masks


@pytest.mark.parametrize("kind", ["torch", "onnxruntime"])
def test_a_frame_without_detections_refines_to_nothing(plain: Checkpoint, kind: str) -> None:
    eng = engine_from_checkpoint(with_fresh_refiner(plain), kind, threads=2)  # type: ignore[arg-type]
    (raw,) = eng.infer(np.zeros((1, 1, 512, 512), np.float32))
    assert len(raw) == 0 and raw.mask_probs.shape[1:] == (S, S)


def test_the_refiner_reads_how_stretched_the_grid_is() -> None:
    """The same crop over a long thin box and over a square box is refined differently (the px
    per cell in x and y are an input), and not at all without that input's weights trained."""
    torch.manual_seed(1)
    net = MaskRefiner(MaskRefinerConfig(size=24, channels=8, dilations=(1,)))
    torch.nn.init.normal_(net.out.weight)
    crops, coarse = torch.randn(2, 1, 24, 24), torch.rand(2, 12, 12)
    thin = torch.tensor([[0.0, 0.0, 200.0, 10.0]] * 2)
    square = torch.tensor([[0.0, 0.0, 60.0, 60.0]] * 2)
    with torch.no_grad():
        assert not torch.allclose(net(crops, coarse, thin), net(crops, coarse, square), atol=1e-3)
        torch.nn.init.zeros_(net.body[0].weight[:, 2:])
        torch.testing.assert_close(net(crops, coarse, thin), net(crops, coarse, square))


def test_a_refiner_needs_the_torchvision_grid(plain: Checkpoint) -> None:
    """Its crops are sampled on torchvision's mask-target grid; detectron2's is half a pixel off."""
    with pytest.raises(ValueError, match="mask_refiner needs torchvision semantics"):
        plain.model_config.model_validate(plain.model_config.model_dump() | {
            "semantics": "detectron2", "roi_aligned": True, "mask_refiner": MaskRefinerConfig().model_dump()})
