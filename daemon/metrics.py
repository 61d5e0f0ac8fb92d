"""Prometheus metrics of the daemon (units in the names) and its HTTP endpoint.

``/metrics`` (Prometheus text format, prometheus-client's own WSGI app), ``/healthz`` (200 while
the process serves), ``/readyz`` (200 once a model is loaded and the sockets are bound, 503 before
and while draining), served by prometheus-client's threading WSGI server.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    generate_latest,
    make_wsgi_app,
)
from prometheus_client.exposition import ThreadingWSGIServer

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class DaemonMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.frames_received = Counter("nanoseg_frames_received_total", "Frames accepted by ingest", registry=r)
        self.frames_processed = Counter("nanoseg_frames_processed_total", "Frames analysed and stored", registry=r)
        self.frames_dropped = Counter("nanoseg_frames_dropped_total", "Frames dropped before analysis", ["reason"], registry=r)
        self.frames_failed = Counter("nanoseg_frames_failed_total", "Frames that could not be analysed", ["reason"], registry=r)
        self.frames_input_mismatch = Counter(
            "nanoseg_frames_input_mismatch_total",
            "Frames that look like another input than their profile expects (transmission vs optical_density)",
            ["looks_like"], registry=r)
        self.frames_converted = Counter("nanoseg_frames_converted_total", "Frames accepted after a conversion (rgb_to_gray)", ["reason"], registry=r)
        self.instances_dropped = Counter("nanoseg_instances_dropped_total", "Instances dropped from analysed frames", ["reason"], registry=r)
        self.statistics_workers = Gauge("nanoseg_statistics_workers", "Statistics worker processes running "
                                        "(statistics.workers)", registry=r)
        self.statistics_remeasured = Counter(
            "nanoseg_statistics_remeasured_frames_total",
            "Frames measured in the daemon's thread because their statistics worker died", registry=r)
        self.messages_rejected = Counter("nanoseg_messages_rejected_total", "Malformed input messages", ["reason"], registry=r)
        self.stage_seconds = Histogram("nanoseg_stage_seconds", "Time per pipeline stage", ["stage"],
                                       buckets=LATENCY_BUCKETS, registry=r)
        self.latency_seconds = Histogram("nanoseg_frame_latency_seconds", "Ingest to published, per frame",
                                         buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("nanoseg_batch_size_frames", "Frames analysed together, per engine batch",
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=r)
        self.queue_depth = Gauge("nanoseg_queue_depth", "Items waiting for analysis", registry=r)
        self.particles = Histogram("nanoseg_particles_per_frame", "Particles found per frame",
                                   buckets=(0, 1, 2, 5, 10, 20, 50, 100, 200), registry=r)
        self.last_frame = Gauge("nanoseg_last_frame_timestamp_seconds", "Unix time of the last analysed frame", registry=r)
        self.open_runs = Gauge("nanoseg_open_runs", "Runs started and not yet stopped", registry=r)
        self.model_info = Info("nanoseg_model", "Serving model", registry=r)
        self.model_reloads = Counter("nanoseg_model_reloads_total", "Model reload attempts", ["result"], registry=r)
        self.store_errors = Counter("nanoseg_store_errors_total", "Failed result-store writes", ["reason"], registry=r)
        self.sink_errors = Counter("nanoseg_sink_errors_total", "Failed sink writes (store, publishers)",
                                   ["sink", "reason"], registry=r)
        self.publish_dropped = Counter("nanoseg_publish_dropped_total", "Messages not published", ["channel"], registry=r)
        self.closed_run_items = Counter(
            "nanoseg_closed_run_items_total",
            "Items of a run closed already (late_stop: a second stop, ignored; late_frame: a frame, stored "
            "but not published)", ["reason"], registry=r)
        self.published_values_replaced = Counter(
            "nanoseg_published_values_replaced_total",
            "Metadata values published as their repr because the wire formats cannot carry them "
            "(int_beyond_64_bits, not_utf8)", ["reason"], registry=r)
        self.paused = Gauge("nanoseg_paused", "1 while analysis is paused", registry=r)
        self.ready = Gauge("nanoseg_ready", "1 when serving", registry=r)
        # growth monitoring (daemon/growth.py); the quantity label carries the unit (length_nm, count, ...)
        self.growth_ewma = Gauge("nanoseg_growth_ewma", "EWMA of a per-frame quantity, latest frame's run", ["quantity"], registry=r)
        self.growth_rate_per_frame = Gauge("nanoseg_growth_rate_per_frame", "Change of the EWMA per frame", ["quantity"], registry=r)
        self.growth_rate_per_second = Gauge("nanoseg_growth_rate_per_second", "Change of the EWMA per second of acquisition time", ["quantity"], registry=r)
        self.growth_alarm_active = Gauge("nanoseg_growth_alarm_active", "1 while a growth alarm rule holds", ["rule"], registry=r)
        self.growth_alarms = Counter("nanoseg_growth_alarms_total", "Growth alarms raised", ["rule"], registry=r)

        self._ready = False

    @property
    def is_ready(self) -> bool:
        """What ``/readyz`` answers: set by ``set_ready`` (the gauge ``nanoseg_ready`` follows)."""
        return self._ready

    def set_ready(self, ready: bool) -> None:
        self._ready = ready
        self.ready.set(1 if ready else 0)

    def render(self) -> bytes:
        return bytes(generate_latest(self.registry))


StartResponse = Callable[[str, list[tuple[str, str]]], Any]


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # scrapes every few seconds: no log line each
        return


class MetricsServer:
    """``/healthz`` and ``/readyz`` in front of prometheus-client's WSGI app, on its threading server."""

    def __init__(self, metrics: DaemonMetrics, host: str, port: int) -> None:
        self.metrics = metrics
        self._prometheus = make_wsgi_app(metrics.registry)
        self.httpd = make_server(host, port, self._app, ThreadingWSGIServer, handler_class=_QuietHandler)
        self.port = int(self.httpd.server_port)
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="metrics-http", daemon=True)

    def _app(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path.startswith("/metrics"):
            return self._prometheus(environ, start_response)
        if path.startswith("/healthz"):
            code, body = "200 OK", b"ok\n"
        elif path.startswith("/readyz"):
            code, body = ("200 OK", b"ready\n") if self.metrics.is_ready else ("503 Service Unavailable", b"not ready\n")
        else:
            code, body = "404 Not Found", b"not found\n"
        start_response(code, [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
        return [body]

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
