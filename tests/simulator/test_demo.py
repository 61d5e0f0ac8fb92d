"""simulator/demo.py: ``nanoseg demo`` as the user runs it (child processes, free ports, report)."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

from nanoseg_sim.demo import _listening, _ready, first_ephemeral_port, free_ports


def test_free_ports_are_distinct_bindable_and_below_the_ephemeral_range() -> None:
    # CI once drew the same port twice (one choice per bind to port 0, each released before the
    # next): the daemon could not bind its control socket on the proxy's port.
    for _ in range(20):
        ports = free_ports(5)
        assert len(set(ports)) == 5
        assert all(1024 <= p < first_ephemeral_port() for p in ports)
    socks = []
    try:
        for p in free_ports(3):
            s = socket.socket()
            socks.append(s)
            s.bind(("127.0.0.1", p))
    finally:
        for s in socks:
            s.close()


def demo(*args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    return subprocess.run([sys.executable, "-m", "nanoseg.cli", "demo", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def test_demo_runs_the_loop_writes_the_report_and_stops_its_processes(tmp_path: Path, trained_model_path: Path) -> None:
    out = tmp_path / "demo"
    p = demo("--out", str(out), "--model", str(trained_model_path), "--max-frames", "3")
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["frames"] == 3 and summary["stop_reason"] == "max_frames"
    assert summary["engine"] == "onnxruntime"
    for name in ("frames.csv", "truth.json", "truth.csv", "growth.png", "last_frame.png", "daemon.log"):
        assert (out / name).stat().st_size > 0, name
    assert len((out / "frames.csv").read_text().splitlines()) == 4  # header + 3 frames
    table = [line for line in p.stdout.splitlines() if re.match(r"^\s+\d+\s+\d+\s", line)]
    assert len(table) == 3  # the live table: one row per analysed frame
    # every process the demo started is gone: its daemon's metrics and its proxy's ports are closed
    metrics = int(re.search(r"metrics http://127.0.0.1:(\d+)/metrics", p.stdout).group(1))  # type: ignore[union-attr]
    proxy = [int(x) for x in re.search(r"proxy up: in tcp://127.0.0.1:(\d+), out tcp://127.0.0.1:(\d+)",
                                       p.stdout).groups()]  # type: ignore[union-attr]
    assert not _ready(metrics) and not any(_listening(port) for port in proxy)


def test_demo_fails_clearly_without_a_model(tmp_path: Path) -> None:
    p = demo("--out", str(tmp_path), "--model", str(tmp_path / "nothing.pt"), timeout=60)
    assert p.returncode == 1
    assert "FAILED" in p.stderr and "nothing.pt is missing" in p.stderr
