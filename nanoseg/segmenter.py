"""One frame pipeline: prepare -> engine -> post-process -> instances on the original frame.

The daemon drives it from sockets, ``nanoseg segment`` and ``nanoseg evaluate`` from files.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from nanoseg.checkpoint import Checkpoint
from nanoseg.engines import Engine, RawDetections
from nanoseg.engines.factory import input_spec_of
from nanoseg.input_spec import InputSpec
from nanoseg.instances import Instances
from nanoseg.model import mask_grid_offset_px
from nanoseg.postprocess import (
    PostprocessConfig,
    filter_instances,
    resolve_postprocess,
    to_instances,
)
from nanoseg.prepare import PreparedFrame, instances_to_frame


@dataclass
class Segmenter:
    engine: Engine
    spec: InputSpec
    post: PostprocessConfig
    mask_offset_px: float = 0.0
    """Where the model's mask grid sits relative to its boxes (``mask_grid_offset_px``)."""
    mask_margin_px: float = 0.0
    """How far the engine's mask grid reaches beyond each box (``MaskDecoding.margin_px``)."""

    @classmethod
    def for_checkpoint(cls, engine: Engine, ckpt: Checkpoint, post: PostprocessConfig) -> Segmenter:
        """A segmenter with the input spec, mask convention and operating point of the checkpoint
        ``engine`` runs (and the engine's mask decoding); fields ``post`` sets explicitly override
        the model's operating point."""
        return cls(engine, input_spec_of(ckpt), resolve_postprocess(post, ckpt.operating_point),
                   mask_grid_offset_px(ckpt.model_config), engine.mask_decoding.margin_px)

    def with_post(self, post: PostprocessConfig) -> Segmenter:
        """The same model with another post-processing."""
        return Segmenter(self.engine, self.spec, post, self.mask_offset_px, self.mask_margin_px)

    def detect_tiles(self, tiles: np.ndarray) -> list[RawDetections]:
        """The network's raw detections per (size x size) model-input tile, before any threshold."""
        c = self.engine.input_shape[0]
        out: list[RawDetections] = []
        step = max(self.engine.max_batch, 1)
        for i in range(0, len(tiles), step):
            batch = np.repeat(tiles[i: i + step, None], c, axis=1).astype(np.float32)
            out.extend(self.engine.infer(batch))
        return out

    def infer_tiles(self, tiles: np.ndarray) -> list[Instances]:
        """Instances per (size x size) model-input tile, in tile coordinates."""
        return [to_instances(raw, tile.shape, self.post, self.mask_offset_px, self.mask_margin_px)
                for raw, tile in zip(self.detect_tiles(tiles), tiles)]

    def segment_prepared(self, prepared: PreparedFrame, max_instances: int | None = None) -> Instances:
        """Instances on the frame; ``max_instances``: the best-scored ones only (e.g. the detections
        per image COCOeval counts), which bounds the memory of a frame of many tiles."""
        per_tile = self.infer_tiles(prepared.tiles)
        return filter_instances(instances_to_frame(per_tile, prepared, max_instances), self.post)

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
