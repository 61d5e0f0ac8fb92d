"""``nanoseg calibrate MODEL DATASET``: choose a model's operating point on a validation set.

The network runs once per image; every (score threshold, mask threshold) pair of a grid is then
applied to the same raw detections, exactly as the daemon applies them (mask pasting, score
threshold, small and nested instance filters), and scored against the ground truth:

- ``foreground_accuracy``: TP / (TP + FP + FN) over the union of masks (the paper's pixel measure),
- ``count_mae``: mean absolute error of the instance count per image.

The best pair by the chosen objective is the model's operating point. ``--write`` stores it in the
checkpoint (``meta["operating_point"]``, with the data set and the objective's value), where the
daemon, ``nanoseg evaluate`` and ``nanoseg segment`` take it from unless configured otherwise.
Choose it on a validation set (another seed), never on the test set its metrics are reported on.
"""

from __future__ import annotations

import argparse
import csv
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np

from nanoseg.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from nanoseg.engines import RawDetections
from nanoseg.engines.factory import EngineKind, engine_from_checkpoint
from nanoseg.instances import Instances
from nanoseg.mask_decoding import with_decoding
from nanoseg.postprocess import OperatingPoint, PostprocessConfig, to_instances
from nanoseg.segmenter import Segmenter
from nanoseg_training.evaluate import (
    EvaluationError,
    PixelCounts,
    at_operating_point,
    gt_instances,
    iter_images,
    load_coco,
    pixel_counts,
)

Objective = Literal["foreground_accuracy", "count_mae"]
SCORE_GRID = tuple(round(0.1 * i, 2) for i in range(1, 10))  # 0.1 ... 0.9
MASK_GRID = tuple(round(0.3 + 0.05 * i, 2) for i in range(8))  # 0.30 ... 0.65


@dataclass(frozen=True)
class GridPoint:
    """The measures of one (score, mask) threshold pair over the whole validation set."""

    score_threshold: float
    mask_threshold: float
    foreground_accuracy: float
    tp: int
    fp: int
    fn: int
    count_mae: float
    count_bias: float
    """Mean (predicted - true) instances per image: < 0 misses wires, > 0 invents them."""


def detect_dataset(segmenter: Segmenter, dataset: Path, coco: dict[str, Any], limit: int | None = None,
                   progress: bool = True) -> list[tuple[int, RawDetections]]:
    """Raw detections of every image (id order); images must be the model's input size."""
    size = segmenter.spec.size
    out = []
    for image_id, gray in iter_images(dataset, coco, limit, progress, desc="detect"):
        if gray.shape != (size, size):
            raise EvaluationError(f"{dataset}: image {image_id} is {gray.shape[0]}x{gray.shape[1]}; "
                                  f"calibration needs the model's input size {size}x{size}")
        out.append((image_id, segmenter.detect_tiles(gray[None])[0]))
    return out


def measure_grid(raws: list[tuple[int, RawDetections]], truths: dict[int, Instances], mask_offset_px: float,
                 base: PostprocessConfig, scores: tuple[float, ...] = SCORE_GRID,
                 masks: tuple[float, ...] = MASK_GRID, mask_margin_px: float = 0.0) -> list[GridPoint]:
    """Every (score, mask) pair applied to the same raw detections and scored against ``truths``
    (masks pasted with the engine's offset and margin, ``nanoseg.postprocess.paste_mask``).

    Masks are pasted once per mask threshold (at the lowest score threshold); each score threshold
    then selects from them, so the grid costs ``len(masks)`` pastes of the detections."""
    if not raws:
        raise EvaluationError("no images to calibrate on")
    points = []
    for m in masks:
        low = base.model_copy(update={"score_threshold": min(scores), "mask_threshold": m})
        pasted = [(i, to_instances(raw, truths[i].image_shape, low, mask_offset_px, mask_margin_px)) for i, raw in raws]
        for s in scores:
            post = low.model_copy(update={"score_threshold": s})
            total = PixelCounts(0, 0, 0)
            diffs = []
            for i, inst in pasted:
                kept = at_operating_point(inst, post)
                total = total + pixel_counts(kept.masks, truths[i].masks)
                diffs.append(len(kept) - len(truths[i]))
            d = np.asarray(diffs, dtype=np.float64)
            points.append(GridPoint(s, m, total.accuracy, total.tp, total.fp, total.fn,
                                    float(np.abs(d).mean()), float(d.mean())))
    return points


def best_point(points: list[GridPoint], objective: Objective) -> GridPoint:
    """The best pair: highest accuracy or lowest count error; ties go to the other measure, then to
    the higher score threshold (fewer, surer instances)."""
    if objective == "foreground_accuracy":
        return max(points, key=lambda p: (round(p.foreground_accuracy, 6), -p.count_mae, p.score_threshold))
    return min(points, key=lambda p: (round(p.count_mae, 6), -p.foreground_accuracy, -p.score_threshold))


def write_table(points: list[GridPoint], best: GridPoint, out: Path, objective: Objective, dataset: str) -> None:
    """``calibration.csv`` (every pair) and ``calibration.md`` (accuracy and count error grids)."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "calibration.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(asdict(points[0])))
        w.writeheader()
        w.writerows(asdict(p) for p in points)
    scores = sorted({p.score_threshold for p in points})
    masks = sorted({p.mask_threshold for p in points})
    at = {(p.score_threshold, p.mask_threshold): p for p in points}
    lines = [f"# Operating point of the model on `{dataset}`", "",
             f"Objective: **{objective}**. Best: score threshold **{best.score_threshold}**, mask threshold "
             f"**{best.mask_threshold}**: foreground accuracy {best.foreground_accuracy:.4f}, count error "
             f"{best.count_mae:.2f} per image (bias {best.count_bias:+.2f}).", ""]
    for title, key, fmt in (("Foreground accuracy", "foreground_accuracy", "{:.4f}"),
                            ("Count error per image (mean absolute)", "count_mae", "{:.2f}")):
        lines += [f"## {title}", "", "| mask \\ score | " + " | ".join(f"{s:g}" for s in scores) + " |",
                  "|---|" + "---|" * len(scores)]
        for m in masks:
            lines.append(f"| {m:g} | " + " | ".join(fmt.format(getattr(at[(s, m)], key)) for s in scores) + " |")
        lines.append("")
    (out / "calibration.md").write_text("\n".join(lines))


def calibrate(model: Path, dataset: Path, out: Path, objective: Objective = "foreground_accuracy",
              engine: EngineKind = "torch", limit: int | None = None, threads: int = 2, write: bool = False,
              progress: bool = True, scores: tuple[float, ...] = SCORE_GRID,
              masks: tuple[float, ...] = MASK_GRID, mask_rescoring: bool = False,
              mask_margin_px: float | None = None, mask_tta: int | None = None,
              refine_boxes: int | None = None) -> OperatingPoint:
    """Measure the grid on ``dataset``, write the tables to ``out``; with ``write`` store the best
    pair in the checkpoint at ``model`` (atomically, weights untouched). A one-value ``scores``
    keeps the score threshold fixed (e.g. chosen for real data) and tunes the mask threshold.
    ``mask_rescoring``: the thresholds apply to class score x maskness, and the point says so.
    ``mask_margin_px``, ``mask_tta``, ``refine_boxes``: how masks are predicted (None: the model's
    own), stored with the point."""
    ckpt = load_checkpoint(model)
    decoding = with_decoding(ckpt.mask_decoding, mask_margin_px, mask_tta, refine_boxes)
    eng = engine_from_checkpoint(ckpt, engine, "cpu", threads, decoding=decoding)
    # The filters (min area, nested) at their defaults, as the daemon's.
    base = PostprocessConfig(mask_rescoring=mask_rescoring)
    seg = Segmenter.for_checkpoint(eng, ckpt, base)
    coco = load_coco(dataset)
    raws = detect_dataset(seg, dataset, coco, limit, progress)
    truths = gt_instances(coco, [i for i, _ in raws])
    points = measure_grid(raws, truths, seg.mask_offset_px, base, scores, masks, seg.mask_margin_px)
    best = best_point(points, objective)
    value = best.foreground_accuracy if objective == "foreground_accuracy" else best.count_mae
    point = OperatingPoint(score_threshold=best.score_threshold, mask_threshold=best.mask_threshold,
                           objective=objective, value=round(value, 4),
                           chosen_on=f"{dataset.name} ({len(raws)} images)", mask_rescoring=mask_rescoring,
                           mask_decoding=eng.mask_decoding)
    write_table(points, best, out, objective, dataset.name)
    if write:
        save_checkpoint(replace(ckpt, meta={**ckpt.meta, "operating_point": point.model_dump(mode="json")}),
                        model, half=ckpt.stored_half)
    return point


def threshold_list(text: str | None, default: tuple[float, ...]) -> tuple[float, ...]:
    """``"0.3,0.4,0.5"`` -> (0.3, 0.4, 0.5), each in (0, 1); ``None`` -> ``default``."""
    if text is None:
        return default
    try:
        values = tuple(sorted({float(v) for v in text.split(",") if v.strip()}))
    except ValueError:
        raise EvaluationError(f"not a comma-separated list of thresholds: {text!r}") from None
    if not values or not all(0 < v < 1 for v in values):
        raise EvaluationError(f"thresholds must lie in (0, 1): {text!r}")
    return values


def cmd_calibrate(args: argparse.Namespace) -> int:
    """``nanoseg calibrate``: the CLI handler."""
    try:
        point = calibrate(Path(args.model), Path(args.dataset), Path(args.out), args.objective, args.engine,
                          args.limit, args.threads, args.write, not args.quiet,
                          threshold_list(args.scores, SCORE_GRID), threshold_list(args.masks, MASK_GRID),
                          args.mask_rescoring, args.mask_margin, args.mask_tta, args.refine_boxes)
    except (EvaluationError, CheckpointError, ValueError) as err:
        print(f"nanoseg calibrate: error: {err}", file=sys.stderr)
        return 2
    where = f"written to {args.model}" if args.write else "not written (--write stores it in the checkpoint)"
    rescored = " (score x maskness)" if point.mask_rescoring else ""
    print(f"operating point: score {point.score_threshold}{rescored}, mask {point.mask_threshold} "
          f"({point.objective} {point.value} on {point.chosen_on}); {where}; tables in {args.out}/calibration.md")
    return 0
