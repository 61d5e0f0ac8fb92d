"""Training batches from a COCO data set: random native-scale crops and on-the-fly augmentation.

Batch ``it`` is a pure function of (seed, rank, it): a resumed run sees exactly the batches the
uninterrupted run would have seen.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image
from scipy import ndimage

from nanoseg.errors import FrameError
from nanoseg.frame_profile import FrameProfile
from nanoseg.input_spec import InputSpec
from nanoseg.masks import MaskDecodeError, decode_segmentation
from nanoseg.prepare import to_model_scale
from nanoseg_training.train_config import AugmentConfig, DataConfig


class BadSampleError(ValueError):
    """A data set entry cannot be used; the message names the file."""


@dataclass(frozen=True)
class Sample:
    image: np.ndarray  # float32 (H, W), 0–255
    masks: np.ndarray  # bool (N, H, W)


@dataclass(frozen=True)
class FramePreparation:
    """How a set of a user's own images becomes model input: as ``nanoseg segment`` prepares a
    frame (``to_model_scale`` with ``profile``, at ``pixel_size_nm`` nm or ``auto``, for ``spec``)."""

    profile: FrameProfile
    spec: InputSpec
    pixel_size_nm: float | Literal["auto"] | None = None

    def __call__(self, frame: np.ndarray, masks: np.ndarray) -> Sample:
        """The frame as the model's 0–255 gray at its scale, masks resampled alike (> 0.5)."""
        gray = to_model_scale(frame, self.profile, self.spec, pixel_size_nm=self.pixel_size_nm).gray
        if gray.shape != frame.shape and len(masks):
            masks = torch.nn.functional.interpolate(
                torch.from_numpy(masks.astype(np.float32))[None], size=gray.shape, mode="bilinear",
                align_corners=False)[0].numpy() > 0.5
        elif gray.shape != frame.shape:
            masks = np.zeros((0, *gray.shape), bool)
        return Sample(gray, masks)


class CocoSource:
    """Random access to the images and instance masks of a COCO data set directory.

    Without ``prepare`` the images are the generator's 8-bit gray, at the model's scale. With it,
    images in any format ``nanoseg segment`` reads (PNG, TIFF, .npy; any size and contrast) are
    prepared as frames, and masks may also be polygons (a CVAT or labelme COCO export)."""

    def __init__(self, root: Path, prepare: FramePreparation | None = None) -> None:
        self.root = Path(root)
        self.prepare = prepare
        ann_file = self.root / "annotations.json"
        try:
            coco = json.loads(ann_file.read_text())
        except FileNotFoundError:
            raise BadSampleError(f"{ann_file}: no such file (is {self.root} a data set?)") from None
        except json.JSONDecodeError as err:
            raise BadSampleError(f"{ann_file}: not valid JSON: {err}") from None
        self.images: list[dict[str, Any]] = coco["images"]
        self.anns: dict[int, list[dict[str, Any]]] = {}
        for a in coco["annotations"]:
            self.anns.setdefault(a["image_id"], []).append(a)
        if not self.images:
            raise BadSampleError(f"{ann_file}: data set has no images")

    def __len__(self) -> int:
        return len(self.images)

    def draw(self, rng: np.random.Generator) -> int:
        """A uniformly random image index."""
        return int(rng.integers(len(self.images)))

    def load(self, index: int) -> Sample:
        info = self.images[index]
        path = self.root / info["file_name"]
        image = self._read(path)
        anns = self.anns.get(info["id"], [])
        h, w = image.shape
        try:
            masks = (np.stack([decode_segmentation(a["segmentation"], h, w) for a in anns]) if anns
                     else np.zeros((0, h, w), bool))
        except (MaskDecodeError, KeyError) as err:
            raise BadSampleError(f"{path}: corrupt mask annotation: {err}") from None
        if masks.shape[1:] != (h, w):
            raise BadSampleError(f"{path}: masks are {masks.shape[1:]}, image is {(h, w)}")
        if self.prepare is None:
            return Sample(image, masks)
        try:
            return self.prepare(image, masks)
        except FrameError as err:
            raise BadSampleError(f"{path}: {err}") from None

    def _read(self, path: Path) -> np.ndarray:
        if self.prepare is not None:
            from nanoseg_training.image_files import UnreadableImage, read_image

            try:
                return read_image(path)
            except UnreadableImage as err:
                raise BadSampleError(str(err)) from None
        try:
            with Image.open(path) as im:
                return np.asarray(im.convert("L"), dtype=np.float32)
        except (OSError, ValueError) as err:
            raise BadSampleError(f"{path}: cannot read image: {err}") from None


class MixedSource:
    """Several data sets as one: ``draw`` picks a set by weight, then an image of it uniformly.

    Indices are global (set k's images follow those of sets 0..k-1)."""

    def __init__(self, sources: list[CocoSource], weights: list[float]) -> None:
        if not sources or len(sources) != len(weights) or min(weights) <= 0:
            raise ValueError("a mix needs one positive weight per data set")
        self.sources = sources
        self.p = np.asarray(weights, dtype=np.float64) / float(sum(weights))
        self.offsets = np.cumsum([0] + [len(s) for s in sources])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def draw(self, rng: np.random.Generator) -> int:
        k = int(rng.choice(len(self.sources), p=self.p))
        return int(self.offsets[k]) + self.sources[k].draw(rng)

    def load(self, index: int) -> Sample:
        k = int(np.searchsorted(self.offsets, index, side="right")) - 1
        return self.sources[k].load(index - int(self.offsets[k]))


def random_crop(s: Sample, size: int, rng: np.random.Generator, min_area: int) -> Sample:
    h, w = s.image.shape
    if size < h or size < w:
        y = int(rng.integers(0, max(h - size, 0) + 1))
        x = int(rng.integers(0, max(w - size, 0) + 1))
        s = Sample(s.image[y: y + size, x: x + size], s.masks[:, y: y + size, x: x + size])
    return drop_small(s, min_area)


def drop_small(s: Sample, min_area: int) -> Sample:
    """``s`` without the instances of fewer than ``min_area`` pixels (cut by a crop, shrunk by a rescale)."""
    return Sample(s.image, s.masks[s.masks.sum(axis=(1, 2)) >= min_area])


def draw_scale(cfg: AugmentConfig, rng: np.random.Generator) -> float:
    """The scale-jitter factor of one sample, log-uniform in ``cfg.scale`` (1.0 when off)."""
    lo, hi = cfg.scale
    return 1.0 if lo == hi == 1.0 else float(np.exp(rng.uniform(np.log(lo), np.log(hi))))


def rescale(s: Sample, factor: float, min_area: int) -> Sample:
    """Resample image (bilinear) and masks (bilinear, then > 0.5) by ``factor``; instances left with
    fewer than ``min_area`` pixels are dropped."""
    if factor == 1.0:
        return s
    h, w = s.image.shape
    size = (max(1, round(h * factor)), max(1, round(w * factor)))
    resize = torch.nn.functional.interpolate
    image = resize(torch.from_numpy(np.ascontiguousarray(s.image))[None, None], size=size,
                   mode="bilinear", align_corners=False)[0, 0].numpy()
    if len(s.masks):
        masks = resize(torch.from_numpy(s.masks.astype(np.float32))[None], size=size,
                       mode="bilinear", align_corners=False)[0].numpy() > 0.5
    else:
        masks = np.zeros((0, *size), bool)
    return drop_small(Sample(image, masks), min_area)


def augment(s: Sample, cfg: AugmentConfig, rng: np.random.Generator) -> Sample:
    """Flips, 90-degree rotations, contrast and brightness (detectron2 semantics), noise, blur."""
    img, masks = s.image, s.masks
    if rng.uniform() < cfg.hflip:
        img, masks = img[:, ::-1], masks[:, :, ::-1]
    if rng.uniform() < cfg.vflip:
        img, masks = img[::-1], masks[:, ::-1]
    if rng.uniform() < cfg.rot90:
        k = int(rng.integers(1, 4))
        img, masks = np.rot90(img, k), np.rot90(masks, k, axes=(1, 2))
    img = np.ascontiguousarray(img, dtype=np.float32)
    c = rng.uniform(*cfg.contrast)
    mean = float(img.mean())
    img = (img - mean) * c + mean
    img = img * rng.uniform(*cfg.brightness)
    if cfg.blur_probability > 0 and rng.uniform() < cfg.blur_probability:
        img = ndimage.gaussian_filter(img, rng.uniform(*cfg.blur_sigma))
    if cfg.noise_std[1] > 0:
        img = img + rng.normal(0.0, rng.uniform(*cfg.noise_std), img.shape).astype(np.float32)
    return Sample(np.clip(img, 0, 255).astype(np.float32), np.ascontiguousarray(masks))


def to_target(masks: np.ndarray) -> dict[str, torch.Tensor]:
    """torchvision detection target: xyxy boxes from masks (pixel edges), label 1, uint8 masks."""
    n = len(masks)
    boxes = np.zeros((n, 4), dtype=np.float32)
    for i, m in enumerate(masks):
        ys = np.flatnonzero(m.any(1))
        xs = np.flatnonzero(m.any(0))
        boxes[i] = (xs[0], ys[0], xs[-1] + 1, ys[-1] + 1)
    return {
        "boxes": torch.from_numpy(boxes),
        "labels": torch.ones(n, dtype=torch.int64),
        "masks": torch.from_numpy(masks.astype(np.uint8)),
    }


class BatchDataset(torch.utils.data.Dataset):
    """Item ``it`` is the whole batch of iteration ``it`` (images and targets)."""

    def __init__(self, source: CocoSource | MixedSource, data: DataConfig, aug: AugmentConfig,
                 batch_size: int, seed: int, rank: int = 0) -> None:
        self.source, self.data, self.aug = source, data, aug
        self.batch_size, self.seed, self.rank = batch_size, seed, rank
        self.skipped = 0

    def __len__(self) -> int:  # iterations are indexed by the sampler, not bounded here
        return 2**31 - 1

    def __getitem__(self, it: int) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]], int]:
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, self.rank, it]))
        images: list[torch.Tensor] = []
        targets: list[dict[str, torch.Tensor]] = []
        skipped = 0
        w = np.asarray(self.data.crop_weights, dtype=np.float64)
        crop = int(self.data.crop_sizes[int(rng.choice(len(w), p=w / w.sum()))])
        while len(images) < self.batch_size:
            idx = self.source.draw(rng)
            try:
                sample = self.source.load(idx)
            except BadSampleError:
                if self.data.on_bad_sample == "error":
                    raise
                skipped += 1
                if skipped > 100 * self.batch_size:
                    raise
                continue
            factor = draw_scale(self.aug, rng)
            sample = random_crop(sample, round(crop / factor), rng, self.data.min_instance_area)
            sample = rescale(sample, factor, self.data.min_instance_area)
            sample = augment(sample, self.aug, rng)
            images.append(torch.from_numpy(sample.image)[None])
            targets.append(to_target(sample.masks))
        return images, targets, skipped
