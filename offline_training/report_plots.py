"""Figures shared by ``nanoseg segment`` and ``nanoseg evaluate`` (matplotlib, Agg backend)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from scipy.stats import gaussian_kde

from nanoseg.particle_stats import ParticleTable

PANELS = (("area_px", "area (px)"), ("aspect_ratio", "aspect ratio"), ("orientation_deg", "orientation (deg from x)"))


def hist_kde(ax: plt.Axes, values: np.ndarray, label: str, color: str,
             bins: int | np.ndarray = 20, span: tuple[float, float] | None = None) -> None:
    """Histogram (density) with a Gaussian KDE on top, as the paper's Fig. 8.

    ``span``: the KDE's x range (default: the values' own range).
    """
    values = values[np.isfinite(values)]
    if values.size == 0:
        return
    ax.hist(values, bins=bins if isinstance(bins, int) else bins.tolist(), density=True, alpha=0.35, color=color, label=label)
    if values.size >= 2 and np.ptp(values) > 0:
        lo, hi = span if span is not None else (float(values.min()), float(values.max()))
        xs = np.linspace(lo, hi, 200)
        ax.plot(xs, gaussian_kde(values)(xs), color=color, lw=2)


def distribution_figure(table: ParticleTable, path: Path, title: str = "",
                        reference: ParticleTable | None = None) -> Path:
    fig, axes = plt.subplots(1, len(PANELS), figsize=(4 * len(PANELS), 3.2))
    cols = table.columns()
    ref = reference.columns() if reference is not None else None
    for ax, (key, label) in zip(axes, PANELS):
        hist_kde(ax, np.asarray(cols[key], float), "prediction", "tab:blue")
        if ref is not None:
            hist_kde(ax, np.asarray(ref[key], float), "ground truth", "tab:orange")
        ax.set_xlabel(label)
    axes[0].set_ylabel("density")
    if ref is not None:
        axes[0].legend(fontsize=8)
    fig.suptitle(f"{title} ({len(cols['area_px'])} particles)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
