"""Side by side on the same frames, in one run: the paper's app, the shipped model eager, the daemon.

* naive peer: the paper's configuration run the way its app runs it: ResNet-50-FPN Mask R-CNN
  (256 FPN channels, 1024-wide box head, 4x256 mask head, anchors 32-512 x {0.5, 1, 2}) with
  detectron2's default test settings (1000 proposals, score threshold 0.05, up to 100
  detections), eager torch, one frame at a time, 3 channels as detectron2 reads a gray PNG,
  resized as detectron2's ``DefaultPredictor`` resizes every frame (``INPUT.MIN_SIZE_TEST`` 800,
  ``MAX_SIZE_TEST`` 1333: the short side to 800 px, so a 512 x 512 frame runs at 800 x 800),
  boxes scaled and masks pasted back at the frame's size, then scikit-image regionprops on every
  mask. ``--peer-short-side 0`` times it at the frame's own size as well (a reference row: the
  paper's app does not run that way). Random weights (timing only: 100 detections reach the
  mask head, as a model that finds many candidates would).
* eager: the shipped model through ``analyse_frame`` (same preparation, paste and statistics as
  the daemon), torch engine, one frame at a time.
* daemon: ``nanoseg serve``'s Service over raw frames on loopback with its configured engine,
  saturated (block policy), steady-state frames/s.

    python benchmarks/bench_side_by_side.py [--frames 12] [--out results.json]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the nanoseg CLI (no spinning workers)

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import (
    DEFAULT_MODEL,
    machine_facts,
    model_facts,
    print_table,
    summarise,
    synthetic_frame,
    write_json,
)
from bench_daemon import Client, saturated, service_args, start_service


def peer_model(short_side: int) -> torch.nn.Module:
    """The paper's R50-FPN Mask R-CNN with detectron2's test defaults, random weights.

    Parameters
    ----------
    short_side : int
        Resize every frame so its short side is this many px (long side at most 1333), as
        detectron2's ``ResizeShortestEdge`` test augmentation does; 0 keeps the frame's size.

    Returns
    -------
    torch.nn.Module
        The model in eval mode; its outputs are at the input frame's size.
    """
    from torchvision.models.detection.transform import GeneralizedRCNNTransform

    from nanoseg.model import ModelConfig, build_model

    cfg = ModelConfig(
        backbone="resnet50", norm="frozen_bn", in_channels=3, fpn_channels=256,
        image_mean=(103.53, 116.28, 123.675), image_std=(1.0, 1.0, 1.0),
        anchor_sizes=(32, 64, 128, 256, 512), aspect_ratios=(0.5, 1.0, 2.0),
        rpn_pre_nms_top_n_test=1000, rpn_post_nms_top_n_test=1000, box_score_thresh=0.05,
        box_nms_thresh=0.5, detections_per_img=100, box_head_dim=1024,
        mask_head_layers=(256, 256, 256, 256), mask_roi_size=14,
    )
    torch.manual_seed(0)
    model = build_model(cfg)
    if short_side:
        model.transform = GeneralizedRCNNTransform(
            min_size=short_side, max_size=1333, image_mean=list(cfg.image_mean),
            image_std=list(cfg.image_std),
        )
    return model.eval()


def peer_frame(model: torch.nn.Module, gray: np.ndarray) -> int:
    """The app's loop body: inference with pasted masks, then regionprops per mask."""
    from skimage.measure import regionprops

    x = torch.from_numpy(np.repeat(gray[None].astype(np.float32), 3, axis=0))
    with torch.inference_mode():
        out = model([x])[0]
    masks = (out["masks"][:, 0] > 0.5).numpy()
    n = 0
    for m in masks:
        for region in regionprops(m.astype(np.uint8)):
            _ = (region.area, region.orientation, region.axis_major_length, region.axis_minor_length)
            n += 1
    return n


def one_at_a_time(seconds: list[float]) -> dict[str, float]:
    """``summarise`` of per-frame times (s), with the frames per second they add up to."""
    return {**summarise(seconds), "frames_per_second": len(seconds) / sum(seconds)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--frames", type=int, default=12)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--engine", default="onnxruntime", choices=["torch", "onnxruntime"])
    ap.add_argument("--peer-short-side", type=int, nargs="+", default=[800],
                    help="the paper app's resize (detectron2 MIN_SIZE_TEST; 0: the frame's size); "
                         "the first is the one the ratios use")
    ap.add_argument("--out")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    frames = [synthetic_frame(21, i) for i in range(args.frames)]
    od = [-np.log(np.maximum(f.counts.astype(np.float64), 0.5) / 4000.0) for f in frames]
    gray = [np.clip(o / o.max() * 255, 0, 255) for o in od]

    peer_by_side: dict[int, list[float]] = {}
    for side in args.peer_short_side:
        peer = peer_model(side)
        peer_frame(peer, gray[0])  # warm-up
        peer_by_side[side] = times = []
        for g in gray:
            t0 = time.perf_counter()
            peer_frame(peer, g)
            times.append(time.perf_counter() - t0)
        del peer

    from nanoseg_daemon.contracts import FrameJob, FrameMetadata
    from nanoseg_daemon.pipeline import analyse_frame

    with tempfile.TemporaryDirectory() as tmp:
        ns = service_args(model=args.model, engine="torch", threads=args.threads)
        svc = start_service(Path(tmp) / "eager", ns, None)
        md = FrameMetadata(pixel_size_nm=8.0, i0=4000.0)
        eager_s = []
        for k in range(-1, len(frames)):
            job = FrameJob("e", f"e{k}", k + 2, frames[max(k, 0)].counts, time.time(), md, time.monotonic())
            t0 = time.perf_counter()
            analyse_frame(job, svc.slot.current, svc.profiles)
            if k >= 0:
                eager_s.append(time.perf_counter() - t0)
        svc.stop()
        ns.engine = args.engine
        svc = start_service(Path(tmp) / "daemon", ns, None)
        client = Client(svc)
        sat = saturated(client, [f.counts for f in frames], len(frames), timeout_s=600)
        client.close()
        svc.stop()

    results: dict[str, Any] = {
        "machine": machine_facts(), "model": model_facts(args.model), "frames": len(frames),
        "peer_short_side_px": args.peer_short_side[0],
        "peer": one_at_a_time(peer_by_side[args.peer_short_side[0]]),
        "peer_by_short_side_px": {str(k): one_at_a_time(v) for k, v in peer_by_side.items()},
        "eager_shipped": one_at_a_time(eager_s),
        "daemon": {"engine": args.engine, "frames_per_second": sat["steady_frames_per_second"],
                   "latency": sat["latency"]},
    }
    p, e, d = results["peer"], results["eager_shipped"], results["daemon"]
    results["ratios"] = {"daemon_over_peer": d["frames_per_second"] / p["frames_per_second"],
                         "daemon_over_eager": d["frames_per_second"] / e["frames_per_second"],
                         "eager_over_peer": e["frames_per_second"] / p["frames_per_second"]}
    print_table("Side by side, same frames (512 x 512)", ["what", "frames/s", "p50 ms", "p95 ms"], [
        *[[f"paper app (R50-FPN, d2 test defaults, eager), short side {int(k) or 'as the frame'}",
           v["frames_per_second"], v["median_ms"], v["p95_ms"]]
          for k, v in results["peer_by_short_side_px"].items()],
        ["shipped model, eager, one at a time", e["frames_per_second"], e["median_ms"], e["p95_ms"]],
        [f"daemon ({args.engine}), saturated", d["frames_per_second"], d["latency"]["median_ms"], d["latency"]["p95_ms"]],
    ])
    print("\nratios:", {k: round(v, 2) for k, v in results["ratios"].items()})
    write_json(args.out, results)


if __name__ == "__main__":
    main()
