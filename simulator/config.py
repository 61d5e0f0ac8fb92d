"""Schema of a simulated-microscope run (``configs/simulator/*.yaml``).

Units are in the field names: ``_s`` seconds, ``_nm`` nanometres, ``_um`` micrometres, ``_px``
pixels of the camera (one pixel = ``pixel_size_nm`` of the scene preset). Times in the growth mode
are the sample's simulated time (the clock motor), not wall time.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from nanoseg.config_io import StrictModel
from nanoseg_training.synthetic_config import Range


class SceneSection(StrictModel):
    preset: str = Field("paper", description="Synthetic preset (configs/synthetic) for wire shapes, domain and pixel size.")
    field_px: int | None = Field(None, ge=64, le=4096, description="Square camera field, px; None = the preset's domain.")


class DetectorSection(StrictModel):
    """The camera: transmission counts = Poisson(dose * exp(-OD)) + dark + N(0, read_noise)."""

    dose_rate: float = Field(40_000.0, gt=0, description="Incident photons per pixel per second of exposure.")
    exposure_s: float = Field(0.1, gt=0, description="Exposure time at the start of a run.")
    dark_counts: float = Field(100.0, ge=0, description="Dark level added to every pixel, counts.")
    read_noise: float = Field(2.0, ge=0, description="Gaussian read noise, counts rms.")
    od_per_voxel: float = Field(0.012, gt=0, description="Optical density of one voxel of wire material.")
    blur_sigma_px: float = Field(2.0, ge=0, description="Gaussian point-spread function of the optics, px.")


class GrowthSection(StrictModel):
    """Wires nucleate (a Poisson process) and lengthen from their seed at a constant rate until
    they reach their final length; their width stays constant."""

    frames: int = Field(40, ge=1, description="Frames of a plain growth run (nanoseg simulate growth).")
    interval_s: float = Field(30.0, gt=0, description="Simulated time between frames.")
    initial_wires: int = Field(4, ge=0, description="Wires present (as nuclei) at t = 0.")
    nucleation_per_min: float = Field(1.0, ge=0, description="New wires per minute of simulated time.")
    nucleation_until_s: float | None = Field(600.0, ge=0, description="No nucleation after this time; None = never stops.")
    initial_length_nm: float = Field(200.0, gt=0, description="Length of a wire when it nucleates.")
    growth_rate_nm_per_s: Range = Field(Range(low=1.5, high=3.0), description="Axial growth rate, drawn per wire.")
    final_length_nm: Range = Field(Range(low=2000, high=3600), description="Length at which a wire stops growing, drawn per wire.")
    width_nm: Range = Field(Range(low=100, high=300, distribution="loguniform"), description="Wire width, drawn per wire.")
    margin_px: int = Field(16, ge=0, description="Seeds are drawn at least this far from the field border.")


class RasterSection(StrictModel):
    """A grid of fields of view; each field is its own scene (seed, index)."""

    nx: int = Field(3, ge=1, description="Fields along x.")
    ny: int = Field(2, ge=1, description="Fields along y.")
    step_um: float = Field(10.0, gt=0, description="Motor step between fields.")


class PublishSection(StrictModel):
    proxy: str = Field("tcp://127.0.0.1:5567", description="The bluesky 0MQ proxy's input address (Publisher connects).")
    prefix: str = Field("", description="bluesky Publisher prefix.")
    serializer: Literal["msgpack", "json"] = Field("msgpack", description="Document encoding (never pickle).")
    connect_wait_s: float = Field(0.5, ge=0, description="Wait after connecting before the first document (0MQ slow joiner).")


class MonitorSection(StrictModel):
    """monitor_growth (nanoseg_daemon.plans): stop at the target or when growth stalls."""

    summary_address: str = Field("tcp://127.0.0.1:5590", description="The daemon's JSON summary PUB address.")
    target_mean_length_nm: float = Field(1600.0, gt=0, description="Stop when the smoothed mean length reaches this.")
    stall_rate_nm_per_frame: float = Field(5.0, ge=0, description="Growth below this rate (nm per frame) counts as stalled.")
    stall_frames: int = Field(4, ge=1, description="Stop after this many stalled frames in a row.")
    max_frames: int = Field(60, ge=1, description="Stop after this many frames in any case.")
    smoothing: float = Field(0.5, gt=0, le=1, description="EWMA weight of the newest frame's mean length.")
    timeout_s: float = Field(120.0, gt=0, description="How long to wait for a frame's analysis.")


class SimulatorConfig(StrictModel):
    """``nanoseg simulate --config FILE``."""

    name: str = "simulated"
    mode: Literal["raster", "growth"] = Field("growth", description="raster: fields of view; growth: a time series.")
    seed: int = Field(0, ge=0, description="Every random draw (scenes, nucleation, noise) follows from it.")
    sample: str = Field("simulated V2O5 nanowires", description="Sample name in the start document.")
    profile: str | None = Field(None, description="nanoseg_profile in the start document; None = the daemon's default.")
    scene: SceneSection = Field(default_factory=SceneSection)
    detector: DetectorSection = Field(default_factory=DetectorSection)
    growth: GrowthSection = Field(default_factory=GrowthSection)
    raster: RasterSection = Field(default_factory=RasterSection)
    publish: PublishSection = Field(default_factory=PublishSection)
    monitor: MonitorSection = Field(default_factory=MonitorSection)
    hdf5_dir: str | None = Field(None, description="Write AD_HDF5 files here (referenced by resource/datum) instead of inline frames.")
    pace_s: float = Field(0.0, ge=0, description="Wall-clock pause after each frame (0 = as fast as possible).")

    @model_validator(mode="after")
    def _growth_lengths(self) -> SimulatorConfig:
        if self.growth.initial_length_nm > self.growth.final_length_nm.low:
            raise ValueError("growth.initial_length_nm must not exceed growth.final_length_nm.low")
        return self
