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
timestamps are the time the device received the summary.

Messages the device does not show are counted by reason in ``ignored`` (``SummaryRejected``) and
logged (``stats_summary_ignored``, the first of each reason, then every 1000th): not the summary
topic, over ``max_message_bytes``, not strict JSON (NaN/Infinity included), a field missing or of
the wrong type (named), a frame of a run older than or the same as one already seen
(``older_frame``, ``duplicate_frame``), and, while ``expect_run_uid`` is set, another run's
summary (``other_run``: kept, so that a later trigger for that run finds it, but never shown as
this run's). A trigger that sees nothing fitting within ``timeout_s`` fails with
``NanosegStatsTimeout``, whose message names the address, the wait, the last summary received
and the reasons messages were ignored.

CurveZMQ: when the daemon's summary socket is a CURVE server (``publish.curve``), give the device
``client_secret_key`` (a zmq.auth certificate file holding this client's key pair, e.g.
``beamline.key_secret``) and ``server_public_key`` (the daemon's public key file, e.g.
``server.key``), the same key files as the daemon's other clients use; the daemon admits the client
when its public key is in ``publish.curve.authorized_clients_dir`` (or any client without that
directory). A missing or unreadable key file, or one without the needed key, fails the constructor
with ``ValueError`` naming the file. A daemon that refuses the key never tells a SUB socket
through its messages, so the device watches the socket's handshakes: refusals are logged
(``stats_curve_refused``) and a trigger's timeout message says that CURVE is on, how the handshakes
went, and that the key may not be authorised or the server key may not be the daemon's.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
import time
from collections import Counter, OrderedDict
from pathlib import Path
from typing import Any

import zmq
from ophyd import Component, Device, Signal
from ophyd.status import DeviceStatus
from pydantic import ValidationError
from zmq.utils.monitor import recv_monitor_message

from nanoseg_daemon.curve_auth import ClientCurveKeys
from nanoseg_daemon.logs import log
from nanoseg_daemon.publish import SUMMARY_TOPIC
from nanoseg_daemon.summary_schema import SummaryMessage

_STATS = {  # signal -> (summary stats column, statistic)
    "length_nm_mean": ("length_nm", "mean"), "length_nm_median": ("length_nm", "median"),
    "width_nm_mean": ("width_nm", "mean"), "width_nm_median": ("width_nm", "median"),
    "aspect_ratio_mean": ("aspect_ratio", "mean"),
    "length_nm_mean_lo": ("length_nm", "mean_lo"), "length_nm_mean_hi": ("length_nm", "mean_hi"),
    "min_feret_nm_median": ("min_feret_nm", "median"),
}
MAX_MESSAGE_BYTES = 16 * 2**20
"""Summaries larger than this are ignored unparsed (``too_large``); a real one is a few kB."""
RUNS_KEPT = 8
"""Runs whose latest summary the device keeps, to answer a trigger for a run that is not the newest."""


class SummaryRejected(ValueError):
    """A summary message the device ignores. ``reason``: why, one of ``bad_topic``, ``too_large``,
    ``not_json``, ``non_finite``, ``not_an_object``, ``missing_field``, ``bad_field`` (these from
    ``parse_summary``), ``older_frame``, ``duplicate_frame``, ``other_run`` (from the device) and
    ``error`` (anything else that failed); the message names the field or the frames."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def signal_values(msg: SummaryMessage) -> dict[str, Any]:
    """Signal name -> value for one summary message (NaN where a statistic is null or absent)."""
    out: dict[str, Any] = {"count": msg.count}
    for name, (col, stat) in _STATS.items():
        figures = msg.summary.stats.get(col)
        value = None if figures is None else getattr(figures, stat)
        out[name] = math.nan if value is None else value
    for name in ("orientation_order", "coverage_fraction"):
        value = getattr(msg.summary, name)
        out[name] = math.nan if value is None else value
    out |= {"frame_uid": msg.frame_uid, "run_uid": msg.run_uid, "seq_num": msg.seq_num,
            "model_version": msg.model_version or ""}
    return out


def parse_summary(parts: list[bytes], max_bytes: int = MAX_MESSAGE_BYTES) -> dict[str, Any]:
    """``signal_values`` of one received ``[SUMMARY_TOPIC, JSON]`` message, validated as
    ``SummaryMessage``; ``SummaryRejected`` when it is not one: reason ``bad_topic``,
    ``too_large``, ``not_json``, ``not_an_object``, ``non_finite`` (NaN, Infinity, 1e999),
    ``missing_field`` or ``bad_field``, the detail naming the field."""
    if len(parts) != 2 or parts[0] != SUMMARY_TOPIC:
        raise SummaryRejected("bad_topic", f"{len(parts)} frames, topic {parts[0][:40]!r}")
    if len(parts[1]) > max_bytes:
        raise SummaryRejected("too_large", f"{len(parts[1])} bytes > {max_bytes}")
    try:
        msg = SummaryMessage.model_validate_json(parts[1])
    except ValidationError as err:
        first = err.errors(include_url=False)[0]
        where = ".".join(str(k) for k in first["loc"])
        raise SummaryRejected(_reason(first["type"], first.get("input"), where),
                              f"{where or 'the message'}: {first['msg'][:120]}") from None
    return signal_values(msg)


def _reason(kind: str, value: Any, where: str) -> str:
    """``SummaryRejected``'s reason for a validation error of ``kind`` on ``value`` at ``where``."""
    if kind == "json_invalid":  # not JSON, not UTF-8, nested too deep
        return "not_json"
    if kind == "model_type" and not where:
        return "not_an_object"
    if kind == "finite_number" or (isinstance(value, float) and not math.isfinite(value)):
        return "non_finite"
    return "missing_field" if kind == "missing" else "bad_field"


def _worth_a_line(n: int) -> bool:
    """Whether the ``n``-th occurrence of a repeated event is logged: the first, then every 1000th."""
    return n == 1 or n % 1000 == 0


class NanosegStatsTimeout(TimeoutError):
    """A trigger saw no fitting summary within ``timeout_s``; the message names the address, the
    wait, what was received and what was ignored."""


_HANDSHAKE_EVENTS = zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_HANDSHAKE_FAILED_AUTH | \
    zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL


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
                 context: zmq.Context | None = None, max_message_bytes: int = MAX_MESSAGE_BYTES,
                 client_secret_key: str | Path | None = None, server_public_key: str | Path | None = None,
                 **kwargs: Any) -> None:
        """Subscribe to the daemon's summaries at ``address`` (``publish.summary.address``).

        ``max_message_bytes``: larger summaries are ignored unparsed (bytes). ``client_secret_key``
        and ``server_public_key`` (key file paths, both or neither): connect as a CurveZMQ client
        of a daemon whose summary socket has ``publish.curve``; ``ValueError`` naming the file when
        one cannot be used.
        """
        if (client_secret_key is None) != (server_public_key is None):
            raise ValueError(f"{name}: client_secret_key and server_public_key go together (CurveZMQ), "
                             f"got only {'client_secret_key' if server_public_key is None else 'server_public_key'}")
        self.curve: ClientCurveKeys | None = None
        if client_secret_key is not None and server_public_key is not None:
            try:
                if not zmq.has("curve"):
                    raise ValueError(f"this libzmq {zmq.zmq_version()} has no CURVE support")
                self.curve = ClientCurveKeys(client_secret_key, server_public_key)
            except ValueError as err:
                raise ValueError(f"{name}: {err}") from err
        super().__init__(*args, name=name, **kwargs)
        self.address = address
        self.max_message_bytes = max_message_bytes
        self._lock = threading.RLock()
        self._latest: dict[str, Any] | None = None  # the values the signals show
        self._by_run: OrderedDict[str, tuple[dict[str, Any], float]] = OrderedDict()  # run -> latest, received at
        self._received = 0  # summaries accepted
        self._shown = 0  # summaries put into the signals
        self._last_received_at = math.nan  # time.monotonic()
        self._ignored: Counter[str] = Counter()
        self._last_ignored = ""
        self._handshakes: Counter[str] = Counter()  # CURVE handshake outcomes: succeeded, refused, failed
        self._last_handshake = ""
        self._waiting: list[tuple[DeviceStatus, int, str, int]] = []  # status, shown at trigger, run, seq
        self._context = context or zmq.Context.instance()
        self._stop = threading.Event()
        self._listen_error: Exception | None = None
        self._thread = threading.Thread(target=self._listen, name=f"{name}-summaries", daemon=True)
        self._subscribed = threading.Event()
        self._thread.start()
        if not self._subscribed.wait(5.0):
            raise TimeoutError(f"{name}: could not subscribe to {address} within 5 s")
        if self._listen_error is not None:
            raise ValueError(f"{name}: cannot subscribe to {address!r}: {self._listen_error}") from self._listen_error

    # -- the summary listener --------------------------------------------------------------
    def _listen(self) -> None:
        sock = self._context.socket(zmq.SUB)
        monitor: zmq.Socket[Any] | None = None
        try:
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.SUBSCRIBE, SUMMARY_TOPIC)
            if self.curve is not None:
                self.curve.apply(sock)
                monitor = sock.get_monitor_socket(_HANDSHAKE_EVENTS)
            sock.connect(self.address)
        except zmq.ZMQError as err:
            self._listen_error = err
            if monitor is not None:
                sock.disable_monitor()
                monitor.close(0)
            sock.close()
            self._subscribed.set()
            return
        if self.curve is not None:
            log("stats_curve_client", device=self.name, address=self.address,
                client_public_key=self.curve.public.decode(), server_public_key=str(self.curve.server_public_key))
        self._subscribed.set()
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        if monitor is not None:
            poller.register(monitor, zmq.POLLIN)
        try:
            while not self._stop.is_set():
                ready = dict(poller.poll(100))
                if monitor is not None and monitor in ready:
                    event = recv_monitor_message(monitor)
                    self._handshake(int(event["event"]), int(event["value"]))
                if sock not in ready:
                    continue
                parts = sock.recv_multipart()
                try:
                    self._apply(parse_summary(parts, self.max_message_bytes), time.time())
                except SummaryRejected as err:  # keep the last good summary
                    self._ignore(err)
                except Exception as err:  # the listener must outlive any one message
                    self._ignore(SummaryRejected("error", f"{type(err).__name__}: {err}"))
        finally:
            if monitor is not None:
                with contextlib.suppress(zmq.ZMQError):
                    sock.disable_monitor()
                monitor.close(0)
            sock.close()

    def _handshake(self, kind: int, value: int) -> None:
        """Count one CURVE handshake outcome (a socket monitor ``event`` and its ``value``); log refusals."""
        if kind == zmq.EVENT_HANDSHAKE_SUCCEEDED:
            outcome, detail = "succeeded", "the daemon admitted this client's key"
        elif kind == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
            outcome, detail = "refused", f"the daemon refused this client's key (ZAP status {value})"
        else:  # e.g. a server public key that is not the daemon's: the daemon drops the connection
            outcome, detail = "failed", "the handshake failed without a reason (is server_public_key the daemon's?)"
        with self._lock:
            self._handshakes[outcome] += 1
            n = self._handshakes[outcome]
            self._last_handshake = detail
        if outcome == "succeeded":
            log("stats_curve_connected", device=self.name, address=self.address, times=n)
        elif _worth_a_line(n):  # the daemon retries every ~0.1 s
            log("stats_curve_refused", logging.WARNING, device=self.name, address=self.address,
                outcome=outcome, detail=detail, times=n)

    def _ignore(self, err: SummaryRejected) -> None:
        with self._lock:
            self._ignored[err.reason] += 1
            n = self._ignored[err.reason]
            self._last_ignored = str(err)
        if _worth_a_line(n):
            log("stats_summary_ignored", logging.WARNING, device=self.name, address=self.address,
                reason=err.reason, detail=err.detail, times=n)

    def _apply(self, values: dict[str, Any], ts: float) -> None:
        run, seq = values["run_uid"], values["seq_num"]
        with self._lock:
            last = self._by_run.get(run)
            if last is not None and seq <= last[0]["seq_num"]:
                raise SummaryRejected("duplicate_frame" if seq == last[0]["seq_num"] else "older_frame",
                                      f"run {run} frame {seq} after frame {last[0]['seq_num']}")
            self._by_run[run] = (values, ts)
            self._by_run.move_to_end(run)
            while len(self._by_run) > RUNS_KEPT:
                self._by_run.popitem(last=False)
            self._received += 1
            self._last_received_at = time.monotonic()
            expected = str(self.expect_run_uid.get())
            if expected and run != expected:  # kept for a trigger on that run, never shown as this run's
                raise SummaryRejected("other_run", f"run {run} frame {seq} while expecting run {expected}")
            self._show(values, ts)
            done = [w for w in self._waiting if self._satisfies(values, *w[1:])]
            self._waiting = [w for w in self._waiting if w not in done and not w[0].done]
        for status, *_ in done:
            with contextlib.suppress(Exception):  # already timed out
                status.set_finished()

    def _show(self, values: dict[str, Any], ts: float) -> None:
        """Put one summary's values into the signals (under the lock)."""
        for name, value in values.items():
            getattr(self, name).put(value, timestamp=ts)
        self._latest = values
        self._shown += 1

    def _satisfies(self, values: dict[str, Any], shown_at_trigger: int, run_uid: str, seq_num: int) -> bool:
        if seq_num > 0:
            return (not run_uid or values["run_uid"] == run_uid) and values["seq_num"] >= seq_num
        return self._shown > shown_at_trigger

    # -- ophyd -----------------------------------------------------------------------------
    @property
    def latest(self) -> dict[str, Any] | None:
        """The values the signals show: the last summary accepted (None before the first)."""
        with self._lock:
            return None if self._latest is None else dict(self._latest)

    @property
    def ignored(self) -> dict[str, int]:
        """Messages not shown, by reason (see ``SummaryRejected``)."""
        with self._lock:
            return dict(self._ignored)

    def trigger(self) -> DeviceStatus:
        timeout = float(self.timeout_s.get())
        if not (math.isfinite(timeout) and timeout > 0):
            raise ValueError(f"{self.name}.timeout_s must be a finite number of seconds > 0, got {timeout}")
        status = DeviceStatus(self)
        run_uid, seq_num = str(self.expect_run_uid.get()), int(self.expect_seq_num.get())
        with self._lock:
            if seq_num > 0:
                kept = self._by_run.get(run_uid) if run_uid else None
                candidate, ts = kept if kept is not None else (self._latest, math.nan)
                ready = candidate is not None and self._satisfies(candidate, self._shown, run_uid, seq_num)
                if ready and candidate is not None and candidate is not self._latest:  # arrived while another run's was shown
                    self._show(candidate, ts)
            else:
                ready = self._latest is not None and self.trigger_mode.get() == "latest"
            if not ready:
                self._waiting.append((status, self._shown, run_uid, seq_num))
        if ready:
            status.set_finished()
            return status
        timer = threading.Timer(timeout, self._time_out, (status, run_uid, seq_num, timeout))
        timer.daemon = True
        timer.start()
        status.add_callback(lambda *_: timer.cancel())
        return status

    def _time_out(self, status: DeviceStatus, run_uid: str, seq_num: int, timeout_s: float) -> None:
        if status.done:
            return
        with contextlib.suppress(Exception):  # finished meanwhile
            status.set_exception(NanosegStatsTimeout(self.timeout_message(run_uid, seq_num, timeout_s)))

    def timeout_message(self, run_uid: str, seq_num: int, timeout_s: float) -> str:
        """What a trigger that saw no fitting summary within ``timeout_s`` (s) says."""
        if seq_num > 0:
            what = f"of {'run ' + run_uid + ' ' if run_uid else ''}frame {seq_num} (or later)"
        else:
            what = "newer than the last"
        with self._lock:
            if self._received:
                last = max(self._by_run.values(), key=lambda v: v[1])[0] if self._by_run else self._latest
                ago = time.monotonic() - self._last_received_at
                seen = (f"{self._received} summaries received, the last (run {last['run_uid'] if last else '?'} "
                        f"frame {last['seq_num'] if last else '?'}) {ago:.1f} s ago")
            else:
                seen = "no summary received since the device connected: is the daemon running and publishing there?"
                if self.curve is not None:
                    seen += " " + self._curve_note()
            if self._ignored:
                counts = ", ".join(f"{k} {v}" for k, v in sorted(self._ignored.items()))
                seen += f"; ignored: {counts} (last: {self._last_ignored})"
        return f"{self.name}: no summary {what} from {self.address} within {timeout_s:g} s (timeout_s); {seen}"

    def _curve_note(self) -> str:
        """What the timeout message says about CURVE (under the lock)."""
        assert self.curve is not None
        note = (f"CURVE is on ({self.curve.describe()}); a daemon refuses a key that is not in its "
                f"publish.curve.authorized_clients_dir without a word to a subscriber: the key may not be "
                f"authorised, or the server key may not be the daemon's")
        if self._handshakes:
            counts = ", ".join(f"{k} {v}" for k, v in sorted(self._handshakes.items()))
            note += f"; CURVE handshakes: {counts} (last: {self._last_handshake})"
        else:
            note += "; no CURVE handshake completed (nothing listening there?)"
        return note

    @property
    def curve_handshakes(self) -> dict[str, int]:
        """CURVE handshake outcomes so far (``succeeded``, ``refused``, ``failed``); empty without CURVE."""
        with self._lock:
            return dict(self._handshakes)

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
