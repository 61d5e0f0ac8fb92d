"""Which threads hold Python's interpreter lock, in ms per frame, from a py-spy recording.

    pip install py-spy
    py-spy record --gil --threads -r 500 -f raw -o gil.txt -- \\
        python benchmarks/bench_daemon.py --engine null --null-detections 0 --sizes 128 --inputs raw --frames 4000
    python benchmarks/gil_share.py gil.txt --rate 500 --frames 4000 [--top 10]

``--gil`` keeps only the samples of the thread holding the lock, so a thread's samples / rate is
the time it held it. The daemon's own threads are named (``stage-*``, ``nanoseg-ingest``); the
main thread's samples are the benchmark's (imports, the service's start). For each thread the
functions it spent most of that time in (inclusive) are listed under it with ``--top N``.
"""

from __future__ import annotations

import argparse
import re
from collections import defaultdict
from pathlib import Path

_SKIP = ("threading.py", "<frozen importlib")  # frames every sample of a thread shares


def held_ms(path: Path, rate_hz: float, frames: int) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """Per thread, ms per frame holding the lock; and per thread, ms per frame per function.

    Parameters
    ----------
    path : Path
        py-spy's ``-f raw`` output (collapsed stacks: ``thread;frame;...;frame count``).
    rate_hz : float
        The recording's sampling rate (``-r``), samples per second.
    frames : int
        Frames the recorded run processed.

    Returns
    -------
    (dict, dict of dict)
        Thread name -> ms per frame; thread name -> function -> ms per frame (inclusive).
    """
    per_sample_ms = 1000.0 / rate_hz / frames
    threads: dict[str, float] = defaultdict(float)
    functions: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        first, *calls = stack.split(";")
        name = first.split("): ", 1)[-1].strip('"')  # "thread (TID): NAME"
        ms = int(count) * per_sample_ms
        threads[name] += ms
        for fn in dict.fromkeys(re.sub(r" \(.*/", " (", c) for c in calls if not any(k in c for k in _SKIP)):
            functions[name][fn] += ms
    return threads, functions


def _largest(ms: dict[str, float]) -> list[tuple[str, float]]:
    return sorted(ms.items(), key=lambda kv: -kv[1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("recording", type=Path, help="py-spy record --gil -f raw output")
    ap.add_argument("--rate", type=float, default=100.0, help="py-spy's -r, samples per second (default 100)")
    ap.add_argument("--frames", type=int, required=True, help="frames the recorded run processed")
    ap.add_argument("--top", type=int, default=0, help="functions listed per thread")
    args = ap.parse_args()
    threads, functions = held_ms(args.recording, args.rate, args.frames)
    daemon = sum(ms for name, ms in threads.items() if name.startswith(("stage-", "nanoseg-")))
    print(f"interpreter lock held, ms per frame: daemon threads {daemon:.3f}")
    for name, ms in _largest(threads):
        print(f"  {name:24s} {ms:8.3f}")
        for fn, fms in _largest(functions[name])[: args.top]:
            print(f"      {fms:8.3f}  {fn}")


if __name__ == "__main__":
    main()
