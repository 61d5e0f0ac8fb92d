"""Prometheus metrics of the daemon (units in the names) and its HTTP endpoint.

``/metrics`` (Prometheus text format), ``/healthz`` (200 while the process serves), ``/readyz``
(200 once a model is loaded and the sockets are bound, 503 before and while draining).
"""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

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
        self.messages_rejected = Counter("nanoseg_messages_rejected_total", "Malformed input messages", ["reason"], registry=r)
        self.stage_seconds = Histogram("nanoseg_stage_seconds", "Time per pipeline stage", ["stage"],
                                       buckets=LATENCY_BUCKETS, registry=r)
        self.latency_seconds = Histogram("nanoseg_frame_latency_seconds", "Ingest to published, per frame",
                                         buckets=LATENCY_BUCKETS, registry=r)
        self.queue_depth = Gauge("nanoseg_queue_depth", "Items waiting for analysis", registry=r)
        self.particles = Histogram("nanoseg_particles_per_frame", "Particles found per frame",
                                   buckets=(0, 1, 2, 5, 10, 20, 50, 100, 200), registry=r)
        self.last_frame = Gauge("nanoseg_last_frame_timestamp_seconds", "Unix time of the last analysed frame", registry=r)
        self.open_runs = Gauge("nanoseg_open_runs", "Runs started and not yet stopped", registry=r)
        self.model_info = Info("nanoseg_model", "Serving model", registry=r)
        self.model_reloads = Counter("nanoseg_model_reloads_total", "Model reload attempts", ["result"], registry=r)
        self.store_errors = Counter("nanoseg_store_errors_total", "Failed result-store writes", ["reason"], registry=r)
        self.publish_dropped = Counter("nanoseg_publish_dropped_total", "Messages not published", ["channel"], registry=r)
        self.paused = Gauge("nanoseg_paused", "1 while analysis is paused", registry=r)
        self.ready = Gauge("nanoseg_ready", "1 when serving", registry=r)
        # growth monitoring (daemon/growth.py); the quantity label carries the unit (length_nm, count, ...)
        self.growth_ewma = Gauge("nanoseg_growth_ewma", "EWMA of a per-frame quantity, latest frame's run", ["quantity"], registry=r)
        self.growth_rate_per_frame = Gauge("nanoseg_growth_rate_per_frame", "Change of the EWMA per frame", ["quantity"], registry=r)
        self.growth_rate_per_second = Gauge("nanoseg_growth_rate_per_second", "Change of the EWMA per second of acquisition time", ["quantity"], registry=r)
        self.growth_alarm_active = Gauge("nanoseg_growth_alarm_active", "1 while a growth alarm rule holds", ["rule"], registry=r)
        self.growth_alarms = Counter("nanoseg_growth_alarms_total", "Growth alarms raised", ["rule"], registry=r)

    def render(self) -> bytes:
        return bytes(generate_latest(self.registry))


class MetricsServer:
    """A small threaded HTTP server for /metrics, /healthz and /readyz."""

    def __init__(self, metrics: DaemonMetrics, host: str, port: int) -> None:
        outer = metrics

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path.startswith("/metrics"):
                    body, code, ctype = outer.render(), 200, CONTENT_TYPE_LATEST
                elif self.path.startswith("/healthz"):
                    body, code, ctype = b"ok\n", 200, "text/plain"
                elif self.path.startswith("/readyz"):
                    ready = outer.ready._value.get() == 1
                    body, code, ctype = (b"ready\n", 200, "text/plain") if ready else (b"not ready\n", 503, "text/plain")
                else:
                    body, code, ctype = b"not found\n", 404, "text/plain"
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:  # quiet
                return

        self.httpd = ThreadingHTTPServer((host, port), Handler)
        self.httpd.daemon_threads = True
        self.port = int(self.httpd.server_address[1])
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="metrics-http", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
