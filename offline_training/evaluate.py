"""``nanoseg evaluate MODEL DATASET``: COCO AP, foreground accuracy and particle statistics.

The measures of the paper (Lin et al. 2022, §2.3.5 and §3) on a COCO data set written by the
generator (``nanoseg_training.coco_dataset``):

* COCO AP (IoU 0.50:0.95), AP50, AP75, AP small/medium/large for boxes and masks, x100, from
  pycocotools' ``COCOeval``; predictions at a low score threshold (0.05) so the precision-recall
  curve is complete.
* foreground accuracy TP / (TP + FP + FN) over the union of the instance masks, pixels summed over
  the data set (and per image);
* particle statistics (area, length, width, aspect ratio, orientation) of predicted and
  ground-truth masks, both from ``nanoseg.particle_stats.particle_table``: Wasserstein distance
  per statistic and the error of the particle count per image.

Beside them, ``diagnostics`` (``nanoseg_training.mask_diagnostics``) says whether mask AP is lost
to the detections or to the masks: the oracle mask AP of the same detections with ground-truth
masks, and the IoU and pixel errors of matched masks.

Accuracy, statistics and counts are measured at the operating point (the post-processing score
threshold the model is used with, 0.5 by default), not at the AP threshold: a foreground union of
every 0.05-score detection says nothing about the segmentation a user gets.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast

import numpy as np
from pydantic import ValidationError
from scipy.stats import wasserstein_distance
from tqdm import tqdm

from nanoseg.checkpoint import CheckpointError
from nanoseg.config_io import ConfigError
from nanoseg.frame_profile import FrameProfile
from nanoseg.instances import Instances, mask_boxes
from nanoseg.masks import decode_segmentation, encode_rle_batch
from nanoseg.particle_stats import particle_table
from nanoseg.postprocess import (
    PostprocessConfig,
    explicit_postprocess,
    filter_instances,
    resolve_postprocess,
)
from nanoseg.segmenter import Segmenter
from nanoseg_training.mask_diagnostics import MatchedMasks, oracle_masks

if TYPE_CHECKING:
    from nanoseg.engines.factory import EngineKind

AP_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl")
"""COCOeval ``stats[0:6]``; plus ``AR`` (recall at 100 detections per image, ``stats[8]``)."""
STAT_COLUMNS = ("area_px", "length_px", "width_px", "aspect_ratio", "orientation_deg")
"""Particle statistics compared between predictions and ground truth (``ParticleTable`` columns)."""

Predictions = list[tuple[int, Instances]]


class EvaluationError(ValueError):
    """The model and the data set cannot be evaluated together (the message says why)."""


GT_IMAGE_KEYS = ("id", "height", "width")
"""Keys every ground-truth image record needs (a data set's files also ``file_name``)."""


def load_coco(source: str | Path | dict[str, Any]) -> dict[str, Any]:
    """A COCO dict from a dict, an ``annotations.json`` path or a data set directory.

    Raises
    ------
    BadSampleError
        (a ``ConfigError``) If the file is no valid JSON, lacks ``images``, has a record without a
        needed key or two images of one id (``index_coco``); the message names file and record.
    """
    from nanoseg_training.train_data import BadSampleError, index_coco

    if isinstance(source, dict):
        index_coco(source, "ground truth", GT_IMAGE_KEYS)
        return source
    p = Path(source)
    if p.is_dir():
        p = p / "annotations.json"
    try:
        coco = json.loads(p.read_text())
    except json.JSONDecodeError as err:
        raise BadSampleError(f"{p}: not valid JSON: {err}") from None
    index_coco(coco, p, (*GT_IMAGE_KEYS, "file_name"))
    return dict(coco)


def _anns_by_image(coco: dict[str, Any]) -> dict[int, list[dict[str, Any]]]:
    out: dict[int, list[dict[str, Any]]] = {int(im["id"]): [] for im in coco["images"]}
    for a in coco["annotations"]:
        out.setdefault(int(a["image_id"]), []).append(a)
    return out


def _truth(image: dict[str, Any], anns: list[dict[str, Any]]) -> Instances:
    if not anns:
        return Instances.empty(int(image["height"]), int(image["width"]))
    h, w = int(image["height"]), int(image["width"])
    masks = np.stack([decode_segmentation(a["segmentation"], h, w) for a in anns])
    return Instances(mask_boxes(masks), np.ones(len(masks), np.float32), masks)


def gt_instances(coco: dict[str, Any], image_ids: Iterable[int] | None = None) -> dict[int, Instances]:
    """Ground truth of ``image_ids`` (default all) as Instances: score 1, boxes tight around masks."""
    anns = _anns_by_image(coco)
    images = {int(im["id"]): im for im in coco["images"]}
    ids = images.keys() if image_ids is None else image_ids
    return {int(i): _truth(images[int(i)], anns[int(i)]) for i in ids}


def iter_images(root: Path, coco: dict[str, Any], limit: int | None = None, progress: bool = True,
                desc: str = "evaluate") -> Iterator[tuple[int, np.ndarray]]:
    """(image id, gray image) for the first ``limit`` images of the data set at ``root`` (its
    loaded ``coco`` annotations), in image id order."""
    images = sorted(coco["images"], key=lambda im: int(im["id"]))[:limit]
    for im in tqdm(images, desc=desc, unit="img", disable=not progress):
        yield int(im["id"]), read_gray(root / im["file_name"])


def iter_predictions(segmenter: Segmenter, dataset_dir: str | Path, limit: int | None = None,
                     progress: bool = True, coco: dict[str, Any] | None = None) -> Iterator[tuple[int, Instances]]:
    """(image id, Instances) for the first ``limit`` images of a data set, in image id order.

    Images are the data set's 8-bit gray PNGs, already at the model's scale and mapping. A
    generator, so a large data set never holds every image's masks at once. ``coco``: the data
    set's annotations when the caller has loaded them already.
    """
    root = Path(dataset_dir)
    for image_id, gray in iter_images(root, coco if coco is not None else load_coco(root), limit, progress):
        yield image_id, segmenter.segment_gray(gray)


def predict_dataset(segmenter: Segmenter, dataset_dir: str | Path, limit: int | None = None,
                    progress: bool = True) -> Predictions:
    """``iter_predictions`` as a list."""
    return list(iter_predictions(segmenter, dataset_dir, limit, progress))


def read_gray(path: Path) -> np.ndarray:
    """(H, W) float32 0–255 of an 8-bit image file (``read_gray8``: raises ``UnreadableImage``,
    naming the file, for a broken or non-8-bit one)."""
    from nanoseg_training.image_files import read_gray8

    return read_gray8(path)


def at_operating_point(inst: Instances, post: PostprocessConfig) -> Instances:
    """Instances kept by ``post``: its score threshold, then its frame-level filters."""
    return filter_instances(inst.select(inst.scores >= post.score_threshold), post)


# --- COCO AP ---------------------------------------------------------------------------------


def coco_results(predictions: Iterable[tuple[int, Instances]]) -> list[dict[str, Any]]:
    """COCO result records: RLE mask, bbox [x, y, w, h] px from the instance's xyxy box, score."""
    out: list[dict[str, Any]] = []
    for image_id, inst in predictions:
        for box, score, rle in zip(inst.boxes, inst.scores, encode_rle_batch(inst.masks)):
            x0, y0, x1, y1 = (float(v) for v in box)
            out.append({"image_id": int(image_id), "category_id": 1, "segmentation": dict(rle),
                        "bbox": [x0, y0, x1 - x0, y1 - y0], "score": float(score)})
    return out


def _coco_api(dataset: dict[str, Any]) -> Any:
    from pycocotools.coco import COCO

    with contextlib.redirect_stdout(io.StringIO()):
        api = COCO()
        api.dataset = dataset
        api.createIndex()
    return api


def coco_metrics(gt: str | Path | dict[str, Any], predictions: Iterable[tuple[int, Instances]]
                 ) -> dict[str, dict[str, float | None]]:
    """COCOeval on the images in ``predictions``: ``{"bbox": {...}, "segm": {...}}``.

    Keys ``AP_KEYS`` and ``AR``, x100 as the paper reports; None where the evaluated images have
    no ground truth of that size (COCOeval's -1).
    """
    predictions = list(predictions)
    return coco_metrics_of_results(gt, coco_results(predictions), [i for i, _ in predictions])


def coco_metrics_of_results(gt: str | Path | dict[str, Any], results: list[dict[str, Any]],
                            image_ids: Iterable[int], iou_types: Sequence[str] = ("bbox", "segm"),
                            max_dets: int = 100) -> dict[str, dict[str, float | None]]:
    """``coco_metrics`` from COCO result records (``coco_results``) on ``image_ids``; AP and AR
    count the ``max_dets`` best-scored detections per image (COCO's 100 by default)."""
    from pycocotools.cocoeval import COCOeval

    coco = load_coco(gt)
    ids = sorted({int(i) for i in image_ids})
    if not ids:
        raise EvaluationError("no images to evaluate")
    gt_api = _coco_api(coco)
    out: dict[str, dict[str, float | None]] = {}
    for iou_type in iou_types:
        dt_api = _coco_api({"images": coco["images"], "categories": coco["categories"],
                            "annotations": _result_annotations(results, iou_type)})
        ev = COCOeval(gt_api, dt_api, iou_type)
        ev.params.imgIds = ids
        ev.params.maxDets = [1, 10, max_dets]
        with contextlib.redirect_stdout(io.StringIO()):
            ev.evaluate()
            ev.accumulate()
        out[iou_type] = {k: (None if v < 0 else round(100.0 * v, 4)) for k, v in _summary(ev).items()}
    return out


def _summary(ev: Any) -> dict[str, float]:
    """COCOeval ``stats[0:6]`` and ``stats[8]`` (AP_KEYS and AR) at the last ``maxDets``.

    ``COCOeval.summarize`` reads AP at 100 detections whatever ``params.maxDets`` says, so it is
    recomputed here from the accumulated precision (T x R x K x A x M) and recall (T x K x A x M),
    as ``summarize`` does: the mean over the entries that exist, -1 when none does."""
    precision, recall = ev.eval["precision"][..., -1], ev.eval["recall"][..., -1]
    t50, t75 = (int(np.argmin(np.abs(ev.params.iouThrs - t))) for t in (0.5, 0.75))

    def mean(a: np.ndarray) -> float:
        a = a[a > -1]
        return float(a.mean()) if a.size else -1.0

    return {"AP": mean(precision[..., 0]), "AP50": mean(precision[t50, ..., 0]),
            "AP75": mean(precision[t75, ..., 0]), "APs": mean(precision[..., 1]),
            "APm": mean(precision[..., 2]), "APl": mean(precision[..., 3]), "AR": mean(recall[..., 0])}


def _result_annotations(records: list[dict[str, Any]], iou_type: str) -> list[dict[str, Any]]:
    """What ``COCO.loadRes`` makes of result records (it cannot take an empty list).

    As detectron2 does for mask AP, the mask's own box and area replace the record's box, so
    small/medium/large bin detections by mask area; for box AP the area is the box's.
    """
    from pycocotools import mask as mask_utils

    out = []
    for k, r in enumerate(records, start=1):
        seg = {"size": r["segmentation"]["size"], "counts": r["segmentation"]["counts"].encode("ascii")}
        if iou_type == "segm":
            bbox, area = [float(v) for v in mask_utils.toBbox(seg)], float(mask_utils.area(seg))
        else:
            bbox, area = list(r["bbox"]), float(r["bbox"][2] * r["bbox"][3])
        out.append({**r, "id": k, "segmentation": seg, "bbox": bbox, "area": area, "iscrowd": 0})
    return out


# --- foreground accuracy ---------------------------------------------------------------------


@dataclass(frozen=True)
class PixelCounts:
    """Foreground pixels of the union of predicted vs ground-truth masks."""

    tp: int
    fp: int
    fn: int

    @property
    def accuracy(self) -> float:
        """TP / (TP + FP + FN); 1.0 when neither has any foreground."""
        total = self.tp + self.fp + self.fn
        return self.tp / total if total else 1.0

    def __add__(self, other: PixelCounts) -> PixelCounts:
        return PixelCounts(self.tp + other.tp, self.fp + other.fp, self.fn + other.fn)


def union(masks: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """(H, W) bool: pixels covered by any of the (N, H, W) masks."""
    return np.asarray(masks.any(axis=0)) if len(masks) else np.zeros(shape, bool)


def pixel_counts(pred_masks: np.ndarray, gt_masks: np.ndarray) -> PixelCounts:
    """TP, FP, FN pixels of the union of ``pred_masks`` vs the union of ``gt_masks`` (N, H, W)."""
    shape = (int(gt_masks.shape[1]), int(gt_masks.shape[2]))
    p, g = union(pred_masks, shape), union(gt_masks, shape)
    return PixelCounts(int(np.count_nonzero(p & g)), int(np.count_nonzero(p & ~g)),
                       int(np.count_nonzero(~p & g)))


# --- particle statistics ---------------------------------------------------------------------


def particle_values(instances: Iterable[Instances]) -> dict[str, np.ndarray]:
    """``STAT_COLUMNS`` of every particle of every image, pooled (finite values only)."""
    cols: dict[str, list[np.ndarray]] = {c: [] for c in STAT_COLUMNS}
    for inst in instances:
        table = particle_table(inst.masks).columns()
        for c in STAT_COLUMNS:
            v = table[c].astype(np.float64)
            cols[c].append(v[np.isfinite(v)])
    return {c: np.concatenate(v) if v else np.zeros(0) for c, v in cols.items()}


def circular_wasserstein(u: np.ndarray, v: np.ndarray, period: float) -> float:
    """1-Wasserstein distance of two samples on a circle of circumference ``period``.

    For axial angles (0 deg == 180 deg): W1 = min over m of the integral of |F(x) - G(x) - m|,
    the minimum at the weighted median of F - G (Rabin, Delon & Gousseau 2011).
    """
    u, v = np.mod(u, period), np.mod(v, period)
    x = np.unique(np.concatenate([u, v, [0.0, period]]))
    lengths = np.diff(x)
    d = (np.searchsorted(np.sort(u), x[:-1], side="right") / u.size
         - np.searchsorted(np.sort(v), x[:-1], side="right") / v.size)
    order = np.argsort(d)
    cum = np.cumsum(lengths[order])
    m = d[order][np.searchsorted(cum, cum[-1] / 2)]
    return float(np.sum(lengths * np.abs(d - m)))


def statistic_distances(pred: dict[str, np.ndarray], gt: dict[str, np.ndarray]
                        ) -> dict[str, dict[str, float | int | None]]:
    """Per statistic: Wasserstein distance (circular for orientation, in its units), means, counts."""
    out: dict[str, dict[str, float | int | None]] = {}
    for c in STAT_COLUMNS:
        p, g = pred[c], gt[c]
        dist: float | None = None
        if p.size and g.size:
            dist = circular_wasserstein(p, g, 180.0) if c == "orientation_deg" else float(wasserstein_distance(p, g))
        out[c] = {"wasserstein": dist, "pred_mean": float(p.mean()) if p.size else None,
                  "gt_mean": float(g.mean()) if g.size else None, "pred_n": int(p.size), "gt_n": int(g.size)}
    return out


def count_errors(n_pred: Sequence[int], n_gt: Sequence[int]) -> dict[str, float | None]:
    """Particle count per image: mean absolute error, mean signed error (prediction - truth) and
    mean relative absolute error |n_pred - n_gt| / n_gt over images with ground truth."""
    p, g = np.asarray(n_pred, np.float64), np.asarray(n_gt, np.float64)
    rel = np.abs(p - g)[g > 0] / g[g > 0]
    return {"mean_absolute": float(np.abs(p - g).mean()), "mean_signed": float((p - g).mean()),
            "mean_relative": float(rel.mean()) if rel.size else None,
            "pred_total": int(p.sum()), "gt_total": int(g.sum())}


# --- everything together ---------------------------------------------------------------------


@dataclass(frozen=True)
class Evaluation:
    """``metrics`` (JSON-serialisable) and the pooled particle statistics for the plots."""

    metrics: dict[str, Any]
    pred_values: dict[str, np.ndarray]
    gt_values: dict[str, np.ndarray]


class Accumulator:
    """All measures, image by image: COCO records of the AP predictions; pixel counts, particle
    statistics and counts of the operating-point instances (the ones a user gets)."""

    def __init__(self, gt: str | Path | dict[str, Any], max_dets: int = 100, group_by: str | None = "contrast") -> None:
        self.coco = load_coco(gt)
        self.max_dets, self.group_by = max_dets, group_by
        self.anns = _anns_by_image(self.coco)
        self.images = {int(im["id"]): im for im in self.coco["images"]}
        self.results: list[dict[str, Any]] = []
        self.per_image: list[dict[str, Any]] = []
        self.total = PixelCounts(0, 0, 0)
        self.pred_values: list[dict[str, np.ndarray]] = []
        self.gt_values: list[dict[str, np.ndarray]] = []
        self.oracle_results: list[dict[str, Any]] = []
        self.matched = MatchedMasks()

    def add(self, image_id: int, predicted: Instances, operating: Instances | None = None,
            extra: dict[str, Any] | None = None) -> Instances:
        """Add one image (``extra``: more columns of its per-image row); returns its ground truth."""
        operating = predicted if operating is None else operating
        truth = _truth(self.images[image_id], self.anns[image_id])
        if operating.image_shape != truth.image_shape:
            raise EvaluationError(f"image {image_id}: prediction is {operating.image_shape}, "
                                  f"ground truth {truth.image_shape}")
        self.results.extend(coco_results([(image_id, predicted)]))
        self.oracle_results.extend(coco_results([(image_id, oracle_masks(predicted, truth))]))
        self.matched.add(operating, truth)
        c = pixel_counts(operating.masks, truth.masks)
        self.total = self.total + c
        self.per_image.append({"image_id": image_id, "gt_count": len(truth), "pred_count": len(operating),
                               "tp": c.tp, "fp": c.fp, "fn": c.fn, "accuracy": c.accuracy, **(extra or {})})
        self.pred_values.append(particle_values([operating]))
        self.gt_values.append(particle_values([truth]))
        return truth

    def result(self) -> Evaluation:
        rows = self.per_image
        pred = {c: np.concatenate([v[c] for v in self.pred_values]) for c in STAT_COLUMNS}
        gt = {c: np.concatenate([v[c] for v in self.gt_values]) for c in STAT_COLUMNS}
        ids = [r["image_id"] for r in rows]
        metrics: dict[str, Any] = dict(coco_metrics_of_results(self.coco, self.results, ids, max_dets=self.max_dets))
        metrics["accuracy"] = {"foreground": self.total.accuracy, "tp": self.total.tp, "fp": self.total.fp,
                               "fn": self.total.fn, "per_image_mean": float(np.mean([r["accuracy"] for r in rows]))}
        metrics["statistics"] = statistic_distances(pred, gt)
        metrics["count"] = count_errors([r["pred_count"] for r in rows], [r["gt_count"] for r in rows])
        oracle = coco_metrics_of_results(self.coco, self.oracle_results, ids, ("segm",), self.max_dets)["segm"]
        metrics["diagnostics"] = {"oracle_mask_AP": oracle["AP"], "oracle_mask_AP75": oracle["AP75"],
                                  **self.matched.summary()}
        metrics["images"] = len(rows)
        groups = self.groups(rows)
        if groups:
            metrics["groups"] = {self.group_by: groups}
        metrics["per_image"] = rows
        return Evaluation(metrics, pred, gt)

    def groups(self, rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
        """COCO AP and foreground accuracy per value of the images' ``group_by`` attribute (e.g.
        ``contrast: dark|bright``); empty when no evaluated image carries it."""
        by: dict[str, list[dict[str, Any]]] = {}
        for r in rows:
            value = self.images[r["image_id"]].get(self.group_by) if self.group_by else None
            if value is not None:
                by.setdefault(str(value), []).append(r)
        out: dict[str, dict[str, Any]] = {}
        for value, members in sorted(by.items()):
            ids = {r["image_id"] for r in members}
            total = sum((PixelCounts(r["tp"], r["fp"], r["fn"]) for r in members), PixelCounts(0, 0, 0))
            out[value] = {"images": len(members),
                          **coco_metrics_of_results(self.coco, [x for x in self.results if x["image_id"] in ids],
                                                    ids, max_dets=self.max_dets),
                          "accuracy": {"foreground": total.accuracy}}
        return out


def evaluate_predictions(gt: str | Path | dict[str, Any], predictions: Iterable[tuple[int, Instances]],
                         operating: Iterable[tuple[int, Instances]] | None = None) -> Evaluation:
    """All measures: COCO AP on ``predictions``; accuracy, statistics and counts on ``operating``
    (default ``predictions``), which must list the same image ids in the same order."""
    acc = Accumulator(gt)
    predictions = list(predictions)
    ops = predictions if operating is None else list(operating)
    if [i for i, _ in ops] != [i for i, _ in predictions]:
        raise EvaluationError("predictions and operating-point instances list different images")
    for (image_id, p), (_, o) in zip(predictions, ops):
        acc.add(image_id, p, o)
    return acc.result()


def evaluate_model(model: str | Path, dataset: str | Path, out: str | Path, engine: str = "torch",
                   limit: int | None = None, score_threshold: float = 0.05,
                   post: PostprocessConfig | None = None, plots: bool = True, examples: int = 4,
                   threads: int = 2, progress: bool = True, device: str = "cpu",
                   mask_margin_px: float | None = None, mask_tta: int | None = None,
                   refine_boxes: int | None = None, profile: FrameProfile | None = None,
                   pixel_size: float | Literal["auto"] | None = None, max_detections: int | None = None,
                   group_by: str | None = "contrast", onnx_path: str | Path | None = None) -> dict[str, Any]:
    """Segment ``dataset`` with ``model``, measure, and write ``out``/{metrics.json, report.md,
    per_image.csv, figures}. ``post`` is the operating point (default: the model's own, see
    ``resolve_postprocess``; fields it sets explicitly win);
    ``score_threshold`` the one for AP. One inference pass serves both. ``mask_margin_px``,
    ``mask_tta`` and ``refine_boxes`` replace those of the model's mask decoding
    (``nanoseg.mask_decoding``).

    Without ``profile`` the images are the generator's, at the model's scale and gray mapping.
    With one, every image file is prepared as the daemon prepares a frame (``prepare_frame``: any
    contrast, any size, tiled), at ``pixel_size`` nm (``auto``: chosen per image; default the
    profile's); each image's input check and pixel size go into its per-image row.
    ``max_detections``: detections kept per model input (``with_max_detections``) and per image
    by COCOeval (at least COCO's 100). ``group_by``: an image attribute (e.g. ``contrast``) whose
    values get their own AP and accuracy (``metrics["groups"]``). ``onnx_path``: engine
    onnxruntime runs this exported graph (e.g. an int8 one) instead of exporting the model."""
    from nanoseg.engines.factory import input_spec_of, load_engine
    from nanoseg_training import frame_eval
    from nanoseg_training.eval_report import write_report
    from nanoseg_training.train_data import index_coco

    if onnx_path is not None and engine != "onnxruntime":
        raise EvaluationError(f"an exported graph (--onnx) runs on engine onnxruntime, not {engine}")
    if limit is not None and limit < 0:
        raise EvaluationError(f"--limit {limit}: must be 0 or more")
    coco = load_coco(dataset)
    if not coco["images"][:limit]:
        raise EvaluationError(f"{dataset}: no images to evaluate"
                              f"{'' if limit is None or not coco['images'] else f' (--limit {limit})'}")
    note = index_coco(coco, dataset, GT_IMAGE_KEYS).warning(dataset)
    if note:
        print(f"warning: {note}", file=sys.stderr)
    eng, ckpt = load_engine(model, cast("EngineKind", engine), device=device, threads=threads, onnx_path=onnx_path,
                            mask_margin_px=mask_margin_px, mask_tta=mask_tta, refine_boxes=refine_boxes,
                            max_detections=max_detections)
    post = resolve_postprocess(post or PostprocessConfig(), ckpt.operating_point)
    if score_threshold > post.score_threshold:
        raise EvaluationError(f"AP score threshold {score_threshold} is above the operating point's {post.score_threshold}")
    ap_post = post.model_copy(update={"score_threshold": score_threshold})
    raw_post = ap_post.model_copy(update={"nested": post.nested.model_copy(update={"enabled": False})})
    spec = input_spec_of(ckpt)
    images = {int(im["id"]): im for im in coco["images"]}
    for im in images.values() if profile is None else ():
        px = im.get("pixel_size_nm")
        if px is not None and not math.isclose(float(px), spec.pixel_size_nm, rel_tol=1e-3):
            raise EvaluationError(f"{dataset}: image {im['id']} has {px} nm pixels, the model {spec.pixel_size_nm} nm")
        if max(int(im["height"]), int(im["width"])) > spec.size:
            raise EvaluationError(f"{dataset}: image {im['id']} is {im['height']}x{im['width']}, larger than "
                                  f"the model input {spec.size}x{spec.size}")
    acc = Accumulator(coco, max(100, max_detections or 0), group_by)
    shown: dict[int, tuple[Instances, Instances]] = {}  # image id -> (operating point, truth)
    t0 = time.monotonic()
    seg = Segmenter.for_checkpoint(eng, ckpt, raw_post)
    found: Iterable[tuple[int, Instances, dict[str, Any] | None]] = (
        ((i, x, None) for i, x in iter_predictions(seg, dataset, limit, progress, coco)) if profile is None
        # COCOeval counts the acc.max_dets best detections per image: no more are kept.
        else frame_eval.iter_prepared_predictions(seg, profile, dataset, coco, pixel_size, limit, progress, acc.max_dets))
    for image_id, raw, extra in found:
        operating = at_operating_point(raw, post)
        truth = acc.add(image_id, at_operating_point(raw, ap_post), operating, extra)
        if plots and len(shown) < examples:
            shown[image_id] = (operating, truth)
    seconds = time.monotonic() - t0
    ev = acc.result()
    ev.metrics["run"] = {
        "model": str(model), "dataset": str(dataset), "engine": engine, "device": device, "limit": limit,
        "onnx": None if onnx_path is None else str(onnx_path),
        "precision": getattr(eng, "precision", "float32"),
        "ap_score_threshold": score_threshold, "operating_point": post.model_dump(mode="json"),
        "input_spec": spec.model_dump(mode="json"),
        "profile": None if profile is None else profile.model_dump(mode="json"),
        "pixel_size": pixel_size, "max_detections": max_detections,
        "mask_decoding": eng.mask_decoding.model_dump(mode="json"),
        "inference_seconds_per_image": seconds / max(ev.metrics["images"], 1),
        "checkpoint_meta": {k: v for k, v in ckpt.meta.items() if k in ("name", "iterations", "seed", "train_seconds")},
    }
    write_report(Path(out), ev, Path(dataset), images, shown if plots else None)
    return ev.metrics


def cmd_evaluate(args: argparse.Namespace) -> int:
    """``nanoseg evaluate``: the CLI handler."""
    try:
        post = explicit_postprocess(score_threshold=args.stats_score_threshold, mask_threshold=args.mask_threshold,
                                    mask_rescoring=args.mask_rescoring)
        profile = None
        if args.profile is not None:
            from nanoseg.config_io import load_yaml
            from nanoseg.paths import resolve_config

            profile = load_yaml(resolve_config(args.profile, "profiles"), FrameProfile)
        elif args.pixel_size is not None:
            raise EvaluationError("--pixel-size needs --profile (the images are prepared as frames)")
        m = evaluate_model(args.model, args.dataset, args.out, args.engine, args.limit, args.score_threshold,
                           post, plots=not args.no_plots, threads=args.threads, progress=not args.quiet, device=args.device,
                           mask_margin_px=args.mask_margin, mask_tta=args.mask_tta, refine_boxes=args.refine_boxes,
                           profile=profile, pixel_size=args.pixel_size, max_detections=args.max_detections,
                           group_by=args.group_by or None, onnx_path=args.onnx)
    except (EvaluationError, CheckpointError, ValidationError, ConfigError) as err:
        # ConfigError: also a bad data set record or image file (BadSampleError, UnreadableImage)
        print(f"nanoseg evaluate: error: {err}", file=sys.stderr)
        return 2
    print(f"mask AP {_fmt(m['segm']['AP'])}  box AP {_fmt(m['bbox']['AP'])}  "
          f"foreground accuracy {m['accuracy']['foreground']:.3f}  ({m['images']} images) -> {args.out}/report.md")
    for attr, groups in m.get("groups", {}).items():
        for value, g in groups.items():
            print(f"  {attr} {value}: mask AP {_fmt(g['segm']['AP'])}  box AP {_fmt(g['bbox']['AP'])}  "
                  f"foreground accuracy {g['accuracy']['foreground']:.3f}  ({g['images']} images)")
    return 0


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.1f}"
