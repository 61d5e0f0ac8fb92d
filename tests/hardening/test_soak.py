"""The soak test, short: scripts/soak.py against a `nanoseg serve` subprocess.

The default run drives the daemon for 48 s (16 s of it warm-up, a sample every 4 s, a new run every
25 frames), about a minute in all. The 2-minute variant is marked ``slow``: the default run leaves
it out, ``bash scripts/test.sh -m slow`` runs it. The full soak is ``scripts/soak.py`` (one hour by
default).

The daemon runs with glibc's allocator told to keep what it frees (one arena, no mmap, no trim):
otherwise inference buffers go back to the system and come again, and RSS read during a frame or
between two differs by 6-10 % (measured: 1090 and 1210 MiB in turn), which alone decides the 5 %
growth criterion. Kept, RSS is the daemon's high-water mark (flat within 0.5 MiB over 30 s, measured),
so what makes it grow is memory that is never freed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from nanoseg.paths import REPO_ROOT

KEEP_FREED_MEMORY = {"MALLOC_ARENA_MAX": "1", "MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(1 << 40)}


def soak(tmp_path: Path, model: Path, duration_s: int, warmup_s: int, interval_s: int, frames_per_run: int) -> None:
    """Run scripts/soak.py; assert it passes every criterion with every sample taken."""
    out = tmp_path / "soak.json"
    proc = subprocess.run(
        [sys.executable, str(REPO_ROOT / "scripts" / "soak.py"), "--duration", str(duration_s),
         "--warmup", str(warmup_s), "--interval", str(interval_s), "--engine", "torch", "--threads", "1",
         "--frame-size", "128", "--frames-per-run", str(frames_per_run), "--model", str(model),
         "--json", str(out), "--quiet"],
        capture_output=True, text=True, timeout=duration_s + 300, env={**os.environ, **KEEP_FREED_MEMORY})
    assert out.exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    failed = {k: v for k, v in result["criteria"].items() if not v["pass"]}
    assert result["pass"] and proc.returncode == 0, f"{failed}\n{proc.stdout[-3000:]}"
    samples = result["samples"]
    assert len(samples) >= duration_s // interval_s - 1
    assert set(result["criteria"]) >= {"rss_growth", "rss_step", "fd_growth", "queue_bounded", "latency_not_growing",
                                       "every_frame_analysed", "clean_exit"}
    assert result["final"]["processed"] > 0 and result["final"]["processed"] == result["final"]["sent"]
    assert all(s["rss_mb"] > 0 and s["fds"] > 0 for s in samples)


def test_rss_growth_is_judged_on_its_trend_a_one_off_rise_within_bounds() -> None:
    """A steady climb of 6 % over the run fails (a leak), a one-off rise of 9 % late or 5 % in the
    middle of the run (a new high-water mark of the heap, seen under load) passes, and one of 20 %
    fails."""
    sys.path.insert(0, str(REPO_ROOT / "scripts"))
    from soak import Sample, judge

    def run(rss: list[float]) -> dict[str, bool]:
        samples = [Sample(16.0 + 4 * i, r, 23, 14, 0, 5 * i, 1.5, 2.2, 2.3, 0, 0, 0) for i, r in enumerate(rss)]
        final = {"processed": 60, "sent": 60, "received": 60, "exit_code": 0}
        return {k: v["pass"] for k, v in judge(samples, 16.0, 16, final).items()}

    flat = [1117.5] * 9
    assert all(run(flat).values())
    leak = [1117.5 * (1 + 0.06 * i / 8) for i in range(9)]
    assert not run(leak)["rss_growth"]
    step = [*flat[:7], 1213.8, 1214.0]
    assert run(step)["rss_growth"] and run(step)["rss_step"]
    middle = [1104.0] * 4 + [1156.3] * 5  # one rise mid-window (measured under load): no trend
    assert run(middle)["rss_growth"] and run(middle)["rss_step"]
    stairs = [1117.5 + 12.0 * i for i in range(9)]  # a rise in every interval: a leak
    assert not run(stairs)["rss_growth"]
    assert not run([*flat[:7], 1345.0, 1345.0])["rss_step"]


def test_short_soak_passes(tmp_path: Path, trained_model_path: Path) -> None:
    soak(tmp_path, trained_model_path, duration_s=48, warmup_s=16, interval_s=4, frames_per_run=25)


@pytest.mark.slow
def test_two_minute_soak_passes(tmp_path: Path, trained_model_path: Path) -> None:
    soak(tmp_path, trained_model_path, duration_s=120, warmup_s=40, interval_s=5, frames_per_run=50)
