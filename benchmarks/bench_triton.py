"""Local ONNX Runtime vs the triton engine, and the promotion round trip.

    .venv/bin/python benchmarks/bench_triton.py [--model models/default/model.pt] [--frames 20]
        [--threads 1] [--val DIR] [--limit 5] [--out results.json]

Needs the pytriton environment (scripts/setup_pytriton.sh). On this machine (CPU only) the Triton
server is pytriton's bundled ``tritonserver`` on loopback, its Python backend running the same
``model.onnx`` in ONNX Runtime with the same thread count as the local engine, so the difference
is what going through Triton costs: serialisation, gRPC on loopback, the server's scheduling and
the Python-backend hop (shared memory to the stub process). Measured:

1. engine: ``Engine.infer`` on one prepared 512 x 512 input, frame after frame; per-frame time
   of the local OnnxEngine vs the TritonEngine, overhead = the difference; Triton's own
   statistics split the remote time into queue and compute (compute includes the Python hop).
2. daemon: a real ``Service`` per engine fed ``--frames`` transmission frames as fast as it takes
   them (queue policy block); frames/s between the first and the last summary; two alternating
   rounds per engine.
3. promotion: ``promote`` of a second registry version (evaluate on ``--limit`` validation
   images, compare, switch ``current``) with a running daemon (engine onnxruntime) hot-reloading
   it, then ``rollback``; seconds per phase.

Another job may share the cores: the load average is recorded with the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.* fixtures

import numpy as np


def per_frame(fn: Any, x: np.ndarray, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn(x)
        out.append(time.perf_counter() - t0)
    return out


def ms(seconds: list[float]) -> dict[str, float]:
    v = sorted(s * 1000 for s in seconds)
    return {"median_ms": round(statistics.median(v), 2), "mean_ms": round(statistics.fmean(v), 2),
            "p95_ms": round(v[min(len(v) - 1, int(0.95 * len(v)))], 2), "frames_per_s": round(1000 / statistics.fmean(v), 3)}


STAT_KEYS = ("success", "queue", "compute_input", "compute_infer", "compute_output")


def triton_stats(url: str, model: str) -> dict[str, tuple[int, int]]:
    """Triton's cumulative (count, ns) per phase of the model's requests."""
    import tritonclient.grpc as grpcclient

    c = grpcclient.InferenceServerClient(url)
    s = c.get_inference_statistics(model, as_json=True)["model_stats"][0]["inference_stats"]
    c.close()
    return {k: (int(s[k].get("count", 0)), int(s[k].get("ns", 0))) for k in STAT_KEYS}


def stats_between(before: dict[str, tuple[int, int]], after: dict[str, tuple[int, int]]) -> dict[str, float]:
    """Mean ms per request of each phase, over the requests between two snapshots."""
    return {k: round((after[k][1] - before[k][1]) / max(after[k][0] - before[k][0], 1) / 1e6, 2) for k in STAT_KEYS}


def bench_engines(reg: Any, version: str, server: Any, frames: int, threads: int) -> dict[str, Any]:
    from nanoseg.engines.onnx_engine import OnnxEngine
    from nanoseg.engines.triton_engine import TritonEngine
    from nanoseg.export import trace_image

    x = trace_image((1, 512, 512)).numpy()
    local = OnnxEngine(str(reg.path(version) / "model.onnx"), threads=threads)
    remote = TritonEngine(server.url, "nanoseg")
    local.infer(x), remote.infer(x)  # warm-up: first runs allocate
    # Interleaved rounds, so a burst of load from another job hits both engines alike.
    t_local: list[float] = []
    t_remote: list[float] = []
    before = triton_stats(server.url, "nanoseg")
    for _ in range(2):
        t_local += per_frame(local.infer, x, frames // 2)
        t_remote += per_frame(remote.infer, x, frames // 2)
    server_ms = stats_between(before, triton_stats(server.url, "nanoseg"))
    remote.close()
    loc, rem = ms(t_local), ms(t_remote)
    return {"local_onnxruntime": loc, "triton": rem,
            "triton_minus_local_ms": {"median": round(rem["median_ms"] - loc["median_ms"], 2),
                                      "mean": round(rem["mean_ms"] - loc["mean_ms"], 2)},
            "triton_server_ms_per_request": server_ms,
            # Same requests: what the client waited beyond the server's request handling
            # (serialisation, gRPC on loopback, client library).
            "transport_overhead_ms": round(rem["mean_ms"] - server_ms["success"], 2)}


def bench_daemon(model: Path, onnx: Path, server: Any, frames: int, threads: int, state: Path) -> dict[str, Any]:
    from tests.daemon.service_fixtures import (
        DOSE,
        Client,
        raw_header,
        start_service,
        transmission_frame,
    )

    data = [transmission_frame(11, i % 4) for i in range(4)]
    engines = (("onnxruntime", {"model.engine": "onnxruntime", "model.onnx_path": str(onnx)}),
               ("triton", {"model.engine": "triton", "model.triton_url": server.url, "model.triton_model": "nanoseg"}))
    out: dict[str, list[dict[str, Any]]] = {"onnxruntime": [], "triton": []}
    # Two alternating rounds: the spread between rounds shows how much other load moved the figures.
    for k, (name, extra) in enumerate(engines * 2):
        svc = start_service(state / f"{name}{k}", model, **{"model.threads": str(threads), **extra})
        client = Client(svc)
        try:
            for i in range(frames):
                f = data[i % len(data)]
                client.send([raw_header(i, f.counts, pixel_size_nm=8.0, i0=DOSE), f.counts.tobytes()])
            got = [time.monotonic() for _ in client.summaries(frames, timeout_s=600)]
        finally:
            client.close()
            svc.stop()
        span = got[-1] - got[0]
        out[name].append({"frames": len(got), "frames_per_s": round((len(got) - 1) / span, 3) if span > 0 else None})
    return out


def bench_promotion(model: Path, val: Path, limit: int, threads: int, work: Path) -> dict[str, Any]:
    from nanoseg_training.promotion import ValidationSet, promote, rollback, summary
    from nanoseg_training.registry import Registry
    from tests.daemon.service_fixtures import start_service
    from tests.offline_training.registry_fixtures import renamed_checkpoint

    reg = Registry(work / "promo")
    t0 = time.monotonic()
    reg.register(model)
    reg.register(renamed_checkpoint(model, work / "retrained.pt", "retrained"))
    register_s = (time.monotonic() - t0) / 2
    vs = ValidationSet(val, limit, "torch", threads)
    first = promote(reg, "v1", vs)
    # The daemon's default engine: a reload exports the checkpoint to ONNX and warms up.
    svc = start_service(work / "promo-state", reg.path("v1") / "model.pt",
                        **{"model.threads": str(threads), "model.engine": "onnxruntime"})
    try:
        t1 = time.monotonic()
        second = promote(reg, "v2", vs, daemons=[svc.control.address])
        promote_total = time.monotonic() - t1
        t2 = time.monotonic()
        back = rollback(reg, daemons=[svc.control.address])
        rollback_total = time.monotonic() - t2
    finally:
        svc.stop()
    return {"register_seconds_each": round(register_s, 2), "validation_images": limit,
            "first_promotion": summary(first),
            "promotion_with_daemon": {**summary(second), "total_seconds": round(promote_total, 2),
                                      "note": "evaluates v2 only: v1's AP on this set is in its manifest"},
            "rollback_with_daemon": {**summary(back), "total_seconds": round(rollback_total, 2)}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=os.environ.get("NANOSEG_TEST_MODEL", "models/default/model.pt"))
    ap.add_argument("--frames", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--val", help="validation set (default: 5 generated paper-preset images)")
    ap.add_argument("--limit", type=int, default=5)
    ap.add_argument("--out")
    args = ap.parse_args()

    from nanoseg_training.registry import Registry
    from tests.nanoseg.triton_fixtures import TritonServer, pytriton_python
    from tests.offline_training.registry_fixtures import validation_set

    py, why = pytriton_python()
    if py is None:
        print(f"bench_triton: {why}", file=sys.stderr)
        return 2
    model = Path(args.model)
    with tempfile.TemporaryDirectory(prefix="bench-triton-") as tmp:
        work = Path(tmp)
        val = Path(args.val) if args.val else validation_set(work / "val", count=args.limit)
        reg = Registry(work / "reg")
        version = reg.register(model).version
        server = TritonServer(py, work / "server.log", onnx=reg.path(version) / "model.onnx", threads=args.threads)
        try:
            t0 = time.monotonic()
            server.wait_ready()
            result: dict[str, Any] = {"triton_start_seconds": round(time.monotonic() - t0, 2),
                                      "load_average_before": os.getloadavg()}
            result["engine"] = bench_engines(reg, version, server, args.frames, args.threads)
            result["daemon"] = bench_daemon(reg.path(version) / "model.pt", reg.path(version) / "model.onnx",
                                            server, args.frames, args.threads, work)
        finally:
            server.stop()
        result["promotion"] = bench_promotion(model, val, args.limit, args.threads, work)
        result["load_average_after"] = os.getloadavg()
        result["threads"] = args.threads
        result["model"] = str(model)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
