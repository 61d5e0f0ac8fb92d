"""Training batches from a COCO data set: random native-scale crops and on-the-fly augmentation.

Batch ``it`` is a pure function of (seed, rank, it): a resumed run sees exactly the batches the
uninterrupted run would have seen.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from scipy import ndimage

from nanoseg.config_io import ConfigError
from nanoseg.errors import FrameError
from nanoseg.frame_profile import FrameProfile
from nanoseg.input_spec import InputSpec
from nanoseg.masks import MaskDecodeError, decode_segmentation
from nanoseg.prepare import to_model_scale
from nanoseg_training.train_config import AugmentConfig, DataConfig


class BadSampleError(ConfigError):
    """A data set entry cannot be used; the message names the file (and the record).

    A ``ConfigError``: the ``nanoseg`` CLI reports it as one line and exits 2."""


@dataclass(frozen=True)
class CocoIndex:
    """The checked records of a COCO annotations file (``index_coco``)."""

    images: list[dict[str, Any]]
    anns: dict[int, list[dict[str, Any]]]
    """Annotations per image id (every image id has an entry)."""
    orphans: list[int] = field(default_factory=list)
    """Positions in ``annotations`` of those whose ``image_id`` names no image (ignored)."""
    outside: list[int] = field(default_factory=list)
    """Positions in ``annotations`` of polygons wholly outside their image (0 pixels, ignored)."""

    def warning(self, source: str | Path) -> str | None:
        """One line counting the annotations that are ignored, or None when none is."""
        parts = []
        if self.orphans:
            a = self.orphans[0]
            parts.append(f"{len(self.orphans)} annotation(s) name no image (first: annotations[{a}])")
        if self.outside:
            parts.append(f"{len(self.outside)} polygon annotation(s) lie wholly outside their image "
                         f"(first: annotations[{self.outside[0]}])")
        return f"{source}: ignored: {'; '.join(parts)}" if parts else None


def _is_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _polygon_outside(segmentation: Any, height: Any, width: Any) -> bool:
    """Whether a polygon segmentation (list of flat x, y lists) has no point inside the image."""
    if not (isinstance(segmentation, list) and _is_id(height) and _is_id(width)):
        return False
    try:
        xy = np.concatenate([np.asarray(poly, dtype=np.float64).reshape(-1, 2) for poly in segmentation])
    except (ValueError, TypeError):
        return False  # a malformed polygon: decode_segmentation names it when the image is loaded
    if not len(xy):
        return True
    x, y = xy[:, 0], xy[:, 1]
    return bool(x.max() <= 0 or x.min() >= width or y.max() <= 0 or y.min() >= height)


def index_coco(coco: Any, source: str | Path, image_keys: tuple[str, ...] = ("id", "file_name")) -> CocoIndex:
    """Check the structure of a COCO dict and index its annotations by image.

    Parameters
    ----------
    coco : Any
        The parsed JSON.
    source : str | Path
        Named in the errors (the annotations file).
    image_keys : tuple[str, ...]
        Keys every image record must have.

    Raises
    ------
    BadSampleError
        No ``images`` list, a record without a required key, a non-integer or duplicate image id,
        an annotation without ``image_id`` or ``segmentation``; the message names the record.
    """
    if not isinstance(coco, dict) or not isinstance(coco.get("images"), list):
        raise BadSampleError(f"{source}: no 'images' list (not a COCO annotations file?)")
    ann_list = coco.get("annotations", [])
    if not isinstance(ann_list, list):
        raise BadSampleError(f"{source}: 'annotations' is not a list")
    first: dict[int, int] = {}
    for i, im in enumerate(coco["images"]):
        if not isinstance(im, dict):
            raise BadSampleError(f"{source}: images[{i}] is not an object")
        for key in image_keys:
            if key not in im:
                raise BadSampleError(f"{source}: images[{i}] has no '{key}'")
        if not _is_id(im["id"]):
            raise BadSampleError(f"{source}: images[{i}]: id {im['id']!r} is not an integer")
        if im["id"] in first:
            raise BadSampleError(f"{source}: images[{i}] and images[{first[im['id']]}] have the same id {im['id']}")
        first[im["id"]] = i
    anns: dict[int, list[dict[str, Any]]] = {image_id: [] for image_id in first}
    orphans: list[int] = []
    outside: list[int] = []
    for j, a in enumerate(ann_list):
        if not isinstance(a, dict):
            raise BadSampleError(f"{source}: annotations[{j}] is not an object")
        for key in ("image_id", "segmentation"):
            if key not in a:
                raise BadSampleError(f"{source}: annotations[{j}] (id {a.get('id')}) has no '{key}'")
        if a["image_id"] not in anns:
            orphans.append(j)
            continue
        im = coco["images"][first[a["image_id"]]]
        if _polygon_outside(a["segmentation"], im.get("height"), im.get("width")):
            outside.append(j)
        anns[a["image_id"]].append(a)
    return CocoIndex(list(coco["images"]), anns, orphans, outside)


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
    prepared as frames, and masks may also be polygons (a CVAT or labelme COCO export).

    The annotations are checked at construction (``index_coco``); ``missing`` lists the images
    whose file does not exist, ``warning()`` says what is ignored."""

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
        self.ann_file = ann_file
        self.index = index_coco(coco, ann_file)
        self.images: list[dict[str, Any]] = self.index.images
        self.anns: dict[int, list[dict[str, Any]]] = self.index.anns
        if not self.images:
            raise BadSampleError(f"{ann_file}: data set has no images")
        self.missing: list[Path] = [p for p in (self.root / im["file_name"] for im in self.images) if not p.is_file()]
        """Image files named by the annotations that do not exist (checked once, here)."""

    def check(self, on_bad_sample: Literal["error", "skip"]) -> list[str]:
        """Refuse missing image files (``error``), or lines (none when all is well) counting what
        is skipped or ignored (missing files under ``skip``, annotations of no image, polygons outside theirs).

        Raises
        ------
        BadSampleError
            Under ``error`` when an image file is missing; under either when all are.
        """
        n = len(self.images)
        if self.missing and (on_bad_sample == "error" or len(self.missing) == n):
            raise BadSampleError(f"{self.missing[0]}: no such image file ({len(self.missing)} of {n} images of "
                                 f"{self.ann_file} are missing{'' if len(self.missing) < n else ': all'})")
        notes = [] if not self.missing else [
            f"{self.ann_file}: skipped: {len(self.missing)} of {n} image files are missing (first: {self.missing[0]})"]
        warning = self.index.warning(self.ann_file)
        return notes + ([warning] if warning else [])

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
        from nanoseg_training.image_files import UnreadableImage, read_gray8

        try:
            return read_gray8(path)
        except UnreadableImage as err:
            raise BadSampleError(str(err)) from None


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
