"""How to prepare frames from one instrument (``configs/profiles/*.yaml``)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from nanoseg.config_io import StrictModel
from nanoseg.input_check import InputKind
from nanoseg.input_spec import FrameMode


class ScalarI0(StrictModel):
    """A known incident intensity, in the frame's units (counts), dark not yet subtracted."""

    policy: Literal["scalar"]
    value: float = Field(gt=0)


class FlatFieldI0(StrictModel):
    """A flat-field frame (no sample) of the frame's shape is supplied with every frame."""

    policy: Literal["flat_field"]


class BackgroundI0(StrictModel):
    """I0 estimated from the frame itself (the substrate's mode, ``optical_density.estimate_i0``)."""

    policy: Literal["background"]


I0Policy = Annotated[ScalarI0 | FlatFieldI0 | BackgroundI0, Field(discriminator="policy")]

_OD_ONLY = ("i0", "dark", "transmission_floor")
_INTENSITY_ONLY = ("invert", "normalise", "normalise_percentiles")


class FrameProfile(StrictModel):
    """Frame preparation for one instrument.

    Optical-density mode uses ``i0``, ``dark`` and ``transmission_floor``; intensity mode uses
    ``invert``, ``normalise`` and ``normalise_percentiles``. Setting a field of the other mode is an
    error, so a profile never carries settings that are silently ignored.
    """

    name: str = Field(min_length=1)
    description: str = ""
    mode: FrameMode
    input: InputKind | Literal["auto"] | None = None
    """What a frame is. ``transmission``: a bright background with darker objects (optical-density
    mode converts it with ``i0``/``dark``; intensity mode inverts it). ``optical_density``: a dark
    background with brighter objects (an OD map, a secondary-electron image; used as it is).
    ``auto``: decided per frame from where its background lies (``nanoseg.input_check``). None:
    transmission in optical-density mode, and in intensity mode what ``invert`` implies. Every
    frame is checked either way, and a frame that looks like the other kind is reported."""
    i0: I0Policy = BackgroundI0(policy="background")
    dark: float = 0.0
    """Dark level (counts) subtracted from frame and I0; a dark frame supplied at run time wins."""
    transmission_floor: float = Field(1e-3, gt=0, lt=1)
    """Smallest transmission (I - dark) / (I0 - dark) used; OD is capped at -ln(floor)."""
    invert: bool = False
    """Intensity mode: use max - I (dark wires on a bright substrate become bright); the same as
    ``input: transmission`` in intensity mode."""
    normalise: bool = True
    """Intensity mode: map the percentiles below to 0 and 1 (clipping outside)."""
    normalise_percentiles: tuple[float, float] = (0.5, 99.5)
    flatten_background: bool = False
    """Remove uneven illumination (or SEM charging) first: the background's slow variation, a
    quadratic surface fitted to the background side of the frame (``input_check.background_surface``),
    divides a transmission frame (becoming the flat field of its OD) or is subtracted from an
    intensity one."""
    pixel_size_nm: float | Literal["auto"] | None = None
    """Frame pixel size, nm; None = already at the model's scale (no resampling); ``auto`` =
    estimated per frame from its objects' widths (``nanoseg.scale``)."""
    tile_overlap_px: int = Field(64, ge=0)
    """Overlap of neighbouring tiles at the model's scale, px; must be below the model input size."""
    merge_iou: float = Field(0.5, gt=0, le=1)
    """Instances of neighbouring tiles merge when their IoU inside the tiles' overlap reaches this."""
    max_model_side_px: int = Field(16384, ge=1)
    """Largest height or width of a frame at the model's scale, px: a frame whose pixel size would
    resample it beyond this is refused (``too_large``) before any work, as a small frame with a
    large pixel size would otherwise cost (pixel size / model pixel size)^2 times its own size."""

    @model_validator(mode="after")
    def _mode_fields(self) -> FrameProfile:
        other = _INTENSITY_ONLY if self.mode == "optical_density" else _OD_ONLY
        stray = sorted(set(other) & self.model_fields_set)
        if stray:
            raise ValueError(f"{', '.join(stray)} not used in {self.mode} mode")
        if isinstance(self.pixel_size_nm, float) and self.pixel_size_nm <= 0:
            raise ValueError("pixel_size_nm must be > 0 nm or 'auto'")
        if self.invert and self.input == "optical_density":
            raise ValueError("invert: true contradicts input: optical_density (a dark background)")
        lo, hi = self.normalise_percentiles
        if not 0 <= lo < hi <= 100:
            raise ValueError("normalise_percentiles must satisfy 0 <= low < high <= 100")
        return self

    @property
    def expected_input(self) -> InputKind | Literal["auto"]:
        """The input this profile prepares frames as (``input`` with its default resolved)."""
        if self.input is not None:
            return self.input
        if self.mode == "optical_density" or self.invert:
            return "transmission"
        return "optical_density"
