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
    """An integer drawn uniformly (or log-uniformly, low >= 1) from [low, high] inclusive."""

    low: int = Field(ge=0)
    high: int = Field(ge=0)
    distribution: Literal["uniform", "loguniform"] = "uniform"

    _ordered = field_validator("high")(_not_below_low)

    @model_validator(mode="after")
    def _positive_for_log(self) -> IntRange:
        if self.distribution == "loguniform" and self.low < 1:
            raise ValueError(f"loguniform needs low >= 1, got low = {self.low}")
        return self


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


class EndCaps(SceneModel):
    """Relative weights of the end shapes; ends are cut from the wire's own length, so the drawn
    length stays the tip-to-tip length."""

    flat: float = Field(1.0, ge=0)
    round: float = Field(0.0, ge=0)
    faceted: float = Field(0.0, ge=0)

    @model_validator(mode="after")
    def _some(self) -> EndCaps:
        if self.flat + self.round + self.faceted <= 0:
            raise ValueError("at least one end-cap weight must be > 0")
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
    aspect_ratio: Range | None = None
    """When set, each wire's length is its width times a ratio drawn from this range, clipped to
    ``length``'s bounds: short rods and long wires of any width."""
    end_caps: EndCaps = EndCaps()
    """Shape of the wire ends: flat (the paper's prisms), round (hemispherical) or faceted."""


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


class Bundle(Probability):
    """With this probability a wire comes with parallel neighbours touching or nearly touching it
    (a bundle); the neighbours come in addition to the drawn wire count."""

    size: IntRange = IntRange(low=2, high=4)
    gap: Range = Range(low=0.0, high=0.3)
    """Gap between neighbours as a fraction of the width."""


class NonPrismatic(SceneModel):
    taper: Taper = Taper()
    bend: Bend = Bend()
    roughness: Roughness = Roughness()
    sintering: Sintering = Sintering()
    bundle: Bundle = Bundle()


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


class Texture(Probability):
    """Fine background texture (amorphous carbon film, substrate grain): band-limited noise of
    standard deviation ``amplitude`` times the image's signal range, grain size in px."""

    amplitude: Range = Range(low=0.02, high=0.15)
    grain_px: Range = Range(low=1.0, high=6.0)


class Gradient(Probability):
    """Uneven illumination: a linear ramp plus vignetting, peak-to-peak ``amplitude`` times the
    signal range."""

    amplitude: Range = Range(low=0.05, high=0.4)


class Halo(Probability):
    """Fresnel fringe or halo around each object (defocused bright-field TEM): a rim of width
    ``width_px`` just outside the edges, of ``amplitude`` times the signal range; its sign is
    drawn (bright or dark rim)."""

    amplitude: Range = Range(low=0.05, high=0.3)
    width_px: Range = Range(low=1.0, high=4.0)


class Charging(Probability):
    """SEM charging: bright horizontal streaks trailing from bright objects along the scan."""

    streaks: IntRange = IntRange(low=1, high=6)
    amplitude: Range = Range(low=0.1, high=0.5)


class Debris(Probability):
    """Unlabelled debris: small irregular blobs that are not wires."""

    count: IntRange = IntRange(low=1, high=15)
    size_px: Range = Range(low=2.0, high=10.0)
    amplitude: Range = Range(low=0.2, high=1.0)


class Jpeg(Probability):
    """JPEG compression of the final 8-bit image (figures from papers)."""

    quality: IntRange = IntRange(low=30, high=90)


class FigureMarks(Probability):
    """The marks of a figure crop: a scale bar with its label, a panel letter, a panel border;
    drawn black or white on the 8-bit image, never labelled."""


class Invert(Probability):
    """Contrast inverted (dark objects on a light background) before the 8-bit mapping."""


class Look(SceneModel):
    """Relative weights of the imaging looks, drawn per image (``mode: mixed``)."""

    optical_density: float = Field(1.0, ge=0)
    sem: float = Field(0.0, ge=0)

    @model_validator(mode="after")
    def _some(self) -> Look:
        if self.optical_density + self.sem <= 0:
            raise ValueError("at least one look weight must be > 0")
        return self


class Artefacts(SceneModel):
    """Domain randomisation: effects of real instruments and of figures from papers. Every one is
    off by default; each is applied to an image with its probability."""

    texture: Texture = Texture()
    gradient: Gradient = Gradient()
    halo: Halo = Halo()
    charging: Charging = Charging()
    debris: Debris = Debris()
    gaussian_noise: Range | None = None
    """Additive Gaussian noise, std as a fraction of the signal range (None = off)."""
    invert: Invert = Invert()
    jpeg: Jpeg = Jpeg()
    figure_marks: FigureMarks = FigureMarks()


class Rendering(SceneModel):
    mode: Literal["optical_density", "sem", "mixed"] = "optical_density"
    """``mixed``: each image draws its look from ``looks``."""
    looks: Look = Look()
    od_per_voxel: float | None = Field(None, gt=0)
    """Optical density of one voxel of material; None = 1/height (the paper: sum / total thickness)."""
    normalisation: Literal["image_max", "domain_height", "percentile"] = "image_max"
    """8-bit mapping: scale each image's maximum to 255, the full domain height to 255, or
    percentiles drawn from ``percentile_low``/``percentile_high`` to 0 and 255 (as the intensity
    profiles of real frames do)."""
    percentile_low: Range = Range(low=0.0, high=2.0)
    percentile_high: Range = Range(low=98.0, high=100.0)
    blur_sigma: float = Field(2.0, ge=0, le=10)
    blur_sigma_jitter: float = Field(0.0, ge=0, le=5)
    """Per-image blur sigma drawn from [blur_sigma - jitter, blur_sigma + jitter]."""
    noise: Noise = Noise()
    background: Background = Background()
    sem_edge_gain: float = Field(3.0, ge=0)
    """SEM mode: brightness of surface slopes (edges) relative to flat tops."""
    sem_edge_gain_jitter: float = Field(0.0, ge=0)
    """Per-image edge gain drawn from [gain - jitter, gain + jitter] (clipped at 0)."""
    artefacts: Artefacts = Artefacts()


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
