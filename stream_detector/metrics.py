"""Prometheus metrics and the worker's HTTP endpoints: ``/metrics``, ``/healthz``, ``/readyz``.

Each worker owns one ``Metrics`` (its own registry, so several workers can share a process
in tests and the demo) and one ``Health``; ``serve`` exposes both from a daemon thread.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

logger = logging.getLogger(__name__)

_LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class Metrics:
    """Everything the worker counts, registered in a registry of its own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.consumer_lag = Gauge(
            "detector_consumer_lag_messages",
            "Readings not yet consumed, per owned partition",
            ["topic", "partition"],
            registry=r,
        )
        self.assigned_partitions = Gauge(
            "detector_assigned_partitions", "Partitions this worker owns", registry=r
        )
        self.readings = Counter("detector_readings", "Readings consumed (valid or not)", registry=r)
        self.invalid_readings = Counter(
            "detector_invalid_readings",
            "Readings sent to the dead-letter topic, by reason code",
            ["reason"],
            registry=r,
        )
        self.late_readings = Counter(
            "detector_late_readings",
            "Readings dropped because their timestamp was not after the sensor's last one",
            ["kind"],
            registry=r,
        )
        self.replayed_readings = Counter(
            "detector_replayed_readings",
            "Readings skipped because their offset was already applied (replay after a crash)",
            registry=r,
        )
        self.windows_scored = Counter(
            "detector_windows_scored", "Windows scored", ["model"], registry=r
        )
        self.batch_size = Histogram(
            "detector_batch_size", "Windows per inference batch", buckets=_BATCH_BUCKETS, registry=r
        )
        self.inference_seconds = Histogram(
            "detector_inference_seconds",
            "Model time per inference batch",
            buckets=_LATENCY_BUCKETS_S,
            registry=r,
        )
        self.end_to_end_seconds = Histogram(
            "detector_end_to_end_seconds",
            "From a window's newest reading entering Kafka to its score being acknowledged",
            buckets=_LATENCY_BUCKETS_S,
            registry=r,
        )
        self.alerts = Counter(
            "detector_alert_events", "Alert events published, by state", ["state"], registry=r
        )
        self.model_version = Gauge(
            "detector_model_version_info",
            "1 for the model version being served",
            ["model", "version"],
            registry=r,
        )
        self.model_load_failures = Counter(
            "detector_model_load_failures",
            "Model versions refused (corrupt, tampered or incompatible)",
            ["model"],
            registry=r,
        )
        self.retries = Counter(
            "detector_retries",
            "Worker cycles that failed on an external system and were retried",
            ["system"],
            registry=r,
        )
        self.state_losses = Counter(
            "detector_redis_state_losses",
            "Times Redis was found to have lost its state (each starts a rebuild from Kafka)",
            registry=r,
        )
        self.rebuild_messages = Counter(
            "detector_rebuild_messages",
            "Records rewound to rebuild windows after Redis lost its state",
            registry=r,
        )
        self.cut_outputs = Counter(
            "detector_cut_outputs",
            "Outputs cut to fit their topic (a dead letter keeps its head, a score record or "
            "alert event loses its channel attribution), by topic",
            ["topic"],
            registry=r,
        )
        self.undeliverable_outputs = Counter(
            "detector_undeliverable_outputs",
            "Records their topic refused for good (too large, invalid), sent to the "
            "dead-letter topic or cut further instead, by the refusing topic",
            ["topic"],
            registry=r,
        )
        self.dropped_outputs = Counter(
            "detector_dropped_outputs",
            "Dead letters refused even when cut to their headers, and so dropped, by topic",
            ["topic"],
            registry=r,
        )
        self.unavailable_topics = Gauge(
            "detector_output_topic_unavailable",
            "1 while an output topic refuses every record (authorization, unknown topic)",
            ["topic"],
            registry=r,
        )
        self.sensors = Gauge(
            "detector_sensors",
            "Sensors this worker holds (bounded by limits.max_sensors_per_worker)",
            registry=r,
        )
        self._versions: dict[str, str] = {}

    def serving(self, model_name: str, version: str) -> None:
        """Record that ``model_name`` is now served at ``version``."""
        old = self._versions.get(model_name)
        if old is not None and old != version:
            self.model_version.remove(model_name, old)
        self._versions[model_name] = version
        self.model_version.labels(model_name, version).set(1)

    def set_lag(self, lag: Mapping[tuple[str, int], int]) -> None:
        """Replace the per-partition lag gauges."""
        self.consumer_lag.clear()
        for (topic, partition), value in lag.items():
            self.consumer_lag.labels(topic, str(partition)).set(value)


class Health:
    """Liveness (the loop's heartbeat) and readiness checks, for the HTTP endpoints."""

    def __init__(self, heartbeat_timeout_s: float = 60.0) -> None:
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self._last_beat = time.monotonic()
        self._checks: dict[str, Callable[[], bool]] = {}
        self._details: dict[str, object] = {}
        self._lock = threading.Lock()

    def beat(self) -> None:
        """Called by the loop on every turn, successful or not."""
        self._last_beat = time.monotonic()

    def alive(self) -> tuple[bool, float]:
        """Whether the loop turned recently, and how long ago it did."""
        age = time.monotonic() - self._last_beat
        return age <= self.heartbeat_timeout_s, age

    def add_check(self, name: str, check: Callable[[], bool]) -> None:
        """Register a readiness check; it runs on each /readyz request and must be quick."""
        self._checks[name] = check

    def set_detail(self, name: str, value: object) -> None:
        """Extra JSON-ready information shown on /readyz (e.g. the owned partitions)."""
        with self._lock:
            self._details[name] = value

    def ready(self) -> tuple[bool, dict[str, object]]:
        """Run the checks; ready when all pass."""
        results: dict[str, bool] = {}
        for name, check in self._checks.items():
            try:
                results[name] = bool(check())
            except Exception:  # a failing probe means "not ready", never a crashed endpoint
                results[name] = False
        with self._lock:
            details = dict(self._details)
        return all(results.values()), {"checks": results, **details}


class _Handler(BaseHTTPRequestHandler):
    metrics: Metrics
    health: Health

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            self._send(200, generate_latest(self.metrics.registry), CONTENT_TYPE_LATEST)
        elif path == "/healthz":
            alive, age = self.health.alive()
            body = {"alive": alive, "heartbeat_age_s": round(age, 3)}
            self._send_json(200 if alive else 503, body)
        elif path == "/readyz":
            ready, body = self.health.ready()
            self._send_json(200 if ready else 503, {"ready": ready, **body})
        else:
            self._send(404, b"not found\n", "text/plain")

    def _send_json(self, status: int, body: dict[str, object]) -> None:
        self._send(status, json.dumps(body).encode() + b"\n", "application/json")

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        logger.debug("http %s", format % args)


class MetricsServer:
    """``/metrics``, ``/healthz`` and ``/readyz`` on a port, served from a daemon thread."""

    def __init__(self, metrics: Metrics, health: Health, port: int, host: str = "0.0.0.0") -> None:
        handler = type("Handler", (_Handler,), {"metrics": metrics, "health": health})
        self._server = ThreadingHTTPServer((host, port), handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="metrics-http", daemon=True
        )

    def start(self) -> MetricsServer:
        """Start serving."""
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and release the port."""
        self._server.shutdown()
        self._server.server_close()
