"""``nanoseg sweep SWEEP.yaml``: train a grid of configs (like the paper's Table 1), evaluate each.

A sweep file names a base training config, overrides for every run and a grid of dotted keys::

    name: table1
    base: cpu_default                 # configs/training name, a YAML path, or an inline mapping
    overrides: {solver.warmup_iters: 50}
    grid:
      solver.max_iter: [300, 600]
      solver.base_lr: [0.01, 0.02]
      data.generate.count: [250, 500]
    validation: {data: data/val-s99-n50, generate: {preset: paper, count: 50, seed: 99}}

Each combination (in grid order, the last key varying fastest) trains in ``OUT/runs/NN-<slug>``
and is evaluated into ``OUT/runs/NN-<slug>/eval``; ``OUT/results.csv`` and ``OUT/results.md``
hold one row per run. A run whose ``model_final.pt`` exists is not retrained, one with a
``last.pt`` resumes and one whose evaluation is newer than its model is not re-evaluated, so an
interrupted (or extended) sweep continues where it stopped. When the grid varies
``data.generate.*`` but not ``data.train``, each run's training set directory is named after
preset, seed and count (``data/paper-train-s1-n250``), so different sizes never share one.

An ablation names its runs instead (``arms``: name -> dotted overrides; with a grid too, every
arm runs every grid point), and may be judged on several validation sets at once, e.g. the
training domain and a shifted one (``validation: {paper: {...}, ptychography: {...}}``: columns
``paper.mask_AP``, ..., evaluations in ``eval-<name>``)::

    arms:
      flips_only: {augment.rot90: 0.0}
      with_rot90: {augment.rot90: 0.5}
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from nanoseg.config_io import ConfigError, StrictModel, load_yaml, parse_config
from nanoseg.paths import cache_dir, resolve_config
from nanoseg.postprocess import PostprocessConfig
from nanoseg_training.train_config import GenerateSpec, TrainConfig


class ValidationSet(StrictModel):
    data: str
    """COCO data set directory; relative paths are resolved under the nanoseg cache directory."""
    generate: GenerateSpec | None = None
    """If set and ``data`` is missing, generate it first (use a seed unlike the training sets')."""
    limit: int | None = Field(None, ge=1)
    """Evaluate the first ``limit`` images only."""


class SweepEvaluation(StrictModel):
    engine: Literal["torch", "onnxruntime"] = "torch"
    score_threshold: float = Field(0.05, ge=0, le=1)
    """Score threshold of the COCO AP predictions."""
    post: PostprocessConfig = PostprocessConfig()
    """Operating point for accuracy, statistics and counts."""
    plots: bool = False


class SweepConfig(StrictModel):
    name: str
    base: str | dict[str, Any]
    overrides: dict[str, Any] = Field(default_factory=dict)
    """Dotted keys (``solver.warmup_iters``) applied to the base before the grid."""
    grid: dict[str, list[Any]] = Field(default_factory=dict)
    """Dotted key -> values; every combination is one run."""
    arms: dict[str, dict[str, Any]] = Field(default_factory=dict)
    """Named runs (an ablation): arm name -> dotted overrides; crossed with the grid if both."""
    validation: dict[str, ValidationSet]
    """Named validation sets; a single set (a mapping with ``data``) is accepted as the unnamed one."""
    evaluation: SweepEvaluation = SweepEvaluation()

    @field_validator("validation", mode="before")
    @classmethod
    def _single_set(cls, v: Any) -> Any:
        return {"": v} if isinstance(v, dict) and "data" in v else v

    @field_validator("grid")
    @classmethod
    def _grid_values(cls, grid: dict[str, list[Any]]) -> dict[str, list[Any]]:
        if any(not v for v in grid.values()):
            raise ValueError("every grid key needs at least one value")
        return grid

    @field_validator("arms")
    @classmethod
    def _arm_names(cls, arms: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        bad = [a for a in arms if not re.fullmatch(r"[A-Za-z0-9_.-]+", a)]
        if bad:
            raise ValueError(f"arm names may use letters, digits, '_', '.', '-' only: {bad}")
        return arms

    @model_validator(mode="after")
    def _some_runs(self) -> SweepConfig:
        if not self.grid and not self.arms:
            raise ValueError("a sweep needs a grid, arms, or both")
        if not self.validation:
            raise ValueError("validation needs at least one data set")
        return self


def set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    """``data['a']['b'] = value`` for ``key`` 'a.b', creating mappings on the way."""
    *parents, last = key.split(".")
    node = data
    for p in parents:
        child = node.get(p)
        if child is None:
            child = node[p] = {}
        elif not isinstance(child, dict):
            raise ConfigError(f"sweep key {key!r}: {p!r} is not a mapping")
        node = child
    node[last] = value


def base_config(sweep: SweepConfig) -> dict[str, Any]:
    """The base training config as a plain dict (validated), with the sweep's overrides."""
    if isinstance(sweep.base, dict):
        cfg = parse_config(sweep.base, TrainConfig, "sweep.base")
    else:
        cfg = load_yaml(resolve_config(sweep.base, "training"), TrainConfig)
    data = cfg.model_dump(mode="json")
    for k, v in sweep.overrides.items():
        set_dotted(data, k, v)
    return data


def _slug(point: dict[str, Any]) -> str:
    text = "_".join(f"{k.rsplit('.', 1)[-1]}-{v}" for k, v in point.items())
    return re.sub(r"[^A-Za-z0-9_.-]+", "", text)[:80]


def grid_points(sweep: SweepConfig) -> list[dict[str, Any]]:
    """Every combination of the grid, as {dotted key: value}, the last key varying fastest."""
    keys = list(sweep.grid)
    return [dict(zip(keys, values)) for values in itertools.product(*(sweep.grid[k] for k in keys))]


@dataclass(frozen=True)
class SweepRun:
    """One run of a sweep: its arm (``""`` without arms) and grid point."""

    arm: str
    point: dict[str, Any]

    @property
    def slug(self) -> str:
        return "_".join(p for p in (self.arm, _slug(self.point)) if p)[:80]


def sweep_runs(sweep: SweepConfig) -> list[SweepRun]:
    """Every arm crossed with every grid point, arms outermost."""
    return [SweepRun(arm, point) for arm in (list(sweep.arms) or [""]) for point in grid_points(sweep)]


def run_config(sweep: SweepConfig, index: int, run: SweepRun) -> TrainConfig:
    """The training config of one run; errors name the arm, the point and the field."""
    data = base_config(sweep)
    point = run.point
    for k, v in {**sweep.arms.get(run.arm, {}), **point}.items():
        set_dotted(data, k, v)
    gen = data["data"].get("generate")
    if gen and any(k.startswith("data.generate.") for k in point) and "data.train" not in point:
        parent = Path(data["data"]["train"]).parent
        data["data"]["train"] = str(parent / f"{gen['preset']}-train-s{gen['seed']}-n{gen['count']}")
    data["name"] = f"{sweep.name}-{index:02d}"
    where = f"arm {run.arm} " if run.arm else ""
    return parse_config(data, TrainConfig, f"sweep {sweep.name} {where}point {point}")


def validation_dir(v: ValidationSet) -> Path:
    """The validation set directory, generated first when missing and a spec is given."""
    from nanoseg_training.train import resolve_data_dir

    root = resolve_data_dir(v.data)
    if (root / "annotations.json").exists() or v.generate is None:
        return root
    from nanoseg_training.coco_dataset import write_dataset
    from nanoseg_training.synthetic_config import SceneConfig

    scene = load_yaml(resolve_config(v.generate.preset, "synthetic"), SceneConfig)
    tmp = root.with_name(root.name + ".partial")
    write_dataset(scene, tmp, v.generate.count, v.generate.seed, workers=1, write_od=False)
    tmp.rename(root)
    return root


RESULT_KEYS = (
    ("box_AP", ("bbox", "AP")), ("box_AP50", ("bbox", "AP50")), ("box_AP75", ("bbox", "AP75")),
    ("mask_AP", ("segm", "AP")), ("mask_AP50", ("segm", "AP50")), ("mask_AP75", ("segm", "AP75")),
    ("accuracy", ("accuracy", "foreground")), ("count_mae", ("count", "mean_absolute")),
)  # fmt: skip


def run_sweep(sweep: SweepConfig, out: Path, progress: bool = True) -> list[dict[str, Any]]:
    """Train and evaluate every run; write ``out``/results.{csv,md}; return the rows."""
    from nanoseg_training.evaluate import evaluate_model
    from nanoseg_training.train import train

    out.mkdir(parents=True, exist_ok=True)
    runs = sweep_runs(sweep)
    configs = [run_config(sweep, i, r) for i, r in enumerate(runs)]  # fail before training
    vals = {name: validation_dir(v) for name, v in sweep.validation.items()}
    ev = sweep.evaluation
    rows: list[dict[str, Any]] = []
    for i, (run, cfg) in enumerate(zip(runs, configs)):
        run_dir = out / "runs" / f"{i:02d}-{run.slug}"
        model = run_dir / "model_final.pt"
        if not model.exists():
            model = train(cfg, run_dir, resume=(run_dir / "last.pt").exists(), progress=progress)
        if model.name != "model_final.pt":
            raise RuntimeError(f"{run_dir}: training stopped before max_iter")
        row: dict[str, Any] = {"run": run_dir.name, **({"arm": run.arm} if sweep.arms else {}), **run.point}
        for name, val in vals.items():
            eval_dir = run_dir / (f"eval-{name}" if name else "eval")
            done = eval_dir / "metrics.json"
            if done.exists() and done.stat().st_mtime >= model.stat().st_mtime:  # resumed sweep: keep it
                m = json.loads(done.read_text())
            else:
                m = evaluate_model(model, val, eval_dir, ev.engine, sweep.validation[name].limit,
                                   ev.score_threshold, ev.post, plots=ev.plots, threads=cfg.threads, progress=progress)
            row.setdefault("train_seconds", m["run"]["checkpoint_meta"].get("train_seconds"))
            prefix = f"{name}." if name else ""
            for key, (section, field) in RESULT_KEYS:
                row[prefix + key] = m[section][field]
            row[prefix + "w_area_px"] = m["statistics"]["area_px"]["wasserstein"]
            # mask AP with ground-truth masks on the same detections: detection vs mask quality
            # (absent from evaluations written before it existed)
            row[prefix + "oracle_mask_AP"] = m.get("diagnostics", {}).get("oracle_mask_AP")
        rows.append(row)
        write_results(out, rows)
    return rows


def write_results(out: Path, rows: list[dict[str, Any]]) -> None:
    """``results.csv`` and ``results.md``: one row per run."""
    if not rows:
        return
    keys = list(rows[0])
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)

    def cell(v: Any) -> str:
        if v is None:
            return "–"
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(cell(r.get(k)) for k in keys) + " |" for r in rows]
    (out / "results.md").write_text("\n".join(lines) + "\n")


def cmd_sweep(args: argparse.Namespace) -> int:
    """``nanoseg sweep``: the CLI handler."""
    sweep = load_yaml(resolve_config(args.sweep, "sweeps"), SweepConfig)
    out = Path(args.out) if args.out else cache_dir() / "sweeps" / sweep.name
    rows = run_sweep(sweep, out, progress=not args.quiet)
    print(f"{len(rows)} runs; results in {out / 'results.md'}")
    return 0
