"""CurveZMQ server sockets that share one ZAP authenticator per 0MQ context.

0MQ asks the ZAP handler bound at ``inproc://zeromq.zap.01`` of a socket's context whether a
CURVE client may connect; only one handler can bind that address per context. The daemon has up
to three CURVE server sockets in one context (control, raw ingest, publication), so they share
one ``ThreadAuthenticator`` here, each under its own ZAP domain with its own authorised keys.

Every domain is checked by a callback (``configure_curve_callback``), never by pyzmq's
``allow_any`` switch, which would open every domain of the authenticator at once: a socket whose
config names no ``authorized_clients_dir`` admits any client that knows the server key, and the
others stay closed. A domain nobody configured admits no one.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils import z85

from nanoseg_daemon.ingest_config import CurveConfig


class _SharedZap:
    """The authenticator of one context and the keys each ZAP domain admits (None = any)."""

    def __init__(self, ctx: zmq.Context[Any]) -> None:
        self.ctx = ctx
        self.auth = ThreadAuthenticator(ctx)
        self.auth.start()
        self.domains: dict[str, frozenset[bytes] | None] = {}
        self.sockets: dict[str, int] = {}  # domain -> CURVE server sockets using it

    def callback(self, domain: str, client_key: bytes) -> bool:
        """pyzmq's credentials provider: ``client_key`` is the client's Z85 public key."""
        allowed = self.domains.get(domain, frozenset())
        return allowed is None or client_key in allowed


_lock = threading.Lock()
_shared: dict[int, _SharedZap] = {}  # id(context) -> its authenticator


class CurveServer:
    """The handle of one CURVE server socket; ``stop()`` releases the shared authenticator."""

    def __init__(self, zap: _SharedZap, domain: str) -> None:
        self._zap: _SharedZap | None = zap
        self.domain = domain

    def stop(self) -> None:
        with _lock:
            zap, self._zap = self._zap, None
            if zap is None:
                return
            zap.sockets[self.domain] -= 1
            if zap.sockets[self.domain] == 0:
                del zap.sockets[self.domain], zap.domains[self.domain]
            if zap.sockets:
                return
            _shared.pop(id(zap.ctx), None)
        zap.auth.stop()


def _z85_key(key: bytes | None, path: Path, what: str, which: str) -> bytes:
    if key is None:
        raise ValueError(f"{what} {path} holds no {which} (a zmq.auth certificate file is needed)")
    try:
        ok = len(key) == 40 and len(z85.decode(key)) == 32
    except (ValueError, KeyError, TypeError):
        ok = False
    if not ok:
        raise ValueError(f"{what} {path}: its {which} is not a 40-character Z85 CurveZMQ key")
    return key


def load_key_file(path: Path, what: str, need_secret: bool) -> tuple[bytes, bytes | None]:
    """(public, secret) of one zmq.auth key file at ``path`` (``what``: its name in messages);
    ``ValueError`` naming the file when it is missing, unreadable, not a key file, or its keys (the
    secret one only with ``need_secret``) are not 40-character Z85 CurveZMQ keys."""
    try:
        public, secret = zmq.auth.load_certificate(str(path))
    except (OSError, ValueError) as err:  # missing, unreadable, a directory, no public key, not text
        reason = "no such file" if not path.exists() else f"{type(err).__name__}: {err}"
        raise ValueError(f"cannot read {what} {path}: {reason}") from err
    public = _z85_key(public, path, what, "public-key")
    if need_secret:
        secret = _z85_key(secret, path, what, "secret-key")
    return public, secret


def load_keypair(path: Any, what: str) -> tuple[bytes, bytes]:
    """(public, secret) from a zmq.auth certificate file; a file without a secret key is an error."""
    public, secret = load_key_file(Path(path), what, need_secret=True)
    assert secret is not None
    return public, secret


def curve_server(
    sock: zmq.Socket[Any], ctx: zmq.Context[Any], curve: CurveConfig, domain: str
) -> CurveServer:
    """Make ``sock`` (not yet bound) a CURVE server checked under ZAP ``domain``.

    Clients must know the server's public key; with ``authorized_clients_dir`` their own public
    key must also be in that directory. Sockets may share a domain if they admit the same keys.
    Call ``stop()`` on the result when the socket closes.
    """
    if curve.server_secret_key is None:
        raise ValueError(f"{domain}: curve.server_secret_key is required for a CURVE server socket")
    public, secret = load_keypair(curve.server_secret_key, "server_secret_key")
    keys = None
    if curve.authorized_clients_dir is not None:
        keys = frozenset(zmq.auth.load_certificates(str(curve.authorized_clients_dir)))
    with _lock:
        zap = _shared.get(id(ctx))
        if zap is None:
            zap = _shared[id(ctx)] = _SharedZap(ctx)
        if domain in zap.domains and zap.domains[domain] != keys:
            raise ValueError(f"ZAP domain {domain!r} already admits other clients in this context")
        zap.domains[domain] = keys
        zap.sockets[domain] = zap.sockets.get(domain, 0) + 1
        zap.auth.configure_curve_callback(domain=domain, credentials_provider=zap)
    sock.zap_domain = domain.encode()
    sock.curve_publickey = public
    sock.curve_secretkey = secret
    sock.curve_server = True
    return CurveServer(zap, domain)


class ClientCurveKeys:
    """CurveZMQ keys of a client, loaded from zmq.auth key files.

    ``client_secret_key``: certificate file with this client's public and secret key (as
    ``zmq.auth.create_certificates`` writes ``NAME.key_secret``); ``server_public_key``: file with
    the server's public key (``NAME.key`` or its ``.key_secret``), called ``server_key_name`` in
    messages. Raises ``ValueError`` naming the file when one is missing, unreadable or holds no
    valid key.
    """

    def __init__(self, client_secret_key: str | Path, server_public_key: str | Path,
                 server_key_name: str = "server_public_key") -> None:
        self.client_secret_key = Path(client_secret_key)
        self.server_public_key = Path(server_public_key)
        self.public, self.secret = load_keypair(self.client_secret_key, "client_secret_key")
        self.server, _ = load_key_file(self.server_public_key, server_key_name, need_secret=False)

    def apply(self, sock: zmq.Socket[Any]) -> None:
        """Make ``sock`` (not yet connected) a CURVE client of the server."""
        sock.curve_publickey = self.public
        sock.curve_secretkey = self.secret
        sock.curve_serverkey = self.server

    def describe(self) -> str:
        """The keys and the files they came from, for messages."""
        return (f"client key {self.public.decode()} from {self.client_secret_key}, "
                f"server key {self.server.decode()} from {self.server_public_key}")


def curve_client(sock: zmq.Socket[Any], curve: CurveConfig) -> None:
    """Make ``sock`` a CURVE client of a server (a proxy) with ``client_secret_key`` and
    ``proxy_public_key``; nothing when they are not configured."""
    if curve.client_secret_key is None or curve.proxy_public_key is None:
        return
    ClientCurveKeys(curve.client_secret_key, curve.proxy_public_key, "proxy_public_key").apply(sock)
