"""Per-stage latency of the inference core for one 512 x 512 frame, torch vs ONNX Runtime.

    .venv/bin/python benchmarks/bench_inference.py [--model models/default/model.pt]
        [--repeats 20] [--warmup 3] [--threads 2] [--batches 1 2 4] [--onnx-file FILE] [--out results.json]

Stages, as the daemon runs them (daemon/pipeline.py), timed with perf_counter per repeat:

- prepare: transmission counts -> optical density (scalar I0) -> model scale -> tiles
- inference: the network alone (``engine.infer``) on the frame's tile(s)
- postprocess: score threshold and mask pasting (``to_instances``), tiles -> frame, area and
  nested-instance filters
- statistics: the particle table and the frame summary

The stages are timed in a worker thread, as the daemon's stage threads run them (``--main-thread``
to time them in the main thread instead). OMP_WAIT_POLICY defaults to PASSIVE as in the nanoseg
CLI: with spinning OpenMP workers, eager torch in the main thread was ~6x slower on this 2-core
machine (ONNX Runtime was not affected). Each engine runs in its own subprocess so that its memory is its own: ``peak_rss_growth`` is the
process's peak resident set (VmHWM of /proc/self/status; not getrusage's ru_maxrss, which Linux
carries over from the parent across fork and exec) minus its resident set after the imports and
the frame were ready, i.e. the model, the engine's buffers and the run. ONNX Runtime is given
an ONNX file exported once beforehand (the export's own memory is not counted against it).

FLOPs per frame are counted by ``torch.utils.flop_counter.FlopCounterMode`` on the torch model
(convolutions and matrix products; RoIAlign, NMS and the other torchvision ops count 0, so this is
a lower bound). The physical limit is that count divided by the measured SGEMM peak (``torch.mm``
on 2048 x 2048 float32, same thread count): the inference time the machine could reach at best.
The machine's load average is recorded: other jobs make every figure slower.

``--batches 1 2 4``: also the network's throughput on batches of B copies of the prepared frame
(``engine.infer`` alone, frames/s = B / seconds per call), ONNX Runtime on a graph exported at
``max_batch`` B (``nanoseg.export``), torch eager on the same batch. ``--onnx-file FILE``: ONNX
Runtime runs this graph (e.g. ``nanoseg export --int8``'s) instead of exporting one; engine
``onnxruntime-file`` in the tables.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
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

STAGES = ("prepare", "inference", "postprocess", "statistics")
RESULT_MARK = "RESULT "


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    """This process's resident-set high-water mark (VmHWM), reset by exec."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def profile_with_i0() -> Any:
    from nanoseg.config_io import load_yaml
    from nanoseg.frame_profile import FrameProfile, ScalarI0
    from nanoseg.paths import resolve_config

    prof = load_yaml(resolve_config("ptychography", "profiles"), FrameProfile)
    return prof.model_copy(update={"i0": ScalarI0(policy="scalar", value=DOSE)})


def run_child(args: argparse.Namespace) -> dict[str, Any]:
    """One engine, in this process: load, warm up, time the stages, measure memory."""
    import torch  # noqa: F401  # imported before the baseline: both engines' processes hold it

    from nanoseg.checkpoint import load_checkpoint
    from nanoseg.engines.factory import engine_from_checkpoint, input_spec_of
    from nanoseg.model import mask_grid_offset_px
    from nanoseg.particle_stats import frame_summary, particle_table
    from nanoseg.postprocess import PostprocessConfig, filter_instances, to_instances
    from nanoseg.prepare import instances_to_frame, prepare_frame

    frame = synthetic_frame()
    prof = profile_with_i0()
    baseline = rss_bytes()
    t0 = time.perf_counter()
    ckpt = load_checkpoint(args.model)
    engine = engine_from_checkpoint(ckpt, args.child, "cpu", args.threads, args.onnx, decoding=decoding_of(ckpt, args))
    spec, post = input_spec_of(ckpt), PostprocessConfig()
    offset = mask_grid_offset_px(ckpt.model_config)
    load_s = time.perf_counter() - t0
    rss_loaded = rss_bytes()
    c, step = engine.input_shape[0], max(engine.max_batch, 1)

    def one_frame() -> tuple[list[float], int]:
        t = [time.perf_counter()]
        prepared = prepare_frame(frame.counts, prof, spec, pixel_size_nm=PIXEL_SIZE_NM)
        t.append(time.perf_counter())
        batch = np.repeat(prepared.tiles[:, None], c, axis=1).astype(np.float32)
        raws = [r for i in range(0, len(batch), step) for r in engine.infer(batch[i: i + step])]
        t.append(time.perf_counter())
        per_tile = [to_instances(raw, tile.shape, post, offset, engine.mask_decoding.margin_px) for raw, tile in zip(raws, prepared.tiles)]
        inst = filter_instances(instances_to_frame(per_tile, prepared), post)
        t.append(time.perf_counter())
        table = particle_table(inst.masks, prepared.image, PIXEL_SIZE_NM)
        frame_summary(table)
        t.append(time.perf_counter())
        return [b - a for a, b in itertools.pairwise(t)], len(table)

    timings: dict[str, list[float]] = {s: [] for s in STAGES}
    totals: list[float] = []
    counts: list[int] = []

    def timed_loop() -> None:
        for _ in range(args.warmup):
            one_frame()
        for _ in range(args.repeats):
            stage_s, n = one_frame()
            for name, s in zip(STAGES, stage_s):
                timings[name].append(s)
            totals.append(sum(stage_s))
            counts.append(n)

    if args.main_thread:
        timed_loop()
    else:  # as in the daemon, whose stages run in their own threads
        worker = threading.Thread(target=timed_loop, name="bench-stages")
        worker.start()
        worker.join()
    count = counts[-1]
    peak = peak_rss_bytes()
    return {
        "engine": args.child, "threads": args.threads, "load_seconds": load_s,
        "timed_in": "main thread" if args.main_thread else "worker thread",
        "stages": {s: summarise(v) for s, v in timings.items()}, "total": summarise(totals),
        "frames_per_second": 1.0 / float(np.median(totals)),
        "particles_found": count, "ground_truth_wires": frame.n_wires,
        "memory": {"rss_after_imports_mib": baseline / 2**20, "rss_after_load_mib": rss_loaded / 2**20,
                   "peak_rss_mib": peak / 2**20, "peak_rss_growth_mib": (peak - baseline) / 2**20},
    }


def run_batches_child(args: argparse.Namespace) -> dict[str, Any]:
    """Engine-only frames/s of ``args.child`` on a batch of ``args.batch`` copies of the frame."""
    from nanoseg.checkpoint import load_checkpoint
    from nanoseg.engines.factory import engine_from_checkpoint, input_spec_of
    from nanoseg.prepare import prepare_frame

    ckpt = load_checkpoint(args.model)
    engine = engine_from_checkpoint(ckpt, args.child, "cpu", args.threads, args.onnx, decoding=decoding_of(ckpt, args),
                                    max_batch=args.batch)
    tiles = prepare_frame(synthetic_frame().counts, profile_with_i0(), input_spec_of(ckpt), pixel_size_nm=PIXEL_SIZE_NM).tiles
    x = np.repeat(np.repeat(tiles[:1, None], engine.input_shape[0], axis=1), args.batch, axis=0).astype(np.float32)
    for _ in range(args.warmup):
        engine.infer(x)
    seconds = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        engine.infer(x)
        seconds.append(time.perf_counter() - t0)
    median = float(np.median(seconds))
    return {"engine": args.child, "batch": args.batch, "max_batch": engine.max_batch,
            "seconds_per_call": summarise(seconds), "frames_per_second": args.batch / median,
            "precision": getattr(engine, "precision", "float32")}


def decoding_of(ckpt: Any, args: argparse.Namespace) -> Any:
    """The model's mask decoding, its view count replaced by ``--mask-tta``."""
    from nanoseg.mask_decoding import with_decoding

    return with_decoding(ckpt.mask_decoding, tta=args.mask_tta)


def export_onnx(args: argparse.Namespace, out: Path, max_batch: int = 1) -> float:
    from nanoseg.checkpoint import load_checkpoint
    from nanoseg.export import export_checkpoint_onnx

    t0 = time.perf_counter()
    ckpt = load_checkpoint(args.model)
    out.write_bytes(export_checkpoint_onnx(ckpt, decoding_of(ckpt, args), max_batch=max_batch))
    return time.perf_counter() - t0


def child(args: argparse.Namespace, engine: str, graph: str | None, batch: int | None = None) -> dict[str, Any]:
    """Run one engine (one batch size with ``batch``) in its own process; its RESULT line."""
    cmd = [sys.executable, __file__, "--child", engine, "--model", str(args.model),
           "--repeats", str(args.repeats), "--warmup", str(args.warmup), "--threads", str(args.threads)]
    if args.mask_tta:
        cmd += ["--mask-tta", str(args.mask_tta)]
    if args.main_thread:
        cmd.append("--main-thread")
    if graph:
        cmd += ["--onnx", graph]
    if batch:
        cmd += ["--batch", str(batch)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT_MARK)]
    if proc.returncode or not lines:
        sys.exit(f"bench_inference: {engine} failed:\n{proc.stderr[-3000:]}")
    return dict(json.loads(lines[-1][len(RESULT_MARK):]))


def flops_per_frame(args: argparse.Namespace) -> dict[str, Any]:
    """FlopCounterMode over the torch engine's network on the prepared frame."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from nanoseg.checkpoint import input_shape, load_checkpoint
    from nanoseg.engines.factory import input_spec_of
    from nanoseg.engines.torch_engine import TorchEngine
    from nanoseg.prepare import prepare_frame

    ckpt = load_checkpoint(args.model)
    engine = TorchEngine(ckpt.build(), input_shape(ckpt), threads=args.threads, decoding=decoding_of(ckpt, args),
                         model_config=ckpt.model_config)
    tiles = prepare_frame(synthetic_frame().counts, profile_with_i0(), input_spec_of(ckpt),
                          pixel_size_nm=PIXEL_SIZE_NM).tiles
    x = torch.from_numpy(np.repeat(tiles[:, None], engine.input_shape[0], axis=1).astype(np.float32))
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        engine.core(x)
    by_module = counter.get_flop_counts()
    parts = {name.rsplit(".", 1)[-1]: int(sum(ops.values())) for name, ops in by_module.items()
             if name.count(".") == 2}  # DetectionCore.model.<backbone|rpn|roi_heads|...>
    return {"flops": int(counter.get_total_flops()), "tiles": len(tiles), "by_part": parts}


def sgemm_peak(threads: int, n: int = 2048, repeats: int = 10) -> dict[str, float]:
    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(2):
        torch.mm(a, b)
    best = min(_timed(lambda: torch.mm(a, b)) for _ in range(repeats))
    return {"n": n, "threads": threads, "best_seconds": best, "gflops_per_second": 2 * n**3 / best / 1e9}


def _timed(fn: Any) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="nanoseg checkpoint (default %(default)s)")
    ap.add_argument("--engines", nargs="+", default=["torch", "onnxruntime"], choices=["torch", "onnxruntime"])
    ap.add_argument("--repeats", type=int, default=20, help="timed frames per engine")
    ap.add_argument("--warmup", type=int, default=3, help="untimed frames first")
    ap.add_argument("--threads", type=int, default=2, help="intra-op threads of each engine")
    ap.add_argument("--main-thread", action="store_true",
                    help="time the stages in the main thread (default: a worker thread, as the daemon runs them)")
    ap.add_argument("--out", help="write the results as JSON here")
    ap.add_argument("--mask-tta", type=int, choices=[1, 2, 4, 8],
                    help="views the masks are averaged over (default: the model's mask decoding)")
    ap.add_argument("--batches", type=int, nargs="+", metavar="B",
                    help="also the network's frames/s on batches of B frames (B = 1 2 4, say)")
    ap.add_argument("--onnx-file", type=Path, help="ONNX Runtime runs this exported graph (e.g. an int8 one) too")
    ap.add_argument("--child", choices=["torch", "onnxruntime"], help=argparse.SUPPRESS)
    ap.add_argument("--onnx", help=argparse.SUPPRESS)
    ap.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(RESULT_MARK + json.dumps(run_batches_child(args) if args.batch else run_child(args)), flush=True)
        return
    if not args.model.exists():
        sys.exit(f"bench_inference: model {args.model} not found (use --model)")

    results: dict[str, Any] = {"model": model_facts(args.model), "machine": machine_facts(),
                               "frame": {"shape": [512, 512], "pixel_size_nm": PIXEL_SIZE_NM, "i0": DOSE},
                               "repeats": args.repeats, "mask_tta": args.mask_tta, "engines": {}}
    print(f"model {args.model} ({results['model']['name']}, {results['model']['iterations']} iterations, "
          f"sha256 {results['model']['sha256'][:12]}); {results['machine']['cpu']}, "
          f"{results['machine']['affinity']} cores, load average {results['machine']['load_average_1m']}")
    with tempfile.TemporaryDirectory(prefix="bench_inference_") as tmp:
        onnx = Path(tmp) / "model.onnx"
        if "onnxruntime" in args.engines:
            results["onnx_export_seconds"] = export_onnx(args, onnx)
        runs: list[tuple[str, str, str | None]] = [(e, e, str(onnx) if e == "onnxruntime" else None) for e in args.engines]
        if args.onnx_file:
            runs.append(("onnxruntime-file", "onnxruntime", str(args.onnx_file)))
        for label, engine, graph in runs:
            results["engines"][label] = child(args, engine, graph)
        if args.batches:
            results["batches"] = {}
            for label, engine, graph in runs:
                for b in args.batches:
                    path = graph
                    if label == "onnxruntime" and b > 1:  # a graph computing b images per run
                        path = str(Path(tmp) / f"model_b{b}.onnx")
                        export_onnx(args, Path(path), max_batch=b)
                    results["batches"][f"{label} batch {b}"] = child(args, engine, path, batch=b)

    flops = flops_per_frame(args)
    peak = sgemm_peak(args.threads)
    results["flops"] = flops
    results["sgemm_peak"] = peak
    limit_s = flops["flops"] / (peak["gflops_per_second"] * 1e9)
    results["physical_limit"] = {"inference_seconds_at_sgemm_peak": limit_s}
    for r in results["engines"].values():
        inf_s = r["stages"]["inference"]["median_ms"] / 1000
        r["achieved_gflops_per_second"] = flops["flops"] / inf_s / 1e9
        r["fraction_of_sgemm_peak"] = limit_s / inf_s
    if {"torch", "onnxruntime"} <= results["engines"].keys():
        t, o = results["engines"]["torch"], results["engines"]["onnxruntime"]
        results["onnxruntime_over_torch"] = {
            s: o["stages"][s]["median_ms"] / t["stages"][s]["median_ms"] for s in STAGES
        } | {"total": o["total"]["median_ms"] / t["total"]["median_ms"]}
    results["machine"]["load_average_1m_after"] = round(os.getloadavg()[0], 2)
    report(results)
    write_json(args.out, results)


def report(results: dict[str, Any]) -> None:
    engines = results["engines"]
    rows = []
    for stage in (*STAGES, "total"):
        row: list[Any] = [stage]
        for r in engines.values():
            s = r["total"] if stage == "total" else r["stages"][stage]
            row += [s["median_ms"], s["p95_ms"]]
        if "onnxruntime_over_torch" in results:
            row.append(results["onnxruntime_over_torch"][stage])
        rows.append(row)
    header = ["stage"] + [f"{e} {q} ms" for e in engines for q in ("p50", "p95")]
    if "onnxruntime_over_torch" in results:
        header.append("ort/torch (p50)")
    where = next(iter(engines.values()))["timed_in"]
    print_table(f"per-stage latency, one 512 x 512 frame, {results['repeats']} repeats, timed in a {where}",
                header, rows)
    print_table("per engine", ["engine", "frames/s", "load s", "peak RSS MiB", "peak growth MiB",
                               "GFLOP/s achieved", "of SGEMM peak", "particles (truth)"],
                [[e, r["frames_per_second"], r["load_seconds"], r["memory"]["peak_rss_mib"],
                  r["memory"]["peak_rss_growth_mib"], r["achieved_gflops_per_second"],
                  f"{100 * r['fraction_of_sgemm_peak']:.1f} %", f"{r['particles_found']} ({r['ground_truth_wires']})"]
                 for e, r in engines.items()])
    f, p = results["flops"], results["sgemm_peak"]
    print(f"\nFLOPs per frame (FlopCounterMode, conv/matmul only): {f['flops'] / 1e9:.2f} GFLOP "
          f"({', '.join(f'{k} {v / 1e9:.2f}' for k, v in f['by_part'].items())})")
    print(f"SGEMM peak (torch.mm {p['n']}^2 fp32, {p['threads']} threads): {p['gflops_per_second']:.1f} GFLOP/s; "
          f"inference at that peak: {1000 * results['physical_limit']['inference_seconds_at_sgemm_peak']:.1f} ms")
    if "batches" in results:
        print_table("network only, batches of the frame", ["engine, batch", "max_batch", "ms per call p50", "frames/s"],
                    [[k, r["max_batch"], r["seconds_per_call"]["median_ms"], r["frames_per_second"]]
                     for k, r in results["batches"].items()])
    print(f"load average {results['machine']['load_average_1m']} before, "
          f"{results['machine']['load_average_1m_after']} after")


if __name__ == "__main__":
    main()
