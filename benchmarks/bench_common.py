"""What the benchmark scripts share: the synthetic frame, machine facts, tables and JSON output.

The frame is a paper-preset scene measured in transmission, 512 x 512 at 8 nm per pixel (the
model's training scale, so it is exactly one model input): OD = thickness * 0.012 smoothed by a
2 px Gaussian, counts Poisson(4000 * exp(-OD)) + N(0, 1), as tests/daemon/service_fixtures.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

DOSE = 4000.0  # counts per pixel without sample: the frames' I0
OD_PER_VOXEL = 0.012
PIXEL_SIZE_NM = 8.0
DEFAULT_MODEL = Path(__file__).resolve().parents[1] / "models" / "default" / "model.pt"


@dataclass(frozen=True)
class Frame:
    counts: np.ndarray  # (512, 512) uint16
    n_wires: int


def synthetic_frame(seed: int = 11, index: int = 0) -> Frame:
    from scipy import ndimage

    from nanoseg.config_io import load_yaml
    from nanoseg.paths import resolve_config
    from nanoseg_training.coco_dataset import make_sample
    from nanoseg_training.rendering import transmission_counts
    from nanoseg_training.synthetic_config import SceneConfig

    cfg = load_yaml(resolve_config("paper", "synthetic"), SceneConfig)
    s = make_sample(cfg, seed, index)
    od = ndimage.gaussian_filter(s.scene.thickness.astype(np.float64) * OD_PER_VOXEL, 2.0)
    counts = transmission_counts(od, DOSE, 1.0, np.random.default_rng(seed * 1000 + index))
    return Frame(np.clip(np.rint(counts), 0, 65535).astype(np.uint16), len(s.scene.wires))


def model_facts(path: Path) -> dict[str, Any]:
    from nanoseg.checkpoint import load_checkpoint

    ckpt = load_checkpoint(path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    return {"path": str(path), "sha256": digest, "name": ckpt.meta.get("name"),
            "iterations": ckpt.meta.get("iterations"), "backbone": ckpt.model_config.backbone,
            "input_spec": ckpt.input_spec}


def machine_facts() -> dict[str, Any]:
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import onnxruntime
    import torch

    return {"cpu": cpu, "cores": os.cpu_count(), "affinity": len(os.sched_getaffinity(0)),
            "load_average_1m": round(os.getloadavg()[0], 2), "python": platform.python_version(),
            "torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "omp_num_threads": os.environ.get("OMP_NUM_THREADS")}


def steady_rate(arrivals: list[float]) -> float:
    """Results per second from the first result's arrival to the last's (s, any order).

    A daemon that hands frames on in groups publishes a group's results together, so the
    results that arrive with the first one were analysed before it: only those after its group
    count (a group: arrivals closer than a quarter of the mean gap). 0.0 when all came together.
    """
    t = sorted(arrivals)
    if len(t) < 2 or t[-1] <= t[0]:
        return 0.0
    close = 0.25 * (t[-1] - t[0]) / (len(t) - 1)
    first_group = 1
    while first_group < len(t) and t[first_group] - t[first_group - 1] < close:
        first_group += 1
    return (len(t) - first_group) / (t[-1] - t[0]) if first_group < len(t) else 0.0


def summarise(seconds: list[float]) -> dict[str, float]:
    """median, p95, p99, mean, min and max of a list of durations, in milliseconds."""
    ms = sorted(s * 1000 for s in seconds)
    return {"median_ms": statistics.median(ms), "p95_ms": percentile(ms, 95), "p99_ms": percentile(ms, 99),
            "mean_ms": statistics.fmean(ms),
            "min_ms": ms[0], "max_ms": ms[-1], "n": len(ms)}


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


def print_table(title: str, header: list[str], rows: list[list[Any]]) -> None:
    cells = [[str(h) for h in header]] + [[f"{c:.2f}" if isinstance(c, float) else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    print(f"\n{title}")
    for k, r in enumerate(cells):
        print("  " + "  ".join(c.rjust(w) if k and i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))))


def write_json(path: str | None, data: dict[str, Any]) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(data, indent=2) + "\n")
        print(f"\nwrote {path}")
