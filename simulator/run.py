"""``nanoseg simulate``: a RunEngine, the simulated microscope, bluesky's Publisher to a 0MQ proxy.

Modes: ``raster`` (``bp.list_scan`` of the stage over a grid of fields of view) and ``growth``
(``bp.list_scan`` of the clock over the frame times; with ``--monitor``, the ``monitor_growth``
plan reads the daemon's analysis through ``NanosegStats`` and stops at the target or a stall).

The start document carries what the daemon needs (``pixel_size_nm``, ``i0`` = dose + dark,
``dark`` = the dark frame, ``sample``, ``nanoseg_profile`` when configured) and the simulator's
configuration. The ground truth of each frame is in the raw run's own events (the camera's truth
fields); ``TruthRecorder`` collects it into ``truth.json`` and ``truth.csv`` so a run can be scored.
"""

from __future__ import annotations

import argparse
import csv
import functools
import json
import math
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import bluesky.plan_stubs as bps
import bluesky.plans as bp
from bluesky import RunEngine
from bluesky.callbacks.zmq import Publisher
from event_model import DocumentRouter

from nanoseg.codec import json_safe, msgpack_dumps
from nanoseg.config_io import (
    apply_overrides,
    load_yaml,
    parse_config,
    parse_sets,
    read_yaml_mapping,
)
from nanoseg.paths import resolve_config
from nanoseg_sim.config import SimulatorConfig
from nanoseg_sim.devices import Microscope, build_microscope
from nanoseg_sim.sample import GrowthSample, RasterSample, dark_frame, field_config, i0_counts
from nanoseg_training.synthetic_config import SceneConfig

TRUTH_FIELDS = ("truth_count", "truth_length_nm_mean", "truth_visible_length_nm_mean",
                "truth_visible_width_nm_mean")


def load_simulator_config(name_or_path: str, overrides: Mapping[str, str] | None = None) -> SimulatorConfig:
    """A config from configs/simulator (or a path), with dotted ``key=value`` overrides."""
    path = resolve_config(name_or_path, "simulator")
    data = read_yaml_mapping(path)
    return parse_config(apply_overrides(data, overrides or {}, f"{path} (--set)"), SimulatorConfig, str(path))


def scene_config(cfg: SimulatorConfig) -> SceneConfig:
    return field_config(load_yaml(resolve_config(cfg.scene.preset, "synthetic"), SceneConfig), cfg.scene.field_px)


def growth_horizon_s(cfg: SimulatorConfig) -> float:
    """How far nucleation is drawn: the longest run the config can make."""
    return max(cfg.growth.frames, cfg.monitor.max_frames) * cfg.growth.interval_s


@dataclass
class Simulation:
    """The simulated instrument of one config: sample, devices and start metadata."""

    cfg: SimulatorConfig
    scene_cfg: SceneConfig
    sample: RasterSample | GrowthSample
    microscope: Microscope

    @classmethod
    def build(cls, cfg: SimulatorConfig) -> Simulation:
        scene_cfg = scene_config(cfg)
        sample: RasterSample | GrowthSample
        if cfg.mode == "raster":
            sample = RasterSample(scene_cfg, cfg.raster, cfg.seed)
        else:
            sample = GrowthSample(scene_cfg, cfg.growth, cfg.seed, growth_horizon_s(cfg))
        mic = build_microscope(sample, cfg.detector, scene_cfg.pixel_size_nm, cfg.seed, cfg.hdf5_dir)
        return cls(cfg, scene_cfg, sample, mic)

    @property
    def pixel_size_nm(self) -> float:
        return self.scene_cfg.pixel_size_nm

    def start_metadata(self, with_i0: bool = True) -> dict[str, Any]:
        """What the daemon reads from the start document, plus the simulator's configuration."""
        shape = (self.scene_cfg.domain.depth, self.scene_cfg.domain.width)
        md: dict[str, Any] = {
            "pixel_size_nm": self.pixel_size_nm,
            "dark": dark_frame(self.cfg.detector, shape),
            "sample": self.cfg.sample,
            "simulator": {"name": self.cfg.name, "mode": self.cfg.mode, "seed": self.cfg.seed,
                          "preset": self.cfg.scene.preset, "config": self.cfg.model_dump(mode="json")},
        }
        if with_i0:
            md["i0"] = i0_counts(self.cfg.detector, float(self.microscope.camera.exposure_time.get()))
        if self.cfg.profile:
            md["nanoseg_profile"] = self.cfg.profile
        return md

    def plain_plan(self) -> Any:
        """The run without feedback: the raster over the grid, or the growth series over time."""
        mic, cfg = self.microscope, self.cfg
        per_step = None
        if cfg.pace_s > 0:
            def per_step(detectors: Any, step: Any, pos_cache: Any) -> Any:
                yield from bps.one_nd_step(detectors, step, pos_cache)
                yield from bps.sleep(cfg.pace_s)
        if isinstance(self.sample, RasterSample):
            pos = self.sample.positions()
            # (bluesky's annotation of list_scan's *args does not match its documented call)
            return bp.list_scan([mic.camera], mic.x, [p[0] for p in pos], mic.y, [p[1] for p in pos],  # type: ignore[arg-type]
                                per_step=per_step, md=self.start_metadata())  # type: ignore[arg-type]
        times = [k * cfg.growth.interval_s for k in range(cfg.growth.frames)]
        return bp.list_scan([mic.camera], mic.clock, times, per_step=per_step,  # type: ignore[arg-type]
                            md=self.start_metadata())

    def monitor_plan(self, stats: Any) -> Any:
        """monitor_growth on this microscope (growth mode)."""
        from nanoseg_daemon.plans import monitor_growth

        m = self.cfg.monitor
        return monitor_growth(self.microscope.camera, stats, m.target_mean_length_nm, m.stall_rate_nm_per_frame,
                              m.stall_frames, m.max_frames, clock=self.microscope.clock,
                              interval_s=self.cfg.growth.interval_s, smoothing=m.smoothing,
                              md=self.start_metadata())


def json_serializer(doc: Any) -> bytes:
    """Strict JSON of ``doc`` (NumPy values as Python values, non-finite floats as null)."""
    return json.dumps(json_safe(doc)).encode()


def make_publisher(address: str, prefix: str = "", serializer: str = "msgpack", connect_wait_s: float = 0.5) -> Publisher:
    """bluesky's own Publisher, connected to a proxy's input; waits out 0MQ's slow joiner."""
    ser: Callable[[Any], bytes] = msgpack_dumps if serializer == "msgpack" else json_serializer
    pub = Publisher(address, prefix=prefix.encode(), serializer=ser)
    time.sleep(connect_wait_s)
    return pub


class TruthRecorder(DocumentRouter):
    """Collects each raw frame's ground truth from the primary events (a RunEngine callback)."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[dict[str, Any]] = []
        self.run_uid: str | None = None
        self.stop_doc: dict[str, Any] | None = None
        self._primary: set[str] = set()
        self._lock = threading.Lock()

    def start(self, doc: Any) -> None:
        self.run_uid = doc["uid"]

    def descriptor(self, doc: Any) -> None:
        if doc.get("name") == "primary":
            self._primary.add(doc["uid"])

    def event(self, doc: Any) -> Any:
        if doc["descriptor"] not in self._primary:
            return doc
        data = doc["data"]
        row: dict[str, Any] = {"run_uid": self.run_uid, "seq_num": doc["seq_num"], "frame_uid": doc["uid"],
                               "time": doc["time"]}
        for key in ("sample_time", "sample_x", "sample_y", "cam_exposure_time"):
            if key in data:
                row[key] = float(data[key])
        for f in TRUTH_FIELDS:
            v = float(data.get(f"cam_{f}", math.nan))
            row[f] = None if not math.isfinite(v) else (int(v) if f == "truth_count" else v)
        with self._lock:
            self.rows.append(row)
        return doc

    def stop(self, doc: Any) -> None:
        self.stop_doc = dict(doc)

    def write(self, out_dir: Path) -> tuple[Path, Path]:
        out_dir.mkdir(parents=True, exist_ok=True)
        with self._lock:
            rows = list(self.rows)
        j, c = out_dir / "truth.json", out_dir / "truth.csv"
        j.write_text(json.dumps({"run_uid": self.run_uid, "frames": rows}, indent=1))
        keys = sorted({k for r in rows for k in r}, key=lambda k: list(rows[0]).index(k) if k in rows[0] else 99)
        with c.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            w.writerows(rows)
        return j, c


def run_engine(interactive: bool = True) -> RunEngine:
    """A RunEngine. ``interactive``: bluesky's SIGINT handler (Ctrl-C pauses the plan); only in the
    main thread. Otherwise Ctrl-C raises KeyboardInterrupt as in any program."""
    if interactive and threading.current_thread() is threading.main_thread():
        return RunEngine({})
    return RunEngine({}, context_managers=[])


def cmd_simulate(args: argparse.Namespace) -> int:
    sets = parse_sets(args.set or [])
    for key, value in (("mode", args.mode), ("seed", args.seed), ("hdf5_dir", args.hdf5),
                       ("publish.proxy", args.proxy), ("growth.frames", args.frames),
                       ("monitor.summary_address", args.summary)):
        if value is not None:
            sets[key] = str(value)
    cfg = load_simulator_config(args.config, sets)
    sim = Simulation.build(cfg)
    out = Path(args.out)
    RE = run_engine()
    truth = TruthRecorder()
    RE.subscribe(truth)
    pub = make_publisher(cfg.publish.proxy, cfg.publish.prefix, cfg.publish.serializer, cfg.publish.connect_wait_s)
    RE.subscribe(pub)
    RE.subscribe(functools.partial(_progress, quiet=args.quiet))
    stats = None
    try:
        if args.monitor:
            if cfg.mode != "growth":
                print("nanoseg simulate: --monitor needs mode growth", flush=True)
                return 2
            from nanoseg_daemon.ophyd_stats import NanosegStats

            stats = NanosegStats(cfg.monitor.summary_address, name="nanoseg")
            stats.timeout_s.put(cfg.monitor.timeout_s)
            RE(sim.monitor_plan(stats))
        else:
            RE(sim.plain_plan())
    finally:
        if stats is not None:
            stats.close()
        pub.close()
    j, c = truth.write(out)
    reason = (truth.stop_doc or {}).get("reason") or ""
    print(f"run {truth.run_uid}: {len(truth.rows)} frames, exit {(truth.stop_doc or {}).get('exit_status')}"
          f"{', ' + reason if reason else ''}; truth in {j} and {c}")
    return 0 if (truth.stop_doc or {}).get("exit_status") == "success" else 1


def _progress(name: str, doc: dict[str, Any], quiet: bool = False) -> None:
    if quiet or name != "event" or "cam_truth_count" not in doc.get("data", {}):
        return
    d = doc["data"]
    print(f"frame {doc['seq_num']:4d}  wires {int(d['cam_truth_count']):3d}  "
          f"visible mean length {float(d['cam_truth_visible_length_nm_mean']):7.0f} nm", flush=True)
