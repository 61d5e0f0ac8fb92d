"""The daemon end to end over raw frames: throughput and latency against the model alone.

    .venv/bin/python benchmarks/bench_daemon.py [--model models/default/model.pt]
        [--engine onnxruntime] [--frames 30] [--unloaded 5] [--model-only 10] [--out results.json]

A real ``Service`` on loopback (raw PULL input, SQLite store, bluesky documents composed and
sent on a bound socket, JSON summaries on another), fed 512 x 512 uint16 transmission frames by a
PUSH socket in this process. Three measurements, on the same loaded model:

1. model only: ``daemon.pipeline.analyse_frame`` (prepare, inference, post-processing,
   statistics) called in a loop in a worker thread, one frame after the other; the reference.
2. unloaded: one frame at a time, the next sent when the previous frame's summary arrived;
   latency = summary received - frame sent. Daemon overhead per frame = this latency minus the
   model-only time: decoding, queues and thread hand-offs, the store, composing and publishing.
3. saturated: ``--frames`` frames pushed as fast as the daemon takes them (queue policy block;
   the PUSH socket blocks when the daemon's queue and 0MQ buffers are full). Throughput is
   counted between the first and the last summary (steady state); latency = published_at minus
   the frame's send time, so it includes the wait in the queue (queue.size frames deep).

The daemon's mean time per stage (prepare, infer, postprocess, stats) comes from its metrics;
the statistics' share is stats / their sum. Nothing may be dropped or fail: the script checks
the counters and says so. The machine's load
average is recorded; other jobs slow every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

# As the nanoseg CLI does (nanoseg/cli.py), before torch loads OpenMP: workers sleep instead of
# spinning. Spinning made eager torch several times slower here on 2 shared cores.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import zmq

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import (  # a script beside its helper module
    DEFAULT_MODEL,
    DOSE,
    PIXEL_SIZE_NM,
    machine_facts,
    model_facts,
    print_table,
    summarise,
    synthetic_frame,
    write_json,
)

from nanoseg_daemon.config import load_daemon_config
from nanoseg_daemon.contracts import FrameJob, FrameMetadata
from nanoseg_daemon.pipeline import analyse_frame
from nanoseg_daemon.service import Service


def header(frame_id: int, arr: np.ndarray, run: str) -> bytes:
    return json.dumps({"frame_id": frame_id, "run": run, "dtype": str(arr.dtype), "shape": list(arr.shape),
                       "timestamp": time.time(), "metadata": {"pixel_size_nm": PIXEL_SIZE_NM, "i0": DOSE}}).encode()


def start_service(state: Path, args: argparse.Namespace) -> Service:
    overrides = {
        "model.path": str(args.model), "model.engine": args.engine, "model.threads": str(args.threads),
        "store.state_dir": str(state), "ingest.bluesky.enabled": "false", "ingest.raw.enabled": "true",
        "ingest.raw.bind": "tcp://127.0.0.1:*", "queue.policy": "block", "queue.size": str(args.queue_size),
        "queue.block_timeout_s": "600", "publish.bluesky.bind": "true",
        "publish.bluesky.address": "tcp://127.0.0.1:*", "publish.summary.address": "tcp://127.0.0.1:*",
        "control.address": "tcp://127.0.0.1:*", "metrics.port": "0", "log.level": "warning",
    }
    svc = Service(load_daemon_config(None, overrides, environ={}))
    svc.start()
    return svc


class Client:
    def __init__(self, svc: Service) -> None:
        self.ctx = zmq.Context()
        self.push = self.ctx.socket(zmq.PUSH)
        self.push.linger = 0
        assert svc.ingest.raw_address and svc.summary_pub is not None
        self.push.connect(svc.ingest.raw_address)
        self.sub = self.ctx.socket(zmq.SUB)
        self.sub.linger = 0
        self.sub.connect(svc.summary_pub.address)
        self.sub.setsockopt(zmq.SUBSCRIBE, b"nanoseg.summary")
        assert svc.summary_pub.wait_for_subscriber(10.0)

    def send(self, frame_id: int, arr: np.ndarray, run: str) -> float:
        msg = [header(frame_id, arr, run), arr.tobytes()]
        self.push.send_multipart(msg)
        return json.loads(msg[0])["timestamp"]

    def receive(self, timeout_s: float) -> tuple[dict[str, Any], float]:
        if not self.sub.poll(int(timeout_s * 1000)):
            raise TimeoutError(f"no summary within {timeout_s} s")
        _topic, body = self.sub.recv_multipart()
        return json.loads(body), time.time()

    def close(self) -> None:
        self.push.close(0)
        self.sub.close(0)
        self.ctx.term()


def model_only(svc: Service, frames: list[np.ndarray], n: int) -> list[float]:
    """analyse_frame in a loop, in a worker thread like the daemon's stages."""
    model, out = svc.slot.current, []
    md = FrameMetadata(pixel_size_nm=PIXEL_SIZE_NM, i0=DOSE)

    def loop() -> None:
        for k in range(-1, n):  # k = -1: an untimed first frame
            job = FrameJob("bench", f"m{k}", k + 2, frames[k % len(frames)], time.time(), md, time.monotonic())
            t0 = time.perf_counter()
            analyse_frame(job, model, svc.profiles)
            if k >= 0:
                out.append(time.perf_counter() - t0)

    worker = threading.Thread(target=loop, name="bench-model-only")
    worker.start()
    worker.join()
    return out


def unloaded(client: Client, frames: list[np.ndarray], n: int, timeout_s: float) -> list[float]:
    out = []
    for k in range(n):
        sent = client.send(k, frames[k % len(frames)], "unloaded")
        _summary, received = client.receive(timeout_s)
        out.append(received - sent)
    return out


def saturated(client: Client, frames: list[np.ndarray], n: int, timeout_s: float) -> dict[str, Any]:
    sent: dict[int, float] = {}

    def sender() -> None:
        for k in range(n):
            sent[k] = client.send(k, frames[k % len(frames)], "saturated")

    t_start = time.time()
    thread = threading.Thread(target=sender, daemon=True)
    thread.start()
    received: list[tuple[dict[str, Any], float]] = [client.receive(timeout_s) for _ in range(n)]
    thread.join()
    first, last = received[0][1], received[-1][1]
    latencies = [s["published_at"] - s["timestamp"] for s, _ in received]
    seqs = [s["seq_num"] for s, _ in received]
    return {"frames": n, "in_order": seqs == sorted(seqs),
            "steady_frames_per_second": (n - 1) / (last - first),
            "overall_frames_per_second": n / (last - t_start),
            "latency": summarise(latencies)}


def sample(svc: Service, name: str, **labels: str) -> float:
    return svc.metrics.registry.get_sample_value(name, labels) or 0.0


def total(svc: Service, name: str) -> float:
    """A counter summed over all its label values (every reason)."""
    return sum(s.value for fam in svc.metrics.registry.collect() for s in fam.samples if s.name == name)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="nanoseg checkpoint (default %(default)s)")
    ap.add_argument("--engine", default="onnxruntime", choices=["torch", "onnxruntime"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--frames", type=int, default=30, help="frames in the saturated run")
    ap.add_argument("--unloaded", type=int, default=5, help="frames sent one at a time")
    ap.add_argument("--model-only", type=int, default=10, help="frames through analyse_frame alone")
    ap.add_argument("--queue-size", type=int, default=16)
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for any one summary")
    ap.add_argument("--out", help="write the results as JSON here")
    args = ap.parse_args()
    if not args.model.exists():
        sys.exit(f"bench_daemon: model {args.model} not found (use --model)")
    results: dict[str, Any] = {"model": model_facts(args.model), "machine": machine_facts(), "engine": args.engine,
                               "threads": args.threads, "queue_size": args.queue_size}
    print(f"model {args.model} ({results['model']['name']}, {results['model']['iterations']} iterations), "
          f"engine {args.engine}, {args.threads} threads; {results['machine']['cpu']}, "
          f"{results['machine']['affinity']} cores, load average {results['machine']['load_average_1m']}")
    frames = [synthetic_frame(11, i).counts for i in range(4)]
    with tempfile.TemporaryDirectory(prefix="bench_daemon_") as state:
        svc = start_service(Path(state), args)
        client = Client(svc)
        try:
            mo = model_only(svc, frames, args.model_only)
            ul = unloaded(client, frames, args.unloaded, args.timeout)
            sat = saturated(client, frames, args.frames, args.timeout)
            deadline = time.monotonic() + 10  # the counter follows the last summary by a moment
            while (total(svc, "nanoseg_frames_processed_total") < total(svc, "nanoseg_frames_received_total")
                   and time.monotonic() < deadline):
                time.sleep(0.05)
            counters = {name: total(svc, f"nanoseg_frames_{name}_total")
                        for name in ("received", "processed", "dropped", "failed")}
            stage_means = {st: 1000 * sample(svc, "nanoseg_stage_seconds_sum", stage=st)
                           / max(sample(svc, "nanoseg_stage_seconds_count", stage=st), 1)
                           for st in ("prepare", "infer", "postprocess", "stats")}
            histogram_latency_ms = 1000 * sample(svc, "nanoseg_frame_latency_seconds_sum") / max(
                sample(svc, "nanoseg_frame_latency_seconds_count"), 1)
        finally:
            client.close()
            stopped_cleanly = svc.stop()
    mo_s, ul_s = summarise(mo), summarise(ul)
    model_fps = 1000 / mo_s["median_ms"]
    results.update({
        "model_only": mo_s | {"frames_per_second": model_fps},
        "unloaded_latency": ul_s,
        "saturated": sat,
        "throughput_ratio_daemon_over_model_only": sat["steady_frames_per_second"] / model_fps,
        "overhead_ms_per_frame": {
            "unloaded_latency_minus_model_only": ul_s["median_ms"] - mo_s["median_ms"],
            "saturated_time_per_frame_minus_model_only": 1000 / sat["steady_frames_per_second"] - mo_s["median_ms"],
        },
        "daemon_stage_mean_ms": stage_means,
        "statistics_share_of_frame": stage_means["stats"] / max(sum(stage_means.values()), 1e-9),
        "daemon_latency_histogram_mean_ms": histogram_latency_ms,
        "counters": counters, "stopped_cleanly": stopped_cleanly,
    })
    results["machine"]["load_average_1m_after"] = round(os.getloadavg()[0], 2)
    report(results)
    write_json(args.out, results)


def report(r: dict[str, Any]) -> None:
    mo, ul, sat = r["model_only"], r["unloaded_latency"], r["saturated"]
    print_table("frames per second and latency per frame", ["measurement", "frames/s", "p50 ms", "p95 ms", "n"], [
        ["model only (analyse_frame)", mo["frames_per_second"], mo["median_ms"], mo["p95_ms"], mo["n"]],
        ["daemon, one frame at a time", 1000 / ul["median_ms"], ul["median_ms"], ul["p95_ms"], ul["n"]],
        ["daemon, saturated (block)", sat["steady_frames_per_second"], sat["latency"]["median_ms"],
         sat["latency"]["p95_ms"], sat["frames"]],
    ])
    o = r["overhead_ms_per_frame"]
    print(f"\nthroughput daemon / model only: {r['throughput_ratio_daemon_over_model_only']:.2f}")
    print(f"daemon overhead per frame: {o['unloaded_latency_minus_model_only']:.1f} ms (unloaded latency - model "
          f"only), {o['saturated_time_per_frame_minus_model_only']:.1f} ms (saturated time per frame - model only)")
    print("daemon stage means (ms): " + ", ".join(f"{k} {v:.1f}" for k, v in r["daemon_stage_mean_ms"].items())
          + f"; statistics (table and summary) {100 * r['statistics_share_of_frame']:.1f} % of the frame's time")
    c = r["counters"]
    print(f"counters: received {c['received']:.0f}, processed {c['processed']:.0f}, dropped {c['dropped']:.0f}, "
          f"failed {c['failed']:.0f}; saturated results in order: {sat['in_order']}; clean stop: {r['stopped_cleanly']}")
    print(f"load average {r['machine']['load_average_1m']} before, {r['machine']['load_average_1m_after']} after")
    if c["dropped"] or c["failed"] or c["processed"] != c["received"]:
        print("WARNING: frames were dropped or failed; the figures above do not describe a clean run")


if __name__ == "__main__":
    main()
