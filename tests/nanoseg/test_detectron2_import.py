"""Importing a genuine detectron2 checkpoint reproduces detectron2's own numbers.

The oracle is ``shared/detectron2-fixture`` (detectron2's outputs on one image, see its README).
"""

from __future__ import annotations

import copy
import json
import os
import pickle
from collections import namedtuple
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from PIL import Image
from scipy.optimize import linear_sum_assignment
from torchvision.models.detection.rpn import concat_box_prediction_layers
from torchvision.ops import box_iou

from nanoseg.checkpoint import load_checkpoint
from nanoseg.cli import main
from nanoseg.detectron2_import import (
    Detectron2ImportError,
    import_detectron2,
    map_state_dict,
    model_config,
    read_config,
    read_weights,
)
from nanoseg.engines.detection_core import DetectionCore
from nanoseg.engines.onnx_engine import OnnxEngine
from nanoseg.export import export_checkpoint_onnx
from nanoseg.model import build_model

_SHARED = Path(os.environ.get("NANOSEG_SHARED", Path(__file__).resolve().parents[3] / "shared"))
FIXTURE = _SHARED / "detectron2-fixture"
if not (FIXTURE / "model_final.pth").exists():
    pytest.skip(f"detectron2 fixture not found at {FIXTURE} (set NANOSEG_SHARED)", allow_module_level=True)
CONFIG, WEIGHTS = FIXTURE / "config.yaml", FIXTURE / "model_final.pth"

Run = namedtuple("Run", "preprocessed features proposals logits boxes scores mask_probs")


@pytest.fixture(scope="module")
def ref() -> dict[str, np.ndarray]:
    with np.load(FIXTURE / "reference_outputs.npz") as z:
        return {k: z[k] for k in z.files}


@pytest.fixture(scope="module")
def imported() -> tuple[Any, dict[str, Any]]:
    return import_detectron2(CONFIG, WEIGHTS, pixel_size_nm=4.0)


@pytest.fixture(scope="module")
def run(imported: tuple[Any, dict[str, Any]]) -> Run:
    """The imported model on the fixture image: each stage, and the engines' graph for the end."""
    torch.set_num_threads(1)
    model = imported[0].build()
    gray = np.asarray(Image.open(FIXTURE / "input.png"), dtype=np.float32)
    x = torch.from_numpy(np.repeat(gray[None], 3, axis=0))  # detectron2 read it as 3 equal channels
    with torch.no_grad():
        images, _ = model.transform([x])
        feats = model.backbone(images.tensors)
        levels = list(feats.values())
        objectness, deltas = model.rpn.head(levels)
        anchors = model.rpn.anchor_generator(images, levels)
        per_level = [o[0].numel() for o in objectness]
        objectness, deltas = concat_box_prediction_layers(objectness, deltas)
        decoded = model.rpn.box_coder.decode(deltas, anchors).view(1, -1, 4)
        proposals, logits = model.rpn.filter_proposals(decoded, objectness, images.image_sizes, per_level)
        boxes, scores, probs, num = DetectionCore(model)(x[None])
    n = int(num[0])
    return Run(images.tensors[0].numpy(), [f[0].numpy() for f in levels], proposals[0].numpy(),
               logits[0].numpy(), boxes[0, :n].numpy(), scores[0, :n].numpy(), probs[0, :n].numpy())


def paste_like_detectron2(probs: np.ndarray, boxes: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """detectron2's mask pasting: bilinear at pixel centres, zero beyond the grid, >= 0.5."""
    h, w = shape
    b = torch.from_numpy(boxes)
    x0, y0, x1, y1 = b.split(1, dim=1)
    gy = ((torch.arange(h) + 0.5) - y0) / (y1 - y0) * 2 - 1
    gx = ((torch.arange(w) + 0.5) - x0) / (x1 - x0) * 2 - 1
    grid = torch.stack([gx[:, None, :].expand(-1, h, w), gy[:, :, None].expand(-1, h, w)], dim=3)
    out = F.grid_sample(torch.from_numpy(probs)[:, None], grid.float(), align_corners=False)
    return (out[:, 0] >= 0.5).numpy()


def test_config_maps_every_setting(imported: tuple[Any, dict[str, Any]]) -> None:
    cfg = imported[0].model_config
    assert (cfg.backbone, cfg.norm, cfg.in_channels, cfg.fpn_channels) == ("resnet18", "frozen_bn", 3, 64)
    assert cfg.image_mean == (103.53, 116.28, 123.675) and cfg.image_std == (1.0, 1.0, 1.0)
    assert cfg.anchor_sizes == (32, 64, 128, 256, 512) and cfg.aspect_ratios == (0.5, 1.0, 2.0)
    assert (cfg.anchor_offset, cfg.rpn_min_box_size, cfg.rpn_nms_thresh) == (0.0, 0.0, 0.7)
    assert (cfg.rpn_pre_nms_top_n_test, cfg.rpn_post_nms_top_n_test) == (1000, 1000)
    assert (cfg.box_score_thresh, cfg.box_nms_thresh, cfg.detections_per_img) == (0.0, 0.5, 20)
    assert (cfg.box_head_dim, cfg.box_head_convs, cfg.mask_head_layers) == (128, 0, (64, 64, 64, 64))
    assert (cfg.roi_aligned, cfg.roi_sampling_ratio, cfg.mask_roi_size) == (True, 0, 14)
    assert cfg.box_reg_weights == (10.0, 10.0, 5.0, 5.0)  # read through the YAML alias *id001
    assert (cfg.semantics, cfg.stride_in_1x1) == ("detectron2", False)  # basic blocks: no 1x1 stride
    spec = imported[0].input_spec
    assert (spec["mode"], spec["pixel_size_nm"], spec["size"]) == ("intensity", 4.0, 256)


def test_class_layout_moves_background_first(imported: tuple[Any, dict[str, Any]]) -> None:
    d2, _ = read_weights(WEIGHTS)
    sd = imported[0].state_dict
    cls = d2["roi_heads.box_predictor.cls_score.weight"]
    assert torch.equal(sd["roi_heads.box_predictor.cls_score.weight"], cls[[1, 0]])
    deltas = sd["roi_heads.box_predictor.bbox_pred.weight"]
    assert torch.equal(deltas[4:], d2["roi_heads.box_predictor.bbox_pred.weight"]) and not deltas[:4].any()
    masks = sd["roi_heads.mask_predictor.mask_fcn_logits.bias"]
    assert masks.tolist() == [0.0, d2["roi_heads.mask_head.predictor.bias"].item()]


def test_preprocessed_input_and_fpn_features_match(run: Run, ref: dict[str, np.ndarray]) -> None:
    np.testing.assert_allclose(run.preprocessed, ref["preprocessed"], rtol=0, atol=1e-4)
    for level, feat in zip(range(2, 7), run.features):
        want = ref[f"feat_p{level}"]
        assert feat.shape == want.shape
        # float32 sums of ~1e3 in another order: agreement to ~1e-6 of the feature range
        np.testing.assert_allclose(feat, want, rtol=0, atol=1e-5 * np.abs(want).max())


def test_rpn_proposals_match(run: Run, ref: dict[str, np.ndarray]) -> None:
    assert len(run.proposals) >= 100
    np.testing.assert_allclose(run.proposals[:100], ref["proposal_boxes"], rtol=0, atol=1e-2)
    np.testing.assert_allclose(run.logits[:100], ref["proposal_logits"], rtol=0, atol=1e-3)


def test_final_instances_match(run: Run, ref: dict[str, np.ndarray]) -> None:
    assert len(run.boxes) == len(ref["boxes"]) == 20
    iou = box_iou(torch.from_numpy(ref["boxes"]), torch.from_numpy(run.boxes)).numpy()
    rows, cols = linear_sum_assignment(-iou)
    assert iou[rows, cols].min() >= 0.99
    assert np.abs(run.scores[cols] - ref["scores"][rows]).max() <= 1e-3
    masks = paste_like_detectron2(run.mask_probs[cols], run.boxes[cols], (256, 256))
    want = ref["masks"][rows]
    mask_iou = (masks & want).sum((1, 2)) / np.maximum((masks | want).sum((1, 2)), 1)
    assert mask_iou.min() >= 0.95


def test_onnx_graph_matches_torch_on_images_with_other_proposal_counts(
    imported: tuple[Any, dict[str, Any]],
) -> None:
    """The exported graph keeps every count dynamic: on inputs whose RPN keeps another number of
    proposals than the trace image did (a blank frame, noise), it runs and agrees with torch."""
    ckpt = imported[0]
    model = ckpt.build().eval()
    engine = OnnxEngine(export_checkpoint_onnx(ckpt), threads=1)
    gray = np.asarray(Image.open(FIXTURE / "input.png"), dtype=np.float32)
    noise = np.random.default_rng(0).uniform(0, 255, gray.shape).astype(np.float32)
    torch.set_num_threads(1)
    for image in (gray, np.zeros_like(gray), noise):
        x = np.repeat(image[None, None], 3, axis=1)
        with torch.no_grad():
            boxes, scores, _, num = DetectionCore(model)(torch.from_numpy(x))
        n = int(num[0])
        (raw,) = engine.infer(x)
        assert len(raw) == n
        np.testing.assert_allclose(raw.boxes, boxes[0, :n].numpy(), rtol=0, atol=0.05)
        np.testing.assert_allclose(raw.scores, scores[0, :n].numpy(), rtol=0, atol=1e-3)


def _r50_config() -> dict[str, Any]:
    cfg = copy.deepcopy(read_config(CONFIG))
    m = cfg["MODEL"]
    m["RESNETS"].update(DEPTH=50, RES2_OUT_CHANNELS=256)
    m["FPN"]["OUT_CHANNELS"] = 256
    m["ROI_BOX_HEAD"]["FC_DIM"] = 1024
    m["ROI_MASK_HEAD"]["CONV_DIM"] = 256
    return cfg


def test_full_r50_state_dict_maps_every_key_and_loads_strictly() -> None:
    shapes = json.loads((FIXTURE / "mask_rcnn_R_50_FPN_1class_state_dict_shapes.json").read_text())
    cfg = model_config(_r50_config())
    assert cfg.stride_in_1x1  # detectron2's MSRA ResNet-50: the bottleneck strides in its 1x1 conv
    sd = {k: torch.zeros(s) for k, s in shapes.items()}
    mapped, report = map_state_dict(sd, cfg)
    assert len(report.mapped) == len(shapes) == 307 and not report.ignored
    model = build_model(cfg)
    model.load_state_dict(mapped, strict=True)
    first = model.backbone.body.layer2[0]
    assert (first.conv1.stride, first.conv2.stride) == ((2, 2), (1, 1))


@pytest.mark.parametrize(("key", "value"), [
    ("MODEL.ROI_HEADS.NAME", "CascadeROIHeads"),
    ("MODEL.META_ARCHITECTURE", "RetinaNet"),
    ("MODEL.MASK_ON", False),
    ("MODEL.RESNETS.NUM_GROUPS", 32),
    ("MODEL.ROI_HEADS.NUM_CLASSES", 3),
    ("MODEL.ANCHOR_GENERATOR.SIZES", [[32, 40, 50]]),
])
def test_unsupported_option_is_named(key: str, value: Any) -> None:
    cfg = read_config(CONFIG)
    *path, last = key.split(".")
    node = cfg
    for part in path:
        node = node[part]
    node[last] = value
    with pytest.raises(Detectron2ImportError, match=key.replace(".", r"\.")):
        model_config(cfg)


def test_base_config_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "mask_rcnn.yaml"
    path.write_text(yaml.safe_dump({"_BASE_": "../Base-RCNN-FPN.yaml", "MODEL": {"MASK_ON": True}}))
    with pytest.raises(Detectron2ImportError, match="_BASE_"):
        read_config(path)


def test_unmapped_missing_and_misshaped_keys_are_named() -> None:
    cfg = model_config(read_config(CONFIG))
    sd, _ = read_weights(WEIGHTS)
    sd = dict(sd)
    del sd["backbone.fpn_output3.bias"]
    sd["roi_heads.keypoint_head.conv1.weight"] = torch.zeros(1)
    sd["roi_heads.mask_head.mask_fcn5.weight"] = torch.zeros(1)
    sd["proposal_generator.rpn_head.conv.bias"] = torch.zeros(65)
    with pytest.raises(Detectron2ImportError) as err:
        map_state_dict(sd, cfg)
    msg = str(err.value)
    for name in ("backbone.fpn.layer_blocks.1.0.bias", "roi_heads.keypoint_head.conv1.weight",
                 "roi_heads.mask_head.mask_fcn5.weight -> roi_heads.mask_head.4.0.weight",
                 "proposal_generator.rpn_head.conv.bias (65,)"):
        assert name in msg


def test_pixel_buffers_are_checked_against_the_config() -> None:
    cfg = model_config(read_config(CONFIG))
    sd, _ = read_weights(WEIGHTS)
    ok = dict(sd, pixel_mean=torch.tensor([103.53, 116.28, 123.675]).view(3, 1, 1),
              pixel_std=torch.ones(3, 1, 1))
    _, report = map_state_dict(ok, cfg)
    assert sorted(report.ignored) == ["pixel_mean", "pixel_std"]
    with pytest.raises(Detectron2ImportError, match="pixel_mean"):
        map_state_dict(dict(ok, pixel_mean=torch.tensor([123.675, 116.28, 103.53]).view(3, 1, 1)), cfg)


class _TrainerState:
    """Stands for pickled training objects that weights_only loading refuses."""


def _torch_save_with_objects(path: Path) -> None:
    torch.save({"model": {"w": torch.zeros(1)}, "trainer": _TrainerState()}, path)


def _model_zoo_pickle(path: Path) -> None:
    with open(path, "wb") as f:  # detectron2 model-zoo .pkl: numpy arrays in a plain pickle
        pickle.dump({"model": {"w": np.zeros(1, np.float32)}, "__author__": "Detectron2 Model Zoo"}, f)


@pytest.mark.parametrize("write", [_torch_save_with_objects, _model_zoo_pickle])
def test_checkpoint_with_objects_is_refused_with_a_recipe(tmp_path: Path, write: Any) -> None:
    path = tmp_path / "model_final.pth"
    write(path)
    with pytest.raises(Detectron2ImportError, match=r"weights_only=True.*\n?.*Re-save"):
        read_weights(path)


def test_cli_writes_checkpoint_and_report(tmp_path: Path) -> None:
    out = tmp_path / "imported"
    rc = main(["models", "import-detectron2", str(CONFIG), str(WEIGHTS), "--out", str(out), "--pixel-size-nm", "4"])
    assert rc == 0
    ckpt = load_checkpoint(out / "model.pt")
    assert ckpt.input_spec["pixel_size_nm"] == 4.0 and ckpt.meta["source"] == "detectron2"
    d2, _ = read_weights(WEIGHTS)
    model = ckpt.build()
    assert torch.equal(model.backbone.fpn.inner_blocks[3][0].weight, d2["backbone.fpn_lateral5.weight"])
    report = json.loads((out / "import_report.json").read_text())
    assert report["keys"]["mapped"] == report["keys"]["checkpoint"] == 142
    assert report["pixel_size_nm_assumed"] is False


def test_cli_reports_unsupported_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = read_config(CONFIG)
    cfg["MODEL"]["ROI_HEADS"]["NAME"] = "CascadeROIHeads"
    path = tmp_path / "cascade.yaml"
    path.write_text(yaml.safe_dump(cfg))
    rc = main(["models", "import-detectron2", str(path), str(WEIGHTS), "--out", str(tmp_path / "x")])
    assert rc == 2
    assert "MODEL.ROI_HEADS.NAME = 'CascadeROIHeads'" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
