"""Shared pieces of the hardening tests: metrics scraping, small frames, `nanoseg serve` subprocesses.

Daemons under test run the torch engine on one thread (``model.threads: 1``): these tests share
two CPU cores with whatever else runs, and a 64 x 64 frame still costs one 512 x 512 inference.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections import defaultdict
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import yaml
import zmq
from prometheus_client.parser import text_string_to_metric_families

from nanoseg.config_io import apply_overrides
from nanoseg_daemon.service import Service
from tests.daemon.service_fixtures import service_overrides, start_service

Metrics = dict[str, dict[str, float]]  # sample name -> label value ("" without labels) -> value


def scrape(port: int) -> Metrics:
    """The daemon's /metrics as {sample: {first label value: value}}."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    out: Metrics = defaultdict(dict)
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            label = next(iter(s.labels.values()), "") if s.labels else ""
            out[s.name][label] = s.value
    return out


def by_reason(m: Metrics, name: str) -> dict[str, int]:
    """Non-zero counts of a labelled counter, e.g. by_reason(m, "nanoseg_messages_rejected_total")."""
    return {k: int(v) for k, v in m.get(name, {}).items() if v}


def total(m: Metrics, name: str) -> int:
    return int(sum(m.get(name, {}).values()))


def subtract(after: Mapping[str, int], before: Mapping[str, int]) -> dict[str, int]:
    keys = set(after) | set(before)
    return {k: after.get(k, 0) - before.get(k, 0) for k in keys if after.get(k, 0) != before.get(k, 0)}


def wait_for(condition: Callable[[], Any], timeout: float, what: str, interval: float = 0.1) -> Any:
    """Poll ``condition`` until it returns something truthy; AssertionError naming ``what`` after timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def wait_counts(metrics: Callable[[], Metrics], names: tuple[str, ...], target: int, timeout: float,
                stall_s: float = 15.0) -> Metrics:
    """Wait until the counters ``names`` sum to ``target`` (or stop moving for ``stall_s``); the last scrape."""
    deadline = time.monotonic() + timeout
    last, last_change = -1, time.monotonic()
    while True:
        m = metrics()
        now_total = sum(total(m, n) for n in names)
        if now_total >= target:
            return m
        if now_total != last:
            last, last_change = now_total, time.monotonic()
        if time.monotonic() > deadline or time.monotonic() - last_change > stall_s:
            return m
        time.sleep(0.05)


def svc_metrics(svc: Service) -> Metrics:
    assert svc.metrics_server is not None
    return scrape(svc.metrics_server.port)


def start_lean_service(state_dir: Path, model: Path, **extra: Any) -> Service:
    """start_service with one inference thread."""
    return start_service(state_dir, model, **{"model.threads": "1", **extra})


def small_frame(seed: int, size: int = 64) -> np.ndarray:
    """A transmission-like uint16 frame: Poisson counts around 1000 with one absorbing bar."""
    rng = np.random.default_rng(seed)
    od = np.zeros((size, size))
    r = int(rng.integers(size // 4, 3 * size // 4))
    od[r : r + 3, size // 8 : 7 * size // 8] = 0.8
    return rng.poisson(1000.0 * np.exp(-od)).astype(np.uint16)


def raw_frame_message(frame_id: Any, arr: np.ndarray, run: str = "r1", **metadata: Any) -> list[bytes]:
    header = {"frame_id": frame_id, "run": run, "dtype": str(arr.dtype), "shape": list(arr.shape),
              "timestamp": time.time(), "metadata": {"pixel_size_nm": 8.0, **metadata}}
    return [json.dumps(header).encode(), arr.tobytes()]


def make_certificates(directory: Path, *names: str) -> dict[str, tuple[Path, Path]]:
    """zmq.auth key pairs: name -> (public file, secret file)."""
    import zmq.auth

    directory.mkdir(parents=True, exist_ok=True)
    return {n: tuple(Path(p) for p in zmq.auth.create_certificates(str(directory), n)) for n in names}  # type: ignore[misc]


def curve_keys(secret_file: Path, server_public_file: Path) -> tuple[bytes, bytes, bytes]:
    """(public, secret, server public) for a client socket."""
    import zmq.auth

    public, secret = zmq.auth.load_certificate(str(secret_file))
    server_public, _ = zmq.auth.load_certificate(str(server_public_file))
    assert secret is not None
    return public, secret, server_public


# -- `nanoseg serve` in a subprocess ----------------------------------------------------------


def write_config(path: Path, overrides: Mapping[str, Any]) -> Path:
    """A daemon YAML file from dotted keys (values as YAML scalars, like --set)."""
    data = apply_overrides({}, {k: str(v) for k, v in overrides.items()}, str(path))
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def serve_overrides(state_dir: Path, model: Path, sockets: Path, **extra: Any) -> dict[str, str]:
    """A serve config on ipc:// endpoints under ``sockets`` (no port races), metrics on any port."""
    base = service_overrides(state_dir, model)
    base.update({
        "model.threads": "1", "log.level": "info",
        "ingest.raw.bind": f"ipc://{sockets}/raw",
        "publish.bluesky.address": f"ipc://{sockets}/docs",
        "publish.summary.address": f"ipc://{sockets}/summary",
        "control.address": f"ipc://{sockets}/control",
    })
    base.update({k: str(v) for k, v in extra.items()})
    return base


class ServeProcess:
    """``python -m nanoseg.cli serve --config FILE``; its JSON log lines go to ``log_path``."""

    def __init__(self, config: Path, log_path: Path) -> None:
        self.log_path = log_path
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        env = {k: v for k, v in env.items() if not k.startswith("NANOSEG__")}
        self._offset = log_path.stat().st_size if log_path.exists() else 0  # this process's lines only
        with open(log_path, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "nanoseg.cli", "serve", "--config", str(config)],
                                         stdout=log, stderr=log, env=env)
        self.metrics_port = 0

    def events(self) -> list[dict[str, Any]]:
        out = []
        with open(self.log_path, "rb") as f:
            f.seek(self._offset)
            text = f.read().decode(errors="replace")
        for line in text.splitlines():
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(entry, dict) and "event" in entry:
                out.append(entry)
        return out

    def event(self, name: str) -> dict[str, Any] | None:
        return next((e for e in reversed(self.events()) if e["event"] == name), None)

    def wait_started(self, timeout: float = 120.0) -> dict[str, Any]:
        def started() -> dict[str, Any] | None:
            if self.proc.poll() is not None:
                raise AssertionError(f"nanoseg serve exited {self.proc.returncode}: {self.log_path.read_text()[-2000:]}")
            return self.event("service_started")

        entry = wait_for(started, timeout, "service_started in the log", 0.2)
        self.metrics_port = int(entry["metrics_port"])
        return dict(entry)

    def metrics(self) -> Metrics:
        return scrape(self.metrics_port)

    def signal(self, signum: int) -> None:
        self.proc.send_signal(signum)

    def wait(self, timeout: float) -> int:
        return self.proc.wait(timeout)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)


class Pusher:
    """A PUSH client of the raw input and/or a SUB client of the summaries."""

    def __init__(self, raw_address: str | None, summary_address: str | None = None,
                 curve: tuple[bytes, bytes, bytes] | None = None) -> None:
        self.ctx = zmq.Context()
        self.push = self.ctx.socket(zmq.PUSH)
        self.push.linger = 0
        if curve is not None:
            self.push.curve_publickey, self.push.curve_secretkey, self.push.curve_serverkey = curve
        if raw_address is not None:
            self.push.connect(raw_address)
        self.sub: zmq.Socket[Any] | None = None
        if summary_address is not None:
            self.sub = self.ctx.socket(zmq.SUB)
            self.sub.linger = 0
            self.sub.connect(summary_address)
            self.sub.setsockopt(zmq.SUBSCRIBE, b"nanoseg.summary")
            time.sleep(0.3)  # slow joiner

    def send(self, parts: list[bytes], timeout_s: float = 30.0) -> None:
        if not self.try_send(parts, timeout_s):
            raise AssertionError("raw input accepts no more messages")

    def try_send(self, parts: list[bytes], timeout_s: float) -> bool:
        """Send unless no peer takes the message within ``timeout_s`` (e.g. a refused CURVE handshake)."""
        if not self.push.poll(int(timeout_s * 1000), zmq.POLLOUT):
            return False
        try:  # the pipe can go between poll and send (a handshake refused meanwhile): never block
            self.push.send_multipart(parts, flags=zmq.NOBLOCK)
        except zmq.Again:
            return False
        return True

    def summaries(self, n: int, timeout_s: float = 120.0) -> list[dict[str, Any]]:
        assert self.sub is not None
        out: list[dict[str, Any]] = []
        deadline = time.monotonic() + timeout_s
        while len(out) < n and time.monotonic() < deadline:
            if self.sub.poll(200):
                _topic, body = self.sub.recv_multipart()
                out.append(json.loads(body))
        return out

    def close(self) -> None:
        self.push.close(0)
        if self.sub is not None:
            self.sub.close(0)
        self.ctx.term()
