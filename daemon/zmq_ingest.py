"""The daemon's input sockets: one thread polls them, decodes each message and calls the sink.

- bluesky: a SUB socket connected to the proxy's output port (``bluesky-0MQ-proxy``), subscribed
  to ``prefix + b" "`` (or to everything with ``subscribe_all``); messages go through
  wire.parse_bluesky_message and a BlueskyRouter.
- raw frames: a PULL socket bound for detectors to PUSH to (see RawIngestConfig for why PULL);
  messages go through a RawFrameDecoder.
- between messages the router's ``tick`` runs (at least every ``poll_interval_s``): documents held
  for what they refer to expire, runs found in Tiled for a late joiner are opened.
- CurveZMQ (optional): the raw socket is a CURVE server whose clients are checked against
  ``authorized_clients_dir`` by the context's shared authenticator (curve_auth.py, ZAP domain
  ``ingest``); the bluesky socket is a CURVE client of the proxy when ``client_secret_key`` and ``proxy_public_key`` are set.

A bad message never stops the loop: it is counted through ``sink.rejected(reason, detail)``; an
unexpected exception is logged with its traceback and counted as ``internal_error``. The sockets
belong to the ingest thread once it runs; ``stop()`` closes them and joins it.
"""

from __future__ import annotations

import logging
import threading
from types import TracebackType
from typing import Any

import zmq

from nanoseg_daemon.bluesky_ingest import BlueskyRouter, RunJournal, RunLookup
from nanoseg_daemon.contracts import IngestSink
from nanoseg_daemon.curve_auth import CurveServer, curve_client, curve_server
from nanoseg_daemon.ingest_config import IngestConfig
from nanoseg_daemon.raw_ingest import MAX_HEADER_BYTES, RawFrameDecoder
from nanoseg_daemon.wire import WireError, make_deserializer, parse_bluesky_message

logger = logging.getLogger(__name__)

_BATCH = 64  # messages taken from one socket before looking at the other


class ZmqIngest:
    """Bluesky and raw-frame input on 0MQ sockets, delivering to ``sink`` from one thread.

    ``context``: a 0MQ context to share (the caller terminates it); None = own one.
    """

    def __init__(
        self,
        config: IngestConfig,
        sink: IngestSink,
        *,
        context: zmq.Context[Any] | None = None,
        journal: RunJournal | None = None,
        run_lookup: RunLookup | None = None,
    ) -> None:
        self._config = config
        self._sink = sink
        self._own_context = context is None
        self._context: zmq.Context[Any] = context if context is not None else zmq.Context()
        bc = config.bluesky
        self._prefix = bc.prefix.encode("ascii")
        self._deserialize = (
            make_deserializer(bc.serializer, allow_pickle=bc.allow_pickle) if bc.enabled else None
        )
        self.router = BlueskyRouter(sink, bc, journal=journal, run_lookup=run_lookup) if bc.enabled else None
        self._run_lookup = run_lookup  # closed with the ingest
        self._decoder = RawFrameDecoder(config.raw) if config.raw.enabled else None
        self._bluesky: zmq.Socket[Any] | None = None
        self._raw: zmq.Socket[Any] | None = None
        self._auth: CurveServer | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self.raw_address: str | None = None  # the bound endpoint, port resolved

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        """Create, connect and bind the sockets, then start the ingest thread."""
        if self._thread is not None:
            raise RuntimeError("ZmqIngest already started")
        try:
            if self._config.bluesky.enabled:
                self._bluesky = self._bluesky_socket()
            if self._config.raw.enabled:
                self._raw = self._raw_socket()
        except BaseException:
            self._close_sockets()
            self._stop_auth()
            raise
        self._thread = threading.Thread(target=self._loop, name="nanoseg-ingest", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = None) -> bool:
        """Stop the thread, close the sockets; False if the thread did not end within timeout."""
        self._stopping.set()
        thread = self._thread
        if thread is not None:
            thread.join(self._config.stop_timeout_s if timeout is None else timeout)
            if thread.is_alive():
                logger.error("ingest thread did not stop in time; sockets left open")
                return False
        else:
            self._close_sockets()
        self._stop_auth()
        close_lookup = getattr(self._run_lookup, "close", None)
        if callable(close_lookup):
            close_lookup()
        if self._own_context and not self._context.closed:
            self._context.term()
        return True

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def __enter__(self) -> ZmqIngest:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- sockets -----------------------------------------------------------------------------

    def _bluesky_socket(self) -> zmq.Socket[Any]:
        bc = self._config.bluesky
        sock = self._context.socket(zmq.SUB)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, bc.max_message_bytes)
        sock.setsockopt(zmq.RCVHWM, bc.rcvhwm)
        if self._config.curve is not None:
            curve_client(sock, self._config.curve)
        topic = b"" if bc.subscribe_all or not self._prefix else self._prefix + b" "
        sock.setsockopt(zmq.SUBSCRIBE, topic)
        sock.connect(bc.address)
        return sock

    def _raw_socket(self) -> zmq.Socket[Any]:
        rc = self._config.raw
        sock = self._context.socket(zmq.PULL)
        sock.setsockopt(zmq.LINGER, 0)
        # Up to twice the frame limit still arrives and is counted as oversize; beyond it 0MQ
        # drops the sender's connection without telling us.
        limit = max(2 * rc.max_frame_bytes, rc.max_frame_bytes + 1024 * 1024) + MAX_HEADER_BYTES
        sock.setsockopt(zmq.MAXMSGSIZE, limit)
        sock.setsockopt(zmq.RCVHWM, rc.rcvhwm)
        if self._config.curve is not None:
            self._auth = curve_server(sock, self._context, self._config.curve, domain="ingest")
        sock.bind(rc.bind)
        self.raw_address = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        return sock

    def _close_sockets(self) -> None:
        for sock in (self._bluesky, self._raw):
            if sock is not None and not sock.closed:
                sock.close(linger=0)

    def _stop_auth(self) -> None:
        if self._auth is not None:
            self._auth.stop()
            self._auth = None

    # -- the loop ----------------------------------------------------------------------------

    def _loop(self) -> None:
        poller = zmq.Poller()
        for sock in (self._bluesky, self._raw):
            if sock is not None:
                poller.register(sock, zmq.POLLIN)
        timeout_ms = max(1, int(self._config.poll_interval_s * 1000))
        try:
            while not self._stopping.is_set():
                ready = dict(poller.poll(timeout_ms))
                if self._bluesky is not None and self._bluesky in ready:
                    self._drain(self._bluesky, self._on_bluesky)
                if self._raw is not None and self._raw in ready:
                    self._drain(self._raw, self._on_raw)
                if self.router is not None:
                    self._tick(self.router)
        except zmq.ContextTerminated:
            logger.warning("0MQ context terminated under the ingest thread")
        finally:
            self._close_sockets()

    def _drain(self, sock: zmq.Socket[Any], handle: Any) -> None:
        for _ in range(_BATCH):
            try:
                handle(sock)
            except zmq.Again:
                return
            except zmq.ContextTerminated:
                raise
            except Exception as err:  # whatever a message does, the loop goes on
                logger.exception("ingest failed on a message")
                self._reject("internal_error", f"{err!r:.300}")

    def _tick(self, router: BlueskyRouter) -> None:
        """Held early documents expire, runs found in Tiled open (between messages)."""
        try:
            router.tick()
        except Exception as err:
            logger.exception("bluesky router tick failed")
            self._reject("internal_error", f"{err!r:.300}")

    def _reject(self, reason: Any, detail: str) -> None:
        try:
            self._sink.rejected(reason, detail)
        except Exception:
            logger.exception("sink.rejected failed")

    def _on_bluesky(self, sock: zmq.Socket[Any]) -> None:
        message = sock.recv(zmq.NOBLOCK)
        assert self._deserialize is not None and self.router is not None
        try:
            name, doc = parse_bluesky_message(message, self._prefix, self._deserialize)
        except WireError as err:
            if err.reason == "bad_prefix":
                logger.debug("ignored bluesky message: %s", err.detail)
            self._reject(err.reason, err.detail)
            return
        self.router(name, doc)

    def _on_raw(self, sock: zmq.Socket[Any]) -> None:
        frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
        assert self._decoder is not None
        self._decoder.handle([f.buffer for f in frames], self._sink)
