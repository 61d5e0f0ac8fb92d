"""``NanosegStats``: the daemon's latest frame statistics as an ophyd Device, for bluesky plans.

A background thread subscribes to the daemon's JSON summary topic (``publish.summary.address``,
``SUMMARY_TOPIC``) and puts each summary's values into the device's signals, so the device works
in any process that can reach that socket: the RunEngine's own, or another host.

- ``bps.read`` / ``bps.trigger_and_read``: the values of the latest summary, read as one
  consistent snapshot. ``trigger()`` returns a Status that completes on the next summary to
  arrive (``trigger_mode`` "next", the default), or at once when a summary has been seen
  (``trigger_mode`` "latest"). To wait for the analysis of a particular frame, set
  ``expect_run_uid`` and ``expect_seq_num`` (e.g. ``bps.mv(stats.expect_seq_num, n)``): the
  Status then completes on the first summary of that run with ``seq_num >= n`` (at once if it
  has already arrived). A Status that sees nothing within ``timeout_s`` fails.
- ``bps.monitor``: every signal runs its value subscriptions when a summary arrives.

Signals (NaN where the frame has no particles or no pixel size): ``count``, ``length_nm_mean``,
``length_nm_median``, ``width_nm_mean``, ``width_nm_median``, ``aspect_ratio_mean``,
``length_nm_mean_lo``/``length_nm_mean_hi`` (95 % interval of the mean length), ``min_feret_nm_median``,
``orientation_order`` (|<exp(2i theta)>|, 0 isotropic .. 1 aligned), ``coverage_fraction``
(0..1), ``frame_uid``, ``run_uid`` (the raw run's), ``seq_num`` and ``model_version``. Reading
timestamps are the time the daemon published the summary.
"""

from __future__ import annotations

import contextlib
import json
import math
import threading
import time
from typing import Any

import zmq
from ophyd import Component, Device, Signal
from ophyd.status import DeviceStatus

from nanoseg_daemon.publish import SUMMARY_TOPIC

_STATS = {  # signal -> (summary stats column, statistic)
    "length_nm_mean": ("length_nm", "mean"), "length_nm_median": ("length_nm", "median"),
    "width_nm_mean": ("width_nm", "mean"), "width_nm_median": ("width_nm", "median"),
    "aspect_ratio_mean": ("aspect_ratio", "mean"),
    "length_nm_mean_lo": ("length_nm", "mean_lo"), "length_nm_mean_hi": ("length_nm", "mean_hi"),
    "min_feret_nm_median": ("min_feret_nm", "median"),
}


def _number(v: Any) -> float:
    return math.nan if v is None else float(v)


def signal_values(msg: dict[str, Any]) -> dict[str, Any]:
    """Signal name -> value for one JSON summary message (see ``publish.summary_message``)."""
    summary = msg.get("summary") or {}
    stats = summary.get("stats") or {}
    out: dict[str, Any] = {"count": int(msg["count"])}
    for name, (col, stat) in _STATS.items():
        out[name] = _number((stats.get(col) or {}).get(stat))
    out["orientation_order"] = _number(summary.get("orientation_order"))
    out["coverage_fraction"] = _number(summary.get("coverage_fraction"))
    out["frame_uid"] = str(msg["frame_uid"])
    out["run_uid"] = str(msg["run_uid"])
    out["seq_num"] = int(msg["seq_num"])
    out["model_version"] = str(msg.get("model_version", ""))
    return out


class NanosegStats(Device):
    count = Component(Signal, value=0, kind="hinted")
    length_nm_mean = Component(Signal, value=math.nan, kind="hinted")
    length_nm_median = Component(Signal, value=math.nan, kind="normal")
    width_nm_mean = Component(Signal, value=math.nan, kind="hinted")
    width_nm_median = Component(Signal, value=math.nan, kind="normal")
    aspect_ratio_mean = Component(Signal, value=math.nan, kind="normal")
    length_nm_mean_lo = Component(Signal, value=math.nan, kind="normal")
    length_nm_mean_hi = Component(Signal, value=math.nan, kind="normal")
    min_feret_nm_median = Component(Signal, value=math.nan, kind="normal")
    orientation_order = Component(Signal, value=math.nan, kind="normal")
    coverage_fraction = Component(Signal, value=math.nan, kind="hinted")
    frame_uid = Component(Signal, value="", kind="normal")
    run_uid = Component(Signal, value="", kind="normal")
    seq_num = Component(Signal, value=0, kind="normal")
    model_version = Component(Signal, value="", kind="normal")
    # how trigger() waits (not recorded in documents)
    trigger_mode = Component(Signal, value="next", kind="omitted")
    timeout_s = Component(Signal, value=60.0, kind="omitted")
    expect_run_uid = Component(Signal, value="", kind="omitted")
    expect_seq_num = Component(Signal, value=0, kind="omitted")

    def __init__(self, address: str = "tcp://127.0.0.1:5590", *args: Any, name: str = "nanoseg",
                 context: zmq.Context | None = None, **kwargs: Any) -> None:
        super().__init__(*args, name=name, **kwargs)
        self.address = address
        self._lock = threading.RLock()
        self._latest: dict[str, Any] | None = None
        self._received = 0
        self._waiting: list[tuple[DeviceStatus, int, str, int]] = []  # status, received at trigger, run, seq
        self._context = context or zmq.Context.instance()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._listen, name=f"{name}-summaries", daemon=True)
        self._subscribed = threading.Event()
        self._thread.start()
        if not self._subscribed.wait(5.0):
            raise TimeoutError(f"could not subscribe to {address}")

    # -- the summary listener --------------------------------------------------------------
    def _listen(self) -> None:
        sock = self._context.socket(zmq.SUB)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SUBSCRIBE, SUMMARY_TOPIC)
        sock.connect(self.address)
        self._subscribed.set()
        try:
            while not self._stop.is_set():
                if not sock.poll(100):
                    continue
                parts = sock.recv_multipart()
                if len(parts) != 2 or parts[0] != SUMMARY_TOPIC:
                    continue
                try:
                    values = signal_values(json.loads(parts[1]))
                except (ValueError, KeyError, TypeError):
                    continue  # not a summary this device understands: keep the last good one
                self._apply(values, time.time())
        finally:
            sock.close()

    def _apply(self, values: dict[str, Any], ts: float) -> None:
        with self._lock:
            for name, value in values.items():
                getattr(self, name).put(value, timestamp=ts)
            self._latest = values
            self._received += 1
            done = [w for w in self._waiting if self._satisfies(values, *w[1:])]
            self._waiting = [w for w in self._waiting if w not in done and not w[0].done]
        for status, *_ in done:
            with contextlib.suppress(Exception):  # already timed out
                status.set_finished()

    def _satisfies(self, values: dict[str, Any], received_at_trigger: int, run_uid: str, seq_num: int) -> bool:
        if seq_num > 0:
            return (not run_uid or values["run_uid"] == run_uid) and values["seq_num"] >= seq_num
        return self._received > received_at_trigger

    # -- ophyd -----------------------------------------------------------------------------
    @property
    def latest(self) -> dict[str, Any] | None:
        """The values of the last summary received (None before the first)."""
        with self._lock:
            return None if self._latest is None else dict(self._latest)

    def trigger(self) -> DeviceStatus:
        status = DeviceStatus(self, timeout=float(self.timeout_s.get()))
        run_uid, seq_num = str(self.expect_run_uid.get()), int(self.expect_seq_num.get())
        with self._lock:
            latest = self._latest
            if seq_num > 0:
                ready = latest is not None and self._satisfies(latest, self._received, run_uid, seq_num)
            else:
                ready = latest is not None and self.trigger_mode.get() == "latest"
            if not ready:
                self._waiting.append((status, self._received, run_uid, seq_num))
        if ready:
            status.set_finished()
        return status

    def read(self) -> dict[str, Any]:
        with self._lock:  # one summary's values, never a mix of two
            reading: dict[str, Any] = super().read()
            return reading

    def close(self) -> None:
        """Stop listening (the signals keep their last values)."""
        self._stop.set()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(2.0)

    def destroy(self) -> None:
        self.close()
        super().destroy()
