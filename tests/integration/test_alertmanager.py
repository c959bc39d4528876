"""The Alertmanager bridge against a real Alertmanager (Debian's binary), a real broker and,
for the round trip, a real worker scoring an injected anomaly.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from stream_detector import alertmanager, store
from stream_detector.config import Settings
from stream_detector.devtools import loadgen
from stream_detector.devtools.proxy import TcpProxy
from stream_detector.devtools.workers import metric_value
from stream_detector.publisher import ReadingProducer
from stream_detector.schemas import AlertEvent
from tests.conftest import Topics
from tests.monitoring_support import Alertmanager, require
from tests.worker_support import (
    MODEL,
    STEP_MS,
    T0_MS,
    bridge,
    bridge_settings,
    make_plan,
    produce,
    running,
    wait_for,
)

pytestmark = pytest.mark.integration


@pytest.fixture
def alertmanager_binary() -> str:
    return require("prometheus-alertmanager", "prometheus-alertmanager")


def _firing(url: str) -> dict[str, dict]:
    """Alert id -> the SensorAnomaly alert Alertmanager shows as active."""
    client = alertmanager.AlertmanagerClient(url, timeout_s=5)
    return {a["labels"]["alert_id"]: a for a in client.active(alertmanager.ALERTNAME)}


def test_an_injected_anomaly_fires_in_alertmanager_with_its_labels_then_resolves(
    kafka_bootstrap: str,
    topics: Topics,
    model_store: Path,
    settings_for: Callable[..., Settings],
    alertmanager_binary: str,
) -> None:
    anomaly = loadgen.InjectedAnomaly("s-00002", T0_MS + 100 * STEP_MS, T0_MS + 123 * STEP_MS, 1.5)
    plan = make_plan(4, 200, (anomaly,))
    settings = settings_for(model_store)
    version = store.current_version(model_store, MODEL)
    with (
        Alertmanager(alertmanager_binary) as manager,
        running(settings),
        bridge(bridge_settings(settings, f"bridge-{uuid.uuid4().hex[:8]}"), manager.url),
    ):
        produce(kafka_bootstrap, topics.readings, plan, range(0, 124))  # the whole anomaly
        wait_for(lambda: _firing(manager.url), 60, "the alert in Alertmanager")
        (alert,) = _firing(manager.url).values()
        labels, annotations = alert["labels"], alert["annotations"]
        assert labels["alertname"] == "SensorAnomaly"
        assert labels["sensor_id"] == "s-00002"
        assert labels["severity"] in settings.alerts.severity_bands
        assert labels["model_version"] == version
        assert labels["alert_id"]
        assert float(annotations["peak_score"]) > float(annotations["threshold"]) > 0
        assert int(annotations["nearest_prototype"]) >= 0
        assert annotations["channel_attribution"] == "[1.0]"  # one channel carries it all

        produce(kafka_bootstrap, topics.readings, plan, range(124, 200))  # and past it
        wait_for(lambda: not _firing(manager.url), 60, "the alert to resolve")


def _event(alert_id: str, sequence: int, sensor_id: str, state: str) -> AlertEvent:
    start_ms = time.time_ns() // 1_000_000 - 60_000
    end_ms = start_ms + 30_000 if state == "resolved" else None
    return AlertEvent(
        alert_id, sequence, sensor_id, state, "major", start_ms, end_ms, start_ms, 2.5, 1.0,
        "v1", 2, (0.25, 0.75),
    )  # fmt: skip


def _publish(bootstrap: str, topic: str, *events: AlertEvent) -> None:
    producer = ReadingProducer(bootstrap, topic)
    for event in events:
        producer.send(event.sensor_id.encode(), event.to_json())
    producer.flush()


def test_an_alertmanager_outage_delays_alerts_and_loses_none_across_a_bridge_restart(
    kafka_bootstrap: str,
    topics: Topics,
    settings_for: Callable[..., Settings],
    alertmanager_binary: str,
    tmp_path: Path,
) -> None:
    # Leases (4 resend intervals) outlive the outage: an alert leaves Alertmanager only
    # through a delivered resolution, not by lapsing.
    group = f"bridge-{uuid.uuid4().hex}"
    settings = bridge_settings(settings_for(tmp_path / "no-models"), group, resend_interval_s=60)
    with (
        Alertmanager(alertmanager_binary) as manager,
        TcpProxy(manager.host, manager.port) as proxy,
    ):
        through_proxy = f"http://{proxy.address}"
        with bridge(settings, through_proxy):
            _publish(kafka_bootstrap, topics.alerts, _event("pump-a", 0, "pump-a", "open"))
            wait_for(lambda: "pump-a" in _firing(manager.url), 60, "the first alert")

            proxy.cut()
            _publish(
                kafka_bootstrap,
                topics.alerts,
                _event("pump-b", 0, "pump-b", "open"),
                _event("pump-a", 1, "pump-a", "resolved"),
            )
            port = settings.metrics_port
            wait_for(
                lambda: metric_value(port, "detector_alertmanager_failures_total") >= 2,
                60,
                "the bridge to fail against the cut Alertmanager",
            )
            assert set(_firing(manager.url)) == {"pump-a"}, "nothing new got through the cut"
        # The bridge stopped during the outage; its successor must deliver what it could not.
        proxy.restore()
        with bridge(settings, through_proxy):
            wait_for(lambda: set(_firing(manager.url)) == {"pump-b"}, 60, "the delayed events")
        labels = _firing(manager.url)["pump-b"]["labels"]
        assert (labels["sensor_id"], labels["severity"]) == ("pump-b", "major")
