"""Synthetic generator throughput (a benchmark script, not a timed test).

    .venv/bin/python benchmarks/bench_generator.py [--count 1000] [--rate-images 100]
        [--preset randomised] [--rounds 5] [--baseline-rev REV]

Prints images per second for 512 x 512 scenes of the ``paper`` preset (as shipped, 5-20 wires,
and with the count fixed near 20) and of the ``randomised`` preset (domain randomisation, every
effect on with its preset probability), in one process and with every core through
``write_dataset``, then writes a ``--count``-image data set end to end with and without the
float OD files, reporting time and size on disk (``--count 0``: skipped). Everything goes to a
temporary directory that is deleted at the end. The load average is printed too: other jobs on
the machine slow it down.

``--preset`` (repeatable) measures only those presets; ``--rounds N`` repeats every measurement
and prints the median. ``--baseline-rev REV`` also measures the generator of git revision REV
(its ``offline_training/`` tree, with this checkout's core), interleaved with this one under the
same load, each measurement in a fresh process, and prints the ratio of the medians.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

PRESETS = {"paper": "paper preset (5-20 wires)", "paper-20": "paper, 18-22 wires", "randomised": "randomised preset"}
REPO = Path(__file__).resolve().parent.parent


def use_generator_tree(tree: str | None) -> None:
    """Import ``nanoseg_training`` from ``tree`` (a revision's ``offline_training/``) from now on."""
    if tree:
        import nanoseg_training

        nanoseg_training.__path__[:] = [tree]


def preset_config(key: str) -> Any:
    from nanoseg.config_io import load_yaml
    from nanoseg.paths import resolve_config
    from nanoseg_training.synthetic_config import IntRange, SceneConfig

    cfg = load_yaml(resolve_config("randomised" if key == "randomised" else "paper", "synthetic"), SceneConfig)
    if key == "paper-20":
        cfg = cfg.model_copy(update={"wires": cfg.wires.model_copy(update={"count": IntRange(low=18, high=22)})})
    return cfg


def disk_usage(root: Path) -> tuple[int, int]:
    """(sum of file sizes, bytes of allocated blocks) under ``root``."""
    files = [p.stat() for p in root.rglob("*") if p.is_file()]
    return sum(s.st_size for s in files), sum(s.st_blocks * 512 for s in files)


def timed_write(cfg: Any, out: Path, count: int, workers: int, write_od: bool = True) -> tuple[float, dict]:
    from nanoseg_training.coco_dataset import write_dataset

    t0 = time.perf_counter()
    summary = write_dataset(cfg, out, count, seed=1, workers=workers, progress=False, write_od=write_od)
    return time.perf_counter() - t0, summary


def measure(key: str, workers: int, images: int, tree: str | None) -> tuple[float, float]:
    """(images/s, wires/image) of ``images`` images of preset ``key``, in a fresh process."""
    cmd = [sys.executable, __file__, "--measure", key, str(workers), str(images)] + (["--tree", tree] if tree else [])
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=REPO).stdout.split()
    return float(out[0]), float(out[1])


def measure_here(key: str, workers: int, images: int) -> None:
    cfg = preset_config(key)
    with tempfile.TemporaryDirectory(prefix="bench_generator_") as tmp:
        timed_write(cfg, Path(tmp) / "warm", 2, 1)  # imports, caches, fonts
        seconds, summary = timed_write(cfg, Path(tmp) / "rate", images, workers)
    print(images / seconds, summary["annotations"] / summary["images"])


def baseline_tree(rev: str, workdir: Path) -> str:
    """Extract revision ``rev``'s ``offline_training/`` under ``workdir``; its path."""
    archive = subprocess.run(["git", "archive", rev, "offline_training"], cwd=REPO, check=True, capture_output=True)
    subprocess.run(["tar", "-x", "-C", str(workdir)], input=archive.stdout, check=True)
    return str(workdir / "offline_training")


def throughput(args: argparse.Namespace, cores: int, tree: str | None) -> None:
    variants = [("this", None)] + ([(f"baseline {args.baseline_rev}", tree)] if tree else [])
    print(f"\nthroughput, {args.rate_images} images of 512 x 512 each (PNG + OD .npy + COCO RLE)"
          f"{f', {args.rounds} rounds, median' if args.rounds > 1 else ''}:")
    for key in args.preset or list(PRESETS):
        for workers in (1, cores):
            rates: dict[str, list[float]] = {name: [] for name, _ in variants}
            for _ in range(args.rounds):
                for name, path in variants:
                    rate, wires = measure(key, workers, args.rate_images, path)
                    rates[name].append(rate)
            line = f"  {PRESETS[key]:28s} workers {workers}: {statistics.median(rates['this']):6.1f} img/s"
            if tree:
                base = statistics.median(rates[variants[1][0]])
                line += f", baseline {base:6.1f} img/s, {statistics.median(rates['this']) / base:4.2f}x"
            if args.rounds > 1:
                line += f" (this: {', '.join(f'{r:.1f}' for r in rates['this'])})"
            print(line + f" ({wires:.1f} wires/image)", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--count", type=int, default=1000, help="images in the end-to-end data set (0: skip it)")
    ap.add_argument("--rate-images", type=int, default=100, help="images per throughput measurement")
    ap.add_argument("--preset", action="append", choices=list(PRESETS), help="measure only this preset (repeatable)")
    ap.add_argument("--rounds", type=int, default=1, help="repeat each throughput measurement, print the median")
    ap.add_argument("--baseline-rev", default=None, help="also measure the generator of this git revision")
    ap.add_argument("--measure", nargs=3, metavar=("PRESET", "WORKERS", "IMAGES"), help=argparse.SUPPRESS)
    ap.add_argument("--tree", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.measure:
        use_generator_tree(args.tree)
        measure_here(args.measure[0], int(args.measure[1]), int(args.measure[2]))
        return
    cores = os.cpu_count() or 1
    print(f"cores {cores}, load average before {os.getloadavg()[0]:.2f}")
    with tempfile.TemporaryDirectory(prefix="bench_generator_") as tmp:
        root = Path(tmp)
        tree = baseline_tree(args.baseline_rev, root) if args.baseline_rev else None
        throughput(args, cores, tree)
        if args.count > 0:
            paper = preset_config("paper")
            print(f"\nend to end, {args.count} images of the paper preset, {cores} workers:")
            for write_od in (True, False):
                out = root / ("with_od" if write_od else "no_od")
                seconds, summary = timed_write(paper, out, args.count, cores, write_od)
                size, blocks = disk_usage(out)
                label = "with OD  " if write_od else "--no-od  "
                print(f"  {label} {seconds:6.1f} s ({args.count / seconds:5.1f} img/s), "
                      f"{summary['annotations']} wires, {size / 1e6:7.1f} MB in files, {blocks / 1e6:7.1f} MB on disk")
    print(f"\nload average after {os.getloadavg()[0]:.2f}; temporary data deleted")


if __name__ == "__main__":
    main()
