"""One frame pipeline: prepare -> engine -> post-process -> instances on the original frame ->
particle table.

``Segmenter.analyse`` is the one path from a prepared frame to its particle table: the daemon
drives it from sockets, ``nanoseg segment`` from files. ``segment_gray`` is the same engine and
post-processing for images already at the model's scale (``nanoseg evaluate``'s data sets).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from numpy.typing import ArrayLike

from nanoseg.checkpoint import Checkpoint
from nanoseg.engines import Engine, RawDetections
from nanoseg.engines.factory import input_spec_of
from nanoseg.frame_profile import FrameProfile
from nanoseg.input_spec import FrameMode, InputSpec
from nanoseg.instances import Instances
from nanoseg.model import mask_grid_offset_px
from nanoseg.mosaic import pack_mosaic, plan_mosaics, split_detections
from nanoseg.particle_stats import FrameSummary, ParticleTable, frame_statistics
from nanoseg.postprocess import (
    PostprocessConfig,
    cap_instances,
    filter_instances,
    instance_scores,
    resolve_postprocess,
    to_instances,
)
from nanoseg.prepare import (
    PreparedFrame,
    ScaleChooser,
    instances_to_frame,
    prepare_frame,
    resample_to_model_scale,
    to_model_input,
)
from nanoseg.scale import CONFIDENCE_SCALES, ScaleChoice, pick_confident_scale, top_k_confidence
from nanoseg.summary_stats import StatisticsConfig
from nanoseg.tiling import FrameTiles, TileStack, made_tiles, plan_tiles, write_tile


@dataclass(frozen=True)
class FrameAnalysis:
    """One frame's result: instances in original frame pixels (x right, y down), their particle
    table (px, and nm where a pixel size is known) and its summary."""

    instances: Instances
    table: ParticleTable
    summary: FrameSummary
    instances_capped: int = 0
    """Instances beyond ``PostprocessConfig.max_instances``, dropped (highest scores kept)."""


@dataclass
class Segmenter:
    engine: Engine
    spec: InputSpec
    post: PostprocessConfig
    mask_offset_px: float = 0.0
    """Where the model's mask grid sits relative to its boxes (``mask_grid_offset_px``)."""
    mask_margin_px: float = 0.0
    """How far the engine's mask grid reaches beyond each box (``MaskDecoding.margin_px``)."""
    device_post: bool | None = None
    """Post-process on the engine's device: None = where it runs on CUDA (``post_on_device``)."""
    _buffers: _BatchBuffers = field(default_factory=lambda: _BatchBuffers(), init=False, repr=False, compare=False)

    @classmethod
    def for_checkpoint(cls, engine: Engine, ckpt: Checkpoint, post: PostprocessConfig) -> Segmenter:
        """A segmenter with the input spec, mask convention and operating point of the checkpoint
        ``engine`` runs (and the engine's mask decoding); fields ``post`` sets explicitly override
        the model's operating point."""
        return cls(engine, input_spec_of(ckpt), resolve_postprocess(post, ckpt.operating_point),
                   mask_grid_offset_px(ckpt.model_config), engine.mask_decoding.margin_px)

    def with_post(self, post: PostprocessConfig) -> Segmenter:
        """The same model with another post-processing."""
        return Segmenter(self.engine, self.spec, post, self.mask_offset_px, self.mask_margin_px, self.device_post)

    def _batches(self, tiles: Sequence[TileStack]) -> Iterator[np.ndarray]:
        """The engine's input batches (B, C, size, size) float32 over several frames' tiles
        ((T_i, size, size) each, made or described), in order, at most ``engine.max_batch`` each,
        channels repeated. Tiles made already of one frame (one channel) are a view; else the
        tiles are written into a buffer lent for the batch and reused by later ones (the engine
        keeps no reference to its input: ``Engine.infer``), so a small frame's padding never
        costs fresh memory."""
        c, h, w = self.engine.input_shape
        step = max(self.engine.max_batch, 1)
        for frame in tiles:  # a buffer's slot would pad or cut a tile of another size without a word
            if len(frame) and tuple(frame.shape[1:]) != (h, w):
                raise ValueError(f"tiles of {frame.shape[1]} x {frame.shape[2]} px for an engine taking {h} x {w}")
        flat = [(f, t) for f, frame in enumerate(tiles) for t in range(len(frame))]
        for i in range(0, len(flat), step):
            chunk = flat[i: i + step]
            (f0, t0), (f1, t1) = chunk[0], chunk[-1]
            made = made_tiles(tiles[f0]) if f0 == f1 and c == 1 else None
            if made is not None:
                yield made[t0: t1 + 1, None].astype(np.float32, copy=False)
                continue
            with self._buffers.lend(min(step, len(flat)), (c, h, w)) as buffer:
                batch = buffer[: len(chunk)]
                for k, (f, t) in enumerate(chunk):
                    write_tile(tiles[f], t, batch[k, 0])
                if c > 1:
                    batch[:, 1:] = batch[:, :1]
                yield batch

    def detect_tiles(self, tiles: TileStack) -> list[RawDetections]:
        """The network's raw detections per (size x size) model-input tile, before any threshold."""
        return self.detect_frames([tiles])[0]

    def detect_frames(self, tiles: Sequence[TileStack]) -> list[list[RawDetections]]:
        """Raw detections of several frames' tiles ((T_i, size, size) each, made or described:
        ``FrameTiles``, as ``PreparedFrame.inputs``), through the engine
        together: the tiles of all frames, in order, in calls of up to ``engine.max_batch``.

        Returns
        -------
        list of list of RawDetections
            Per frame, one per tile, in tile order (as ``detect_tiles`` on each frame alone).
        """
        raw = [r for batch in self._batches(tiles) for r in self.engine.infer(batch)]
        out, k = [], 0
        for frame in tiles:
            out.append(raw[k: k + len(frame)])
            k += len(frame)
        return out

    def detect_packed(self, tiles: Sequence[TileStack], shapes: Sequence[tuple[int, int] | None],
                      gap: int) -> list[list[RawDetections]]:
        """``detect_frames``, with the frames small enough packed several to a model input
        (``nanoseg.mosaic``): the network runs once per mosaic instead of once per frame.

        Parameters
        ----------
        tiles : sequence of ndarray or FrameTiles
            Per frame, its tiles ((T_i, size, size), padded at the bottom and right).
        shapes : sequence of (int, int) or None
            Per frame, its content's (height, width) at model scale, px, when it is one tile;
            None for a frame of several tiles (it runs alone).
        gap : int
            Padding kept right of and below each packed frame, px.

        Returns
        -------
        list of list of RawDetections
            Per frame, one per tile (a packed frame: its share of the mosaic's detections, in
            its own tile's coordinates).
        """
        mosaics = plan_mosaics([s if len(t) == 1 else None for t, s in zip(tiles, shapes)], self.spec.size, gap)
        packed = {i for m in mosaics for i in m.frames}
        alone = [i for i in range(len(tiles)) if i not in packed]
        inputs = [tiles[i] for i in alone] + [pack_mosaic(m, [tiles[i] for i in m.frames])[None] for m in mosaics]
        raws = self.detect_frames(inputs)
        out: list[list[RawDetections]] = [[] for _ in tiles]
        for i, raw in zip(alone, raws):
            out[i] = raw
        for m, raw in zip(mosaics, raws[len(alone):]):
            for i, det in zip(m.frames, split_detections(m, raw[0])):
                out[i] = [det]
        return out

    def prepare(self, frame: ArrayLike, profile: FrameProfile, *, flat_field: ArrayLike | None = None,
                dark_frame: ArrayLike | None = None, pixel_size_nm: float | Literal["auto"] | None = None,
                scale_chooser: ScaleChooser | None = None) -> PreparedFrame:
        """``nanoseg.prepare.prepare_frame`` for this segmenter's model (same arguments); an
        ``auto`` pixel size (given, or the profile's) is chosen by ``scale_chooser``, by default
        this segmenter's ``choose_scale``."""
        return prepare_frame(frame, profile, self.spec, flat_field=flat_field, dark_frame=dark_frame,
                             pixel_size_nm=pixel_size_nm, scale_chooser=scale_chooser or self.choose_scale)

    def choose_scale(self, image: np.ndarray, mode: FrameMode = "optical_density",
                     scales: tuple[float, ...] = CONFIDENCE_SCALES) -> ScaleChoice:
        """The resampling at which the model is most confident of the frame's objects.

        The centre of the frame, one model input (``spec.size`` px square at model scale), is
        run through the model at each scale; ``nanoseg.scale.pick_confident_scale`` picks from
        the mean score of the best detections at each. One model pass per scale (9 by default).

        Parameters
        ----------
        image : ndarray, shape (H, W)
            The converted frame (optical density or intensity, bright objects on a dark
            background), frame px.
        mode : {"optical_density", "intensity"}
            How ``image`` maps to the model's input (``to_model_input``).
        scales : tuple of float
            Model px per frame px to try.

        Returns
        -------
        ScaleChoice
            Method ``confidence``, the chosen scale and pixel size (nm) and its confidence.
        """
        gray = to_model_input(np.asarray(image, dtype=np.float32), self.spec, mode)
        size = self.spec.size
        h, w = gray.shape
        views = []
        for s in scales:
            side = int(np.ceil(size / s)) + 2
            y0, x0 = max(0, (h - side) // 2), max(0, (w - side) // 2)
            view = resample_to_model_scale(gray[y0: y0 + side, x0: x0 + side], self.spec.pixel_size_nm * s,
                                           self.spec)[0][:size, :size]
            views.append(FrameTiles(view, tuple(plan_tiles(view.shape, size, 0))))  # one tile, padded with its median
        raws = [raw for tiles in self.detect_frames(views) for raw in tiles]
        conf = [top_k_confidence(instance_scores(raw, self.post)) for raw in raws]
        return pick_confident_scale(scales, conf, self.spec.pixel_size_nm)

    def infer_tiles(self, tiles: TileStack, detections: Sequence[RawDetections] | None = None) -> list[Instances]:
        """Instances per (size x size) model-input tile, in tile coordinates (``detections``: the
        tiles' raw detections when the engine ran already, ``detect_frames``). Where the engine
        runs on CUDA and can leave its outputs there, scores, thresholds and mask pasting run on
        the device too (``nanoseg.device_postprocess``)."""
        if self.post_on_device and detections is None:
            return self._infer_tiles_on_device(tiles)
        raw = self.detect_tiles(tiles) if detections is None else detections
        shape = (tiles.shape[1], tiles.shape[2])
        return [to_instances(r, shape, self.post, self.mask_offset_px, self.mask_margin_px) for r in raw]

    @property
    def post_on_device(self) -> bool:
        """Post-processing on the engine's device: ``device_post`` if set, else where the engine
        runs on CUDA and has ``infer_device``."""
        if self.device_post is not None:
            return self.device_post and hasattr(self.engine, "infer_device")
        return str(self.engine.device).startswith("cuda") and hasattr(self.engine, "infer_device")

    def _infer_tiles_on_device(self, tiles: TileStack) -> list[Instances]:
        from nanoseg import device_postprocess as dp  # torch only where it runs

        infer_device = self.engine.infer_device  # type: ignore[attr-defined]  # post_on_device checked it
        dets = [det for batch in self._batches([tiles]) for det in dp.split_device_outputs(*infer_device(batch))]
        shape = (tiles.shape[1], tiles.shape[2])
        return [dp.to_instances(det, shape, self.post, self.mask_offset_px, self.mask_margin_px)
                for det in dets]

    def segment_prepared(self, prepared: PreparedFrame, timings: dict[str, float] | None = None,
                         max_instances: int | None = None) -> Instances:
        """Instances of a prepared frame in original frame pixels (x right, y down).

        ``timings``, when given, receives seconds per step: ``infer`` (engine and per-tile
        instances) and ``postprocess`` (tile merge, back to frame pixels, cap, filters).
        ``max_instances``: keep the best-scored ones only (e.g. the detections per image COCOeval
        counts), applied when the tiles are merged.
        """
        return self._segment(prepared, timings, max_instances)[0]

    def _segment(self, prepared: PreparedFrame, timings: dict[str, float] | None,
                 max_instances: int | None = None,
                 detections: Sequence[RawDetections] | None = None) -> tuple[Instances, int]:
        t0 = time.perf_counter()
        per_tile = self.infer_tiles(prepared.inputs, detections)
        t1 = time.perf_counter()
        merged = instances_to_frame(per_tile, prepared, max_instances)
        inst, capped = cap_instances(merged, self.post.max_instances)
        inst = filter_instances(inst, self.post)
        if timings is not None:
            timings.update(infer=timings.get("infer", 0.0) + t1 - t0, postprocess=time.perf_counter() - t1)
        return inst, capped

    def analyse(self, prepared: PreparedFrame, pixel_size_nm: float | None,
                timings: dict[str, float] | None = None,
                detections: Sequence[RawDetections] | None = None,
                statistics: StatisticsConfig | None = None) -> FrameAnalysis:
        """Frame -> instances -> particle table: the one path the daemon and ``nanoseg segment`` share.

        Parameters
        ----------
        prepared
            The frame from ``nanoseg.prepare.prepare_frame`` with this segmenter's ``spec``.
        pixel_size_nm
            Size of one original frame pixel in nm, for the table's nm columns; None: px only.
        timings
            When given, receives seconds per step: ``infer``, ``postprocess`` (see
            ``segment_prepared``) and ``stats`` (table and summary); an ``infer`` already there
            (the frame's share of a batch the engine ran) is added to.
        detections
            The frame's raw detections per tile when the engine ran already (``detect_frames``,
            several frames in one batch); None runs the engine on the frame's tiles.
        statistics
            How the summary counts and what intervals it gives (edge rule, bootstrap); None:
            ``StatisticsConfig()`` (``include``).

        Returns
        -------
        FrameAnalysis
            The instances, their table and its summary. The table's mean optical density comes
            from ``prepared.image`` when the frame was prepared as optical density.
        """
        inst, capped = self._segment(prepared, timings, detections=detections)
        stats = frame_statistics(inst.box_masks, prepared.optical_density, pixel_size_nm, statistics)
        if timings is not None:
            timings["stats"] = stats.seconds
        return FrameAnalysis(inst, stats.table, stats.summary, capped)

    def detected_instances(self, prepared: PreparedFrame, detections: Sequence[RawDetections],
                           timings: dict[str, float] | None = None) -> tuple[Instances, int]:
        """``analyse`` up to the instances, for a caller that measures them elsewhere
        (``particle_stats.frame_statistics`` on ``inst.box_masks`` and ``prepared.optical_density``).

        Parameters
        ----------
        prepared
            The frame from ``nanoseg.prepare.prepare_frame`` with this segmenter's ``spec``.
        detections
            The frame's raw detections per tile (``detect_frames``).
        timings
            When given, receives ``infer`` (added to) and ``postprocess`` seconds.

        Returns
        -------
        tuple of (Instances, int)
            The frame's instances in original frame pixels, and how many the cap removed.
        """
        return self._segment(prepared, timings, detections=detections)

    def segment_gray(self, gray: np.ndarray) -> Instances:
        """A 0–255 image already at the model's scale and mapping (e.g. a synthetic data set image)."""
        h, w = gray.shape
        size = self.spec.size
        if (h, w) != (size, size):
            padded = np.zeros((max(h, size), max(w, size)), np.float32)
            padded[:h, :w] = gray
            if padded.shape != (size, size):
                raise ValueError(f"segment_gray takes images up to {size}x{size}; use prepare_frame to tile")
            inst = self.infer_tiles(padded[None])[0]
            inst = Instances(inst.boxes, inst.scores, np.ascontiguousarray(inst.masks[:, :h, :w]))
        else:
            inst = self.infer_tiles(gray[None].astype(np.float32))[0]
        return filter_instances(inst, self.post)


class _BatchBuffers:
    """Batch buffers (B, C, H, W) float32 lent one batch at a time and kept for the next: a
    segmenter's threads (the daemon's engine stage, a scale search in its preparation) each get
    one of their own; at most ``keep`` wait between batches, each of up to ``max_batch`` inputs,
    for the segmenter's life. Holding a lock, a segmenter is not pickled or deep-copied (nothing
    does)."""

    def __init__(self, keep: int = 2) -> None:
        self._free: list[np.ndarray] = []
        self._lock = threading.Lock()
        self._keep = keep

    @contextmanager
    def lend(self, n: int, image: tuple[int, int, int]) -> Iterator[np.ndarray]:
        """A buffer of at least ``n`` inputs of shape ``image`` (C, H, W), its contents whatever
        the last batch left, for the ``with`` block (use its first ``n``)."""
        with self._lock:
            fits = [k for k, b in enumerate(self._free) if b.shape[0] >= n and b.shape[1:] == image]
            buffer = self._free.pop(min(fits, key=lambda k: len(self._free[k]))) if fits else None  # the smallest
        if buffer is None:
            buffer = np.empty((n, *image), np.float32)
        try:
            yield buffer
        finally:
            with self._lock:
                self._free.append(buffer)
                if len(self._free) > self._keep:  # keep the largest
                    del self._free[min(range(len(self._free)), key=lambda k: len(self._free[k]))]
