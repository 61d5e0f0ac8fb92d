"""Bad input on the control socket: refused with a reply naming what is wrong, counted, and the
control thread serves on. Real REQ (and ROUTER) sockets on 127.0.0.1; a real Service on engine null (the
model is not the subject here)."""

from __future__ import annotations

import json
import threading
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import zmq
from pydantic import BaseModel

from nanoseg.control_client import control_request
from nanoseg_daemon import control as ctl
from nanoseg_daemon.service import Service

REJECTED = 'nanoseg_messages_rejected_total{reason="bad_control_request"}'


@pytest.fixture
def svc(null_service: Service) -> Service:
    return null_service


def metric(svc: Service, name: str) -> float:
    """The value of one sample on the metrics endpoint (0 when absent)."""
    assert svc.metrics_server is not None
    text = urllib.request.urlopen(f"http://127.0.0.1:{svc.metrics_server.port}/metrics", timeout=5).read().decode()
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def raw_request(address: str, parts: list[bytes], timeout_s: float = 5.0) -> dict[str, Any] | None:
    """Send ``parts`` as one (multipart) message on a REQ socket; the reply, None on no reply."""
    s: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.REQ)
    s.linger = 0
    s.rcvtimeo = s.sndtimeo = int(timeout_s * 1000)
    try:
        s.connect(address)
        s.send_multipart(parts)
        return dict(json.loads(s.recv()))
    except zmq.Again:
        return None
    finally:
        s.close(0)


def assert_serving(svc: Service) -> None:
    assert svc.control.thread.is_alive()
    assert control_request(svc.control.address, {"command": "status"}, timeout_s=5)["ok"]
    assert control_request(svc.control.address, {"command": "pause"}, timeout_s=5)["result"]["paused"] is True
    assert control_request(svc.control.address, {"command": "resume"}, timeout_s=5)["result"]["paused"] is False


def test_a_multipart_request_is_refused_counted_and_the_control_thread_serves_on(svc: Service) -> None:
    reply = raw_request(svc.control.address, [b'{"command":"status"}', b"extra"])
    assert reply is not None and not reply["ok"] and "2 message parts" in reply["error"]
    assert metric(svc, REJECTED) == 1
    assert_serving(svc)


def test_an_oversized_request_is_refused_and_a_huge_one_never_taken_in_whole(svc: Service) -> None:
    assert svc.control.sock.getsockopt(zmq.MAXMSGSIZE) == 2 * ctl.MAX_REQUEST_BYTES
    big = b'{"command":"status","x":"' + b"A" * (ctl.MAX_REQUEST_BYTES + 10) + b'"}'
    reply = raw_request(svc.control.address, [big])
    assert reply is not None and not reply["ok"] and f"more than the {ctl.MAX_REQUEST_BYTES}" in reply["error"]
    assert metric(svc, REJECTED) == 1
    # beyond MAXMSGSIZE 0MQ drops the connection: no reply, and the daemon serves on
    assert raw_request(svc.control.address, [b"A" * (3 * ctl.MAX_REQUEST_BYTES)], timeout_s=1.5) is None
    assert_serving(svc)


def test_a_failed_reload_is_counted_as_a_failed_reload_only(svc: Service, tmp_path: Path,
                                                            trained_model_path: Path) -> None:
    broken = tmp_path / "broken.pt"
    broken.write_bytes(trained_model_path.read_bytes()[:100_000])
    before = svc.slot.current.version
    reply = control_request(svc.control.address, {"command": "reload_model", "path": str(broken)})
    assert not reply["ok"] and "still serving" in reply["error"]
    assert svc.slot.current.version == before
    assert metric(svc, 'nanoseg_model_reloads_total{result="failed"}') == 1
    assert metric(svc, REJECTED) == 0  # the request itself was well-formed
    assert_serving(svc)


def test_deeply_nested_json_is_refused_and_counted(svc: Service) -> None:
    reply = raw_request(svc.control.address, [b"[" * 100_000 + b"]" * 100_000])
    assert reply is not None and not reply["ok"] and "nested too deeply" in reply["error"]
    deep_set = b'{"command":"set","nested":' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    reply = raw_request(svc.control.address, [deep_set])
    assert reply is not None and not reply["ok"]
    assert metric(svc, REJECTED) == 2
    assert_serving(svc)


def test_a_partial_set_of_nested_keeps_its_earlier_sub_fields(svc: Service, trained_model_path: Path) -> None:
    first = control_request(svc.control.address, {"command": "set", "nested": {"containment": 0.95}})
    assert first["ok"] and first["result"]["postprocess"]["nested"]["containment"] == 0.95
    second = control_request(svc.control.address, {"command": "set", "nested": {"max_area_ratio": 0.3}})
    assert second["ok"]
    nested = second["result"]["postprocess"]["nested"]
    assert (nested["containment"], nested["max_area_ratio"], nested["enabled"]) == (0.95, 0.3, True)
    assert second["result"]["postprocess_configured"]["nested"] == {"containment": 0.95, "max_area_ratio": 0.3}
    # what the operator set survives a reload, sub-fields included
    reloaded = control_request(svc.control.address, {"command": "reload_model", "path": str(trained_model_path)})
    assert reloaded["ok"]
    assert reloaded["result"]["postprocess"]["nested"] == {"enabled": True, "containment": 0.95, "max_area_ratio": 0.3}


@pytest.mark.parametrize(("field", "request_fields"), [
    ("score_threshold", {"score_threshold": True}),
    ("score_threshold", {"score_threshold": "0.6"}),
    ("mask_threshold", {"mask_threshold": "0.5"}),
    ("min_area_px", {"min_area_px": "30"}),
    ("min_area_px", {"min_area_px": False}),
    ("max_instances", {"max_instances": 10.5}),
    ("mask_rescoring", {"mask_rescoring": 1}),
    ("nested.containment", {"nested": {"containment": "0.9"}}),
    ("nested.enabled", {"nested": {"enabled": "yes"}}),
])
def test_set_takes_json_numbers_and_booleans_only_naming_the_field(svc: Service, field: str,
                                                                    request_fields: dict[str, Any]) -> None:
    before = svc.slot.current.segmenter.post
    reply = control_request(svc.control.address, {"command": "set", **request_fields})
    assert not reply["ok"] and f"postprocess: {field}:" in reply["error"]
    assert svc.slot.current.segmenter.post == before
    assert metric(svc, REJECTED) == 1
    ok = control_request(svc.control.address, {"command": "set", "score_threshold": 1, "min_area_px": 30})
    assert ok["ok"] and ok["result"]["postprocess"]["score_threshold"] == 1.0  # a JSON integer is a number


class _Unencodable:
    def __str__(self) -> str:
        raise RuntimeError("no text either")


def test_no_error_in_the_control_loop_ends_the_thread() -> None:
    """A handler failing unexpectedly, a reply that cannot be encoded and a send that fails are each
    logged and counted (``control_error``), and the next request is served."""
    counted: list[str] = []
    mode = {"kind": "ok"}

    def handler(req: BaseModel) -> dict[str, Any]:
        if mode["kind"] == "raise":
            raise RuntimeError("boom")
        if mode["kind"] == "unencodable":
            return {"x": _Unencodable()}
        return {"command": req.model_dump()["command"]}

    ctx: zmq.Context[Any] = zmq.Context()
    server = ctl.ControlServer(ctx, "tcp://127.0.0.1:*", handler, on_reject=counted.append)
    server.start()
    try:
        for kind, expected in (("raise", "RuntimeError: boom"), ("unencodable", "could not be encoded")):
            mode["kind"] = kind
            reply = control_request(server.address, {"command": "status"}, timeout_s=5)
            assert not reply["ok"] and expected in reply["error"]
        mode["kind"] = "ok"
        real_send = server.sock.send
        failures = [zmq.ZMQError(zmq.EHOSTUNREACH)]
        lock = threading.Lock()

        def failing_send(data: bytes, *args: Any, **kwargs: Any) -> Any:
            with lock:
                if failures:
                    raise failures.pop()
            return real_send(data, *args, **kwargs)

        server.sock.send = failing_send  # fault injection: the first reply fails to send
        reply = control_request(server.address, {"command": "status"}, timeout_s=5)
        assert not reply["ok"] and "reply not sent" in reply["error"]
        assert control_request(server.address, {"command": "pause"}, timeout_s=5) == {
            "ok": True, "result": {"command": "pause"}}
        assert server.thread.is_alive()
        assert counted == [ctl.CONTROL_ERROR] * 3
    finally:
        server.stop()
        ctx.term()


def test_a_message_without_the_req_envelope_is_dropped_counted_and_the_thread_serves_on(svc: Service) -> None:
    """A DEALER that sends no empty delimiter frame: no reply can be addressed (a REP socket dropped
    such a message too); it is counted as a bad request."""
    dealer: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.DEALER)
    dealer.linger = 0
    try:
        dealer.connect(svc.control.address)
        dealer.send(b'{"command":"status"}')
        assert not dealer.poll(500)
        assert metric(svc, REJECTED) == 1
    finally:
        dealer.close(0)
    assert_serving(svc)
