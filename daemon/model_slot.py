"""The serving model and its hot reload: load and warm up beside the old one, then swap.

The swap is one attribute assignment between frames, so a frame is analysed wholly by one model.
A reload that fails to load, to verify or to warm up leaves the old model serving.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from nanoseg.checkpoint import file_sha256, input_shape, load_checkpoint
from nanoseg.config_io import merge
from nanoseg.engines import Engine
from nanoseg.engines.factory import EngineKind, engine_instances, with_max_detections
from nanoseg.engines.triton_engine import TritonTarget
from nanoseg.input_spec import InputSpec
from nanoseg.mask_decoding import with_decoding
from nanoseg.postprocess import PostprocessConfig
from nanoseg.segmenter import Segmenter

if TYPE_CHECKING:
    from nanoseg_daemon.config import ModelSection


@dataclass(frozen=True)
class LoadedModel:
    """A loaded model: ``segmenter`` and, with ``model.instances`` N > 1, N - 1 ``replicas`` (the
    same network and post-processing, each on its own engine), so that N batches run at once;
    ``instance()`` lends one that is free."""

    segmenter: Segmenter
    version: str  # name + short sha256 of the checkpoint file
    path: str
    engine: str
    device: str
    warmup_seconds: float
    replicas: tuple[Segmenter, ...] = ()
    # indices of the engines no one holds; shared with ``with_post``'s model, whose engines are these
    _free: queue.SimpleQueue[int] | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self._free is None:
            free: queue.SimpleQueue[int] = queue.SimpleQueue()
            for i in range(self.instances):
                free.put(i)
            object.__setattr__(self, "_free", free)

    @property
    def spec(self) -> InputSpec:
        return self.segmenter.spec

    @property
    def segmenters(self) -> tuple[Segmenter, ...]:
        """Every instance: ``segmenter`` first, then the ``replicas``."""
        return (self.segmenter, *self.replicas)

    @property
    def instances(self) -> int:
        """Engines of this model that can run at once."""
        return 1 + len(self.replicas)

    @contextmanager
    def instance(self) -> Iterator[Segmenter]:
        """A segmenter of this model no other caller of ``instance`` holds (waits for one)."""
        free = cast("queue.SimpleQueue[int]", self._free)
        i = free.get()
        try:
            yield self.segmenters[i]
        finally:
            free.put(i)

    def with_post(self, post: PostprocessConfig) -> LoadedModel:
        """The same model and engines (lent by both, one caller at a time) with another
        post-processing."""
        return LoadedModel(self.segmenter.with_post(post), self.version, self.path, self.engine, self.device,
                           self.warmup_seconds, tuple(r.with_post(post) for r in self.replicas), self._free)

    def describe(self, profile: str) -> tuple[str, dict[str, Any]]:
        """The version and the processing settings an analysis run's start records (``profile``:
        the default frame profile)."""
        return self.version, {"profile": profile, "engine": self.engine,
                              "postprocess": self.segmenter.post.model_dump(mode="json")}


def load_model(path: str | Path, engine: EngineKind, device: str, threads: int, post: PostprocessConfig,
               onnx_path: str | Path | None = None, expected_sha256: str | None = None,
               cache_dir: Path | None = None, triton: TritonTarget | None = None,
               mask_tta: int | None = None, max_detections: int | None = None,
               null_detections: int | None = None, instances: int = 1) -> LoadedModel:
    """Load, verify (optional sha256) and warm up a model; raises on any failure. ``mask_tta``
    replaces the view count of the model's mask decoding (None keeps it); ``max_detections`` the
    model's cap of detections per input (``with_max_detections``; None keeps it);
    ``null_detections`` the rods per input of engine null (None: all); ``instances`` the engines
    that run batches at once (each with ``threads`` CPU threads)."""
    p = Path(path)
    digest = file_sha256(p)
    if expected_sha256 and digest != expected_sha256:
        raise ValueError(f"{p}: sha256 {digest[:12]}... does not match the expected {expected_sha256[:12]}...")
    ckpt = load_checkpoint(p)
    if max_detections is not None:
        ckpt = with_max_detections(ckpt, max_detections)
    engines: list[Engine] = engine_instances(ckpt, engine, instances, device, threads, onnx_path, cache_dir, triton,
                                             with_decoding(ckpt.mask_decoding, tta=mask_tta),
                                             null_detections=null_detections)
    segs = [Segmenter.for_checkpoint(eng, ckpt, post) for eng in engines]
    t0 = time.perf_counter()
    _, h, w = input_shape(ckpt)
    for seg in segs:
        seg.infer_tiles(np.zeros((1, h, w), np.float32))  # first run allocates; an empty frame must work
    name = str(ckpt.meta.get("name", p.stem))
    return LoadedModel(segs[0], f"{name}@{digest[:12]}", str(p), engines[0].name, engines[0].device,
                       time.perf_counter() - t0, tuple(segs[1:]))


def repo_relative(path: str) -> Path:
    """A model path as given, or from the repository root when it does not exist as given."""
    p = Path(path).expanduser()
    if p.is_absolute() or p.exists():
        return p
    from nanoseg.paths import REPO_ROOT

    return REPO_ROOT / p


def load_configured(m: ModelSection, post: PostprocessConfig, cache_dir: Path) -> LoadedModel:
    """``load_model`` with the config's ``model`` section (relative paths from the repository root)."""
    return load_model(repo_relative(m.path), m.engine, m.device, m.threads, post,
                      repo_relative(m.onnx_path) if m.onnx_path else None, m.sha256, cache_dir,
                      m.triton_target(), m.mask_tta, m.max_detections, m.null_detections, m.instances)


class ModelSlot:
    """Holds the current model; ``reload`` builds a new one off the hot path and swaps it in.

    The slot remembers the post-processing the operator configured (config file, control ``set``)
    apart from the one in effect: a reloaded model brings its own operating point, and only the
    configured fields override it."""

    def __init__(self, model: LoadedModel, configured: PostprocessConfig | None = None) -> None:
        self._model = model
        self._configured = configured if configured is not None else PostprocessConfig()
        self._lock = threading.Lock()  # one reload at a time
        self._swap = threading.Lock()  # a swap and a set_postprocess, one at a time (short)

    @property
    def current(self) -> LoadedModel:
        return self._model

    @property
    def configured(self) -> PostprocessConfig:
        """The explicitly configured post-processing fields (``model_fields_set``) over defaults."""
        return self._configured

    def set_postprocess(self, updates: dict[str, Any]) -> PostprocessConfig:
        """Set post-processing fields on the serving model (and on later reloads); returns the
        post-processing now in effect. Raises ``ValueError`` naming a bad field.

        A sub-object (``nested``) is merged field by field, like the top level: setting one of its
        fields keeps the others as they were set before."""
        with self._swap:
            configured = PostprocessConfig.model_validate(merge(self._configured.model_dump(exclude_unset=True),
                                                                updates))
            post = PostprocessConfig.model_validate(merge(self._model.segmenter.post.model_dump(), updates))
            self._configured = configured
            self._model = self._model.with_post(post)
            return post

    def reload(self, path: str | Path, engine: EngineKind, device: str, threads: int,
               onnx_path: str | Path | None = None, expected_sha256: str | None = None,
               cache_dir: Path | None = None, triton: TritonTarget | None = None,
               mask_tta: int | None = None, max_detections: int | None = None,
               null_detections: int | None = None, instances: int = 1) -> LoadedModel:
        """Swap to the model at ``path``; on any error the old model stays and the error is raised.

        ``set_postprocess`` may run while the new model loads: what it set is applied to the new
        model at the swap, as to the old one."""
        with self._lock:
            configured = self._configured
            new = load_model(path, engine, device, threads, configured, onnx_path,
                             expected_sha256, cache_dir, triton, mask_tta, max_detections, null_detections,
                             instances)
            with self._swap:
                if self._configured is not configured:  # set during the load: over the new model's point too
                    updates = self._configured.model_dump(exclude_unset=True)
                    new = new.with_post(PostprocessConfig.model_validate(
                        merge(new.segmenter.post.model_dump(), updates)))
                self._model = new
            return new
