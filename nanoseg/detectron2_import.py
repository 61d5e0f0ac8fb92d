"""Import a detectron2 Mask R-CNN (config YAML + ``model_final.pth``) as a nanoseg checkpoint.

detectron2 is not needed: the config is read as plain YAML (the full ``cfg.dump()``, anchors and
aliases included) and the weights with ``torch.load(..., weights_only=True)``. The supported model
is detectron2's standard one-class Mask R-CNN with a ResNet-FPN backbone (depth 18, 34, 50 or
101); any other option that changes the computation stops the import with a message naming it.

Every checkpoint key is mapped onto ``build_model(config)``'s state dict, nothing is dropped but
the documented non-weights (``pixel_mean``/``pixel_std`` buffers, which must equal the config's
PIXEL_MEAN/PIXEL_STD, and ``*.num_batches_tracked``). Layout differences bridged here:

* class logits: detectron2 puts background last, torchvision first (rows are rotated);
* box deltas: detectron2 predicts none for background, torchvision does (zero rows are added;
  torchvision never reads them);
* mask logits: likewise, a zero background channel is added in front.

The network then runs with ``semantics="detectron2"`` (``nanoseg.detectron2_compat``). Inputs are
0–255 in detectron2's channel order (INPUT.FORMAT, usually BGR; gray frames fill every channel)
and are not resized: the input spec's ``size`` is MIN_SIZE_TEST, detectron2's test scale. The input
spec maps each frame's maximum to 255 (``image_max``), so an 8-bit frame that does not reach 255
is stretched where detectron2 would have taken its raw values.
"""

from __future__ import annotations

import hashlib
import pickle
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from pydantic import ValidationError

from nanoseg.checkpoint import Checkpoint
from nanoseg.input_spec import InputSpec
from nanoseg.model import ModelConfig, build_model

DEFAULT_PIXEL_SIZE_NM = 1.0
"""A detectron2 checkpoint does not record its pixel size; 1 nm/px unless ``--pixel-size-nm``."""

_P2_P5, _P2_P6 = ["p2", "p3", "p4", "p5"], ["p2", "p3", "p4", "p5", "p6"]
_SUPPORTED: dict[str, Any] = {
    "MODEL.META_ARCHITECTURE": "GeneralizedRCNN",
    "MODEL.MASK_ON": True,
    "MODEL.KEYPOINT_ON": False,
    "MODEL.LOAD_PROPOSALS": False,
    "MODEL.BACKBONE.NAME": "build_resnet_fpn_backbone",
    "MODEL.RESNETS.NUM_GROUPS": 1,
    "MODEL.RESNETS.WIDTH_PER_GROUP": 64,
    "MODEL.RESNETS.STEM_OUT_CHANNELS": 64,
    "MODEL.RESNETS.RES5_DILATION": 1,
    "MODEL.RESNETS.DEFORM_ON_PER_STAGE": [False, False, False, False],
    "MODEL.FPN.IN_FEATURES": ["res2", "res3", "res4", "res5"],
    "MODEL.FPN.NORM": "",
    "MODEL.FPN.FUSE_TYPE": "sum",
    "MODEL.PROPOSAL_GENERATOR.NAME": "RPN",
    "MODEL.ANCHOR_GENERATOR.NAME": "DefaultAnchorGenerator",
    "MODEL.RPN.HEAD_NAME": "StandardRPNHead",
    "MODEL.RPN.CONV_DIMS": [-1],
    "MODEL.RPN.IN_FEATURES": _P2_P6,
    "MODEL.RPN.BBOX_REG_WEIGHTS": [1.0, 1.0, 1.0, 1.0],
    "MODEL.ROI_HEADS.NAME": "StandardROIHeads",
    "MODEL.ROI_HEADS.NUM_CLASSES": 1,
    "MODEL.ROI_HEADS.IN_FEATURES": _P2_P5,
    "MODEL.ROI_BOX_HEAD.NAME": "FastRCNNConvFCHead",
    "MODEL.ROI_BOX_HEAD.NUM_FC": 2,
    "MODEL.ROI_BOX_HEAD.NORM": "",
    "MODEL.ROI_BOX_HEAD.POOLER_TYPE": "ROIAlignV2",
    "MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION": 7,
    "MODEL.ROI_BOX_HEAD.USE_SIGMOID_CE": False,
    "MODEL.ROI_MASK_HEAD.NAME": "MaskRCNNConvUpsampleHead",
    "MODEL.ROI_MASK_HEAD.NORM": "",
    "MODEL.ROI_MASK_HEAD.POOLER_TYPE": "ROIAlignV2",
    "TEST.AUG.ENABLED": False,
}
"""Options that must have exactly these values (detectron2 name -> value)."""
_NORMS = ("FrozenBN", "BN", "SyncBN")
"""All are an affine transform with stored statistics at inference: FrozenBatchNorm2d here."""
_CHANNELS = {"BGR": 3, "RGB": 3, "L": 1}


class Detectron2ImportError(ValueError):
    """A detectron2 config or checkpoint that cannot be imported; the message says what and why."""


def _get(cfg: dict[str, Any], dotted: str) -> Any:
    node: Any = cfg
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            raise Detectron2ImportError(
                f"config lacks {dotted}: pass the full config (detectron2's cfg.dump()), not one "
                "that relies on _BASE_ files or detectron2's defaults")
        node = node[part]
    return node


def read_config(path: str | Path) -> dict[str, Any]:
    """The detectron2 config at ``path`` as nested dicts (YAML anchors/aliases resolved)."""
    p = Path(path)
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as err:
        raise Detectron2ImportError(f"{p}: not valid YAML: {err}") from None
    if not isinstance(data, dict) or "MODEL" not in data:
        raise Detectron2ImportError(f"{p}: not a detectron2 config (no MODEL section)")
    if "_BASE_" in data:
        raise Detectron2ImportError(
            f"{p}: uses _BASE_ (inherits files and detectron2's defaults); export the full config "
            "with detectron2's cfg.dump() and import that")
    return data


def check_supported(cfg: dict[str, Any]) -> None:
    """Raise naming every option whose value this importer cannot reproduce."""
    bad = [f"{key} = {_get(cfg, key)!r} (supported: {want!r})"
           for key, want in _SUPPORTED.items() if _get(cfg, key) != want]
    depth = _get(cfg, "MODEL.RESNETS.DEPTH")
    res2 = 64 if depth in (18, 34) else 256
    checks: list[tuple[str, bool, str]] = [
        ("MODEL.RESNETS.DEPTH", depth in (18, 34, 50, 101), "18, 34, 50 or 101"),
        ("MODEL.RESNETS.RES2_OUT_CHANNELS",
         depth not in (18, 34, 50, 101) or _get(cfg, "MODEL.RESNETS.RES2_OUT_CHANNELS") == res2,
         f"{res2} for depth {depth}"),
        ("MODEL.RESNETS.NORM", _get(cfg, "MODEL.RESNETS.NORM") in _NORMS, " or ".join(_NORMS)),
        ("MODEL.RESNETS.OUT_FEATURES",
         {"res2", "res3", "res4", "res5"} <= set(_get(cfg, "MODEL.RESNETS.OUT_FEATURES")), "res2..res5"),
        ("INPUT.FORMAT", _CHANNELS.get(_get(cfg, "INPUT.FORMAT")) == len(_get(cfg, "MODEL.PIXEL_MEAN"))
         == len(_get(cfg, "MODEL.PIXEL_STD")), "BGR/RGB with 3 PIXEL_MEAN/STD values, L with 1"),
        ("MODEL.ANCHOR_GENERATOR.SIZES", _anchor_sizes(cfg) is not None, "one integer size per level P2..P6"),
        ("MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS", _aspect_ratios(cfg) is not None, "the same ratios on every level"),
        ("MODEL.ROI_BOX_HEAD.CONV_DIM", _get(cfg, "MODEL.ROI_BOX_HEAD.NUM_CONV") == 0
         or _get(cfg, "MODEL.ROI_BOX_HEAD.CONV_DIM") == _get(cfg, "MODEL.FPN.OUT_CHANNELS"),
         "MODEL.FPN.OUT_CHANNELS when NUM_CONV > 0"),
        ("MODEL.ROI_MASK_HEAD.NUM_CONV", _get(cfg, "MODEL.ROI_MASK_HEAD.NUM_CONV") >= 1, "at least 1"),
        ("MODEL.ROI_MASK_HEAD.POOLER_SAMPLING_RATIO", _get(cfg, "MODEL.ROI_MASK_HEAD.POOLER_SAMPLING_RATIO")
         == _get(cfg, "MODEL.ROI_BOX_HEAD.POOLER_SAMPLING_RATIO"), "equal to ROI_BOX_HEAD's"),
    ]
    bad += [f"{key} = {_get(cfg, key)!r} (supported: {want})" for key, ok, want in checks if not ok]
    if bad:
        raise Detectron2ImportError("unsupported detectron2 option(s):\n  " + "\n  ".join(bad))


def _anchor_sizes(cfg: dict[str, Any]) -> tuple[int, ...] | None:
    sizes = _get(cfg, "MODEL.ANCHOR_GENERATOR.SIZES")
    ok = len(sizes) == 5 and all(len(s) == 1 and float(s[0]).is_integer() for s in sizes)
    return tuple(int(s[0]) for s in sizes) if ok else None


def _aspect_ratios(cfg: dict[str, Any]) -> tuple[float, ...] | None:
    ratios = _get(cfg, "MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS")
    ok = len(ratios) in (1, 5) and all(r == ratios[0] for r in ratios)
    return tuple(float(r) for r in ratios[0]) if ok else None


def model_config(cfg: dict[str, Any]) -> ModelConfig:
    """The nanoseg ModelConfig that computes what the (supported) detectron2 config computes."""
    check_supported(cfg)

    def g(key: str) -> Any:
        return _get(cfg, "MODEL." + key)

    depth = g("RESNETS.DEPTH")
    iou = g("ROI_HEADS.IOU_THRESHOLDS")
    mask_convs = g("ROI_MASK_HEAD.NUM_CONV")
    fields = dict(
        backbone=f"resnet{depth}", norm="frozen_bn", in_channels=len(g("PIXEL_MEAN")),
        fpn_channels=g("FPN.OUT_CHANNELS"),
        image_mean=tuple(g("PIXEL_MEAN")), image_std=tuple(g("PIXEL_STD")),
        anchor_sizes=_anchor_sizes(cfg), aspect_ratios=_aspect_ratios(cfg),
        anchor_offset=g("ANCHOR_GENERATOR.OFFSET"),
        rpn_pre_nms_top_n_train=g("RPN.PRE_NMS_TOPK_TRAIN"), rpn_post_nms_top_n_train=g("RPN.POST_NMS_TOPK_TRAIN"),
        rpn_pre_nms_top_n_test=g("RPN.PRE_NMS_TOPK_TEST"), rpn_post_nms_top_n_test=g("RPN.POST_NMS_TOPK_TEST"),
        rpn_nms_thresh=g("RPN.NMS_THRESH"), rpn_batch_size_per_image=g("RPN.BATCH_SIZE_PER_IMAGE"),
        rpn_min_box_size=g("PROPOSAL_GENERATOR.MIN_SIZE"),
        box_batch_size_per_image=g("ROI_HEADS.BATCH_SIZE_PER_IMAGE"),
        box_positive_fraction=g("ROI_HEADS.POSITIVE_FRACTION"),
        box_fg_iou_thresh=max(iou), box_bg_iou_thresh=min(iou),
        box_score_thresh=g("ROI_HEADS.SCORE_THRESH_TEST"), box_nms_thresh=g("ROI_HEADS.NMS_THRESH_TEST"),
        detections_per_img=_get(cfg, "TEST.DETECTIONS_PER_IMAGE"),
        box_head_dim=g("ROI_BOX_HEAD.FC_DIM"), box_head_convs=g("ROI_BOX_HEAD.NUM_CONV"),
        box_reg_weights=tuple(g("ROI_BOX_HEAD.BBOX_REG_WEIGHTS")),
        mask_head_layers=(g("ROI_MASK_HEAD.CONV_DIM"),) * mask_convs,
        mask_roi_size=g("ROI_MASK_HEAD.POOLER_RESOLUTION"),
        roi_sampling_ratio=g("ROI_BOX_HEAD.POOLER_SAMPLING_RATIO"), roi_aligned=True,
        stride_in_1x1=bool(g("RESNETS.STRIDE_IN_1X1")) and depth >= 50, semantics="detectron2",
    )
    try:
        return ModelConfig.model_validate(fields)
    except ValidationError as err:
        lines = [f"{'.'.join(str(x) for x in e['loc'])}: {e['msg']}" for e in err.errors()]
        raise Detectron2ImportError("config maps outside nanoseg's model limits:\n  " + "\n  ".join(lines)) from None


def read_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], list[str]]:
    """(state dict, names of the file's other top-level entries) of a detectron2 checkpoint."""
    p = Path(path)
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise Detectron2ImportError(f"{p}: no such file") from None
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as err:
        raise Detectron2ImportError(
            f"{p}: cannot be read with torch.load(weights_only=True): it holds more than tensors and "
            "plain containers (e.g. numpy arrays in a model-zoo .pkl, or pickled training objects), "
            "and loading those would run code from the file. Re-save just the weights, where you "
            "trust the file: `ck = torch.load(path, weights_only=False)` (for a .pkl: "
            "`ck = pickle.load(open(path, 'rb'), encoding='latin1')`), then `torch.save({'model': "
            "{k: torch.as_tensor(v) for k, v in ck['model'].items()}}, 'model_weights.pth')`.\n"
            f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})") from None
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        sd, others = obj["model"], sorted(str(k) for k in obj if k != "model")
    elif isinstance(obj, dict):
        sd, others = obj, []
    else:
        raise Detectron2ImportError(f"{p}: expected a dict with a 'model' state dict, got {type(obj).__name__}")
    not_tensors = sorted(str(k) for k, v in sd.items() if not isinstance(v, torch.Tensor))
    if not_tensors:
        raise Detectron2ImportError(f"{p}: state dict entries that are not tensors: {', '.join(not_tensors[:10])}")
    return dict(sd), others


Rule = tuple[str, Callable[[re.Match[str]], str]]


def _rules(box_head_convs: int) -> list[Rule]:
    body, fc = "backbone.body", "roi_heads.box_head." + ("mlp." if box_head_convs else "")
    return [
        (r"backbone\.bottom_up\.stem\.conv1\.weight", lambda m: f"{body}.conv1.weight"),
        (r"backbone\.bottom_up\.stem\.conv1\.norm\.(\w+)", lambda m: f"{body}.bn1.{m[1]}"),
        (r"backbone\.bottom_up\.res([2-5])\.(\d+)\.conv([1-3])\.weight",
         lambda m: f"{body}.layer{int(m[1]) - 1}.{m[2]}.conv{m[3]}.weight"),
        (r"backbone\.bottom_up\.res([2-5])\.(\d+)\.conv([1-3])\.norm\.(\w+)",
         lambda m: f"{body}.layer{int(m[1]) - 1}.{m[2]}.bn{m[3]}.{m[4]}"),
        (r"backbone\.bottom_up\.res([2-5])\.(\d+)\.shortcut\.weight",
         lambda m: f"{body}.layer{int(m[1]) - 1}.{m[2]}.downsample.0.weight"),
        (r"backbone\.bottom_up\.res([2-5])\.(\d+)\.shortcut\.norm\.(\w+)",
         lambda m: f"{body}.layer{int(m[1]) - 1}.{m[2]}.downsample.1.{m[3]}"),
        # detectron2 names FPN convs by the level they produce (2 = P2, finest); torchvision
        # indexes them in input order, res2 first.
        (r"backbone\.fpn_lateral([2-5])\.(weight|bias)", lambda m: f"backbone.fpn.inner_blocks.{int(m[1]) - 2}.0.{m[2]}"),
        (r"backbone\.fpn_output([2-5])\.(weight|bias)", lambda m: f"backbone.fpn.layer_blocks.{int(m[1]) - 2}.0.{m[2]}"),
        (r"proposal_generator\.rpn_head\.conv\.(weight|bias)", lambda m: f"rpn.head.conv.0.0.{m[1]}"),
        (r"proposal_generator\.rpn_head\.objectness_logits\.(weight|bias)", lambda m: f"rpn.head.cls_logits.{m[1]}"),
        (r"proposal_generator\.rpn_head\.anchor_deltas\.(weight|bias)", lambda m: f"rpn.head.bbox_pred.{m[1]}"),
        (r"roi_heads\.box_head\.conv(\d+)\.(weight|bias)",
         lambda m: f"roi_heads.box_head.convs.{2 * (int(m[1]) - 1)}.{m[2]}"),
        (r"roi_heads\.box_head\.fc([12])\.(weight|bias)", lambda m: f"{fc}fc{int(m[1]) + 5}.{m[2]}"),
        (r"roi_heads\.box_predictor\.(cls_score|bbox_pred)\.(weight|bias)", lambda m: m[0]),
        (r"roi_heads\.mask_head\.mask_fcn(\d+)\.(weight|bias)", lambda m: f"roi_heads.mask_head.{int(m[1]) - 1}.0.{m[2]}"),
        (r"roi_heads\.mask_head\.deconv\.(weight|bias)", lambda m: f"roi_heads.mask_predictor.conv5_mask.{m[1]}"),
        (r"roi_heads\.mask_head\.predictor\.(weight|bias)", lambda m: f"roi_heads.mask_predictor.mask_fcn_logits.{m[1]}"),
    ]


def _with_background_first(key: str, t: torch.Tensor) -> torch.Tensor:
    """detectron2 -> torchvision class layout of the prediction layers (one foreground class)."""
    if key.startswith("roi_heads.box_predictor.cls_score."):
        return torch.cat([t[-1:], t[:-1]])  # background: last -> first
    if key.startswith("roi_heads.box_predictor.bbox_pred."):
        return torch.cat([torch.zeros_like(t[:4]), t])  # deltas of the background class: unused
    if key.startswith("roi_heads.mask_predictor.mask_fcn_logits."):
        return torch.cat([torch.zeros_like(t[:1]), t])  # background mask channel: unused
    return t


@dataclass
class KeyReport:
    """How the checkpoint's keys were used; ``mapped`` is detectron2 key -> torchvision key."""

    mapped: dict[str, str] = field(default_factory=dict)
    ignored: list[str] = field(default_factory=list)
    """Documented non-weights: num_batches_tracked counters, pixel_mean/pixel_std (checked)."""


def map_state_dict(
    sd: dict[str, torch.Tensor], config: ModelConfig
) -> tuple[dict[str, torch.Tensor], KeyReport]:
    """detectron2 state dict -> ``build_model(config)``'s; every key accounted for, else raise."""
    target = build_model(config).state_dict()
    rules = [(re.compile(p), f) for p, f in _rules(config.box_head_convs)]
    out: dict[str, torch.Tensor] = {}
    report = KeyReport()
    unmapped, unexpected, shapes, wrong_buffers = [], [], [], []
    seen: set[str] = set()
    for key, value in sd.items():
        if key.endswith(".num_batches_tracked"):
            report.ignored.append(key)
            continue
        if key in ("pixel_mean", "pixel_std"):
            want = torch.tensor(config.image_mean if key == "pixel_mean" else config.image_std)
            if value.numel() != want.numel() or not torch.allclose(value.flatten().float(), want):
                wrong_buffers.append(f"{key} {value.flatten().tolist()} != config {want.tolist()}")
            report.ignored.append(key)
            continue
        name = next((f(m) for r, f in rules if (m := r.fullmatch(key))), None)
        if name is None:
            unmapped.append(key)
            continue
        if name not in target:
            unexpected.append(f"{key} -> {name}")
            continue
        tensor = _with_background_first(name, value)
        if tensor.shape != target[name].shape:
            shapes.append(f"{key} {tuple(value.shape)} -> {name} needs {tuple(target[name].shape)}")
            seen.add(name)
            continue
        out[name] = tensor.to(target[name].dtype).contiguous()
        report.mapped[key] = name
        seen.add(name)
    missing = sorted(set(target) - seen)
    problems = [("keys with no torchvision counterpart", unmapped),
                ("keys that map to parameters the model lacks", unexpected),
                ("shape mismatches", shapes), ("buffers that contradict the config", wrong_buffers),
                ("model parameters the checkpoint does not provide", missing)]
    msg = [f"{title} ({len(items)}):\n    " + "\n    ".join(items[:20]) for title, items in problems if items]
    if msg:
        raise Detectron2ImportError("checkpoint does not fit the config:\n  " + "\n  ".join(msg))
    return out, report


def import_detectron2(
    config_path: str | Path, weights_path: str | Path, pixel_size_nm: float = DEFAULT_PIXEL_SIZE_NM
) -> tuple[Checkpoint, dict[str, Any]]:
    """(nanoseg checkpoint, import report) for a detectron2 config and checkpoint."""
    cfg = read_config(config_path)
    mcfg = model_config(cfg)
    sd, other_entries = read_weights(weights_path)
    state, keys = map_state_dict(sd, mcfg)
    test_size = int(_get(cfg, "INPUT.MIN_SIZE_TEST")) or 512  # 0: detectron2 does not resize
    try:
        spec = InputSpec(mode="intensity", pixel_size_nm=pixel_size_nm, intensity_mapping="image_max",
                         size=test_size)
    except ValidationError as err:
        first = err.errors()[0]
        raise Detectron2ImportError(f"input spec: {'.'.join(map(str, first['loc']))}: {first['msg']}") from None
    sha = hashlib.sha256(Path(weights_path).read_bytes()).hexdigest()
    meta = {"source": "detectron2", "detectron2_config": str(config_path), "weights": str(weights_path),
            "weights_sha256": sha, "channel_order": _get(cfg, "INPUT.FORMAT")}
    ckpt = Checkpoint(mcfg, spec.model_dump(mode="json"), state, meta)
    report = {
        "keys": {"checkpoint": len(sd), "mapped": len(keys.mapped), "ignored": keys.ignored,
                 "model": len(state), "layout_changes": {
                     "roi_heads.box_predictor.cls_score.*": "background row moved from last to first",
                     "roi_heads.box_predictor.bbox_pred.*": "4 zero rows added for background (unused)",
                     "roi_heads.mask_predictor.mask_fcn_logits.*": "zero background channel added first (unused)"}},
        "other_checkpoint_entries": other_entries,
        "config": {"architecture": f"Mask R-CNN {mcfg.backbone}-FPN({mcfg.fpn_channels}), detectron2 semantics",
                   "input_format": _get(cfg, "INPUT.FORMAT"), "min_size_test": test_size,
                   "max_size_test": _get(cfg, "INPUT.MAX_SIZE_TEST"),
                   "score_thresh": mcfg.box_score_thresh, "nms_thresh": mcfg.box_nms_thresh,
                   "detections_per_img": mcfg.detections_per_img,
                   "note": "inputs are never resized: frames are resampled to pixel_size_nm and tiled "
                           "at min_size_test px, as detectron2 saw its test images"},
        "input_spec": ckpt.input_spec, "weights_sha256": sha,
    }
    return ckpt, report
