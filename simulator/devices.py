"""ophyd devices of the simulated microscope: an area-detector-like camera, stage motors, a clock.

``SimulatedCamera``: ``image`` (2-D uint16 counts, hinted) is acquired on ``trigger`` from the
sample at the current stage position and clock time; ``exposure_time`` (s, configuration) sets the
dose. The camera also reads the frame's ground truth (``truth_count``, ``truth_length_nm_mean``,
``truth_visible_length_nm_mean``, ``truth_visible_width_nm_mean``), so the raw run's own events
carry what a run is scored against; the daemon ignores every field but the image.

With ``hdf5_dir`` the camera writes each frame to its own AD_HDF5 file (``/entry/data/data``, one
frame, as the areaDetector HDF5 plugin in Single mode) and the event holds a datum id; the
resource and datum documents come through ``collect_asset_docs``. A file is complete before its
datum is emitted, so a reader never sees a half-written frame.
"""

from __future__ import annotations

import itertools
import math
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
from ophyd import Component, Device, Signal
from ophyd.sim import NullStatus, SynAxis

from nanoseg_sim.config import DetectorSection
from nanoseg_sim.sample import FrameTruth, frame_truth, transmission_frame
from nanoseg_training.scene import Scene

SceneSource = Callable[[], Scene]
"""The scene in the field of view now (reads the stage and the clock)."""


class SimulatedCamera(Device):
    image = Component(Signal, kind="hinted")
    exposure_time = Component(Signal, value=0.1, kind="config")
    truth_count = Component(Signal, value=0, kind="normal")
    truth_length_nm_mean = Component(Signal, value=math.nan, kind="normal")
    truth_visible_length_nm_mean = Component(Signal, value=math.nan, kind="normal")
    truth_visible_width_nm_mean = Component(Signal, value=math.nan, kind="normal")

    def __init__(self, *args: Any, scene_source: SceneSource, detector: DetectorSection, pixel_size_nm: float,
                 seed: int = 0, hdf5_dir: str | Path | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._scene_source = scene_source
        self._detector = detector
        self._pixel_size_nm = pixel_size_nm
        self._rng = np.random.default_rng(np.random.SeedSequence([seed, 0xCA3]))
        self._hdf5_dir = Path(hdf5_dir) if hdf5_dir is not None else None
        self._asset_docs: deque[tuple[str, dict[str, Any]]] = deque()
        self._frame_shape: tuple[int, int] | None = None
        self.exposure_time.put(detector.exposure_s)
        self.last_truth: FrameTruth | None = None
        self.last_frame: np.ndarray | None = None
        self.files: list[Path] = []
        self._frames = itertools.count(1)
        if self._hdf5_dir is not None:
            self._hdf5_dir.mkdir(parents=True, exist_ok=True)
            self.image.put("")
        else:
            self.image.put(np.zeros((1, 1), np.uint16))

    @property
    def detector(self) -> DetectorSection:
        return self._detector

    def trigger(self) -> NullStatus:
        scene = self._scene_source()
        exposure = float(self.exposure_time.get())
        counts = transmission_frame(scene, self._detector, exposure, self._rng)
        truth = frame_truth(scene, self._pixel_size_nm)
        self._frame_shape = counts.shape
        self.last_frame, self.last_truth = counts, truth
        if self._hdf5_dir is None:
            self.image.put(counts)
        else:
            self.image.put(self._write_hdf5(counts))
        self.truth_count.put(truth.count)
        self.truth_length_nm_mean.put(truth.length_nm_mean)
        self.truth_visible_length_nm_mean.put(truth.visible_length_nm_mean)
        self.truth_visible_width_nm_mean.put(truth.visible_width_nm_mean)
        return NullStatus()

    def _write_hdf5(self, counts: np.ndarray) -> str:
        assert self._hdf5_dir is not None
        name = f"{uuid.uuid4()}.h5"
        with h5py.File(self._hdf5_dir / name, "w") as f:
            f.create_dataset("entry/data/data", data=counts[None])
        self.files.append(self._hdf5_dir / name)
        resource_uid = str(uuid.uuid4())
        datum_id = f"{resource_uid}/0"
        self._asset_docs.append(("resource", {
            "uid": resource_uid, "spec": "AD_HDF5", "root": str(self._hdf5_dir.resolve()),
            "resource_path": name, "resource_kwargs": {"frame_per_point": 1}, "path_semantics": "posix"}))
        self._asset_docs.append(("datum", {"resource": resource_uid, "datum_id": datum_id,
                                           "datum_kwargs": {"point_number": 0}}))
        return datum_id

    def describe(self) -> dict[str, Any]:
        desc: dict[str, Any] = super().describe()
        key = desc[self.image.name]
        if self._hdf5_dir is not None:
            h, w = self._frame_shape or self._expected_shape()
            key.update(dtype="array", shape=[1, h, w], external="FILESTORE:", dtype_numpy="<u2")
        else:
            h, w = self._frame_shape or self._expected_shape()
            key.update(dtype="array", shape=[h, w], dtype_numpy="<u2")
        key["units"] = "counts"
        return desc

    def _expected_shape(self) -> tuple[int, int]:
        shape: tuple[int, int] = self._scene_source().shape
        self._frame_shape = shape
        return shape

    def collect_asset_docs(self) -> Iterator[tuple[str, dict[str, Any]]]:
        while self._asset_docs:
            yield self._asset_docs.popleft()


@dataclass
class Microscope:
    """The devices of one simulated instrument and the sample they look at."""

    camera: SimulatedCamera
    x: SynAxis  # stage x, µm
    y: SynAxis  # stage y, µm
    clock: SynAxis  # the sample's simulated time, s

    def position(self) -> tuple[float, float, float]:
        return (float(self.x.position), float(self.y.position), float(self.clock.position))


def build_microscope(sample: Any, detector: DetectorSection, pixel_size_nm: float, seed: int,
                     hdf5_dir: str | Path | None = None) -> Microscope:
    """Camera, motors and clock wired to ``sample`` (anything with ``scene_at(x_um, y_um, t_s)``)."""
    x = SynAxis(name="sample_x", value=0.0)
    y = SynAxis(name="sample_y", value=0.0)
    clock = SynAxis(name="sample_time", value=0.0)

    def scene_now() -> Scene:
        return sample.scene_at(float(x.position), float(y.position), float(clock.position))

    camera = SimulatedCamera(name="cam", scene_source=scene_now, detector=detector, pixel_size_nm=pixel_size_nm,
                             seed=seed, hdf5_dir=hdf5_dir)
    return Microscope(camera, x, y, clock)
