"""Schema of a synthetic-scene preset (``configs/synthetic/*.yaml``).

Units: lengths in voxels; one voxel is one image pixel in x and y, and ``pixel_size_nm`` says what
that is physically. Angles in degrees, in-plane angle counter-clockwise from the image x axis
(y pointing down), 0–180.
"""

from __future__ import annotations

from typing import Literal

from pydantic import (
    ConfigDict,
    Field,
    PositiveInt,
    ValidationInfo,
    field_validator,
    model_validator,
)

from nanoseg.config_io import StrictModel


class SceneModel(StrictModel):
    """Base of the scene schema: no NaN or infinity anywhere (they would pass range checks)."""

    model_config = ConfigDict(allow_inf_nan=False)


def _not_below_low(high: float, info: ValidationInfo) -> float:
    # A field validator (not a model validator) so that the error names ``<range>.high``.
    low = info.data.get("low")
    if low is not None and high < low:
        raise ValueError(f"must be >= low ({low})")
    return high


class Range(SceneModel):
    """A scalar drawn uniformly (or log-uniformly) from [low, high]."""

    low: float
    high: float
    distribution: Literal["uniform", "loguniform"] = "uniform"

    _ordered = field_validator("high")(_not_below_low)

    @model_validator(mode="after")
    def _positive_for_log(self) -> Range:
        if self.distribution == "loguniform" and self.low <= 0:
            raise ValueError(f"loguniform needs low > 0, got low = {self.low}")
        return self


class IntRange(SceneModel):
    """An integer drawn uniformly from [low, high] inclusive."""

    low: int = Field(ge=0)
    high: int = Field(ge=0)

    _ordered = field_validator("high")(_not_below_low)


class Domain(SceneModel):
    """Voxel domain W x B x H (x, y, z)."""

    width: PositiveInt = 512
    depth: PositiveInt = 512
    height: PositiveInt = 200


class CrossSections(SceneModel):
    """Relative weights of the prism cross-sections."""

    rectangle: float = Field(0.5, ge=0)
    hexagon: float = Field(0.5, ge=0)

    @model_validator(mode="after")
    def _some(self) -> CrossSections:
        if self.rectangle + self.hexagon <= 0:
            raise ValueError("at least one cross-section weight must be > 0")
        return self


class WireConfig(SceneModel):
    count: IntRange = IntRange(low=5, high=25)
    length: Range = Range(low=60, high=450, distribution="loguniform")
    width: Range = Range(low=12, high=50, distribution="loguniform")
    thickness_ratio: Range = Range(low=0.5, high=1.0)
    """Thickness (z extent) as a fraction of the width."""
    cross_sections: CrossSections = CrossSections()
    tilt_max_deg: float = Field(3.0, ge=0, le=30)
    """Out-of-plane tilt: the wire's bottom rises by tan(tilt) per voxel along its axis."""
    field_margin: float = Field(0.15, ge=0, le=1)
    """Wire centres are drawn from the field extended by this fraction on each side."""
    min_visible_area: int = Field(40, ge=1)
    """Wires whose visible footprint in the field is smaller than this (px) are dropped."""


class Probability(SceneModel):
    probability: float = Field(0.0, ge=0, le=1)


class Taper(Probability):
    max_fraction: float = Field(0.4, ge=0, lt=1)
    """Width at the far end is (1 - f) of the near end, f drawn from [0, max_fraction]."""


class Bend(Probability):
    max_sagitta_fraction: float = Field(0.06, ge=0, le=0.3)
    """Largest sideways bow of the axis, as a fraction of the length (parabolic arc)."""


class Roughness(Probability):
    amplitude: float = Field(0.12, ge=0, lt=0.5)
    """Relative width modulation along the wire (sum of 4 random sinusoids)."""


class Sintering(Probability):
    """With this probability a new wire starts on the axis of an earlier one (a junction)."""


class NonPrismatic(SceneModel):
    taper: Taper = Taper()
    bend: Bend = Bend()
    roughness: Roughness = Roughness()
    sintering: Sintering = Sintering()


class Noise(SceneModel):
    """Photon (Poisson) and read noise of a transmission measurement."""

    enabled: bool = False
    dose: Range = Range(low=200, high=5000, distribution="loguniform")
    """Incident photons per pixel."""
    read_noise: Range = Range(low=0.0, high=5.0)
    """Gaussian read noise, photons rms."""


class Background(SceneModel):
    """Smooth optical-density background and a substrate offset, added before noise."""

    enabled: bool = False
    offset_od: Range = Range(low=0.0, high=0.15)
    amplitude_od: Range = Range(low=0.0, high=0.1)
    length_scale: Range = Range(low=60, high=250)
    """Correlation length of the smooth background, px."""


class Rendering(SceneModel):
    mode: Literal["optical_density", "sem"] = "optical_density"
    od_per_voxel: float | None = Field(None, gt=0)
    """Optical density of one voxel of material; None = 1/height (the paper: sum / total thickness)."""
    normalisation: Literal["image_max", "domain_height"] = "image_max"
    """8-bit mapping: scale each image's maximum to 255, or the full domain height to 255."""
    blur_sigma: float = Field(2.0, ge=0, le=10)
    blur_sigma_jitter: float = Field(0.0, ge=0, le=5)
    """Per-image blur sigma drawn from [blur_sigma - jitter, blur_sigma + jitter]."""
    noise: Noise = Noise()
    background: Background = Background()
    sem_edge_gain: float = Field(3.0, ge=0)
    """SEM mode: brightness of surface slopes (edges) relative to flat tops."""


class SceneConfig(SceneModel):
    """A synthetic nanowire scene preset."""

    name: str = "custom"
    pixel_size_nm: float = Field(8.0, gt=0)
    domain: Domain = Domain()
    wires: WireConfig = WireConfig()
    non_prismatic: NonPrismatic = NonPrismatic()
    rendering: Rendering = Rendering()

    @property
    def od_per_voxel(self) -> float:
        return self.rendering.od_per_voxel or 1.0 / self.domain.height

    @model_validator(mode="after")
    def _fits(self) -> SceneConfig:
        if self.wires.width.low * self.wires.thickness_ratio.low >= self.domain.height:
            raise ValueError("domain.height must exceed the thinnest wire's thickness")
        return self
