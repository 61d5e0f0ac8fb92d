"""``nanoseg results report``: one run's measurements as a PNG figure and a self-contained HTML page.

The figure: distributions of length, width (MinFeret) and aspect ratio of every particle of the
run that the counting rule keeps, with the run's median and its 95 % bootstrap interval, and the
growth over time (each frame's mean length with its 95 % interval). The page: the figure
(embedded) and the run summary table of ``export`` (``run_rows``), with the rule and the
particle counts stated.
"""

from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from nanoseg.summary_stats import EdgeRule

if TYPE_CHECKING:
    from nanoseg_daemon.store import ResultReader

PANELS = (("length", "length"), ("min_feret", "width (MinFeret)"), ("aspect_ratio", "aspect ratio"))


def _column(particles: list[dict[str, Any]], name: str) -> np.ndarray:
    return np.array([np.nan if p.get(name) is None else p[name] for p in particles], dtype=np.float64)


def report_figure(particles: list[dict[str, Any]], frames: list[Any], summary: dict[str, dict[str, Any]],
                  rule: str, path: Path) -> Path:
    """Write the run's figure to ``path`` (PNG); ``summary``: ``run_rows`` by column name."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    nm = any(p.get("length_nm") is not None for p in particles)
    fig, axes = plt.subplots(1, len(PANELS) + 1, figsize=(4.2 * (len(PANELS) + 1), 3.6))
    for ax, (base, label) in zip(axes, PANELS):
        name = base if base == "aspect_ratio" else f"{base}_{'nm' if nm else 'px'}"
        unit = "" if base == "aspect_ratio" else (" (nm)" if nm else " (px)")
        values = _column(particles, name)
        values = values[np.isfinite(values)]
        if values.size:
            ax.hist(values, bins=min(40, max(5, values.size // 4)), color="0.6")
        s = summary.get(name)
        if s and s.get("median") is not None:
            ax.axvline(s["median"], color="C3", label=f"median {s['median']:.4g}")
            if s.get("median_lo") is not None:
                ax.axvspan(s["median_lo"], s["median_hi"], color="C3", alpha=0.2, label="95 % interval")
            ax.legend(fontsize=8)
        ax.set_xlabel(label + unit)
        ax.set_ylabel("particles")
    ax = axes[-1]
    col = "length_nm" if nm else "length_px"
    t0 = frames[0].timestamp if frames else 0.0
    t = np.array([f.timestamp - t0 for f in frames])
    stats = [f.summary.get("stats", {}).get(col, {}) for f in frames]
    mean, lo, hi = (np.array([np.nan if s.get(k) is None else s[k] for s in stats], dtype=np.float64)
                    for k in ("mean", "mean_lo", "mean_hi"))  # fmt: skip
    ax.plot(t, mean, "o-", ms=3, color="C0", label="mean per frame")
    ax.fill_between(t, lo, hi, color="C0", alpha=0.25, label="95 % interval")
    ax.set_xlabel("time since the run's first frame (s)")
    ax.set_ylabel(f"mean length{' (nm)' if nm else ' (px)'}")
    ax.legend(fontsize=8)
    fig.suptitle(f"{len(particles)} particles in {len(frames)} frames; counting rule: {rule}", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)
    return path


def report_html(run_uid: str, png: Path, rows: list[dict[str, Any]], rule: str, path: Path) -> Path:
    """A self-contained page: the figure embedded and the run summary table."""
    cols = ["column", "counted", "mean", "mean_lo", "mean_hi", "median", "median_lo", "median_hi", "std", "n_for_target"]

    def cell(v: Any) -> str:
        return "" if v is None else (f"{v:.4g}" if isinstance(v, float) else html.escape(str(v)))

    body = "".join("<tr>" + "".join(f"<td>{cell(r.get(c))}</td>" for c in cols) + "</tr>" for r in rows)
    img = base64.b64encode(png.read_bytes()).decode()
    path.write_text(
        f"<!doctype html><html><head><meta charset='utf-8'><title>nanoseg run {html.escape(run_uid)}</title>"
        "<style>body{font-family:sans-serif;margin:2em}td,th{padding:2px 8px;text-align:right}"
        "td:first-child{text-align:left}</style></head><body>"
        f"<h1>Run {html.escape(run_uid)}</h1><p>Counting rule for particles touching the frame's edge: "
        f"<b>{html.escape(rule)}</b>. Intervals: 95 % bootstrap over particles (1 000 resamples, seeded); "
        "n_for_target: particles needed for +-5 % on the median.</p>"
        f"<img src='data:image/png;base64,{img}' style='max-width:100%'>"
        f"<table><tr>{''.join(f'<th>{c}</th>' for c in cols)}</tr>{body}</table></body></html>\n"
    )
    return path


def write_report(reader: ResultReader, run_uid: str, rule: EdgeRule, png: Path, page: Path,
                 rows: list[dict[str, Any]]) -> None:
    """The figure (``png``) and the page (``page``) of one (resolved) run.

    ``rows`` is the run's summary table (``results_cli.run_rows``) under ``rule``.
    """
    particles, frames = reader.particles(run_uid), reader.frames(run_uid)
    report_figure(particles, frames, {r["column"]: r for r in rows}, rule, png)
    report_html(run_uid, png, rows, rule, page)
