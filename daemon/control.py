"""The control socket: REQ/REP, one JSON request -> one JSON reply, validated by pydantic.

Requests (``command`` selects the kind)::

    {"command": "status"}
    {"command": "pause"} / {"command": "resume"}
    {"command": "reload_model", "path": "...", "sha256": "..." (optional)}
    {"command": "set", "score_threshold": 0.6, "mask_threshold": 0.5, "min_area_px": 30,
     "mask_rescoring": true, "nested": {"enabled": true, ...}}   (any subset)

Replies: ``{"ok": true, "result": {...}}`` or ``{"ok": false, "error": "..."}``. With CurveZMQ
configured, only clients whose public key is in the authorised directory get through at all.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from typing import Annotated, Any, Literal

import zmq
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, model_validator

from nanoseg.config_io import StrictModel, format_validation_error
from nanoseg.postprocess import PostprocessConfig
from nanoseg_daemon.curve_auth import curve_server
from nanoseg_daemon.ingest_config import CurveConfig


class StatusRequest(StrictModel):
    command: Literal["status"]


class PauseRequest(StrictModel):
    command: Literal["pause"]


class ResumeRequest(StrictModel):
    command: Literal["resume"]


class ReloadRequest(StrictModel):
    command: Literal["reload_model"]
    path: str = Field(min_length=1)
    sha256: str | None = Field(None, pattern=r"^[0-9a-f]{64}$")


class SetRequest(BaseModel):
    """Any subset of ``PostprocessConfig``'s fields, validated by that one schema (errors name the
    field); ``updates`` holds them."""

    model_config = ConfigDict(extra="allow")
    command: Literal["set"]

    @property
    def updates(self) -> dict[str, Any]:
        return dict(self.model_extra or {})

    @model_validator(mode="after")
    def _postprocess_fields(self) -> SetRequest:
        unknown = sorted(set(self.updates) - set(PostprocessConfig.model_fields))
        if unknown:
            raise ValueError(f"unknown post-processing field(s): {', '.join(unknown)}")
        try:
            PostprocessConfig.model_validate(self.updates)
        except ValidationError as err:
            raise ValueError(format_validation_error(err, "postprocess")) from None
        return self


ControlRequest = Annotated[
    StatusRequest | PauseRequest | ResumeRequest | ReloadRequest | SetRequest, Field(discriminator="command")
]
REQUEST = TypeAdapter(ControlRequest)


def parse_request(raw: bytes) -> BaseModel:
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"request is not UTF-8 JSON: {err}") from None
    try:
        request: BaseModel = REQUEST.validate_python(data)
        return request
    except ValidationError as err:
        raise ValueError(format_validation_error(err, "request")) from None


def apply_curve_server(sock: zmq.Socket, ctx: zmq.Context, curve: CurveConfig) -> Any:
    """Make ``sock`` a CURVE server; returns its handle (``stop()`` it on shutdown).

    The ZAP authenticator is shared with the context's other CURVE sockets (curve_auth.py).
    """
    if curve.server_secret_key is None:
        raise ValueError("control.curve.server_secret_key is required for a CURVE control socket")
    return curve_server(sock, ctx, curve, domain="control")


class ControlServer:
    """Serves requests on a REP socket in its own thread; ``handler`` returns the result dict."""

    def __init__(self, ctx: zmq.Context, address: str, handler: Callable[[BaseModel], dict[str, Any]],
                 curve: CurveConfig | None = None, on_reject: Callable[[str], None] | None = None) -> None:
        self.sock = ctx.socket(zmq.REP)
        self.sock.linger = 0
        self.auth = apply_curve_server(self.sock, ctx, curve) if curve else None
        self.sock.bind(address)
        self.address = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.handler, self.on_reject = handler, on_reject
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="control", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def _loop(self) -> None:
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        while not self._stop.is_set():
            if not dict(poller.poll(100)):
                continue
            try:
                raw = self.sock.recv(zmq.NOBLOCK)
            except zmq.ZMQError:
                continue
            try:
                req = parse_request(raw)
                reply: dict[str, Any] = {"ok": True, "result": self.handler(req)}
            except ValueError as err:
                if self.on_reject:
                    self.on_reject("bad_control_request")
                reply = {"ok": False, "error": str(err)}
            except Exception as err:  # a failing command must not kill the control thread
                reply = {"ok": False, "error": f"{type(err).__name__}: {err}"}
            self.sock.send(json.dumps(reply, default=str).encode())

    def stop(self) -> None:
        self._stop.set()
        self.thread.join(2)
        self.sock.close(0)
        if self.auth is not None:
            self.auth.stop()
