"""Schema of a training recipe (``configs/training/*.yaml``)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from nanoseg.config_io import StrictModel
from nanoseg.input_spec import InputSpec
from nanoseg.model import ModelConfig


class GenerateSpec(StrictModel):
    """How to (re)make the training set when it is missing: ``nanoseg generate`` arguments."""

    preset: str = "paper"
    count: int = Field(2000, ge=1)
    seed: int = 1


class MixSource(StrictModel):
    """A further training set, drawn from with probability proportional to ``weight``."""

    train: str
    generate: GenerateSpec | None = None
    weight: float = Field(1.0, gt=0)
    profile: str | None = None
    """Frame profile (configs/profiles name or YAML path) for a set of a user's own images
    (e.g. a COCO export of CVAT or labelme: polygons or RLE, any image size and contrast): each image
    is prepared as ``nanoseg segment`` prepares a frame with it (``nanoseg.prepare.to_model_scale``),
    its masks resampled alike. None: the images are the generator's, at the model's scale and gray."""
    pixel_size_nm: float | Literal["auto"] | None = None
    """Pixel size of the set's images, nm, or ``auto``; default the profile's (with ``profile`` only)."""

    @model_validator(mode="after")
    def _prepared(self) -> MixSource:
        _check_prepared(self.profile, self.pixel_size_nm)
        return self


def _check_prepared(profile: str | None, pixel_size_nm: float | str | None) -> None:
    if pixel_size_nm is not None and profile is None:
        raise ValueError("pixel_size_nm needs a profile (images without one are at the model's scale)")
    if isinstance(pixel_size_nm, float) and pixel_size_nm <= 0:
        raise ValueError("pixel_size_nm must be > 0 nm or 'auto'")


class DataConfig(StrictModel):
    train: str = "data/paper-train"
    """COCO data set directory; relative paths are resolved under the nanoseg cache directory."""
    generate: GenerateSpec | None = GenerateSpec()
    """If set and ``train`` is missing, generate it first (seeded, so reproducible)."""
    weight: float = Field(1.0, gt=0)
    """Share of ``train`` among the sets of ``mix`` (relative weights)."""
    profile: str | None = None
    """Frame profile for ``train`` when it holds a user's own images (see ``MixSource.profile``)."""
    pixel_size_nm: float | Literal["auto"] | None = None
    """Pixel size of ``train``'s images, nm, or ``auto``; default the profile's."""
    mix: tuple[MixSource, ...] = ()
    """More training sets (e.g. another generator preset), each image drawn from set k with
    probability weight_k / sum of weights."""
    crop_sizes: tuple[int, ...] = (320, 512)
    """Random square crops at native scale (wires keep their pixel size); >= image size = whole image.
    One size is drawn per iteration with ``crop_weights``: small crops are cheap, whole frames show
    the longest wires entire."""
    crop_weights: tuple[float, ...] = (0.8, 0.2)
    min_instance_area: int = Field(20, ge=1)
    """Instances cut by a crop to fewer pixels than this are dropped from that crop's targets."""
    on_bad_sample: Literal["error", "skip"] = "error"
    """Missing image / corrupt RLE: stop with the file named, or skip it and count it."""

    @model_validator(mode="after")
    def _crops(self) -> DataConfig:
        _check_prepared(self.profile, self.pixel_size_nm)
        if not self.crop_sizes or len(self.crop_sizes) != len(self.crop_weights):
            raise ValueError("crop_sizes and crop_weights need the same, non-zero length")
        if any(c < 32 for c in self.crop_sizes) or any(w < 0 for w in self.crop_weights) or sum(self.crop_weights) <= 0:
            raise ValueError("crop sizes must be >= 32 px and weights >= 0 with a positive sum")
        return self


class AugmentConfig(StrictModel):
    brightness: tuple[float, float] = (0.7, 1.2)
    contrast: tuple[float, float] = (0.7, 1.2)
    hflip: float = Field(0.5, ge=0, le=1)
    vflip: float = Field(0.5, ge=0, le=1)
    rot90: float = Field(0.5, ge=0, le=1)
    """Probability of a random 90/180/270-degree rotation."""
    noise_std: tuple[float, float] = (0.0, 0.0)
    """Gaussian noise std range on the 0–255 scale (0, 0 = off)."""
    blur_sigma: tuple[float, float] = (0.0, 0.0)
    """Extra Gaussian blur sigma range, px (0, 0 = off)."""
    blur_probability: float = Field(0.0, ge=0, le=1)
    scale: tuple[float, float] = Field((1.0, 1.0))
    """Scale jitter: each crop is resampled by a factor drawn log-uniformly from this range
    (wires get thinner/shorter below 1, larger above), covering wire sizes and pixel sizes the
    generator did not draw; (1, 1) = off."""

    @model_validator(mode="after")
    def _scale(self) -> AugmentConfig:
        lo, hi = self.scale
        if not 0.25 <= lo <= hi <= 4.0:
            raise ValueError("scale must be a range (low, high) with 0.25 <= low <= high <= 4")
        return self


class SolverConfig(StrictModel):
    batch_size: int = Field(4, ge=1)
    base_lr: float = Field(0.02, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(1e-4, ge=0)
    warmup_iters: int = Field(200, ge=0)
    max_iter: int = Field(3000, ge=1)
    steps: tuple[float, ...] = (0.75, 0.92)
    """Fractions of max_iter where the learning rate is multiplied by gamma."""
    gamma: float = Field(0.1, gt=0, le=1)
    clip_grad_norm: float | None = Field(10.0, gt=0)

    @model_validator(mode="after")
    def _steps(self) -> SolverConfig:
        if any(not 0 < s < 1 for s in self.steps) or list(self.steps) != sorted(self.steps):
            raise ValueError("steps must be increasing fractions in (0, 1)")
        return self


class TrainConfig(StrictModel):
    name: str
    seed: int = 0
    threads: int = Field(2, ge=1)
    workers: int = Field(1, ge=0)
    checkpoint_period: int = Field(100, ge=1)
    log_period: int = Field(10, ge=1)
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    augment: AugmentConfig = AugmentConfig()
    solver: SolverConfig = SolverConfig()
    input_spec: InputSpec = InputSpec(pixel_size_nm=8.0)
    """Stored in the checkpoint: what a frame must look like for this model."""
    init_from: str | None = None
    """A nanoseg checkpoint whose weights start the run (fine-tuning, e.g. the deployed model on new
    data); tensors whose name or shape differ from this model's are left as initialised and listed."""
    freeze: tuple[str, ...] = ()
    """Parameter-name prefixes that are not trained (e.g. ``backbone``, ``rpn``, ``roi_heads.box``);
    BatchNorm layers under them keep their running statistics."""
