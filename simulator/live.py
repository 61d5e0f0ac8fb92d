"""What the demo watches while the run goes: the daemon's analysis documents coming back through
the proxy (``AnalysisListener``) and one console row per analysed frame (``LiveTable``)."""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
import zmq


class AnalysisListener:
    """Collects the daemon's analysis run of one raw run from the proxy (a SUB socket, a thread)."""

    def __init__(self, address: str) -> None:
        from nanoseg.codec import msgpack_loads

        self._loads = msgpack_loads
        self.raw_run_uid: str | None = None
        self.events: dict[int, dict[str, Any]] = {}  # raw seq_num -> event data (primary stream)
        self.alarms: list[dict[str, Any]] = []
        self.new_alarms: list[dict[str, Any]] = []
        self.start_doc: dict[str, Any] | None = None
        self.stop_doc: dict[str, Any] | None = None
        self._streams: dict[str, str] = {}
        self._pending: list[tuple[str, dict[str, Any]]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.SUB)
        self._sock.setsockopt(zmq.SUBSCRIBE, b"")
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.connect(address)
        self._thread = threading.Thread(target=self._loop, name="analysis-listener", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            if not self._sock.poll(100):
                continue
            parts = self._sock.recv().split(b" ", 2)
            if len(parts) != 3:
                continue
            name = parts[1].decode("ascii", "replace")
            if name not in ("start", "descriptor", "event", "stop"):
                continue  # the raw run's resource/datum etc.
            try:
                doc = self._loads(parts[2])
            except Exception:
                continue
            with self._lock:
                if self.raw_run_uid is None and name != "start":
                    continue  # nothing to follow yet
                self._pending.append((name, doc))
                self._route()

    def follow(self, raw_run_uid: str) -> None:
        with self._lock:
            self.raw_run_uid = raw_run_uid
            self._route()

    def _route(self) -> None:
        if self.raw_run_uid is None:
            self._pending = self._pending[-16:]  # analysis starts only arrive after their raw run's
            return
        for name, doc in self._pending:
            if name == "start" and doc.get("raw_run_uid") == self.raw_run_uid:
                self.start_doc = doc
            elif self.start_doc is None:
                continue
            elif name == "descriptor" and doc.get("run_start") == self.start_doc["uid"]:
                self._streams[doc["uid"]] = doc["name"]
            elif name == "event" and doc["descriptor"] in self._streams:
                if self._streams[doc["descriptor"]] == "alarms":
                    self.alarms.append(doc["data"])
                    self.new_alarms.append(doc["data"])
                else:
                    self.events[int(doc["data"]["raw_seq_num"])] = doc["data"]
            elif name == "stop" and doc.get("run_start") == self.start_doc["uid"]:
                self.stop_doc = doc
        self._pending.clear()

    def take_alarms(self) -> list[dict[str, Any]]:
        with self._lock:
            out, self.new_alarms = self.new_alarms, []
            return out

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2.0)
        self._sock.close()
        self._ctx.term()


class LiveTable:
    """One console row per analysed frame: the truth beside the daemon's numbers."""

    HEADER = (f"{'frame':>5} {'t (s)':>6} {'wires':>5} {'found':>5} {'L true':>7} {'L mean':>7} "
              f"{'W mean':>6} {'cover':>6} {'order':>5} {'lag (s)':>7}")

    def __init__(self, listener: AnalysisListener | None = None) -> None:
        self.rows: list[dict[str, Any]] = []
        self._primary: dict[str, str] = {}
        self._last_primary: dict[str, Any] = {}
        self._listener = listener
        print(self.HEADER + "\n" + "-" * len(self.HEADER), flush=True)

    def __call__(self, name: str, doc: dict[str, Any]) -> None:
        if name == "descriptor":
            self._primary[doc["uid"]] = doc["name"]
        elif name == "event" and self._primary.get(doc["descriptor"]) == "primary":
            self._last_primary = {"time": doc["time"], **{k: v for k, v in doc["data"].items() if k != "cam_image"}}
        elif name == "event" and self._primary.get(doc["descriptor"]) == "nanoseg":
            self._row(doc)

    def _row(self, doc: dict[str, Any]) -> None:
        d, p = doc["data"], self._last_primary
        row = {
            "seq_num": d["nanoseg_seq_num"], "sample_time_s": p.get("sample_time"),
            "truth_count": p.get("cam_truth_count"), "count": d["nanoseg_count"],
            "truth_visible_length_nm_mean": p.get("cam_truth_visible_length_nm_mean"),
            "length_nm_mean": d["nanoseg_length_nm_mean"], "length_nm_median": d["nanoseg_length_nm_median"],
            "truth_visible_width_nm_mean": p.get("cam_truth_visible_width_nm_mean"),
            "width_nm_mean": d["nanoseg_width_nm_mean"], "aspect_ratio_mean": d["nanoseg_aspect_ratio_mean"],
            "coverage_fraction": d["nanoseg_coverage_fraction"], "orientation_order": d["nanoseg_orientation_order"],
            "frame_uid": d["nanoseg_frame_uid"],
            "latency_s": doc["timestamps"]["nanoseg_count"] - p["time"] if "time" in p else None,
            "model_version": d["nanoseg_model_version"],
        }
        self.rows.append(row)

        def f(v: Any, spec: str) -> str:
            return format(v, spec) if isinstance(v, int | float) and np.isfinite(v) else "-"

        print(f"{row['seq_num']:>5} {f(row['sample_time_s'], '6.0f')} {f(row['truth_count'], '5d')} "
              f"{f(row['count'], '5d')} {f(row['truth_visible_length_nm_mean'], '7.0f')} "
              f"{f(row['length_nm_mean'], '7.0f')} {f(row['width_nm_mean'], '6.0f')} "
              f"{f(100 * row['coverage_fraction'], '5.1f')}% {f(row['orientation_order'], '5.2f')} "
              f"{f(row['latency_s'], '7.2f')}", flush=True)
        for a in self._listener.take_alarms() if self._listener else []:
            print(f"      ! alarm {a['state']}: {a['message']}", flush=True)
