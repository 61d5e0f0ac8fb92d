"""``nanoseg segment IMAGE... --model M --profile P --out DIR``: the offline tool.

Per image: an overlay PNG, a per-particle CSV, a summary JSON (with how the frame was prepared:
its input check and pixel size), distribution plots (area, aspect ratio, orientation, as the
paper's Fig. 8) and the masks found as a uint16 label TIFF (0 = background, particle i of the
CSV is label i + 1). For all images together: ``results.json``, the masks as COCO results
(RLE, score, image id), and ``images.json``, the COCO image records those ids refer to (image
ids count from 1 in the order the files were given; ``output_stem``: the prefix of the image's
files, its stem, with the suffix and a counter where stems collide, see ``output_stems``). Accepts PNG, TIFF (8/16-bit, float) and NumPy
``.npy`` files. An unreadable file is reported by name and the others still run; the exit
status is 1 when any file failed.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tifffile
from tqdm import tqdm

from nanoseg.config_io import load_yaml
from nanoseg.engines.factory import load_engine
from nanoseg.errors import FrameError
from nanoseg.frame_profile import FrameProfile
from nanoseg.instances import Instances
from nanoseg.particle_stats import FrameSummary, ParticleTable
from nanoseg.paths import MODELS, resolve_config
from nanoseg.postprocess import explicit_postprocess
from nanoseg.segmenter import Segmenter
from nanoseg.summary_stats import StatisticsConfig
from nanoseg_training.image_files import UnreadableImage, read_image

DEFAULT_MODEL = MODELS / "default" / "model.pt"


@dataclass(frozen=True)
class SegmentResult:
    instances: Instances
    table: ParticleTable
    summary: FrameSummary
    image: np.ndarray


def label_image(inst: Instances) -> np.ndarray:
    """(H, W) uint16: 0 background, i + 1 where instance i's mask is; where masks overlap the
    higher-scored instance owns the pixel."""
    if len(inst) > np.iinfo(np.uint16).max:
        raise ValueError(f"{len(inst)} instances do not fit a uint16 label image")
    labels = np.zeros(inst.image_shape, np.uint16)
    for i in np.argsort(inst.scores, kind="stable"):  # lowest first, so the highest is painted last
        labels[inst.masks[i]] = i + 1
    return labels


def output_stems(paths: list[Path]) -> list[str]:
    """A distinct output name prefix per input file: its stem, or, where stems collide
    (case-insensitively: a/same.png, b/same.png, same.tif), stem and suffix (``same_png``,
    ``same_tif``) and, where those still collide, a counter (``same_png_2``)."""
    counts: dict[str, int] = {}
    for path in paths:
        counts[path.stem.lower()] = counts.get(path.stem.lower(), 0) + 1
    stems: list[str] = []
    taken: set[str] = set()
    for path in paths:
        base = path.stem if counts[path.stem.lower()] == 1 else f"{path.stem}_{path.suffix.lstrip('.')}".rstrip("_")
        stem, n = base, 1
        while stem.lower() in taken:
            n += 1
            stem = f"{base}_{n}"
        taken.add(stem.lower())
        stems.append(stem)
    return stems


def write_outputs(out: Path, stem: str, result: SegmentResult, gray: np.ndarray,
                  preparation: dict[str, object] | None = None) -> None:
    from PIL import Image

    from nanoseg_training.preview import outline_overlay
    from nanoseg_training.report_plots import distribution_figure

    out.mkdir(parents=True, exist_ok=True)
    lo, hi = np.percentile(gray, [0.5, 99.5]) if gray.size else (0.0, 1.0)
    g8 = np.clip((gray - lo) / max(hi - lo, 1e-9) * 255, 0, 255).astype(np.uint8)
    Image.fromarray(outline_overlay(g8, list(result.instances.masks), thickness=2)).save(out / f"{stem}_overlay.png")
    records = result.table.to_records(rounded=True)
    with open(out / f"{stem}_particles.csv", "w", newline="") as f:
        if records:
            w = csv.DictWriter(f, fieldnames=["particle", "score", *records[0].keys()])
            w.writeheader()
            for i, (rec, score) in enumerate(zip(records, result.instances.scores)):
                w.writerow({"particle": i, "score": round(float(score), 4), **rec})
    summary = result.summary.to_dict()
    if preparation is not None:
        summary["preparation"] = preparation
    (out / f"{stem}_summary.json").write_text(json.dumps(summary, indent=1, allow_nan=False))
    tifffile.imwrite(out / f"{stem}_labels.tif", label_image(result.instances), compression="zlib")
    distribution_figure(result.table, out / f"{stem}_distributions.png", title=stem)


def cmd_segment(args: argparse.Namespace) -> int:
    from nanoseg_training.evaluate import coco_results
    from nanoseg_training.frame_eval import preparation_record

    try:
        flat = read_image(Path(args.flat_field)) if args.flat_field else None
    except UnreadableImage as err:
        print(f"nanoseg segment: error: --flat-field {err}", file=sys.stderr)
        return 2
    model = Path(args.model) if args.model else DEFAULT_MODEL
    engine, ckpt = load_engine(model, args.engine, threads=args.threads, mask_tta=args.mask_tta,
                               max_detections=args.max_detections)
    profile = load_yaml(resolve_config(args.profile, "profiles"), FrameProfile)
    try:
        post = explicit_postprocess(score_threshold=args.score_threshold, mask_threshold=args.mask_threshold,
                                    mask_rescoring=args.mask_rescoring)
    except ValueError as err:
        print(f"nanoseg segment: error: {err}", file=sys.stderr)
        return 2
    seg = Segmenter.for_checkpoint(engine, ckpt, post)
    statistics = StatisticsConfig(edge_rule=args.edge_rule)
    out = Path(args.out)
    failed = 0
    images: list[dict[str, object]] = []
    results: list[dict[str, object]] = []
    paths = [Path(p) for p in args.images]
    stems = output_stems(paths)
    for image_id, (path, stem) in enumerate(tqdm(list(zip(paths, stems)), desc="segment", unit="img",
                                                 disable=args.quiet), start=1):
        try:
            frame = read_image(path)
            prepared = seg.prepare(frame, profile, flat_field=flat, pixel_size_nm=args.pixel_size)
            analysis = seg.analyse(prepared, prepared.stated_pixel_size_nm, statistics=statistics)
            inst = analysis.instances
            record = {"image_id": image_id, "file": path.name, "output_stem": stem, **preparation_record(prepared)}
            write_outputs(out, stem, SegmentResult(inst, analysis.table, analysis.summary, prepared.image),
                          prepared.image, record)
            if prepared.input_check is not None and prepared.input_check.mismatch:
                print(f"nanoseg segment: {path.name}: {prepared.input_check.message()}", file=sys.stderr)
            if prepared.invalid.total:
                kinds = ", ".join(f"{n} {k}" for k, n in prepared.invalid.to_dict().items() if n)
                print(f"nanoseg segment: {path.name}: {prepared.invalid.total} pixels replaced ({kinds})", file=sys.stderr)
            images.append({"id": image_id, "file_name": path.name, "path": str(path), "output_stem": stem,
                           "height": prepared.frame_shape[0],
                           "width": prepared.frame_shape[1]})
            results.extend(coco_results([(image_id, inst)]))
        except UnreadableImage as err:
            failed += 1
            print(f"nanoseg segment: {err}", file=sys.stderr)
        except FrameError as err:
            failed += 1
            print(f"nanoseg segment: {path.name}: {err}", file=sys.stderr)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results))
    (out / "images.json").write_text(json.dumps(images, indent=1))
    n = len(args.images)
    print(f"segmented {n - failed}/{n} images into {out}")
    return 1 if failed else 0
