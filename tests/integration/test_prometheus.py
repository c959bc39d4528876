"""A real Prometheus (Debian's binary) scraping a real worker, with a real broker and Redis,
and the Alertmanager bridge, and evaluating the shipped alert rules.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from stream_detector.config import RedisSettings, Settings
from stream_detector.devtools.services import EmbeddedRedis, free_port
from stream_detector.publisher import ReadingProducer
from tests.conftest import Topics
from tests.monitoring_support import (
    RULES,
    Prometheus,
    dashboard_expressions,
    missing,
    require,
    rule_expressions,
)
from tests.worker_support import (
    OutputReader,
    bridge,
    bridge_settings,
    expected_windows,
    make_plan,
    produce,
    running,
    wait_for,
)

pytestmark = pytest.mark.integration


def _without_delays(tmp_path: Path) -> Path:
    """The shipped rules, each firing at its first true evaluation instead of after ``for``."""
    rules = yaml.safe_load(RULES.read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            rule.pop("for", None)
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump(rules))
    return path


def test_prometheus_finds_every_metric_the_rules_and_dashboard_use_and_alerts_on_readiness(
    kafka_bootstrap: str,
    topics: Topics,
    model_store: Path,
    settings_for: Callable[..., Settings],
    reader: OutputReader,
    tmp_path: Path,
) -> None:
    binary = require("prometheus", "prometheus")
    plan = make_plan(2, 60)
    with contextlib.ExitStack() as stack:
        # A fixed port, so that the restarted Redis is where the worker looks.
        own_redis = stack.enter_context(EmbeddedRedis(port=free_port()))
        settings = settings_for(model_store, kafka={"lag_interval_s": 2.0})
        settings = settings.model_copy(
            update={"redis": RedisSettings(url=own_redis.url, key_prefix="prometheus")}
        )
        stack.enter_context(running(settings))
        # No Alertmanager listens there: the bridge only has to export its metrics.
        bridged = bridge_settings(settings, f"bridge-{uuid.uuid4().hex[:8]}")
        stack.enter_context(bridge(bridged, f"http://127.0.0.1:{free_port()}"))
        produce(kafka_bootstrap, topics.readings, plan)
        producer = ReadingProducer(kafka_bootstrap, topics.readings)
        producer.send(b"s-00000", b"not json")
        producer.flush()
        reader.read_until(lambda o: expected_windows(plan) <= o.scored() and o.dead_letters)

        targets = [f"127.0.0.1:{s.metrics_port}" for s in (settings, bridged)]
        labels = {"namespace": "it"}
        prometheus = stack.enter_context(
            Prometheus(binary, targets, [_without_delays(tmp_path)], labels)
        )

        def exported() -> dict[str, set[str]]:
            names: dict[str, set[str]] = {}
            for series in prometheus.series('{__name__=~"detector_.+"}'):
                names.setdefault(series["__name__"], set()).update(series)
            return names

        # A scrape of each target, and a lag report (the worker's lag thread runs every 2 s).
        scraped = {"detector_consumer_lag_messages", "detector_alertmanager_events_total"}
        wait_for(lambda: scraped <= exported().keys(), 45, "both targets and a lag report")
        expressions = {**rule_expressions(), **dashboard_expressions()}
        assert missing(expressions, exported()) == []

        def not_ready_on_redis() -> bool:
            return any(
                alert["alertname"] == "StreamDetectorWorkerNotReady" and alert["check"] == "redis"
                for alert in prometheus.firing()
            )

        assert not not_ready_on_redis()
        own_redis.stop()
        wait_for(not_ready_on_redis, 45, "the not-ready alert on the redis check")
        own_redis.start()
        wait_for(lambda: not not_ready_on_redis(), 45, "the not-ready alert to clear")
