"""The control socket: one JSON request -> one JSON reply, validated by pydantic.

Requests (``command`` selects the kind)::

    {"command": "status"}
    {"command": "pause"} / {"command": "resume"}
    {"command": "reload_model", "path": "...", "sha256": "..." (optional)}
    {"command": "set", "score_threshold": 0.6, "mask_threshold": 0.5, "min_area_px": 30,
     "mask_rescoring": true, "nested": {"enabled": true, ...}}   (any subset)

Replies: ``{"ok": true, "result": {...}}`` or ``{"ok": false, "error": "..."}``. With CurveZMQ
configured, only clients whose public key is in the authorised directory get through at all.

Clients connect a REQ socket (a DEALER that sends the empty delimiter frame first works too): the
server is a ROUTER, which replies to each client by its identity, so a slow command does not hold
up the others. A ``reload_model`` (load, verify and warm up the new model: seconds, tens of seconds
for a TensorRT build) runs in a worker thread; its client gets its one reply, success or failure,
when the reload has finished, while other clients' ``status`` (whose ``reloading`` names the
reload in progress and its seconds so far), ``pause``, ``resume`` and ``set`` are answered at once.
A second ``reload_model`` during a reload is refused at once ("a reload is in progress: ...") and
counted as ``nanoseg_messages_rejected_total{reason="reload_in_progress"}``; nothing is queued.
A reload still running when the daemon stops is abandoned: its client gets no reply.

A request is one message part of at most ``MAX_REQUEST_BYTES``; anything else (several parts, too
large, not UTF-8 JSON, nested too deeply, not a valid request) is refused with a reply and counted
as ``nanoseg_messages_rejected_total{reason="bad_control_request"}`` (a message without the REQ
envelope's empty delimiter cannot be answered: it is dropped, logged and counted so too). A request
the handler fails on unexpectedly, or a reply that cannot be sent, is logged and counted as
``control_error``; the control thread goes on serving. A well-formed command that fails (a reload
of a broken model, a reload while another runs) raises ``CommandFailed``: the handler counts it
itself, and the reply says why.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import zmq
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, model_validator

from nanoseg.config_io import StrictModel, format_validation_error
from nanoseg.postprocess import PostprocessConfig
from nanoseg_daemon.curve_auth import curve_server
from nanoseg_daemon.ingest_config import CurveConfig
from nanoseg_daemon.logs import log

MAX_REQUEST_BYTES = 1024 * 1024
"""The largest control request served (1 MiB; real requests are well under 1 KiB). Up to twice
this still arrives and is refused with a reply and counted; beyond that 0MQ drops the client's
connection without telling us (the socket's ``MAXMSGSIZE``), so that no request, however large,
is taken into memory whole."""

BAD_REQUEST = "bad_control_request"
"""The rejection reason of a malformed control request."""

RELOAD_IN_PROGRESS = "reload_in_progress"
"""The rejection reason of a ``reload_model`` refused because another reload is in progress."""

CONTROL_ERROR = "control_error"
"""The rejection reason of a request the control loop failed on (an unexpected handler error, a
reply that could not be encoded or sent)."""


class CommandFailed(Exception):
    """A well-formed request whose command failed (e.g. a reload of a broken model): the reply
    carries the message; the handler counts the failure, so the request is not counted as bad."""


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
    """Any subset of ``PostprocessConfig``'s fields, validated by that one schema in strict mode
    (errors name the field): numbers must be JSON numbers (a bool or a string such as ``"0.6"`` is
    refused, an integer field takes no fraction), flags JSON booleans; ``updates`` holds them."""

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
            PostprocessConfig.model_validate(self.updates, strict=True)
        except ValidationError as err:
            raise ValueError(format_validation_error(err, "postprocess")) from None
        return self


ControlRequest = Annotated[
    StatusRequest | PauseRequest | ResumeRequest | ReloadRequest | SetRequest, Field(discriminator="command")
]
REQUEST = TypeAdapter(ControlRequest)


def parse_request(raw: bytes) -> BaseModel:
    """The request in ``raw`` (one message part); raises ``ValueError`` saying what is wrong with it
    (naming the field where one is)."""
    if len(raw) > MAX_REQUEST_BYTES:
        raise ValueError(f"request: {len(raw)} bytes, more than the {MAX_REQUEST_BYTES} a control request may have")
    try:
        data = json.loads(raw.decode("utf-8"))
    except RecursionError:
        raise ValueError("request: JSON nested too deeply") from None
    except ValueError as err:  # UnicodeDecodeError, JSONDecodeError, an integer of too many digits
        raise ValueError(f"request is not UTF-8 JSON: {err}") from None
    try:
        request: BaseModel = REQUEST.validate_python(data)
        return request
    except RecursionError:
        raise ValueError("request: nested too deeply") from None
    except ValidationError as err:
        raise ValueError(format_validation_error(err, "request")) from None


def parse_parts(parts: list[bytes]) -> BaseModel:
    """The request in a received message: exactly one part (``parse_request``); raises
    ``ValueError`` otherwise."""
    if len(parts) != 1:
        raise ValueError(f"request: {len(parts)} message parts; a control request is one part (one JSON object)")
    return parse_request(parts[0])


def apply_curve_server(sock: zmq.Socket[Any], ctx: zmq.Context[Any], curve: CurveConfig) -> Any:
    """Make ``sock`` a CURVE server; returns its handle (``stop()`` it on shutdown).

    The ZAP authenticator is shared with the context's other CURVE sockets (curve_auth.py).
    """
    if curve.server_secret_key is None:
        raise ValueError("control.curve.server_secret_key is required for a CURVE control socket")
    return curve_server(sock, ctx, curve, domain="control")


@dataclass(frozen=True)
class Deferred:
    """A handler's answer to a slow command: the control thread runs ``work`` in a worker thread
    (named ``name``, a daemon thread) and goes on serving; ``work``'s result, or the error it
    raises (read as a handler's), is the reply, sent to the requesting client when it returns."""

    work: Callable[[], dict[str, Any]]
    name: str = "control-worker"
    not_started: Callable[[], None] | None = None  # called instead of work when no thread can start


Handler = Callable[[BaseModel], dict[str, Any] | Deferred]
"""A control handler: the result dict of a request, or a ``Deferred`` to compute it off the
control thread."""

Reply = dict[str, Any]


class ControlServer:
    """Serves requests on a ROUTER socket in its own thread; ``handler`` returns the result dict,
    or a ``Deferred`` whose work runs in a worker thread and whose reply is sent when it is done.

    Only the control thread touches the socket: a worker hands its reply over a queue, which the
    control loop empties between polls (every ``POLL_MS``)."""

    POLL_MS = 50

    def __init__(self, ctx: zmq.Context[Any], address: str, handler: Handler,
                 curve: CurveConfig | None = None, on_reject: Callable[[str], None] | None = None) -> None:
        self.sock: zmq.Socket[Any] = ctx.socket(zmq.ROUTER)
        self.sock.linger = 0
        self.sock.setsockopt(zmq.MAXMSGSIZE, 2 * MAX_REQUEST_BYTES)  # see MAX_REQUEST_BYTES
        self.auth = apply_curve_server(self.sock, ctx, curve) if curve else None
        self.sock.bind(address)
        self.address = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.handler, self.on_reject = handler, on_reject
        self._stop = threading.Event()
        self._finished: queue.SimpleQueue[tuple[list[bytes], Reply]] = queue.SimpleQueue()
        self.workers: list[threading.Thread] = []  # the deferred commands' threads (pruned at each new one)
        self.thread = threading.Thread(target=self._loop, name="control", daemon=True)

    def start(self) -> None:
        """Start serving in the control thread."""
        self.thread.start()

    def _loop(self) -> None:
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        while not self._stop.is_set():
            try:
                self._send_finished()
                if dict(poller.poll(self.POLL_MS)):
                    self._serve_one()
            except zmq.ContextTerminated:
                return  # the daemon is stopping; the socket is gone
            except Exception as err:  # nothing may end the control thread: log, count, go on
                self._count(CONTROL_ERROR)
                log("control_error", logging.ERROR, error=f"{type(err).__name__}: {err}")
                self._stop.wait(0.01)  # a socket failing at once on every poll must not spin

    def _serve_one(self) -> None:
        """Receive one message (all its parts) and answer it, or start its deferred work."""
        try:
            parts = self.sock.recv_multipart(zmq.NOBLOCK)
        except zmq.Again:
            return
        envelope, body = split_envelope(parts)
        if envelope is None:
            self._count(BAD_REQUEST)
            log("control_unanswerable", logging.WARNING, parts=len(parts),
                detail="a message without the REQ envelope (no empty delimiter frame) cannot be answered")
            return
        reply = self._answer(lambda: self.handler(parse_parts(body)))
        if isinstance(reply, Deferred):
            self._defer(envelope, reply)
        else:
            self._send(envelope, reply)

    def _defer(self, envelope: list[bytes], deferred: Deferred) -> None:
        """Run ``deferred`` in a worker thread; its reply goes back through ``_finished``."""

        def work() -> None:
            reply = self._answer(deferred.work)
            if isinstance(reply, Deferred):  # work must return the result itself
                self._count(CONTROL_ERROR)
                reply = {"ok": False, "error": "a deferred command answered with another"}
            self._finished.put((envelope, reply))

        self.workers = [w for w in self.workers if w.is_alive()]
        worker = threading.Thread(target=work, name=deferred.name, daemon=True)
        try:
            worker.start()
        except RuntimeError as err:  # no thread to be had: answered, and the handler told
            if deferred.not_started is not None:
                deferred.not_started()
            self._send(envelope, {"ok": False, "error": f"command not started: {err}"})
            raise  # counted and logged by the loop
        self.workers.append(worker)

    def _send_finished(self) -> None:
        """Send the replies of the deferred commands that have finished."""
        while True:
            try:
                envelope, reply = self._finished.get_nowait()
            except queue.Empty:
                return
            self._send(envelope, reply)

    def _send(self, envelope: list[bytes], reply: Reply) -> None:
        """Send ``reply`` to the client of ``envelope``; a reply that cannot be encoded is replaced
        by an error reply, so every request received is answered. A client gone meanwhile (its
        REQ timed out) is not an error: the ROUTER drops a reply to an unknown identity."""
        try:
            body = json.dumps(reply, default=str).encode()
        except Exception as err:  # e.g. a circular result; the request is answered all the same
            self._count(CONTROL_ERROR)
            log("control_error", logging.ERROR, error=f"reply not encodable: {type(err).__name__}: {err}")
            body = json.dumps({"ok": False, "error": f"reply could not be encoded: {type(err).__name__}"}).encode()
        try:
            self.sock.send_multipart([*envelope, body])
        except zmq.ZMQError as err:
            if err.errno == zmq.ETERM:
                raise
            # the client waits for a reply (REQ): a short one, then counted and logged by the loop
            self.sock.send_multipart([*envelope, json.dumps({"ok": False, "error": f"reply not sent: {err}"}).encode()])
            raise

    def _answer(self, call: Callable[[], dict[str, Any] | Deferred]) -> Reply | Deferred:
        """The reply to a request ``call`` serves (or its ``Deferred``); counts a bad request and an
        unexpected handler error, never raises."""
        try:
            result = call()
            return result if isinstance(result, Deferred) else {"ok": True, "result": result}
        except CommandFailed as err:  # well-formed, failed: counted by the handler
            return {"ok": False, "error": str(err)}
        except ValueError as err:
            self._count(BAD_REQUEST)
            return {"ok": False, "error": str(err)}
        except Exception as err:  # a failing command must not kill the control thread
            self._count(CONTROL_ERROR)
            log("control_error", logging.ERROR, error=f"{type(err).__name__}: {err}")
            return {"ok": False, "error": f"{type(err).__name__}: {err}"}

    def _count(self, reason: str) -> None:
        """Count a rejected request as ``reason`` (``on_reject``); a failing counter is only logged."""
        if self.on_reject:
            try:
                self.on_reject(reason)
            except Exception as err:
                log("control_count_failed", logging.ERROR, reason=reason, error=f"{type(err).__name__}: {err}")

    def stop(self) -> None:
        """Stop the control thread and close the socket. A deferred command still running is not
        waited for (its thread is a daemon thread); its reply is never sent."""
        self._stop.set()
        self.thread.join(2)
        self.sock.close(0)
        if self.auth is not None:
            self.auth.stop()


def split_envelope(parts: list[bytes]) -> tuple[list[bytes] | None, list[bytes]]:
    """(envelope, body) of a message a ROUTER received: the envelope is the frames up to and
    including the first empty one (the client's identity, any proxies', REQ's delimiter), sent back
    before the reply; the body is the request's parts. None as the envelope: no delimiter, or
    nothing after it (what a REP socket drops unanswered)."""
    for i, part in enumerate(parts[:-1]):
        if not part:
            return parts[: i + 1], parts[i + 1:]
    return None, parts
