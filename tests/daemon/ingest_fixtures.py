"""Small real objects for the ingest tests: a recording sink, ophyd cameras, a bluesky proxy."""

from __future__ import annotations

import itertools
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import h5py
import numpy as np
from ophyd import Component, Device, Signal
from ophyd.sim import NullStatus

from nanoseg_daemon.contracts import FrameJob, RunStarted, RunStopped


class RecordingSink:
    """An IngestSink that records everything, thread-safe, with a wait for conditions."""

    def __init__(self) -> None:
        self.started: list[RunStarted] = []
        self.frames: list[FrameJob] = []
        self.stopped: list[RunStopped] = []
        self.rejections: list[tuple[str, str]] = []
        self.logged: list[str] = []  # the reasons of the rejections that were to be logged
        self.conversions: list[tuple[str, str]] = []
        self.order: list[tuple[str, str]] = []  # (kind, run uid) in delivery order
        self._cond = threading.Condition()

    def run_started(self, ev: RunStarted) -> None:
        with self._cond:
            self.started.append(ev)
            self.order.append(("start", ev.run_uid))
            self._cond.notify_all()

    def frame(self, job: FrameJob) -> None:
        with self._cond:
            self.frames.append(job)
            self.order.append(("frame", job.run_uid))
            self._cond.notify_all()

    def run_stopped(self, ev: RunStopped) -> None:
        with self._cond:
            self.stopped.append(ev)
            self.order.append(("stop", ev.run_uid))
            self._cond.notify_all()

    def rejected(self, reason: str, detail: str, logged: bool = True, count: int = 1) -> None:
        with self._cond:
            self.rejections += [(reason, detail)] * count
            if logged:
                self.logged.append(reason)
            self._cond.notify_all()

    def converted(self, reason: str, detail: str) -> None:
        with self._cond:
            self.conversions.append((reason, detail))

    @property
    def reasons(self) -> list[str]:
        with self._cond:
            return [r for r, _ in self.rejections]

    def wait_for(self, predicate: Callable[[RecordingSink], bool], timeout: float = 10.0) -> None:
        with self._cond:
            if not self._cond.wait_for(lambda: predicate(self), timeout):
                raise AssertionError(
                    f"timed out: {len(self.started)} started, {len(self.frames)} frames, "
                    f"{len(self.stopped)} stopped, rejections {self.rejections[-5:]}"
                )

    def clear(self) -> None:
        with self._cond:
            self.started.clear()
            self.frames.clear()
            self.stopped.clear()
            self.rejections.clear()
            self.logged.clear()
            self.order.clear()


class TouchOnLoad:
    """Unpickling this creates ``path``: stands for any code a pickle can run."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, tuple[Path]]:
        return (Path.touch, (self.path,))


def test_frames(n: int, shape: tuple[int, int] = (24, 32), dtype: Any = np.uint16) -> np.ndarray:
    """``n`` distinct frames: frame k holds k*1000 + its pixel index."""
    h, w = shape
    base = np.arange(h * w, dtype=np.int64).reshape(h, w)
    return np.stack([(base + 1000 * k) % 60000 for k in range(n)]).astype(dtype)


test_frames.__test__ = False  # type: ignore[attr-defined]  # a helper, not a pytest test


class ImageCamera(Device):
    """An area-detector-like device whose ``image`` reading is a 2-D array held in the event."""

    image = Component(Signal, kind="hinted")

    def __init__(self, *args: Any, frames: np.ndarray, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._frames: Iterator[np.ndarray] = itertools.cycle(list(frames))
        self.image.put(frames[0])

    def trigger(self) -> NullStatus:
        self.image.put(next(self._frames))
        return NullStatus()


class HDF5Camera(Device):
    """An area detector writing AD_HDF5 files: the event holds a datum id, frames are on disk.

    ``stage`` writes all ``frames`` to ``<directory>/<uid>.h5`` at ``/entry/data/data`` (as the
    areaDetector HDF5 plugin lays them out) and emits a resource; each ``trigger`` emits a datum
    for the next point.
    """

    image = Component(Signal, kind="hinted", value="")

    def __init__(self, *args: Any, frames: np.ndarray, directory: Path, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._frames = np.asarray(frames)
        self._directory = Path(directory)
        self._asset_docs: deque[tuple[str, dict[str, Any]]] = deque()
        self._resource_uid: str | None = None
        self._points: Iterator[int] = itertools.count()
        self.files: list[Path] = []

    def stage(self) -> list[Any]:
        path = self._directory / f"{uuid.uuid4()}.h5"
        with h5py.File(path, "w") as f:
            f.create_dataset("entry/data/data", data=self._frames)
        self.files.append(path)
        self._resource_uid = str(uuid.uuid4())
        self._points = itertools.count()
        self._asset_docs.append(
            (
                "resource",
                {
                    "uid": self._resource_uid,
                    "spec": "AD_HDF5",
                    "root": str(self._directory),
                    "resource_path": path.name,
                    "resource_kwargs": {"frame_per_point": 1},
                    "path_semantics": "posix",
                },
            )
        )
        return super().stage()  # type: ignore[no-any-return]

    def trigger(self) -> NullStatus:
        point = next(self._points)
        datum_id = f"{self._resource_uid}/{point}"
        self._asset_docs.append(
            (
                "datum",
                {
                    "resource": self._resource_uid,
                    "datum_id": datum_id,
                    "datum_kwargs": {"point_number": point},
                },
            )
        )
        self.image.put(datum_id)
        return NullStatus()

    def describe(self) -> dict[str, Any]:
        desc = super().describe()
        h, w = self._frames.shape[1:]
        desc[self.image.name].update(dtype="array", shape=[1, h, w], external="FILESTORE:")
        return desc  # type: ignore[no-any-return]

    def collect_asset_docs(self) -> Iterator[tuple[str, dict[str, Any]]]:
        while self._asset_docs:
            yield self._asset_docs.popleft()


def start_proxy() -> tuple[str, str]:
    """A real bluesky 0MQ Proxy on loopback, random ports, in a daemon thread.

    Returns (in address for Publishers, out address for subscribers). The proxy lives until the
    test process ends (bluesky's Proxy has no stop).
    """
    from bluesky.callbacks.zmq import Proxy

    proxy = Proxy("tcp://127.0.0.1", "tcp://127.0.0.1")
    threading.Thread(target=proxy.start, name="bluesky-proxy", daemon=True).start()
    return str(proxy.in_port), str(proxy.out_port)


def wait_until_connected(
    publish: Callable[[], None], sink: RecordingSink, reason: str, timeout: float = 10.0
) -> None:
    """Publish probes until the subscriber rejects one with ``reason`` (0MQ's slow joiner)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        publish()
        time.sleep(0.02)
        if reason in sink.reasons:
            time.sleep(0.05)  # let in-flight probes land before clearing
            sink.clear()
            return
    raise AssertionError("subscriber never received a probe through the proxy")


def blob_detector(directory: Path, name: str = "det") -> Any:
    """ophyd-async's simulated area detector (``SimBlobDetector``): each trigger writes a 240 x 320
    uint8 frame to an HDF5 file in ``directory`` through its own writer (SWMR) and the RunEngine
    emits stream_resource / stream_datum documents. Needs a RunEngine made before (its loop)."""
    from ophyd_async.core import StaticPathProvider, UUIDFilenameProvider, init_devices
    from ophyd_async.sim import PatternGenerator, SimBlobDetector

    with init_devices():
        det = SimBlobDetector(StaticPathProvider(UUIDFilenameProvider(), directory), PatternGenerator(),
                              name=name)
    return det
