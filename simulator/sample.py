"""What the simulated microscope looks at, and what it measures: pure functions, no devices.

A sample answers ``scene_at(x_um, y_um, t_s)``: the deposited wires in the camera's field for a
stage position and a (simulated) time. ``RasterSample``: a grid of fields of view, each its own
scene (seed, field index) from the synthetic generator. ``GrowthSample``: wires nucleate at random
times and lengthen from their seed at constant rates until their final length; each time's scene
is built with the generator's own geometry and deposition (``WireGeometry`` with the current
lengths, ``scene.deposit``), so wires rest on earlier ones exactly as in the training data.

``transmission_frame`` renders a scene as camera counts (the physics of
``rendering.transmission_counts``); ``frame_truth`` is the ground truth a run is scored against.
Conventions: lengths in px unless the name ends in ``_nm``; angles in degrees [0, 180),
counter-clockwise from the image x axis, y down (as in ``wire_geometry``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from functools import lru_cache

import numpy as np
from scipy import ndimage

from nanoseg.particle_stats import particle_table
from nanoseg_sim.config import DetectorSection, GrowthSection, RasterSection
from nanoseg_training.rendering import transmission_counts
from nanoseg_training.scene import Scene, deposit, draw, generate_scene
from nanoseg_training.synthetic_config import SceneConfig
from nanoseg_training.wire_geometry import CrossSection, WireGeometry


def field_config(preset: SceneConfig, field_px: int | None) -> SceneConfig:
    """The preset with its domain resized to a square camera field (None: unchanged)."""
    if field_px is None:
        return preset
    domain = preset.domain.model_copy(update={"width": field_px, "depth": field_px})
    return preset.model_copy(update={"domain": domain})


class RasterSample:
    """A grid of ``nx`` x ``ny`` fields, ``step_um`` apart, centred on the stage origin."""

    def __init__(self, scene_cfg: SceneConfig, raster: RasterSection, seed: int) -> None:
        self.cfg, self.raster, self.seed = scene_cfg, raster, seed
        self._scene = lru_cache(maxsize=2)(self._make)

    def positions(self) -> list[tuple[float, float]]:
        """(x, y) of every field in acquisition order (rows of x), µm."""
        r = self.raster
        xs = [(i - (r.nx - 1) / 2) * r.step_um for i in range(r.nx)]
        ys = [(j - (r.ny - 1) / 2) * r.step_um for j in range(r.ny)]
        return [(x, y) for y in ys for x in xs]

    def index_at(self, x_um: float, y_um: float) -> int:
        """The field nearest to the stage position (clamped to the grid)."""
        r = self.raster
        i = min(max(round(x_um / r.step_um + (r.nx - 1) / 2), 0), r.nx - 1)
        j = min(max(round(y_um / r.step_um + (r.ny - 1) / 2), 0), r.ny - 1)
        return int(j * r.nx + i)

    def _make(self, index: int) -> Scene:
        return generate_scene(self.cfg, np.random.default_rng(np.random.SeedSequence([self.seed, index])))

    def scene_at(self, x_um: float, y_um: float, t_s: float) -> Scene:
        return self._scene(self.index_at(x_um, y_um))


@dataclass(frozen=True)
class GrowingWire:
    """One wire: seeded at ``seed`` at time ``nucleated_s``, growing along its axis ``angle_deg``."""

    nucleated_s: float
    seed: tuple[float, float]  # (x, y) where it nucleated, px
    angle_deg: float  # axis, [0, 180)
    forward: bool  # grows along +direction of the axis (else along -direction)
    width_px: float
    thickness_px: float
    cross_section: CrossSection
    tilt_deg: float
    initial_px: float
    rate_px_per_s: float
    final_px: float

    def length_at(self, t_s: float) -> float | None:
        """Length at time ``t_s`` (px), None before nucleation."""
        if t_s < self.nucleated_s:
            return None
        return min(self.final_px, self.initial_px + self.rate_px_per_s * (t_s - self.nucleated_s))

    def geometry_at(self, t_s: float) -> WireGeometry | None:
        length = self.length_at(t_s)
        if length is None:
            return None
        start = self.seed
        if not self.forward:  # the seed stays put: the axis start moves back as the wire grows
            a = math.radians(self.angle_deg)
            start = (self.seed[0] - length * math.cos(a), self.seed[1] + length * math.sin(a))
        return WireGeometry(start=start, angle_deg=self.angle_deg, length=length, width=self.width_px,
                            thickness=self.thickness_px, cross_section=self.cross_section,
                            tilt_deg=self.tilt_deg)


class GrowthSample:
    """Wires nucleating and lengthening; nuclei are drawn once, up to ``horizon_s``.

    Wires are deposited in order of nucleation (a wire rests on those that were there before).
    """

    def __init__(self, scene_cfg: SceneConfig, growth: GrowthSection, seed: int, horizon_s: float) -> None:
        self.cfg, self.growth = scene_cfg, growth
        rng = np.random.default_rng(np.random.SeedSequence([seed, 0x6720]))
        times = [0.0] * growth.initial_wires
        if growth.nucleation_per_min > 0:
            end = horizon_s if growth.nucleation_until_s is None else min(horizon_s, growth.nucleation_until_s)
            t = float(rng.exponential(60.0 / growth.nucleation_per_min))
            while t <= end:
                times.append(t)
                t += float(rng.exponential(60.0 / growth.nucleation_per_min))
        self.wires: tuple[GrowingWire, ...] = tuple(self._draw(t, rng) for t in times)

    def _draw(self, t: float, rng: np.random.Generator) -> GrowingWire:
        g, w = self.growth, self.cfg.wires
        nm = self.cfg.pixel_size_nm
        size_x, size_y = self.cfg.domain.width, self.cfg.domain.depth
        m = min(g.margin_px, size_x // 4, size_y // 4)
        width = draw(g.width_nm, rng) / nm
        cs = w.cross_sections
        cross: CrossSection = "rectangle" if rng.uniform(0, cs.rectangle + cs.hexagon) < cs.rectangle else "hexagon"
        return GrowingWire(
            nucleated_s=t,
            seed=(float(rng.uniform(m, size_x - m)), float(rng.uniform(m, size_y - m))),
            angle_deg=float(rng.uniform(0.0, 180.0)),
            forward=bool(rng.uniform() < 0.5),
            width_px=width,
            thickness_px=width * draw(w.thickness_ratio, rng),
            cross_section=cross,
            tilt_deg=float(rng.uniform(0.0, w.tilt_max_deg)),
            initial_px=g.initial_length_nm / nm,
            rate_px_per_s=draw(g.growth_rate_nm_per_s, rng) / nm,
            final_px=draw(g.final_length_nm, rng) / nm,
        )

    def geometries_at(self, t_s: float) -> list[WireGeometry]:
        return [g for w in self.wires if (g := w.geometry_at(t_s)) is not None]

    def scene_at(self, x_um: float, y_um: float, t_s: float) -> Scene:
        return deposit(self.cfg, self.geometries_at(t_s))


def i0_counts(det: DetectorSection, exposure_s: float) -> float:
    """The raw level of an empty pixel, counts: dose plus dark (the daemon's I0, dark not subtracted)."""
    return det.dose_rate * exposure_s + det.dark_counts


def dark_frame(det: DetectorSection, shape: tuple[int, int]) -> np.ndarray:
    """The camera's dark frame (uint16, the constant dark level)."""
    return np.full(shape, round(det.dark_counts), dtype=np.uint16)


def transmission_frame(scene: Scene, det: DetectorSection, exposure_s: float, rng: np.random.Generator) -> np.ndarray:
    """Camera counts (uint16) of ``scene``: OD blurred by the optics, then counted with noise."""
    od = scene.thickness.astype(np.float64) * det.od_per_voxel
    if det.blur_sigma_px > 0:
        od = ndimage.gaussian_filter(od, det.blur_sigma_px)
    counts = transmission_counts(od, det.dose_rate * exposure_s, det.read_noise, rng, dark=det.dark_counts)
    return np.clip(np.rint(counts), 0, 65535).astype(np.uint16)


@dataclass(frozen=True)
class FrameTruth:
    """Ground truth of one frame.

    ``count``: wires in the field (deposited, visible footprint >= the preset's min_visible_area).
    ``length_px_mean``/``width_px_mean``: their drawn axis length and width (whole wire, also the
    part outside the field). ``visible_length_px_mean``/``visible_width_px_mean``: the
    second-moment length and width of their footprints in the field, measured exactly as the
    daemon measures predicted masks (``particle_stats``): the fair reference for its lengths.
    Means are NaN for an empty field. ``*_nm`` = px x ``pixel_size_nm``.
    """

    count: int
    length_px_mean: float
    width_px_mean: float
    visible_length_px_mean: float
    visible_width_px_mean: float
    pixel_size_nm: float

    @property
    def length_nm_mean(self) -> float:
        return self.length_px_mean * self.pixel_size_nm

    @property
    def visible_length_nm_mean(self) -> float:
        return self.visible_length_px_mean * self.pixel_size_nm

    @property
    def visible_width_nm_mean(self) -> float:
        return self.visible_width_px_mean * self.pixel_size_nm

    def to_dict(self) -> dict[str, float | int | None]:
        d: dict[str, float | int | None] = {**asdict(self), "length_nm_mean": self.length_nm_mean,
                                            "visible_length_nm_mean": self.visible_length_nm_mean,
                                            "visible_width_nm_mean": self.visible_width_nm_mean}
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in d.items()}


def frame_truth(scene: Scene, pixel_size_nm: float) -> FrameTruth:
    wires = scene.wires
    if not wires:
        return FrameTruth(0, math.nan, math.nan, math.nan, math.nan, pixel_size_nm)
    masks = np.stack([w.full_mask(scene.shape) for w in wires])
    table = particle_table(masks)
    return FrameTruth(
        count=len(wires),
        length_px_mean=float(np.mean([w.geometry.length for w in wires])),
        width_px_mean=float(np.mean([w.geometry.width for w in wires])),
        visible_length_px_mean=float(np.nanmean(table.length_px)),
        visible_width_px_mean=float(np.nanmean(table.width_px)),
        pixel_size_nm=pixel_size_nm,
    )
