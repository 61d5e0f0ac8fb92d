"""A model reload runs beside the control socket: while it loads, ``status`` (naming it), ``pause``,
``resume`` and ``set`` are answered at once, a second reload is refused and counted, the reload's
client gets its one reply when it ends, and stopping the daemon does not wait for it.

Real ZMQ sockets on 127.0.0.1 and a real Service on engine null; the reload is held in its load
by a ``threading.Event`` the test releases (the real load follows), since the subject is timing."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import zmq

from nanoseg.control_client import control_request
from nanoseg_daemon import control as ctl
from nanoseg_daemon import model_slot
from nanoseg_daemon.service import Service
from tests.daemon.service_fixtures import start_service

QUICK_S = 2.0  # a request that does not wait for the reload is answered well within this


@pytest.fixture
def svc(null_service: Service) -> Service:
    return null_service


class Gate:
    """Holds every model load until ``release``; ``entered`` is set once a load waits."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()


def hold_loads(monkeypatch: pytest.MonkeyPatch) -> Gate:
    """Make the slot's model loads (a reload's; call after the service has loaded its own) wait for
    the returned gate's ``release``, then load for real."""
    gate = Gate()
    real = model_slot.load_model

    def held(*args: Any, **kwargs: Any) -> model_slot.LoadedModel:
        gate.entered.set()
        if not gate.release.wait(60):
            raise TimeoutError("the test never released the load")
        return real(*args, **kwargs)

    monkeypatch.setattr(model_slot, "load_model", held)
    return gate


class InFlight:
    """A control request sent from its own thread; ``reply()`` waits for its reply."""

    def __init__(self, address: str, request: dict[str, Any], timeout_s: float = 60.0) -> None:
        self._reply: dict[str, Any] | None = None
        self._error: Exception | None = None
        self.thread = threading.Thread(target=self._send, args=(address, request, timeout_s), daemon=True)
        self.thread.start()

    def _send(self, address: str, request: dict[str, Any], timeout_s: float) -> None:
        try:
            self._reply = control_request(address, request, timeout_s=timeout_s)
        except Exception as err:
            self._error = err

    def reply(self, timeout_s: float = 60.0) -> dict[str, Any]:
        """The reply; raises what the client raised (TimeoutError: no reply)."""
        self.thread.join(timeout_s)
        assert not self.thread.is_alive(), "no answer from the client thread"
        if self._error is not None:
            raise self._error
        assert self._reply is not None
        return self._reply


def sample(svc: Service, name: str, **labels: str) -> float:
    """One sample of the service's metrics (0 when absent)."""
    value = svc.metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


def quick(svc: Service, request: dict[str, Any]) -> dict[str, Any]:
    """``request``'s reply, which must come within ``QUICK_S``."""
    t0 = time.monotonic()
    reply = control_request(svc.control.address, request, timeout_s=QUICK_S)
    assert time.monotonic() - t0 < QUICK_S
    return reply


def test_status_pause_resume_and_set_are_answered_during_a_reload(svc: Service, trained_model_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    gate = hold_loads(monkeypatch)
    reload = InFlight(svc.control.address, {"command": "reload_model", "path": str(trained_model_path)})
    assert gate.entered.wait(10)
    status = quick(svc, {"command": "status"})
    assert status["ok"] and status["result"]["reloading"]["path"] == str(trained_model_path)
    assert status["result"]["reloading"]["seconds"] >= 0
    assert quick(svc, {"command": "pause"})["result"]["paused"] is True
    assert svc._paused.is_set()
    assert quick(svc, {"command": "resume"})["result"]["paused"] is False
    assert quick(svc, {"command": "set", "score_threshold": 0.7})["result"]["postprocess"]["score_threshold"] == 0.7
    assert reload.thread.is_alive()  # still waiting for its reply
    gate.release.set()
    reply = reload.reply()
    assert reply["ok"] and reply["result"]["reloading"] is None
    # what the operator set during the load applies to the model swapped in
    assert reply["result"]["postprocess"]["score_threshold"] == 0.7
    assert svc.slot.current.segmenter.post.score_threshold == 0.7
    assert sample(svc, "nanoseg_model_reloads_total", result="ok") == 1
    assert quick(svc, {"command": "status"})["result"]["reloading"] is None


def test_a_failed_reload_gets_its_one_reply_when_it_ends(svc: Service, tmp_path: Path, trained_model_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Over a DEALER (the REQ envelope by hand), so that a second reply would be seen."""
    broken = tmp_path / "broken.pt"
    broken.write_bytes(trained_model_path.read_bytes()[:100_000])
    before = svc.slot.current.version
    gate = hold_loads(monkeypatch)
    dealer: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.DEALER)
    dealer.linger = 0
    try:
        dealer.connect(svc.control.address)
        dealer.send_multipart([b"", json.dumps({"command": "reload_model", "path": str(broken)}).encode()])
        assert gate.entered.wait(10)
        assert quick(svc, {"command": "status"})["result"]["reloading"]["path"] == str(broken)
        assert not dealer.poll(300)  # no reply before the reload ends
        gate.release.set()
        assert dealer.poll(30_000)
        delimiter, body = dealer.recv_multipart()
        reply = json.loads(body)
        assert delimiter == b"" and not reply["ok"] and "still serving" in reply["error"]
        assert not dealer.poll(500)  # one reply only
    finally:
        dealer.close(0)
    assert svc.slot.current.version == before
    assert sample(svc, "nanoseg_model_reloads_total", result="failed") == 1
    assert sample(svc, "nanoseg_messages_rejected_total", reason=ctl.BAD_REQUEST) == 0
    assert quick(svc, {"command": "status"})["result"]["reloading"] is None


def test_a_second_reload_during_the_first_is_refused_at_once_naming_it(svc: Service, trained_model_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    gate = hold_loads(monkeypatch)
    first = InFlight(svc.control.address, {"command": "reload_model", "path": str(trained_model_path)})
    assert gate.entered.wait(10)
    second = quick(svc, {"command": "reload_model", "path": "elsewhere.pt"})
    assert not second["ok"]
    assert second["error"].startswith(f"a reload is in progress: {trained_model_path}, ")
    assert " s so far" in second["error"]
    assert sample(svc, "nanoseg_messages_rejected_total", reason=ctl.RELOAD_IN_PROGRESS) == 1
    assert sample(svc, "nanoseg_model_reloads_total", result="failed") == 0  # no reload was tried
    gate.release.set()
    assert first.reply()["ok"]
    again = control_request(svc.control.address, {"command": "reload_model", "path": str(trained_model_path)},
                            timeout_s=30)
    assert again["ok"]  # the slot is free again
    assert sample(svc, "nanoseg_model_reloads_total", result="ok") == 2


def test_stop_during_a_reload_returns_promptly_and_the_late_reload_harms_nothing(
        tmp_path: Path, trained_model_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    svc = start_service(tmp_path / "state", trained_model_path, **{"model.engine": "null"})
    gate = hold_loads(monkeypatch)
    thread_errors: list[threading.ExceptHookArgs] = []
    monkeypatch.setattr(threading, "excepthook", thread_errors.append)
    try:
        reload = InFlight(svc.control.address, {"command": "reload_model", "path": str(trained_model_path)},
                          timeout_s=5)
        assert gate.entered.wait(10)
    finally:
        t0 = time.monotonic()
        assert svc.stop()
        stopped_in = time.monotonic() - t0
    assert stopped_in < 5.0
    assert not svc.control.thread.is_alive() and svc.control.sock.closed
    with pytest.raises(TimeoutError):  # abandoned: its client is not answered
        reload.reply()
    (worker,) = svc.control.workers
    gate.release.set()  # the reload finishes after the stop
    worker.join(30)
    assert not worker.is_alive() and not thread_errors
    assert sample(svc, "nanoseg_messages_rejected_total", reason=ctl.CONTROL_ERROR) == 0
    assert sample(svc, "nanoseg_model_reloads_total", result="ok") == 1
    assert svc._reloading is None
