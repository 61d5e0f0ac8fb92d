"""What a monitored growth run leaves behind: the per-frame table, the score against the ground
truth, and two figures (statistics over time; the last frame with its masks).

Pure data handling plus matplotlib (Agg); no sockets. Rows are dicts keyed like ``FRAME_COLUMNS``.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

FRAME_COLUMNS = (
    "seq_num", "sample_time_s", "truth_count", "count", "truth_visible_length_nm_mean", "length_nm_mean",
    "length_nm_median", "truth_visible_width_nm_mean", "width_nm_mean", "aspect_ratio_mean",
    "coverage_fraction", "orientation_order", "latency_s", "frame_uid",
)  # fmt: skip


def _finite(v: Any) -> bool:
    return isinstance(v, int | float) and math.isfinite(v)


def score(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Agreement of the daemon's numbers with the simulation's truth, over the frames of a run.

    ``count_mae``: mean |count - truth|; ``count_within``: share of frames with
    |count - truth| <= max(2, 20 % of truth); ``length_rel_error``: mean of
    (length - truth) / truth over frames where both exist (truth: the visible footprints'
    second-moment length, the daemon's own convention).
    """
    pairs = [(r["count"], r["truth_count"]) for r in rows if _finite(r.get("count")) and _finite(r.get("truth_count"))]
    lengths = [(r["length_nm_mean"], r["truth_visible_length_nm_mean"]) for r in rows
               if _finite(r.get("length_nm_mean")) and _finite(r.get("truth_visible_length_nm_mean"))
               and r["truth_visible_length_nm_mean"] > 0]
    out: dict[str, Any] = {"frames": len(rows)}
    if pairs:
        err = [abs(c - t) for c, t in pairs]
        out["count_mae"] = float(np.mean(err))
        out["count_within"] = float(np.mean([abs(c - t) <= max(2, 0.2 * t) for c, t in pairs]))
    if lengths:
        out["length_rel_error"] = float(np.mean([(m - t) / t for m, t in lengths]))
        out["length_rel_abs_error"] = float(np.mean([abs(m - t) / t for m, t in lengths]))
    return out


def write_table(rows: Sequence[dict[str, Any]], path: Path) -> None:
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(FRAME_COLUMNS), extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None or (isinstance(r.get(k), float) and not math.isfinite(r[k]))
                            else r.get(k)) for k in FRAME_COLUMNS})


def write_json(obj: Any, path: Path) -> None:
    def clean(o: Any) -> Any:
        if isinstance(o, float):
            return o if math.isfinite(o) else None
        if isinstance(o, dict):
            return {str(k): clean(v) for k, v in o.items()}
        if isinstance(o, list | tuple):
            return [clean(v) for v in o]
        if isinstance(o, np.generic):
            return clean(o.item())
        return o

    path.write_text(json.dumps(clean(obj), indent=1, allow_nan=False))


def _series(rows: Sequence[dict[str, Any]], key: str) -> np.ndarray:
    return np.array([float(r[key]) if _finite(r.get(key)) else np.nan for r in rows])


def plot_growth(rows: Sequence[dict[str, Any]], path: Path, *, target_nm: float | None = None,
                smoothed_nm: Sequence[float] | None = None, alarms: Sequence[dict[str, Any]] = ()) -> None:
    """Mean length, count, width and coverage over sample time: measured vs the simulation's truth."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = _series(rows, "sample_time_s")
    x = t if np.isfinite(t).all() and len(t) else _series(rows, "seq_num")
    xlabel = "sample time (s)" if x is t else "frame"
    fig, axes = plt.subplots(2, 2, figsize=(11, 7), sharex=True)
    panels = [
        (axes[0, 0], "mean length (nm)", "length_nm_mean", "truth_visible_length_nm_mean"),
        (axes[0, 1], "particles per frame", "count", "truth_count"),
        (axes[1, 0], "mean width (nm)", "width_nm_mean", "truth_visible_width_nm_mean"),
        (axes[1, 1], "coverage fraction", "coverage_fraction", None),
    ]
    for ax, title, measured, truth in panels:
        ax.plot(x, _series(rows, measured), "o-", ms=3, label="nanoseg")
        if truth:
            ax.plot(x, _series(rows, truth), "k--", lw=1, label="simulation truth")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    ax = axes[0, 0]
    if smoothed_nm is not None and len(smoothed_nm) == len(x):
        ax.plot(x, smoothed_nm, "-", color="tab:orange", lw=1.5, label="EWMA (plan)")
    if target_nm is not None:
        ax.axhline(target_nm, color="tab:red", lw=1, ls=":", label=f"target {target_nm:g} nm")
    for a in alarms:
        if a.get("state") == "raised":
            k = int(a.get("raw_seq_num", 0)) - 1
            if 0 <= k < len(x):
                for axx in axes.flat:
                    axx.axvline(x[k], color="tab:purple", lw=0.8, alpha=0.6)
    axes[0, 0].legend(fontsize=8)
    axes[0, 1].legend(fontsize=8)
    for axx in axes[1]:
        axx.set_xlabel(xlabel)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_frame_with_masks(counts: np.ndarray, masks: np.ndarray, path: Path, *, i0: float, dark: float,
                          title: str = "") -> None:
    """The frame as optical density with each predicted mask's outline in its own colour."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from scipy import ndimage

    od = -np.log(np.clip((counts.astype(np.float64) - dark) / max(i0 - dark, 1e-9), 1e-3, None))
    fig, axes = plt.subplots(1, 2, figsize=(12, 6))
    axes[0].imshow(od, cmap="gray")
    axes[0].set_title("last frame (optical density)")
    axes[1].imshow(od, cmap="gray")
    cmap = plt.get_cmap("tab20")
    overlay = np.zeros((*od.shape, 4))
    for i, m in enumerate(masks):
        edge = m & ~ndimage.binary_erosion(m, iterations=2)
        overlay[edge] = cmap(i % 20)
        fill = np.zeros_like(overlay)
        fill[m] = (*cmap(i % 20)[:3], 0.18)
        overlay = np.where(fill[..., 3:] > overlay[..., 3:], fill, overlay)
    axes[1].imshow(overlay)
    axes[1].set_title(title or f"{len(masks)} masks")
    for ax in axes:
        ax.set_axis_off()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
