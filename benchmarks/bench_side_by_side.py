"""Side by side on the same frames, in one run: the paper's app, the shipped model eager, the daemon.

* naive peer: the paper's configuration run the way its app runs it: ResNet-50-FPN Mask R-CNN
  (256 FPN channels, 1024-wide box head, 4x256 mask head, anchors 32-512 x {0.5, 1, 2}) with
  detectron2's default test settings (1000 proposals, score threshold 0.05, up to 100
  detections), eager torch, one frame at a time at native resolution (512 x 512, 3 channels
  as detectron2 reads a gray PNG), masks pasted to the frame, then scikit-image regionprops on
  every mask. Random weights (timing only: 100 detections reach the mask head, as a model that
  finds many candidates would).
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
from bench_daemon import Client, saturated, start_service


def peer_model() -> torch.nn.Module:
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
    return build_model(cfg).eval()


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--frames", type=int, default=12)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--engine", default="onnxruntime", choices=["torch", "onnxruntime"])
    ap.add_argument("--out")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    frames = [synthetic_frame(21, i) for i in range(args.frames)]
    od = [-np.log(np.maximum(f.counts.astype(np.float64), 0.5) / 4000.0) for f in frames]
    gray = [np.clip(o / o.max() * 255, 0, 255) for o in od]

    peer = peer_model()
    peer_frame(peer, gray[0])  # warm-up
    peer_s = []
    for g in gray:
        t0 = time.perf_counter()
        peer_frame(peer, g)
        peer_s.append(time.perf_counter() - t0)
    del peer

    from nanoseg_daemon.contracts import FrameJob, FrameMetadata
    from nanoseg_daemon.pipeline import analyse_frame

    with tempfile.TemporaryDirectory() as tmp:
        ns = argparse.Namespace(model=args.model, engine="torch", threads=args.threads, queue_size=16)
        svc = start_service(Path(tmp) / "eager", ns)
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
        svc = start_service(Path(tmp) / "daemon", ns)
        client = Client(svc)
        sat = saturated(client, [f.counts for f in frames], len(frames), timeout_s=600)
        client.close()
        svc.stop()

    results: dict[str, Any] = {
        "machine": machine_facts(), "model": model_facts(args.model), "frames": len(frames),
        "peer": {**summarise(peer_s), "frames_per_second": len(peer_s) / sum(peer_s)},
        "eager_shipped": {**summarise(eager_s), "frames_per_second": len(eager_s) / sum(eager_s)},
        "daemon": {"engine": args.engine, "frames_per_second": sat["steady_frames_per_second"],
                   "latency": sat["latency"]},
    }
    p, e, d = results["peer"], results["eager_shipped"], results["daemon"]
    results["ratios"] = {"daemon_over_peer": d["frames_per_second"] / p["frames_per_second"],
                         "daemon_over_eager": d["frames_per_second"] / e["frames_per_second"],
                         "eager_over_peer": e["frames_per_second"] / p["frames_per_second"]}
    print_table("Side by side, same frames (512 x 512)", ["what", "frames/s", "p50 ms", "p95 ms"], [
        ["paper app (R50-FPN, d2 test defaults, eager)", p["frames_per_second"], p["median_ms"], p["p95_ms"]],
        ["shipped model, eager, one at a time", e["frames_per_second"], e["median_ms"], e["p95_ms"]],
        [f"daemon ({args.engine}), saturated", d["frames_per_second"], d["latency"]["median_ms"], d["latency"]["p95_ms"]],
    ])
    print("\nratios:", {k: round(v, 2) for k, v in results["ratios"].items()})
    write_json(args.out, results)


if __name__ == "__main__":
    main()
