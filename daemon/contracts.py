"""The daemon's internal contracts: what ingest produces, what the pipeline hands on.

Transport (sockets, framing), routing (what a bluesky document means), the pipeline (frames ->
results), the store and the publishers meet only through these types.

Flow::

    ingest (bluesky router | raw frames)  --RunStarted/FrameJob/RunStopped-->  Intake (bounded queue)
    -> stages (prepare -> infer + statistics) -> FrameResult -> SinkChain -> sinks (store first, publishers)

Identifiers: ``run_uid`` is the raw bluesky run's start uid, or ``raw:<source>:<run>`` for the raw
frame input. ``frame_uid`` is unique per frame: the event uid (``<event uid>/<k>`` for the k-th
frame of a multi-frame event), or ``raw:<source>:<run>:<frame_id>`` (each part with ``%`` and ``:`` percent-encoded,
``raw_ingest.uid_part``). The store refuses a frame_uid twice.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Protocol

import numpy as np

from nanoseg.codec import json_text
from nanoseg.instances import Instances
from nanoseg.particle_stats import FrameSummary, ParticleTable


@dataclass(frozen=True)
class FrameMetadata:
    """What frame preparation needs to know about a frame (from the start document or header).

    ``pixel_size_nm``: None = use the profile's. ``i0``: scalar incident intensity (counts) or
    None = the profile's policy. ``flat_field``/``dark_frame``: arrays of the frame's shape.
    ``profile``: frame-preparation profile name (configs/profiles), None = the daemon's default.
    ``extra``: scan id, sample name and the like, copied into results verbatim (JSON-safe).
    """

    pixel_size_nm: float | None = None
    i0: float | None = None
    flat_field: np.ndarray | None = None
    dark_frame: np.ndarray | None = None
    profile: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class RunStarted:
    run_uid: str
    metadata: FrameMetadata
    start_doc: dict[str, Any]  # the raw start document (or a synthesised one for raw input)
    time: float


@dataclass(frozen=True)
class FrameJob:
    run_uid: str
    frame_uid: str
    seq_num: int  # 1-based order within the run
    frame: np.ndarray  # 2-D, as received (not yet validated for dtype/NaN: preparation does that)
    timestamp: float  # acquisition time, s since epoch
    metadata: FrameMetadata
    received_monotonic: float  # time.monotonic() at ingest, for latency


@dataclass(frozen=True)
class RunStopped:
    run_uid: str
    exit_status: str  # bluesky's: success | abort | fail (raw input: success)
    time: float
    rejected: dict[str, int] = field(default_factory=dict)  # the run's inputs refused at ingest, by reason
    reason: str = ""  # why it ended so (a resumed run's missed frames, a run given up after a restart)


class IngestSink(Protocol):
    """Where ingest delivers; implemented by ``pipeline.Intake``. Must never block the caller for long."""

    def run_started(self, ev: RunStarted) -> None: ...
    def frame(self, job: FrameJob) -> None: ...
    def run_stopped(self, ev: RunStopped) -> None: ...
    def rejected(self, reason: str, detail: str, logged: bool = True, count: int = 1) -> None:
        """A malformed input: ``reason`` is a short metric label, ``detail`` a log line (counted,
        not logged, when ``logged`` is False: the same fault again, e.g. each event of a run
        whose start was missed); ``count`` frames lost to it at once (a stream resource's rows
        that cannot be read), counted each, logged once."""
        ...

    def converted(self, reason: str, detail: str) -> None:
        """A frame accepted after a conversion (``reason``: e.g. ``rgb_to_gray``, a metric label)."""
        ...


@dataclass(frozen=True)
class FrameResult:
    """Everything computed for one frame; what the store writes and the publishers send."""

    run_uid: str
    frame_uid: str
    seq_num: int
    timestamp: float
    instances: Instances  # in original frame pixels
    table: ParticleTable
    summary: FrameSummary
    model_version: str
    invalid_pixels: dict[str, int]
    timings: dict[str, float]  # seconds per stage: prepare, infer, postprocess, stats
    metadata: dict[str, Any]  # FrameMetadata.extra plus pixel size and profile used
    received_monotonic: float = 0.0  # FrameJob.received_monotonic, for ingest-to-published latency
    instances_capped: int = 0  # instances beyond PostprocessConfig.max_instances, dropped

    @cached_property
    def summary_json(self) -> str:
        """``summary.to_dict()`` as strict compact JSON (missing values null), encoded once for
        the store and the summary topic, which both carry it."""
        return json_text(self.summary.to_dict())


ANALYSIS_PLAN_NAME = "nanoseg_analysis"
"""``plan_name`` of the analysis runs the daemon publishes; ingest never analyses such a run."""
