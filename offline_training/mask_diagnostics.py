"""Where a model's mask AP is lost: to its detections or to its masks.

Two measures beside the COCO tables of ``nanoseg evaluate``:

* **oracle mask AP**: the same detections (boxes, scores, ranking) with each mask replaced by the
  ground-truth mask it overlaps most (mask IoU >= 0.5; detections overlapping none keep their
  own). It is the mask AP this detector would reach with perfect masks: the gap from the model's
  mask AP to it is what a better mask head can win, the gap from it to 100 is detection (misses,
  false and duplicate detections, ranking).
* **matched masks** at the operating point: predictions matched one-to-one to ground truth
  (greedy by score, mask IoU >= 0.5, as COCO matches), their mean IoU overall and by how much of
  its box a wire fills (a thin diagonal wire fills little of an axis-aligned box), and their pixel
  errors per 100 true pixels: false positives on background or on other wires, false negatives
  under other wires (crossings) or elsewhere (edges, ends).

Pure numpy on ``Instances`` in model-input pixels; the COCO evaluation stays in ``evaluate``.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from nanoseg.instances import Instances, mask_iou

MIN_IOU = 0.5
"""A prediction and a ground-truth mask match at this mask IoU or above (COCO's loosest)."""
FILL_EDGES = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
"""Bins of box fill: ground-truth mask area / its tight box's area."""
ERROR_KINDS = ("fp_background", "fp_other_wires", "fn_under_other_wires", "fn_elsewhere")


def oracle_masks(pred: Instances, truth: Instances, min_iou: float = MIN_IOU) -> Instances:
    """``pred`` with each mask replaced by the ground-truth mask it overlaps most (IoU >= ``min_iou``)."""
    iou = mask_iou(pred.masks, truth.masks)
    masks = pred.masks.copy()
    if iou.size:
        best = iou.argmax(axis=1)
        hit = iou[np.arange(len(pred)), best] >= min_iou
        masks[hit] = truth.masks[best[hit]]
    return Instances(pred.boxes, pred.scores, masks)


def match(pred: Instances, truth: Instances, min_iou: float = MIN_IOU) -> list[tuple[int, int, float]]:
    """(prediction, ground truth, IoU) pairs, one-to-one, greedy in descending score."""
    iou = mask_iou(pred.masks, truth.masks)
    pairs: list[tuple[int, int, float]] = []
    if not iou.size:
        return pairs
    free = np.ones(len(truth), bool)
    for k in np.argsort(-pred.scores, kind="stable"):
        cand = np.where(free, iou[k], -1.0)
        j = int(cand.argmax())
        if cand[j] >= min_iou:
            pairs.append((int(k), j, float(cand[j])))
            free[j] = False
    return pairs


def box_fill(mask: np.ndarray, box: np.ndarray) -> float:
    """Mask area / area of its xyxy box, px^2 / px^2 (0 for an empty box)."""
    area = float(box[2] - box[0]) * float(box[3] - box[1])
    return float(mask.sum()) / area if area > 0 else 0.0


@dataclass
class MatchedMasks:
    """Matched pairs pooled over images: IoU, box fill of the ground truth, pixel errors."""

    ious: list[float] = field(default_factory=list)
    fills: list[float] = field(default_factory=list)
    gt_total: int = 0
    true_px: int = 0
    errors: dict[str, int] = field(default_factory=lambda: dict.fromkeys(ERROR_KINDS, 0))

    def add(self, pred: Instances, truth: Instances) -> None:
        self.gt_total += len(truth)
        if len(truth) == 0:
            return
        cover = truth.masks.sum(axis=0, dtype=np.int32)
        for k, j, iou in match(pred, truth):
            p, g = pred.masks[k], truth.masks[j]
            others = (cover - g) > 0
            fp, fn = p & ~g, g & ~p
            self.ious.append(iou)
            self.fills.append(box_fill(g, truth.boxes[j]))
            self.true_px += int(g.sum())
            for kind, px in zip(ERROR_KINDS, (fp & ~others, fp & others, fn & others, fn & ~others)):
                self.errors[kind] += int(np.count_nonzero(px))

    def summary(self) -> dict[str, Any]:
        ious, fills = np.asarray(self.ious), np.asarray(self.fills)
        bins = []
        for lo, hi in itertools.pairwise(FILL_EDGES):
            sel = (fills >= lo) & ((fills < hi) if hi < FILL_EDGES[-1] else (fills <= hi))
            bins.append({"fill": f"{lo:.1f}-{hi:.1f}", "n": int(sel.sum()),
                         "mean_iou": float(ious[sel].mean()) if sel.any() else None})
        per100 = 100.0 / self.true_px if self.true_px else 0.0
        return {
            "matched": len(ious), "ground_truth": self.gt_total,
            "mean_iou": float(ious.mean()) if ious.size else None,
            "fraction_iou_at_least": {f"{t:.2f}": float((ious >= t).mean()) if ious.size else None
                                      for t in (0.75, 0.85, 0.9, 0.95)},
            "by_box_fill": bins,
            "error_px_per_100_true": {k: v * per100 for k, v in self.errors.items()},
        }
