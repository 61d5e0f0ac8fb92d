"""Small frames packed several to a model input (``batching.pack_small_frames``): accuracy and speed.

Crops of the synthetic ``paper`` test set (gray images at the model's scale, with their masks
cropped the same way) run through the shipped model twice: each crop alone, padded with its
median to a whole model input as the daemon does, and packed up to k x k to an input
(``Segmenter.detect_packed``, ``--gap`` px of each crop's own padding right of and below it).
Reported: pycocotools mask and box AP (up to 100 detections per crop) of both, and the engine's
time per crop::

    .venv/bin/python benchmarks/bench_mosaic.py [--side 128] [--images 100] [--gap 32] [--out mosaic.json]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import (  # a script beside its helper
    DEFAULT_MODEL,
    machine_facts,
    model_facts,
    print_table,
    write_json,
)

from nanoseg.checkpoint import load_checkpoint
from nanoseg.engines.factory import engine_from_checkpoint
from nanoseg.masks import encode_rle_batch
from nanoseg.optical_density import InvalidPixels
from nanoseg.paths import cache_dir
from nanoseg.postprocess import PostprocessConfig
from nanoseg.prepare import PreparedFrame
from nanoseg.segmenter import Segmenter
from nanoseg.tiling import FrameTiles, plan_tiles
from nanoseg_training.evaluate import coco_metrics, gt_instances, iter_images, load_coco


def crops(dataset: Path, n: int, side: int) -> tuple[list[np.ndarray], dict[str, Any]]:
    """The top-left ``side`` px square of the first ``n`` images, and a COCO set of their masks."""
    coco = load_coco(dataset)
    truth = gt_instances(coco)
    images: list[dict[str, Any]] = []
    anns: list[dict[str, Any]] = []
    grays: list[np.ndarray] = []
    for image_id, gray in iter_images(dataset, coco, n, progress=False):
        grays.append(np.ascontiguousarray(gray[:side, :side]))
        images.append({"id": image_id, "height": side, "width": side, "file_name": f"{image_id}.png"})
        masks = truth[image_id].masks[:, :side, :side]
        masks = masks[masks.reshape(len(masks), -1).sum(1) >= 20]  # what is left of a wire in the crop
        for rle, m in zip(encode_rle_batch(masks), masks):
            ys, xs = np.nonzero(m)
            anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": 1, "iscrowd": 0,
                         "segmentation": dict(rle), "area": float(m.sum()),
                         "bbox": [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1),
                                  float(ys.max() - ys.min() + 1)]})
    return grays, {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "nanowire"}]}


def prepared(gray: np.ndarray, size: int) -> PreparedFrame:
    """A crop as the daemon prepares a small frame: one model input, padded with its median."""
    shape = (gray.shape[0], gray.shape[1])
    inputs = FrameTiles(gray.astype(np.float32, copy=False), tuple(plan_tiles(shape, size, 0)))
    return PreparedFrame(inputs, shape, gray, "optical_density", InvalidPixels(), None, 0.5)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--dataset", type=Path, default=cache_dir() / "data" / "paper-test-s2-n200",
                    help="nanoseg generate paper --count 200 --seed 2")
    ap.add_argument("--engine", default="onnxruntime", choices=["torch", "onnxruntime"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--images", type=int, default=100)
    ap.add_argument("--side", type=int, default=128, help="crop side, px")
    ap.add_argument("--gap", type=int, default=32, help="padding kept right of and below each packed crop, px")
    ap.add_argument("--batch", type=int, default=9, help="crops handed to the engine together")
    ap.add_argument("--out")
    args = ap.parse_args()
    ckpt = load_checkpoint(args.model)
    seg = Segmenter.for_checkpoint(engine_from_checkpoint(ckpt, args.engine, "cpu", args.threads), ckpt,
                                   PostprocessConfig())
    grays, gt = crops(args.dataset, args.images, args.side)
    frames = [prepared(g, seg.spec.size) for g in grays]
    ids = [int(im["id"]) for im in gt["images"]]
    out: dict[str, Any] = {"model": model_facts(args.model), "machine": machine_facts(), "side": args.side,
                           "gap": args.gap, "crops": len(frames), "truth_instances": len(gt["annotations"])}
    rows = []
    for name in ("alone", "packed"):
        t0, dets = time.perf_counter(), []
        for k in range(0, len(frames), args.batch):
            batch = frames[k: k + args.batch]
            tiles = [p.inputs for p in batch]
            dets += (seg.detect_frames(tiles) if name == "alone"
                     else seg.detect_packed(tiles, [p.model_shape for p in batch], args.gap))
        seconds = time.perf_counter() - t0
        preds = [(i, seg.analyse(p, None, detections=d).instances) for i, p, d in zip(ids, frames, dets)]
        m = coco_metrics(gt, preds)
        out[name] = {"engine_ms_per_crop": 1000 * seconds / len(frames), "metrics": m,
                     "instances": sum(len(x) for _, x in preds)}
        rows.append([name, m["segm"]["AP"], m["segm"]["AP50"], m["bbox"]["AP"], out[name]["instances"],
                     out[name]["engine_ms_per_crop"]])
        print(f"  {name}: mask AP {m['segm']['AP']:.1f}, engine {out[name]['engine_ms_per_crop']:.1f} ms per crop",
              flush=True)
    print_table(f"{len(frames)} crops of {args.side} x {args.side} px ({out['truth_instances']} true instances), "
                f"gap {args.gap} px; {out['machine']['cpu']}, load {out['machine']['load_average_1m']}",
                ["how", "mask AP", "mask AP50", "box AP", "instances", "engine ms per crop"], rows)
    write_json(args.out, out)


if __name__ == "__main__":
    main()
