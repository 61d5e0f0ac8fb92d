"""The soak test's 2-minute variant: scripts/soak.py against a `nanoseg serve` subprocess.

Takes about 2.5 minutes (120 s of driving, 40 s of it warm-up, plus start and drain); marked
``slow`` so ``-m "not slow"`` can leave it out, but it runs in the default suite. The full soak
is ``scripts/soak.py`` (one hour by default).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from nanoseg.paths import REPO_ROOT

DURATION_S, WARMUP_S, INTERVAL_S = 120, 40, 5


@pytest.mark.slow
def test_two_minute_soak_passes(tmp_path: Path, trained_model_path: Path) -> None:
    out = tmp_path / "soak.json"
    proc = subprocess.run(
        [sys.executable, str(REPO_ROOT / "scripts" / "soak.py"), "--duration", str(DURATION_S),
         "--warmup", str(WARMUP_S), "--interval", str(INTERVAL_S), "--engine", "torch", "--threads", "1",
         "--frame-size", "128", "--model", str(trained_model_path), "--json", str(out), "--quiet"],
        capture_output=True, text=True, timeout=DURATION_S + 300)
    assert out.exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    failed = {k: v for k, v in result["criteria"].items() if not v["pass"]}
    assert result["pass"] and proc.returncode == 0, f"{failed}\n{proc.stdout[-3000:]}"
    samples = result["samples"]
    assert len(samples) >= DURATION_S // INTERVAL_S - 1
    assert set(result["criteria"]) >= {"rss_growth", "fd_growth", "queue_bounded", "latency_not_growing",
                                       "every_frame_analysed", "clean_exit"}
    assert result["final"]["processed"] > 0 and result["final"]["processed"] == result["final"]["sent"]
    assert all(s["rss_mb"] > 0 and s["fds"] > 0 for s in samples)
