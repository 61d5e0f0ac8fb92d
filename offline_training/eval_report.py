"""The evaluation report: ``metrics.json``, ``per_image.csv``, figures and ``report.md``.

Figures (matplotlib, drawn on ``Figure`` objects with the Agg canvas, no global pyplot state):

* ``figures/statistics.png``: per particle statistic, histograms with a Gaussian kernel density
  estimate, prediction vs ground truth (the paper's Fig. 8);
* ``figures/example_<image id>.png``: the image, the predicted masks over it, and the pixel map
  of the union of masks: blue true positive, red false negative, green false positive.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from nanoseg.instances import Instances
from nanoseg_training.evaluate import Evaluation, read_gray, union
from nanoseg_training.report_plots import hist_kde

STAT_LABELS = {
    "area_px": "area (px)",
    "length_px": "length (px)",
    "width_px": "width (px)",
    "aspect_ratio": "aspect ratio (length / width)",
    "orientation_deg": "orientation (deg CCW from x)",
}
PRED_COLOR, GT_COLOR = "tab:orange", "tab:blue"
TP_RGB, FN_RGB, FP_RGB = (0, 0, 255), (255, 0, 0), (0, 200, 0)


def pixel_map(pred_masks: np.ndarray, gt_masks: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 of the unions: TP blue, FN red, FP green, background black."""
    shape = (int(gt_masks.shape[1]), int(gt_masks.shape[2]))
    p, g = union(pred_masks, shape), union(gt_masks, shape)
    out = np.zeros((*shape, 3), np.uint8)
    out[p & g] = TP_RGB
    out[~p & g] = FN_RGB
    out[p & ~g] = FP_RGB
    return out


def mask_overlay(gray: np.ndarray, masks: np.ndarray, alpha: float = 0.45, seed: int = 0) -> np.ndarray:
    """(H, W, 3) float in [0, 1]: the gray image with each mask tinted in its own colour."""
    base = np.repeat((gray.astype(np.float64) / 255.0)[..., None], 3, axis=2)
    rng = np.random.default_rng(seed)
    for m in masks:
        colour = rng.uniform(0.2, 1.0, 3)
        base[m] = (1 - alpha) * base[m] + alpha * colour
    return np.clip(base, 0.0, 1.0)


def _save(fig: Figure, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=110)


def plot_statistics(pred: dict[str, np.ndarray], gt: dict[str, np.ndarray], path: Path,
                    distances: dict[str, dict[str, Any]] | None = None) -> Path:
    """Histogram + KDE per statistic, prediction vs ground truth, common bins."""
    names = list(STAT_LABELS)
    fig = Figure(figsize=(4.2 * len(names), 3.6), layout="constrained")
    axes = fig.subplots(1, len(names))
    for ax, name in zip(axes, names):
        p, g = pred.get(name, np.zeros(0)), gt.get(name, np.zeros(0))
        both = np.concatenate([p, g])
        if name == "orientation_deg":
            lo, hi = 0.0, 180.0
        elif both.size:
            lo, hi = float(both.min()), float(both.max())
        else:
            lo, hi = 0.0, 1.0
        hi = hi if hi > lo else lo + 1.0
        bins = np.linspace(lo, hi, 25)
        for values, colour, label in ((g, GT_COLOR, "ground truth"), (p, PRED_COLOR, "prediction")):
            hist_kde(ax, values, f"{label} (n={values.size})", colour, bins=bins, span=(lo, hi))
        title = name
        if distances and distances.get(name, {}).get("wasserstein") is not None:
            title += f"  W={distances[name]['wasserstein']:.3g}"
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(STAT_LABELS[name])
        ax.set_ylabel("density")
        ax.legend(fontsize=8)
    _save(fig, path)
    return path


def plot_example(gray: np.ndarray, predicted: Instances, truth: Instances, path: Path, title: str) -> Path:
    """Image | predicted masks over the image | TP/FP/FN pixel map."""
    fig = Figure(figsize=(12, 4.3), layout="constrained")
    axes = fig.subplots(1, 3)
    axes[0].imshow(gray, cmap="gray", vmin=0, vmax=255)
    axes[0].set_title(f"{title}: image ({len(truth)} wires)", fontsize=10)
    axes[1].imshow(mask_overlay(gray, predicted.masks))
    axes[1].set_title(f"predicted masks ({len(predicted)})", fontsize=10)
    axes[2].imshow(pixel_map(predicted.masks, truth.masks))
    axes[2].set_title("TP blue, FN red, FP green", fontsize=10)
    for ax in axes:
        ax.set_axis_off()
    _save(fig, path)
    return path


def write_report(out: Path, ev: Evaluation, dataset_dir: Path, images: dict[int, dict[str, Any]],
                 examples: dict[int, tuple[Instances, Instances]] | None) -> Path:
    """Write ``out``/{metrics.json, per_image.csv, report.md} and, when ``examples`` (image id ->
    (predicted, truth)) is given, the figures; returns the report path."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(ev.metrics, indent=2, allow_nan=False) + "\n")
    rows = ev.metrics["per_image"]
    with open(out / "per_image.csv", "w", newline="") as f:
        fields = list(dict.fromkeys(k for r in rows for k in r)) or ["image_id"]
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    figures: list[tuple[str, str]] = []
    if examples is not None:
        plot_statistics(ev.pred_values, ev.gt_values, out / "figures" / "statistics.png", ev.metrics["statistics"])
        figures.append(("Particle statistics, prediction vs ground truth", "figures/statistics.png"))
        for image_id, (predicted, truth) in examples.items():
            name = f"figures/example_{image_id:06d}.png"
            gray = read_gray(dataset_dir / images[image_id]["file_name"])
            plot_example(gray, predicted, truth, out / name, f"image {image_id}")
            figures.append((f"Image {image_id}", name))
    report = out / "report.md"
    report.write_text(report_markdown(ev.metrics, figures))
    return report


def _num(v: float | int | None, digits: int = 1) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


def report_markdown(m: dict[str, Any], figures: list[tuple[str, str]]) -> str:
    """The Markdown report: run, COCO AP table, accuracy, statistics, counts, figures."""
    run = m.get("run", {})
    acc, count = m["accuracy"], m["count"]
    lines = [f"# Evaluation of `{run.get('model', 'predictions')}`", ""]
    if run:
        op = run["operating_point"]
        lines += [
            f"- data set: `{Path(run['dataset']).name}`, {m['images']} images"
            + (f" (first {run['limit']})" if run.get("limit") else ""),
            f"- engine: {run['engine']} on {run.get('device', 'cpu')}, {run['inference_seconds_per_image']:.2f} s per image",
            f"- AP at score >= {run['ap_score_threshold']}; accuracy, statistics and counts at the "
            f"operating point {'class score x maskness' if op.get('mask_rescoring') else 'score'} "
            f">= {op['score_threshold']}, min area {op['min_area_px']} px, nested "
            f"suppression {'on' if op['nested']['enabled'] else 'off'}",
            f"- checkpoint: {json.dumps(run.get('checkpoint_meta', {}))}",
            "",
        ]
    keys = [k for k in m["segm"]]
    lines += ["## COCO AP (x100)", "", "| | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for label, kind in (("box", "bbox"), ("mask", "segm")):
        lines.append(f"| {label} | " + " | ".join(_num(m[kind][k]) for k in keys) + " |")
    lines += groups_markdown(m.get("groups", {}), run)
    lines += [
        "", "## Foreground accuracy", "",
        f"TP / (TP + FP + FN) on the union of masks, all pixels of the data set: **{acc['foreground']:.4f}** "
        f"(TP {acc['tp']}, FP {acc['fp']}, FN {acc['fn']}); mean over images {_num(acc['per_image_mean'], 4)}.",
        "", "## Particle statistics", "",
        "Both from `nanoseg.particle_stats.particle_table`; Wasserstein distance in the statistic's "
        "units (circular, period 180, for orientation).", "",
        "| statistic | ground truth mean | prediction mean | Wasserstein | n ground truth | n prediction |",
        "|---|---|---|---|---|---|",
    ]
    for name, s in m["statistics"].items():
        lines.append(f"| {name} | {_num(s['gt_mean'], 2)} | {_num(s['pred_mean'], 2)} | "
                     f"{_num(s['wasserstein'], 3)} | {s['gt_n']} | {s['pred_n']} |")
    lines += [
        "", f"Particle count per image: mean absolute error {count['mean_absolute']:.2f}, mean signed "
        f"error {count['mean_signed']:+.2f} (prediction - truth), mean relative error "
        f"{_num(count['mean_relative'], 3)}; {count['pred_total']} predicted vs {count['gt_total']} true particles.",
        "", "Per image: `per_image.csv`; everything: `metrics.json`.", "",
    ]
    if "diagnostics" in m:
        lines += diagnostics_markdown(m["diagnostics"], m["segm"]["AP"])
    if figures:
        lines += ["## Figures", "", "Pixel maps: blue true positive, red false negative, green false positive.", ""]
        for caption, path in figures:
            lines += [f"### {caption}", "", f"![{caption}]({path})", ""]
    return "\n".join(lines)


def groups_markdown(groups: dict[str, dict[str, Any]], run: dict[str, Any]) -> list[str]:
    """Mask and box AP and foreground accuracy per image attribute value (e.g. ``contrast``), and
    how the frames were prepared when a profile prepared them."""
    lines: list[str] = []
    if run.get("profile"):
        px = run.get("pixel_size") or run["profile"].get("pixel_size_nm")
        lines += ["", f"Images prepared as frames by profile `{run['profile']['name']}`, pixel size "
                  f"{px if px is not None else 'the model scale'}"
                  f"{' (chosen per image, `nanoseg.scale`)' if px == 'auto' else ' nm'}; up to "
                  f"{run.get('max_detections') or 'the model default of'} detections per model input. "
                  "Per image (`per_image.csv`): the input check, the pixel size used."]
    for attr, values in groups.items():
        lines += ["", f"Per `{attr}`:", "", "| " + attr + " | images | mask AP | mask AP50 | box AP | foreground accuracy |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {v} | {g['images']} | {_num(g['segm']['AP'])} | {_num(g['segm']['AP50'])} | "
                  f"{_num(g['bbox']['AP'])} | {g['accuracy']['foreground']:.3f} |" for v, g in values.items()]
    return lines


def diagnostics_markdown(d: dict[str, Any], mask_ap: float | None) -> list[str]:
    """The "where mask AP is lost" section (``nanoseg_training.mask_diagnostics``)."""
    err = d["error_px_per_100_true"]
    frac = d["fraction_iou_at_least"]
    lines = [
        "## Where mask AP is lost", "",
        f"Oracle mask AP (these detections, each mask replaced by the ground truth it overlaps most): "
        f"**{_num(d['oracle_mask_AP'])}** against the model's {_num(mask_ap)}: better masks could win "
        f"the difference, the rest to 100 is detection.", "",
        f"At the operating point {d['matched']} of {d['ground_truth']} wires are matched (mask IoU >= 0.5): "
        f"mean IoU {_num(d['mean_iou'], 3)}; IoU >= 0.75 for {_num(frac['0.75'], 3)}, >= 0.9 for "
        f"{_num(frac['0.90'], 3)} of them. Pixel errors per 100 true pixels: false positive on background "
        f"{_num(err['fp_background'], 2)}, on other wires {_num(err['fp_other_wires'], 2)}; false negative "
        f"under other wires {_num(err['fn_under_other_wires'], 2)}, elsewhere {_num(err['fn_elsewhere'], 2)}.", "",
        "| box fill (mask / box area) | wires | mean mask IoU |", "|---|---|---|",
    ]
    lines += [f"| {b['fill']} | {b['n']} | {_num(b['mean_iou'], 3)} |" for b in d["by_box_fill"]]
    return [*lines, ""]
