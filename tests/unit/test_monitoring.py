"""The Prometheus rules and the Grafana dashboard, checked with promtool and against the
metrics the worker defines. tests/integration/test_prometheus.py checks them against a
Prometheus scraping a live worker.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from stream_detector.config import AlertPolicy
from stream_detector.metrics import BridgeMetrics, Health, Metrics
from tests.monitoring_support import (
    RULES,
    RULES_TESTS,
    check_rules_file,
    dashboard_expressions,
    missing,
    require,
    rule_expressions,
    rules,
)
from tests.shared_data import REPO_ROOT

pytestmark = pytest.mark.unit


def test_the_rules_pass_promtool_check() -> None:
    result = check_rules_file(require("promtool", "prometheus"), RULES)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rules())} rules found" in result.stdout


def test_every_alert_fires_in_its_promtool_unit_test() -> None:
    result = subprocess.run(
        [require("promtool", "prometheus"), "test", "rules", str(RULES_TESTS)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    tests = yaml.safe_load(RULES_TESTS.read_text())["tests"]
    tested = {
        case["alertname"]
        for test in tests
        for case in test["alert_rule_test"]
        if case.get("exp_alerts")
    }
    assert tested == set(rule_expressions())


def test_every_dashboard_query_parses_with_promtool(tmp_path: Path) -> None:
    queries = dashboard_expressions()
    records = [
        {"record": f"dashboard:query_{i}", "expr": expr} for i, expr in enumerate(queries.values())
    ]
    path = tmp_path / "dashboard-queries.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": records}]}))
    result = check_rules_file(require("promtool", "prometheus"), path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert len(queries) >= 20


def _exported_metrics() -> dict[str, set[str]]:
    """Metric -> label names, as a worker that served a model and the bridge export them."""
    metrics, health = Metrics(), Health()
    health.add_check("redis", lambda: True)
    metrics.watch(health)
    metrics.start_at_zero(
        reasons=["bad_json"],
        severities=AlertPolicy().severity_bands,
        output_topics=["scores"],
        model_names=["default"],
        retried_systems=["WindowStoreError"],
    )
    metrics.serving("default", "v1")
    metrics.store_points("default", "v1")
    metrics.set_lag({("readings", 0): 5})
    exported: dict[str, set[str]] = {}
    for registry in (metrics.registry, BridgeMetrics().registry):
        for family in text_string_to_metric_families(generate_latest(registry).decode()):
            for sample in family.samples:
                exported.setdefault(sample.name, set()).update(sample.labels)
    return exported


def test_the_rules_and_the_dashboard_use_only_metrics_the_programs_export() -> None:
    expressions = {**rule_expressions(), **dashboard_expressions()}
    assert missing(expressions, _exported_metrics()) == []


def test_the_check_catches_an_unknown_metric_and_a_missing_label() -> None:
    exported = _exported_metrics()
    expressions = {
        "typo": "rate(detector_reading_total[5m])",
        "label": "sum by (sensor_id) (detector_readings_total)",
    }
    assert missing(expressions, exported) == [
        "typo: no metric detector_reading_total",
        "label: detector_readings_total has no label sensor_id",
    ]


def test_generated_manifests_and_dashboard_are_up_to_date() -> None:
    pytest.importorskip("grafana_foundation_sdk", reason="a dev dependency: pip install -e .[dev]")
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "deploy" / "monitoring.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
