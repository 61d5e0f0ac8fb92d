"""The client side of the daemon's control socket: one JSON request, one JSON reply.

No server here (that is ``nanoseg_daemon.control``): the trainer's promotion and the simulator
talk to running daemons through this module, so neither imports the daemon. The requests are
documented in ``nanoseg_daemon.control``; replies are ``{"ok": true, "result": {...}}`` or
``{"ok": false, "error": "..."}``.
"""

from __future__ import annotations

import json
from typing import Any

import zmq


def control_request(address: str, request: dict[str, Any], timeout_s: float = 10.0,
                    curve_client: tuple[bytes, bytes, bytes] | None = None) -> dict[str, Any]:
    """Send one request to a daemon's control socket and return its reply.

    Parameters
    ----------
    address
        The daemon's control address, e.g. ``tcp://127.0.0.1:5580``.
    request
        The request, e.g. ``{"command": "status"}``.
    timeout_s
        Seconds to wait for sending and for the reply.
    curve_client
        CurveZMQ keys (client public, client secret, server public), or None for a plain socket.

    Returns
    -------
    dict
        The reply, ``{"ok": ..., "result" or "error": ...}``.

    Raises
    ------
    TimeoutError
        No reply within ``timeout_s``.
    """
    s: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.REQ)
    s.linger = 0
    s.rcvtimeo = s.sndtimeo = int(timeout_s * 1000)
    if curve_client:
        s.curve_publickey, s.curve_secretkey, s.curve_serverkey = curve_client
    try:
        s.connect(address)
        s.send(json.dumps(request).encode())
        return dict(json.loads(s.recv()))
    except zmq.Again:
        raise TimeoutError(f"no reply from {address} within {timeout_s} s") from None
    finally:
        s.close(0)
