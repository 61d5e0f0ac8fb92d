"""Synthetic generator throughput (a benchmark script, not a timed test).

    .venv/bin/python benchmarks/bench_generator.py [--count 1000] [--rate-images 100]

Prints images per second for 512 x 512 scenes of the ``paper`` preset (as shipped, 5-20 wires,
and with the count fixed near 20) and of the ``randomised`` preset (domain randomisation, every
effect on with its preset probability), in one process and with every core through
``write_dataset``, then writes a ``--count``-image data set end to end with and without the
float OD files, reporting time and size on disk. Everything goes to a temporary directory that
is deleted at the end. The load average is printed too: other jobs on the machine slow it down.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from nanoseg.config_io import load_yaml
from nanoseg.paths import resolve_config
from nanoseg_training.coco_dataset import write_dataset
from nanoseg_training.synthetic_config import IntRange, SceneConfig


def disk_usage(root: Path) -> tuple[int, int]:
    """(sum of file sizes, bytes of allocated blocks) under ``root``."""
    files = [p.stat() for p in root.rglob("*") if p.is_file()]
    return sum(s.st_size for s in files), sum(s.st_blocks * 512 for s in files)


def timed_write(cfg: SceneConfig, out: Path, count: int, workers: int, write_od: bool = True) -> tuple[float, dict]:
    t0 = time.perf_counter()
    summary = write_dataset(cfg, out, count, seed=1, workers=workers, progress=False, write_od=write_od)
    return time.perf_counter() - t0, summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--count", type=int, default=1000, help="images in the end-to-end data set")
    ap.add_argument("--rate-images", type=int, default=100, help="images per throughput measurement")
    args = ap.parse_args()
    cores = os.cpu_count() or 1
    paper = load_yaml(resolve_config("paper", "synthetic"), SceneConfig)
    twenty = paper.model_copy(update={"wires": paper.wires.model_copy(update={"count": IntRange(low=18, high=22)})})
    randomised = load_yaml(resolve_config("randomised", "synthetic"), SceneConfig)
    print(f"cores {cores}, load average before {os.getloadavg()[0]:.2f}")
    with tempfile.TemporaryDirectory(prefix="bench_generator_") as tmp:
        root = Path(tmp)
        print(f"\nthroughput, {args.rate_images} images of 512 x 512 each (PNG + OD .npy + COCO RLE):")
        presets = (("paper preset (5-20 wires)", paper), ("paper, 18-22 wires", twenty),
                   ("randomised preset", randomised))
        for label, cfg in presets:
            for workers in (1, cores):
                out = root / f"rate_{len(list(root.iterdir()))}"
                seconds, summary = timed_write(cfg, out, args.rate_images, workers)
                wires = summary["annotations"] / summary["images"]
                print(f"  {label:28s} workers {workers}: {args.rate_images / seconds:6.1f} img/s "
                      f"({wires:.1f} wires/image)")
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
