"""CurveZMQ on every socket of one daemon: control, raw ingest and summaries are CURVE servers that
admit only the authorised client key; the bluesky input and the analysis documents go through
real bluesky proxies as an authorised CURVE client.

    detector (good key) --PUSH/CURVE--> daemon --PUB/CURVE--> summary subscriber (good key)
    Publisher --> proxy A --PUB/CURVE--> daemon --PUB/CURVE client--> proxy B --> analysis subscriber
    operator (good key) --REQ/CURVE--> daemon control

One daemon for the module: having three CURVE server sockets in one 0MQ context is itself part of
what is tested (they share one ZAP authenticator, daemon/curve_auth.py).
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import zmq
from bluesky.callbacks.zmq import Proxy, Publisher, ServerCurve
from event_model import compose_run

from nanoseg.codec import msgpack_dumps, msgpack_loads
from nanoseg.control_client import control_request
from nanoseg_daemon.service import Service
from tests.hardening.hardening_fixtures import (
    Pusher,
    by_reason,
    curve_keys,
    make_certificates,
    raw_frame_message,
    small_frame,
    start_lean_service,
    svc_metrics,
    total,
    wait_for,
)

REFUSED_WITHIN_S = 1.5


@dataclass
class Secured:
    svc: Service
    keys: dict[str, tuple[Path, Path]]  # name -> (public, secret) files
    ingest_proxy_in: str
    docs_proxy_out: str
    ingest_proxy_out: str

    def client(self, name: str) -> tuple[bytes, bytes, bytes]:
        """A client's keys for the daemon's CURVE servers."""
        return curve_keys(self.keys[name][1], self.keys["server"][0])


def start_proxy(**curve: ServerCurve) -> Proxy:
    proxy = Proxy("tcp://127.0.0.1", "tcp://127.0.0.1", **curve)
    threading.Thread(target=proxy.start, daemon=True).start()  # bluesky's Proxy has no stop
    return proxy


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory, trained_model_path: Path) -> Iterator[Secured]:
    d = tmp_path_factory.mktemp("curve")
    keys = make_certificates(d / "keys", "server", "proxy", "daemon", "good", "bad")
    authorized, proxy_clients = d / "authorized", d / "proxy_clients"
    authorized.mkdir()
    proxy_clients.mkdir()
    shutil.copy(keys["good"][0], authorized)  # the daemon admits only "good"
    shutil.copy(keys["daemon"][0], proxy_clients)  # the proxies admit only the daemon
    ingest_proxy = start_proxy(out_curve=ServerCurve(keys["proxy"][1], proxy_clients, None))
    docs_proxy = start_proxy(in_curve=ServerCurve(keys["proxy"][1], proxy_clients, None))
    server = {"server_secret_key": keys["server"][1], "authorized_clients_dir": authorized}
    client = {"client_secret_key": keys["daemon"][1], "proxy_public_key": keys["proxy"][0]}
    overrides = {f"control.curve.{k}": v for k, v in server.items()}
    overrides |= {f"{s}.curve.{k}": v for s in ("ingest", "publish") for k, v in (server | client).items()}
    svc = start_lean_service(d / "state", trained_model_path, **overrides, **{
        "ingest.bluesky.enabled": "true", "ingest.bluesky.address": ingest_proxy.out_port,
        "publish.bluesky.bind": "false", "publish.bluesky.address": docs_proxy.in_port})
    try:
        yield Secured(svc, keys, ingest_proxy.in_port, docs_proxy.out_port, ingest_proxy.out_port)
    finally:
        assert svc.stop()


def received(s: Secured) -> int:
    return total(svc_metrics(s.svc), "nanoseg_frames_received_total")


@pytest.mark.parametrize("who", ["no key", "unauthorised key", "authorised key, wrong server key"])
def test_control_refuses_clients_without_the_authorised_key(secured: Secured, who: str) -> None:
    curve = {"no key": None, "unauthorised key": secured.client("bad"),
             "authorised key, wrong server key": curve_keys(secured.keys["good"][1], secured.keys["proxy"][0])}[who]
    for request in ({"command": "status"}, {"command": "pause"},
                    {"command": "reload_model", "path": secured.svc.slot.current.path}):
        with pytest.raises(TimeoutError):
            control_request(secured.svc.control.address, request, timeout_s=REFUSED_WITHIN_S, curve_client=curve)
    assert not secured.svc.status()["paused"]
    assert not by_reason(svc_metrics(secured.svc), "nanoseg_model_reloads_total")


def test_control_obeys_the_authorised_key(secured: Secured) -> None:
    address, good = secured.svc.control.address, secured.client("good")
    status = control_request(address, {"command": "status"}, curve_client=good)
    assert status["ok"] and status["result"]["paused"] is False
    assert control_request(address, {"command": "pause"}, curve_client=good)["result"]["paused"] is True
    assert control_request(address, {"command": "resume"}, curve_client=good)["result"]["paused"] is False
    reply = control_request(address, {"command": "reload_model", "path": secured.svc.slot.current.path},
                            timeout_s=60, curve_client=good)
    assert reply["ok"], reply
    assert by_reason(svc_metrics(secured.svc), "nanoseg_model_reloads_total") == {"ok": 1}


def subscriber(ctx: zmq.Context[Any], address: str, keys: tuple[bytes, bytes, bytes] | None) -> zmq.Socket[Any]:
    sock = ctx.socket(zmq.SUB)
    sock.linger = 0
    if keys is not None:
        sock.curve_publickey, sock.curve_secretkey, sock.curve_serverkey = keys
    sock.setsockopt(zmq.SUBSCRIBE, b"")
    sock.connect(address)
    return sock


def test_raw_ingest_and_summaries_admit_only_the_authorised_key(secured: Secured) -> None:
    svc = secured.svc
    assert svc.ingest.raw_address and svc.summary_pub
    ctx: zmq.Context[Any] = zmq.Context()
    keys = {"no key": None, "unauthorised key": secured.client("bad"), "authorised key": secured.client("good")}
    pushers = {who: Pusher(svc.ingest.raw_address, curve=k) for who, k in keys.items()}
    subs = {who: subscriber(ctx, svc.summary_pub.address, k) for who, k in keys.items()}
    before = received(secured)
    try:
        for k, who in enumerate(["no key", "unauthorised key"]):
            for i in range(2):  # queued until the handshake fails, or refused at once
                pushers[who].try_send(raw_frame_message(i, small_frame(i), run=f"intruder{k}"), 1.0)
        time.sleep(1.0)
        assert received(secured) == before  # nothing from the intruders got in
        for i in range(2):
            pushers["authorised key"].send(raw_frame_message(i, small_frame(i), run="trusted"))
        got = []
        deadline = time.monotonic() + 60
        while len(got) < 2 and time.monotonic() < deadline:
            if subs["authorised key"].poll(200):
                got.append(json.loads(subs["authorised key"].recv_multipart()[1])["frame_uid"])
        assert got == ["raw:detector:trusted:0", "raw:detector:trusted:1"]
        assert received(secured) == before + 2
        assert not subs["no key"].poll(300) and not subs["unauthorised key"].poll(300)  # saw none of it
    finally:
        for p in pushers.values():
            p.close()
        for sock in subs.values():
            sock.close(0)
        ctx.term()


def test_bluesky_in_and_analysis_out_through_curve_proxies(secured: Secured) -> None:
    ctx: zmq.Context[Any] = zmq.Context()
    analysis = ctx.socket(zmq.SUB)  # proxy B's output is plain: the CURVE link is daemon -> proxy B
    analysis.linger = 0
    analysis.setsockopt(zmq.SUBSCRIBE, b"")
    analysis.connect(secured.docs_proxy_out)
    eavesdropper = ctx.socket(zmq.SUB)  # proxy A's output admits only the daemon's key
    eavesdropper.linger = 0
    eavesdropper.setsockopt(zmq.SUBSCRIBE, b"")
    eavesdropper.connect(secured.ingest_proxy_out)
    publisher = Publisher(secured.ingest_proxy_in, serializer=msgpack_dumps)
    bundle = compose_run(metadata={"pixel_size_nm": 8.0})
    desc = bundle.compose_descriptor(name="primary", data_keys={"img": {"dtype": "array", "shape": [64, 64],
                                                                       "source": "cam"}})
    try:
        def probed() -> bool:
            publisher("bogus_probe_document", {})
            time.sleep(0.1)
            return by_reason(svc_metrics(secured.svc), "nanoseg_messages_rejected_total").get("unknown_document", 0) > 0

        wait_for(probed, 30, "the daemon to hear proxy A over CURVE")
        publisher("start", bundle.start_doc)
        publisher("descriptor", desc.descriptor_doc)
        event = desc.compose_event(data={"img": small_frame(7)}, timestamps={"img": time.time()})
        publisher("event", event)
        publisher("stop", bundle.compose_stop())
        names: list[str] = []
        deadline = time.monotonic() + 60
        while "stop" not in names and time.monotonic() < deadline:
            if analysis.poll(200):
                _prefix, name, payload = analysis.recv().split(b" ", 2)
                doc = msgpack_loads(payload)
                if name == b"start":
                    assert doc["raw_run_uid"] == bundle.start_doc["uid"]
                if name == b"event":
                    assert doc["data"]["frame_uid"] == event["uid"]
                names.append(name.decode())
        assert names == ["start", "descriptor", "event", "stop"]
        assert not eavesdropper.poll(200)
    finally:
        publisher.close()
        analysis.close(0)
        eavesdropper.close(0)
        ctx.term()
