"""The JSON summary message: its one schema, for the daemon that publishes it and the clients
that read it.

The daemon publishes one ``[SUMMARY_TOPIC, JSON]`` message per analysed frame
(``publish.summary_message``; compact strict JSON, null where a value is undefined). A reader
validates it with ``SummaryMessage.model_validate_json``: types are strict (no "5" for 5, no
true for 1), numbers finite (NaN, Infinity and 1e999 are refused), and a validation error names
the field (``summary.stats.length_nm.mean``). Fields a reader does not know are ignored, so an
older reader keeps working with a newer daemon. Strings are valid UTF-8: the daemon sends a
uid that is not (a lone surrogate) as its repr. Every field of ``summary`` may be absent (a
reader of one statistic does not need the rest); the frame's identity and count may not.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from nanoseg.summary_stats import EdgeRule


class _Message(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True, strict=True, allow_inf_nan=False)


class ColumnFigures(_Message):
    """One column's statistics over the frame's counted particles (``nanoseg.summary_stats.Stat``),
    in the column's unit (``length_nm``: nm); null where undefined."""

    mean: float | None = None
    median: float | None = None
    std: float | None = None
    mean_lo: float | None = None
    mean_hi: float | None = None
    median_lo: float | None = None
    median_hi: float | None = None
    n_for_target: int | None = Field(None, ge=0)


class HistogramFigures(_Message):
    """Every particle's values of one column counted in fixed bins (``HISTOGRAM_EDGES``)."""

    edges: list[float] = []
    counts: list[int] = []
    underflow: int = Field(0, ge=0)
    overflow: int = Field(0, ge=0)


class FrameSummaryFigures(_Message):
    """The frame's summary (``nanoseg.particle_stats.FrameSummary``): counts, coverage (0-1),
    pixel size (nm), per-column statistics and histograms, orientation order (0 isotropic .. 1
    aligned)."""

    count: int | None = Field(None, ge=0)
    counted: int | None = Field(None, ge=0)
    edge_rule: EdgeRule | None = None
    touching_edge: int | None = Field(None, ge=0)
    overlapped: int | None = Field(None, ge=0)
    target_precision: float | None = None
    frame_shape: list[int] | None = None
    coverage_fraction: float | None = None
    pixel_size_nm: float | None = None
    stats: dict[str, ColumnFigures] = {}
    orientation_order: float | None = None
    histograms: dict[str, HistogramFigures] = {}


class SummaryMessage(_Message):
    """One frame's summary message: which frame (``run_uid`` of the raw run, ``frame_uid``,
    ``seq_num`` from 1), how many particles, by which model, when (s since the epoch: acquired,
    published), its summary, its pixels not converted as measured (by kind) and the seconds each
    step took."""

    run_uid: str = Field(min_length=1)
    frame_uid: str = Field(min_length=1)
    seq_num: int = Field(ge=0)
    count: int = Field(ge=0)
    model_version: str | None = None
    timestamp: float | None = None
    published_at: float | None = None
    summary: FrameSummaryFigures = FrameSummaryFigures()
    invalid_pixels: dict[str, int] = {}
    timings: dict[str, float] = {}
