"""Train a mask refiner (``nanoseg.mask_refiner``) on a trained model's own detections.

``nanoseg train-refiner CONFIG --model MODEL --out OUT``:

1. the model (its refiner, if any, left out) runs with its stored decoding on synthetic images it
   has not seen (a seed of their own); each detection whose box overlaps a ground-truth wire with
   IoU >= 0.5 gives one sample: the image crop and the coarse mask grid over the grown box, and the
   matched wire's mask sampled on the refiner's grid (the convention of torchvision's mask targets);
2. the refiner learns the target from crop + coarse grid (binary cross-entropy; the 8 symmetries
   of the box grid and a gain on the image as augmentation), the last images held out;
3. OUT is MODEL with the refiner in its config and weights, and ``meta.mask_refiner`` saying how.

Samples are cached under ``<cache>/refiner_samples`` by model and data set, so a rerun (or a run
cut off during training) does not run the detector again. Training takes minutes on 2 CPU cores.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torchvision.ops import box_iou, masks_to_boxes, roi_align

from nanoseg.checkpoint import Checkpoint, file_sha256, load_checkpoint, without_refiner
from nanoseg.config_io import ConfigError, StrictModel
from nanoseg.engines.detection_core import DetectionCore
from nanoseg.mask_decoding import grow_boxes
from nanoseg.mask_refiner import MaskRefiner, MaskRefinerConfig, image_crops, upsampled
from nanoseg.paths import cache_dir
from nanoseg_training.train import ensure_dataset
from nanoseg_training.train_config import GenerateSpec
from nanoseg_training.train_data import CocoSource

MATCH_IOU = 0.5
"""Box IoU a detection needs with a ground-truth wire to become a sample (torchvision's mask-loss rule)."""


class RefinerTrainConfig(StrictModel):
    """Schema of ``configs/training/refiner_*.yaml``."""

    name: str = "refiner"
    data: str = "data/paper-refine-s3-n3000"
    """COCO data set directory (relative: under the nanoseg cache); not the model's training images."""
    generate: GenerateSpec | None = GenerateSpec(count=3000, seed=3)
    holdout_images: int = Field(200, ge=1)
    """The last images of ``data``: their samples measure the refiner, never train it."""
    refiner: MaskRefinerConfig = MaskRefinerConfig()
    epochs: int = Field(8, ge=1)
    batch_size: int = Field(64, ge=1)
    lr: float = Field(2e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    gain: tuple[float, float] = (0.7, 1.2)
    """Random gain on the 0–255 image crop (the detector's brightness augmentation)."""
    seed: int = 0
    threads: int = Field(2, ge=1)


@dataclasses.dataclass(frozen=True)
class RefinerSamples:
    """N samples: ``crops`` (N, S, S) 0–255 image, ``coarse`` (N, m, m) mask-head probabilities,
    ``boxes`` (N, 4) xyxy px (grown), ``targets`` (N, S, S) bool, ``image_index`` (N,)."""

    crops: np.ndarray
    coarse: np.ndarray
    boxes: np.ndarray
    targets: np.ndarray
    image_index: np.ndarray

    def __len__(self) -> int:
        return len(self.crops)

    def subset(self, keep: np.ndarray) -> RefinerSamples:
        return RefinerSamples(*(getattr(self, f.name)[keep] for f in dataclasses.fields(self)))


def with_refiner(ckpt: Checkpoint, cfg: MaskRefinerConfig, state: dict[str, torch.Tensor],
                 info: dict[str, Any]) -> Checkpoint:
    """``ckpt`` (without its old refiner) with this refiner; ``info`` goes to ``meta.mask_refiner``."""
    base = without_refiner(ckpt)
    model_cfg = base.model_config.model_copy(update={"mask_refiner": cfg})
    weights = dict(base.state_dict) | {f"mask_refiner.{k}": v.detach().clone() for k, v in state.items()}
    out = dataclasses.replace(base, model_config=model_cfg, state_dict=weights,
                              meta=dict(base.meta) | {"mask_refiner": info})
    out.build()  # strict: the weights fit the config
    return out


def transplant_refiner(ckpt: Checkpoint, donor: Checkpoint, donor_sha256: str) -> Checkpoint:
    """``ckpt`` with ``donor``'s mask refiner, for a network fine-tuned from the donor's.

    The refiner reads the image and the coarse mask of each detection, so it carries over to a
    network whose masks are of the same kind; whether it helps is measured on a validation set
    before it ships. ``meta.mask_refiner`` keeps the donor's record and names the donor.
    """
    cfg = donor.model_config.mask_refiner
    if cfg is None:
        raise ConfigError("the donor model has no mask refiner")
    state = {k.removeprefix("mask_refiner."): v for k, v in donor.state_dict.items() if k.startswith("mask_refiner.")}
    info = dict(donor.meta.get("mask_refiner", {})) | {"transplanted_from_sha256": donor_sha256}
    return with_refiner(ckpt, cfg, state, info)


def extract_samples(ckpt: Checkpoint, source: CocoSource, indices: range, size: int,
                    progress: bool = False) -> RefinerSamples:
    """Run ``ckpt``'s detector (stored decoding, no refiner) on the images at ``indices``."""
    plain = without_refiner(ckpt)
    margin = plain.mask_decoding.margin_px
    core = DetectionCore(plain.build(), plain.mask_decoding, plain.model_config).eval()
    parts: dict[str, list[np.ndarray]] = {f.name: [] for f in dataclasses.fields(RefinerSamples)}
    t0 = time.monotonic()
    with torch.inference_mode():
        for done, i in enumerate(indices):
            s = source.load(i)
            x = torch.from_numpy(s.image)[None, None]
            boxes, _, probs, num = core(x)
            n = int(num[0])
            if n == 0 or len(s.masks) == 0:
                continue
            gt = torch.from_numpy(s.masks)
            gt_boxes = masks_to_boxes(gt) + torch.tensor([0.0, 0.0, 1.0, 1.0])  # pixel-edge xyxy
            best, match = box_iou(boxes[0, :n], gt_boxes).max(1)
            keep = best >= MATCH_IOU
            if not bool(keep.any()):
                continue
            grown = grow_boxes(boxes[0, :n][keep], margin)
            rois = torch.cat([torch.arange(len(grown), dtype=torch.float32)[:, None], grown], 1)
            targets = roi_align(gt[match[keep]].float()[:, None], rois, size, 1.0, 2, aligned=False)[:, 0] >= 0.5
            # Crops of the 0-255 image; fit_refiner normalises them as the model does before its own
            # crops (ROIAlign is linear, and the grown boxes end within 1 px of the image, where it clamps).
            parts["crops"].append(image_crops(x, [grown], size)[:, 0].half().numpy())
            parts["coarse"].append(probs[0, :n][keep].half().numpy())
            parts["boxes"].append(grown.numpy())
            parts["targets"].append(targets.numpy())
            parts["image_index"].append(np.full(len(grown), i, dtype=np.int32))
            if progress and (done + 1) % 100 == 0:
                print(json.dumps({"event": "refiner_extract", "images": done + 1, "of": len(indices),
                                  "samples": sum(map(len, parts["crops"])),
                                  "seconds": round(time.monotonic() - t0, 1)}), flush=True)
    if not parts["crops"]:
        raise ValueError(f"{source.root}: no detection matched a wire (IoU >= {MATCH_IOU}) in {len(indices)} images")
    return RefinerSamples(**{k: np.concatenate(v) for k, v in parts.items()})


def cached_samples(ckpt: Checkpoint, model_sha256: str, data: Path, source: CocoSource, size: int,
                   progress: bool = False) -> RefinerSamples:
    """``extract_samples`` over the whole data set, cached by model (its file's sha256), data set
    and grid size."""
    key = hashlib.sha256(f"{model_sha256}|{data.resolve()}|{len(source)}|{size}".encode()).hexdigest()[:16]
    path = cache_dir() / "refiner_samples" / f"{key}.npz"
    if path.exists():
        with np.load(path) as z:
            return RefinerSamples(**{f.name: z[f.name] for f in dataclasses.fields(RefinerSamples)})
    samples = extract_samples(ckpt, source, range(len(source)), size, progress)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial.npz")
    np.savez(tmp, **dataclasses.asdict(samples))
    tmp.rename(path)
    return samples


def _tensors(s: RefinerSamples, mean: float, std: float) -> tuple[torch.Tensor, ...]:
    return ((torch.from_numpy(s.crops).float()[:, None] - mean) / std, torch.from_numpy(s.coarse).float(),
            torch.from_numpy(s.boxes).float(), torch.from_numpy(s.targets).float())


def mean_iou(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """Mean over samples of the IoU of ``logits >= 0`` with ``targets`` (> 0.5) on the grid."""
    p, t = logits >= 0, targets > 0.5
    inter = (p & t).flatten(1).sum(1).float()
    union = (p | t).flatten(1).sum(1).clamp(min=1).float()
    return float((inter / union).mean())


def _view(k: int, x: torch.Tensor, c: torch.Tensor, b: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Symmetry ``k`` (0–7) of the box grid: transpose (boxes' x and y swap), then flips."""
    if k & 1:
        x, c, t, b = x.transpose(-1, -2), c.transpose(-1, -2), t.transpose(-1, -2), b[:, [1, 0, 3, 2]]
    if k & 2:
        x, c, t = x.flip(-1), c.flip(-1), t.flip(-1)
    if k & 4:
        x, c, t = x.flip(-2), c.flip(-2), t.flip(-2)
    return x, c, b, t


def fit_refiner(train: RefinerSamples, hold: RefinerSamples, cfg: RefinerTrainConfig, mean: float, std: float,
                progress: bool = False) -> tuple[dict[str, torch.Tensor], list[dict[str, float]]]:
    """Train a refiner on ``train``; per epoch, its held-out mean IoU and loss. ``mean``/``std``:
    the model's input normalisation."""
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    net = MaskRefiner(cfg.refiner)
    x, c, b, t = _tensors(train, mean, std)
    hx, hc, hb, ht = _tensors(hold, mean, std)
    steps_per_epoch = max(len(x) // cfg.batch_size, 1)
    opt = torch.optim.AdamW(net.parameters(), cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, cfg.lr, total_steps=cfg.epochs * steps_per_epoch, pct_start=0.1)
    prior, held_prior = upsampled(c, net.size)[1], upsampled(hc, net.size)[1]
    history = [{"epoch": 0, "train_loss": float(F.binary_cross_entropy_with_logits(prior, t)),
                "holdout_iou": mean_iou(held_prior, ht),
                "holdout_loss": float(F.binary_cross_entropy_with_logits(held_prior, ht))}]
    t0 = time.monotonic()
    for epoch in range(1, cfg.epochs + 1):
        net.train()
        perm = torch.from_numpy(rng.permutation(len(x)))
        total = 0.0
        for step in range(steps_per_epoch):
            idx = perm[step * cfg.batch_size:(step + 1) * cfg.batch_size]
            bx, bc, bb, bt = _view(int(rng.integers(8)), x[idx], c[idx], b[idx], t[idx])
            gain = torch.from_numpy(rng.uniform(*cfg.gain, (len(idx), 1, 1, 1))).float()
            bx = ((bx * std + mean) * gain - mean) / std
            loss = F.binary_cross_entropy_with_logits(net(bx, bc, bb), bt)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach())
        net.eval()
        with torch.no_grad():
            logits = torch.cat([net(hx[i:i + 512], hc[i:i + 512], hb[i:i + 512]) for i in range(0, len(hx), 512)])
        row = {"epoch": epoch, "train_loss": total / steps_per_epoch, "holdout_iou": mean_iou(logits, ht),
               "holdout_loss": float(F.binary_cross_entropy_with_logits(logits, ht)),
               "seconds": round(time.monotonic() - t0, 1)}
        history.append(row)
        if progress:
            print(json.dumps({"event": "refiner_epoch"} | row), flush=True)
    return net.state_dict(), history


def train_refiner(cfg: RefinerTrainConfig, model_path: Path, progress: bool = False) -> Checkpoint:
    """The model at ``model_path`` with a refiner trained as ``cfg`` says (``meta.mask_refiner``:
    data, held-out IoU before and after, epochs)."""
    torch.set_num_threads(cfg.threads)
    ckpt = load_checkpoint(model_path)
    model_sha256 = file_sha256(model_path)
    data = ensure_dataset(cfg.data, cfg.generate, workers=cfg.threads)
    source = CocoSource(data)
    if cfg.holdout_images >= len(source):
        raise ConfigError(f"holdout_images: {cfg.holdout_images} leaves no training image of {len(source)} in {data}")
    samples = cached_samples(ckpt, model_sha256, data, source, cfg.refiner.size, progress)
    first_held = len(source) - cfg.holdout_images
    held = samples.image_index >= first_held
    if not held.any() or held.all():
        raise ConfigError(f"holdout_images: the last {cfg.holdout_images} of {len(source)} images in {data} give "
                          f"{int(held.sum())} of {len(held)} matched detections; both parts need some")
    mean, std = float(ckpt.model_config.image_mean[0]), float(ckpt.model_config.image_std[0])
    state, history = fit_refiner(samples.subset(~held), samples.subset(held), cfg, mean, std, progress)
    info = {"config": cfg.model_dump(mode="json"), "samples": int((~held).sum()), "holdout_samples": int(held.sum()),
            "holdout_iou_coarse": history[0]["holdout_iou"], "holdout_iou": history[-1]["holdout_iou"],
            "history": history, "base_model_sha256": model_sha256}
    return with_refiner(ckpt, cfg.refiner, state, info)


def cmd_train_refiner(args: Any) -> int:
    from nanoseg.checkpoint import save_checkpoint
    from nanoseg.config_io import load_yaml
    from nanoseg.paths import resolve_config

    cfg = load_yaml(resolve_config(args.config, "training"), RefinerTrainConfig)
    model_path = Path(args.model)
    ckpt = train_refiner(cfg, model_path, progress=not args.quiet)
    out = save_checkpoint(ckpt, args.out, half=ckpt.stored_half)
    info = ckpt.meta["mask_refiner"]
    print(f"held-out mask IoU {info['holdout_iou_coarse']:.4f} (mask head) -> {info['holdout_iou']:.4f} "
          f"(refined), {info['samples']} training samples -> {out}")
    return 0
