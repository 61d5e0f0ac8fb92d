"""One synthetic scene: wires drawn, deposited one after another, projected and rendered.

The voxel domain is never materialised: each wire is a set of voxel columns (``wire_geometry``)
and the scene keeps a top map (index of the first free voxel in every column) and the summed
thickness map, which is what the projection needs. ``voxelise`` builds the full boolean volume
for small domains so tests can compare against brute force.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

from nanoseg_training.synthetic_config import IntRange, Range, SceneConfig
from nanoseg_training.wire_geometry import (
    CrossSection,
    EndCap,
    WireColumns,
    WireGeometry,
    rasterise,
)

MAX_DRAWS_PER_WIRE = 20


@dataclass(frozen=True)
class DepositedWire:
    """A wire as placed in the scene, with its footprint (mask) in the full field."""

    geometry: WireGeometry
    box: tuple[int, int, int, int]  # (y0, y1, x0, x1) of ``counts``
    counts: np.ndarray  # voxels per column inside box (int32)
    lowest: np.ndarray  # index of the lowest voxel per column inside box (int32)
    truncated: bool  # footprint touches the field border

    @property
    def local_mask(self) -> np.ndarray:
        return self.counts > 0

    def full_mask(self, shape: tuple[int, int]) -> np.ndarray:
        m = np.zeros(shape, dtype=bool)
        y0, y1, x0, x1 = self.box
        m[y0:y1, x0:x1] = self.local_mask
        return m

    @property
    def area(self) -> int:
        return int(np.count_nonzero(self.counts))


@dataclass(frozen=True)
class Scene:
    """Output of one scene: thickness map (voxels), surface and top-label maps, wires."""

    config: SceneConfig
    thickness: np.ndarray  # (H, W) summed voxels per column, int32
    top: np.ndarray  # (H, W) index of the first free voxel per column (0 = bare substrate)
    top_label: np.ndarray  # (H, W) index+1 of the wire owning the top voxel, 0 = substrate
    wires: tuple[DepositedWire, ...]
    dropped: int  # wires drawn but not placed (outside, hidden, too high)

    @property
    def shape(self) -> tuple[int, int]:
        return self.thickness.shape


def draw(r: Range, rng: np.random.Generator) -> float:
    if r.distribution == "loguniform":
        return float(math.exp(rng.uniform(math.log(r.low), math.log(r.high))))
    return float(rng.uniform(r.low, r.high))


def draw_int(r: IntRange, rng: np.random.Generator) -> int:
    if r.distribution == "loguniform":
        return min(int(math.exp(rng.uniform(math.log(r.low), math.log(r.high + 1)))), r.high)
    return int(rng.integers(r.low, r.high + 1))


def draw_wire(cfg: SceneConfig, rng: np.random.Generator, earlier: list[DepositedWire]) -> WireGeometry:
    """Draw one wire's shape and in-plane placement (z is set by deposition)."""
    w = cfg.wires
    npm = cfg.non_prismatic
    W, B = cfg.domain.width, cfg.domain.depth
    if w.aspect_ratio is None:
        length = draw(w.length, rng)
        width = draw(w.width, rng)
    else:
        width = draw(w.width, rng)
        length = min(max(width * draw(w.aspect_ratio, rng), w.length.low), w.length.high)
    thickness = width * draw(w.thickness_ratio, rng)
    cs = w.cross_sections
    cross: CrossSection = "rectangle" if rng.uniform(0, cs.rectangle + cs.hexagon) < cs.rectangle else "hexagon"
    angle = float(rng.uniform(0.0, 180.0))
    tilt = float(rng.uniform(0.0, w.tilt_max_deg))
    a = math.radians(angle)
    ux, uy = math.cos(a), -math.sin(a)
    if earlier and rng.uniform() < npm.sintering.probability:
        host = earlier[int(rng.integers(len(earlier)))].geometry
        t = float(rng.uniform(0.1, 0.9)) * host.length
        hx, hy = host.direction
        sx, sy = host.start[0] + t * hx, host.start[1] + t * hy
    else:
        m = w.field_margin
        cx = float(rng.uniform(-m * W, (1 + m) * W))
        cy = float(rng.uniform(-m * B, (1 + m) * B))
        sx, sy = cx - 0.5 * length * ux, cy - 0.5 * length * uy
    taper = float(rng.uniform(0, npm.taper.max_fraction)) if rng.uniform() < npm.taper.probability else 0.0
    sagitta = 0.0
    if rng.uniform() < npm.bend.probability:
        sagitta = float(rng.uniform(-1, 1)) * npm.bend.max_sagitta_fraction * length
    coeffs: tuple[float, ...] = ()
    phases: tuple[float, ...] = ()
    if rng.uniform() < npm.roughness.probability:
        amps = rng.normal(0.0, 1.0, 4) / np.arange(1, 5)
        amps *= npm.roughness.amplitude / max(float(np.sum(np.abs(amps))), 1e-9)
        coeffs = tuple(float(v) for v in amps)
        phases = tuple(float(v) for v in rng.uniform(0, 2 * math.pi, 4))
    return WireGeometry(
        start=(sx, sy), angle_deg=angle, length=length, width=width, thickness=thickness,
        cross_section=cross, tilt_deg=tilt, taper=taper, sagitta=sagitta,
        rough_coeffs=coeffs, rough_phases=phases, end_cap=draw_end_cap(cfg, rng),
    )


def draw_end_cap(cfg: SceneConfig, rng: np.random.Generator) -> EndCap:
    """The end shape by the preset's weights; draws nothing when only flat ends are possible."""
    caps = cfg.wires.end_caps
    if caps.round + caps.faceted <= 0:
        return "flat"
    r = rng.uniform(0.0, caps.flat + caps.round + caps.faceted)
    if r < caps.flat:
        return "flat"
    return "round" if r < caps.flat + caps.round else "faceted"


def bundle_neighbours(g: WireGeometry, cfg: SceneConfig, rng: np.random.Generator) -> list[WireGeometry]:
    """Parallel neighbours of ``g`` forming a bundle (alternating sides), or none.

    Draws nothing when bundles are off, so presets without them keep their random stream.
    """
    b = cfg.non_prismatic.bundle
    if b.probability <= 0 or rng.uniform() >= b.probability:
        return []
    ux, uy = g.direction
    nx, ny = -uy, ux  # across the axis
    out = []
    for j in range(1, draw_int(b.size, rng)):
        step = g.width * (1.0 + draw(b.gap, rng))
        k = (j + 1) // 2 * (1 if j % 2 else -1)
        shift = float(rng.uniform(-0.15, 0.15)) * g.length  # staggered ends
        start = (g.start[0] + k * step * nx + shift * ux, g.start[1] + k * step * ny + shift * uy)
        out.append(replace(g, start=start, length=g.length * float(rng.uniform(0.8, 1.2)), z0=0.0))
    return out


def resting_height(cols: WireColumns, top: np.ndarray, tilt_deg: float) -> float:
    """Lowest z0 such that every column's bottom is at or above the current top map.

    Columns are compared in voxel units: a bottom at or above the first free voxel ``top`` can
    never share a voxel with earlier wires, and the maximum makes the wire's bottom touch the top
    of earlier voxels in at least one column. Every column with material counts, thin rims too:
    the wire is solid, so a rim that holds no voxel of its own (a hexagon edge thinner than half
    a voxel) still rests on what lies below it; the feasible heights are then one interval.
    """
    if cols.s.size == 0:
        return 0.0
    y0, _, x0, _ = cols.box
    need = top[cols.rows + y0, cols.cols + x0] - cols.bottom(0.0, tilt_deg)
    return max(0.0, float(need.max()))


def place_wire(
    g: WireGeometry, cfg: SceneConfig, top: np.ndarray, thickness: np.ndarray,
    top_label: np.ndarray, label: int,
) -> DepositedWire | None:
    """Deposit ``g`` on the surface ``top``, updating the maps in place; None if it cannot be placed.

    A wire is not placed when it misses the field, its footprint in the field is below
    ``min_visible_area`` or it would stick out of the top of the domain.
    """
    H, W = top.shape
    cols = rasterise(g, (H, W))
    if cols is None:
        return None
    z0 = resting_height(cols, top, g.tilt_deg)
    counts, lowest = cols.voxel_runs(z0, g.tilt_deg)
    has = counts > 0
    visible = int(np.count_nonzero(has))
    if visible == 0 or visible < cfg.wires.min_visible_area:
        return None
    y0, _, x0, _ = cols.box
    rows, columns = cols.rows[has] + y0, cols.cols[has] + x0  # in the field
    surface = lowest[has] + counts[has]
    if int(surface.max()) > cfg.domain.height:
        return None
    top[rows, columns] = surface
    thickness[rows, columns] += counts[has]
    top_label[rows, columns] = label
    truncated = bool(rows.min() == 0 or columns.min() == 0 or rows.max() == H - 1 or columns.max() == W - 1)
    return DepositedWire(replace(g, z0=z0), cols.box, cols.box_map(counts, np.int32),
                         cols.box_map(lowest, np.int32), truncated)


def _empty_maps(cfg: SceneConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Top, thickness and top-label maps of an empty substrate, (depth, width) int32."""
    shape = (cfg.domain.depth, cfg.domain.width)
    return (np.zeros(shape, np.int32), np.zeros(shape, np.int32), np.zeros(shape, np.int32))


def generate_scene(cfg: SceneConfig, rng: np.random.Generator) -> Scene:
    """Draw and deposit wires one after another; each rests on the substrate or on earlier wires."""
    top, thickness, top_label = _empty_maps(cfg)
    placed: list[DepositedWire] = []
    dropped = 0
    n = draw_int(cfg.wires.count, rng)
    for _ in range(n):
        for _attempt in range(MAX_DRAWS_PER_WIRE):
            g = draw_wire(cfg, rng, placed)
            wire = place_wire(g, cfg, top, thickness, top_label, len(placed) + 1)
            if wire is None:
                dropped += 1  # outside, too small or too high: draw again
                continue
            placed.append(wire)
            for h in bundle_neighbours(g, cfg, rng):
                neighbour = place_wire(h, cfg, top, thickness, top_label, len(placed) + 1)
                if neighbour is None:
                    dropped += 1
                else:
                    placed.append(neighbour)
            break
    return Scene(cfg, thickness, top, top_label, tuple(placed), dropped)


def deposit(cfg: SceneConfig, geometries: list[WireGeometry]) -> Scene:
    """Deposit given wires in order (their ``z0`` is ignored and set by deposition)."""
    top, thickness, top_label = _empty_maps(cfg)
    placed: list[DepositedWire] = []
    for g in geometries:
        wire = place_wire(g, cfg, top, thickness, top_label, len(placed) + 1)
        if wire is not None:
            placed.append(wire)
    return Scene(cfg, thickness, top, top_label, tuple(placed), len(geometries) - len(placed))


def drop_hidden(scene: Scene, min_visible: int) -> Scene:
    """Remove wires whose visible (topmost) area is below ``min_visible`` — for surface imaging.

    The removed wires' voxels are taken out of the thickness, top and label maps, so image and
    labels stay consistent.
    """
    visible = np.bincount(scene.top_label.ravel(), minlength=len(scene.wires) + 1)[1:]
    keep = [i for i, v in enumerate(visible) if v >= min_visible]
    if len(keep) == len(scene.wires):
        return scene
    shape = scene.shape
    thickness = np.zeros(shape, dtype=np.int32)
    top = np.zeros(shape, dtype=np.int32)
    top_label = np.zeros(shape, dtype=np.int32)
    wires: list[DepositedWire] = []
    for i in keep:
        w = scene.wires[i]
        y0, y1, x0, x1 = w.box
        occ = w.counts > 0
        thickness[y0:y1, x0:x1] += w.counts
        t = top[y0:y1, x0:x1]
        higher = occ & ((w.lowest + w.counts) > t)
        t[higher] = (w.lowest + w.counts)[higher]
        top_label[y0:y1, x0:x1][higher] = len(wires) + 1
        wires.append(w)
    return replace(
        scene, thickness=thickness, top=top, top_label=top_label, wires=tuple(wires),
        dropped=scene.dropped + len(scene.wires) - len(keep),
    )


def voxelise(scene: Scene) -> np.ndarray:
    """The full boolean voxel volume (z, y, x) of label ids (0 = empty); for tests on small domains."""
    H, W = scene.shape
    vol = np.zeros((scene.config.domain.height, H, W), dtype=np.int32)
    for i, w in enumerate(scene.wires, start=1):
        y0, y1, x0, x1 = w.box
        ks = np.arange(vol.shape[0])[:, None, None]
        inside = (ks >= w.lowest[None]) & (ks < (w.lowest + w.counts)[None])
        sub = vol[:, y0:y1, x0:x1]
        if np.any(sub[inside] != 0):
            raise AssertionError(f"wire {i} interpenetrates an earlier wire")
        sub[inside] = i
    return vol
