"""Prometheus metrics and the HTTP endpoints: ``/metrics``, ``/healthz``, ``/readyz``.

Each worker owns one ``Metrics`` (its own registry, so several workers can share a process
in tests and the demo) and one ``Health``; ``MetricsServer`` exposes both from a daemon
thread. The Alertmanager bridge does the same with ``BridgeMetrics``.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

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
            "From a window's newest reading entering Kafka to the broker acknowledging its score",
            buckets=_LATENCY_BUCKETS_S,
            registry=r,
        )
        self.stage_seconds = Histogram(
            "detector_stage_seconds",
            "Where the end-to-end latency goes, per scored window: fetch (its newest reading "
            "entering Kafka to its window being queued: the broker, the poll, decoding and "
            "the Redis append), batch (queued to scored), score (its batch's scoring and "
            "decisions up to its score being produced), deliver (produced to acknowledged)",
            ["stage"],
            buckets=_LATENCY_BUCKETS_S,
            registry=r,
        )
        self.alerts = Counter(
            "detector_alert_events",
            "Alert events published, by state and severity",
            ["state", "severity"],
            registry=r,
        )
        self.model_version = Gauge(
            "detector_model_version_info",
            "1 for the model version being served",
            ["model", "version"],
            registry=r,
        )
        self.model_store_version = Gauge(
            "detector_model_store_version_info",
            "1 for the version the store's CURRENT pointer names, as the worker last read it",
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
        self._served: dict[str, str] = {}
        self._pointed: dict[str, str] = {}

    def start_at_zero(
        self,
        *,
        reasons: Iterable[str],
        severities: Iterable[str],
        output_topics: Iterable[str],
        model_names: Iterable[str],
        retried_systems: Iterable[str],
    ) -> None:
        """Create every labelled series the worker can count, at 0.

        A series that first appears at 1 hides that first event from ``rate`` and
        ``increase``, and alert rules and dashboards need the series to exist at all.
        """
        for reason in reasons:
            self.invalid_readings.labels(reason)
        for kind in ("late", "duplicate_ts"):
            self.late_readings.labels(kind)
        for state in ("open", "update", "resolved"):
            for severity in severities:
                self.alerts.labels(state, severity)
        for topic in output_topics:
            self.cut_outputs.labels(topic)
            self.undeliverable_outputs.labels(topic)
            self.dropped_outputs.labels(topic)
            self.unavailable_topics.labels(topic).set(0)
        for name in model_names:
            self.windows_scored.labels(name)
            self.model_load_failures.labels(name)
        for system in retried_systems:
            self.retries.labels(system)

    def serving(self, model_name: str, version: str) -> None:
        """Record that ``model_name`` is now served at ``version``."""
        _show_version(self.model_version, self._served, model_name, version)

    def store_points(self, model_name: str, version: str) -> None:
        """Record that the store's CURRENT pointer of ``model_name`` names ``version``."""
        _show_version(self.model_store_version, self._pointed, model_name, version)

    def watch(self, health: Health) -> None:
        """Export ``health``'s readiness checks, evaluated at each scrape."""
        self.registry.register(_Readiness(health))

    def set_lag(self, lag: Mapping[tuple[str, int], int]) -> None:
        """Replace the per-partition lag gauges."""
        self.consumer_lag.clear()
        for (topic, partition), value in lag.items():
            self.consumer_lag.labels(topic, str(partition)).set(value)


def _show_version(gauge: Gauge, shown: dict[str, str], model_name: str, version: str) -> None:
    """Make ``version`` the one version that ``gauge`` shows for ``model_name``."""
    old = shown.get(model_name)
    if old is not None and old != version:
        gauge.remove(model_name, old)
    shown[model_name] = version
    gauge.labels(model_name, version).set(1)


class _Readiness(Collector):
    """``detector_ready`` and ``detector_readiness_check``: /readyz as metrics."""

    def __init__(self, health: Health) -> None:
        self.health = health

    def describe(self) -> list[Metric]:
        return []  # evaluated only at scrape time: the checks may touch Redis

    def collect(self) -> Iterator[Metric]:
        ready, body = self.health.ready()
        checks = GaugeMetricFamily(
            "detector_readiness_check",
            "1 while a readiness check of /readyz passes, by check",
            labels=["check"],
        )
        for name, passed in body["checks"].items():
            checks.add_metric([name], float(passed))
        yield GaugeMetricFamily("detector_ready", "1 while /readyz answers 200", value=float(ready))
        yield checks


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


class BridgeMetrics:
    """What the Alertmanager bridge counts (``python -m stream_detector alertmanager``)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.events = Counter(
            "detector_alertmanager_events",
            "Alert events forwarded and accepted by Alertmanager",
            registry=self.registry,
        )
        self.failures = Counter(
            "detector_alertmanager_failures",
            "Requests to Alertmanager that failed (unreachable, or an error status)",
            registry=self.registry,
        )
        self.firing = Gauge(
            "detector_alertmanager_firing_alerts",
            "Sensor alerts the bridge keeps firing in Alertmanager",
            registry=self.registry,
        )


class _Handler(BaseHTTPRequestHandler):
    registry: CollectorRegistry
    health: Health

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            self._send(200, generate_latest(self.registry), CONTENT_TYPE_LATEST)
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

    def __init__(
        self, registry: CollectorRegistry, health: Health, port: int, host: str = "0.0.0.0"
    ) -> None:
        handler = type("Handler", (_Handler,), {"registry": registry, "health": health})
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
