"""A running Service on loopback with ephemeral ports, and synthetic transmission frames."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zmq

from nanoseg.config_io import load_yaml
from nanoseg.paths import resolve_config
from nanoseg_daemon.config import load_daemon_config
from nanoseg_daemon.service import Service
from nanoseg_training.coco_dataset import make_sample
from nanoseg_training.rendering import transmission_counts
from nanoseg_training.synthetic_config import SceneConfig

DOSE = 4000.0
OD_PER_VOXEL = 0.012


@dataclass(frozen=True)
class TransmissionFrame:
    counts: np.ndarray  # uint16 detector counts
    n_wires: int


def transmission_frame(seed: int, index: int) -> TransmissionFrame:
    """A paper-preset scene measured in transmission: Poisson(DOSE * exp(-OD)), 8 nm pixels."""
    cfg = load_yaml(resolve_config("paper", "synthetic"), SceneConfig)
    s = make_sample(cfg, seed, index)
    rng = np.random.default_rng(seed * 1000 + index)
    from scipy import ndimage

    od = ndimage.gaussian_filter(s.scene.thickness.astype(np.float64) * OD_PER_VOXEL, 2.0)
    counts = transmission_counts(od, DOSE, 1.0, rng)
    return TransmissionFrame(np.clip(np.rint(counts), 0, 65535).astype(np.uint16), len(s.scene.wires))


def service_overrides(state_dir: Path, model: Path, **extra: Any) -> dict[str, str]:
    base = {
        "model.path": str(model), "model.engine": "torch", "model.threads": "2",
        "store.state_dir": str(state_dir), "ingest.bluesky.enabled": "false",
        "ingest.raw.enabled": "true", "ingest.raw.bind": "tcp://127.0.0.1:*",
        "publish.bluesky.bind": "true", "publish.bluesky.address": "tcp://127.0.0.1:*",
        "publish.summary.address": "tcp://127.0.0.1:*", "control.address": "tcp://127.0.0.1:*",
        "metrics.port": "0", "log.level": "warning",
    }
    base.update({k: str(v) for k, v in extra.items()})
    return base


def start_service(state_dir: Path, model: Path, **extra: Any) -> Service:
    svc = Service(load_daemon_config(None, service_overrides(state_dir, model, **extra), environ={}))
    svc.start()
    return svc


def raw_header(frame_id: str | int, arr: np.ndarray, run: str = "r1", **metadata: Any) -> bytes:
    return json.dumps({"frame_id": frame_id, "run": run, "dtype": str(arr.dtype), "shape": list(arr.shape),
                       "timestamp": time.time(), "metadata": metadata}).encode()


class Client:
    """PUSH to the raw input, SUB to the summaries; closes its sockets."""

    def __init__(self, svc: Service) -> None:
        self.ctx = zmq.Context()
        self.push = self.ctx.socket(zmq.PUSH)
        self.push.linger = 0
        assert svc.ingest.raw_address
        self.push.connect(svc.ingest.raw_address)
        self.sub = self.ctx.socket(zmq.SUB)
        self.sub.linger = 0
        assert svc.summary_pub is not None
        self.sub.connect(svc.summary_pub.address)
        self.sub.setsockopt(zmq.SUBSCRIBE, b"nanoseg.summary")
        time.sleep(0.3)  # slow joiner

    def send(self, parts: list[bytes]) -> None:
        self.push.send_multipart(parts)

    def summaries(self, n: int, timeout_s: float = 120.0) -> Iterator[dict[str, Any]]:
        deadline = time.monotonic() + timeout_s
        got = 0
        while got < n and time.monotonic() < deadline:
            if self.sub.poll(200):
                _topic, body = self.sub.recv_multipart()
                got += 1
                yield json.loads(body)

    def close(self) -> None:
        self.push.close(0)
        self.sub.close(0)
        self.ctx.term()


Docs = list[tuple[str, dict[str, Any]]]


def run_plan(plan: Any) -> tuple[Docs, BaseException | None]:
    """``plan`` on a fresh RunEngine: the documents it emitted, and the error it failed with (None)."""
    from bluesky import RunEngine

    RE = RunEngine({}, context_managers=[])
    docs: Docs = []
    RE.subscribe(lambda n, d: docs.append((n, d)))
    try:
        RE(plan)
    except Exception as err:  # the plan's failure, checked by the test
        return docs, err
    return docs, None
