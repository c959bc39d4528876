"""What the monitoring tests share: the rules and dashboard, their PromQL, and real
Prometheus and Alertmanager processes on loopback ports.

The binaries come from Debian's ``prometheus`` and ``prometheus-alertmanager`` packages
(scripts/setup.sh installs them); a test that needs a missing one is skipped with that reason.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import promql_parser
import pytest
import yaml

from stream_detector.devtools.services import _EmbeddedProcess
from tests.shared_data import REPO_ROOT

RULES = REPO_ROOT / "deploy" / "prometheus" / "stream-detector.rules.yaml"
RULES_TESTS = REPO_ROOT / "deploy" / "prometheus" / "stream-detector.rules.test.yaml"
DASHBOARD = REPO_ROOT / "deploy" / "grafana" / "stream-detector.json"
JOB = "stream-detector-metrics"  # the scrape job the rules expect (the ServiceMonitor's)
# Labels that Prometheus attaches to every series of a target, not the worker.
TARGET_LABELS = frozenset({"job", "instance", "namespace", "pod", "service", "endpoint"})
# Series the rules read from elsewhere: Prometheus itself and kube-state-metrics.
EXTERNAL_PREFIXES = ("up", "kube_")
# Values for the dashboard's template variables, to make its queries plain PromQL.
DASHBOARD_VARIABLES = {"$__rate_interval": "5m", "$namespace": ".*"}


def require(binary: str, package: str) -> str:
    """The binary's path, or skip: the test needs that Debian package."""
    path = shutil.which(binary)
    if path is None:
        pytest.skip(f"{binary} is not installed: apt-get install {package} (scripts/setup.sh)")
    return path


def rules() -> list[dict[str, Any]]:
    """Every rule of the rules file."""
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def rule_expressions() -> dict[str, str]:
    """Alert name -> its expression."""
    return {rule["alert"]: rule["expr"] for rule in rules()}


def dashboard_expressions() -> dict[str, str]:
    """'panel title / refId' -> its query, with the template variables filled in."""
    expressions = {}
    for panel in json.loads(DASHBOARD.read_text())["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"]
            for variable, value in DASHBOARD_VARIABLES.items():
                expr = expr.replace(variable, value)
            expressions[f"{panel['title']} / {target['refId']}"] = expr
    return expressions


def _walk(node: Any, grouping: frozenset[str]) -> Iterator[tuple[str, frozenset[str]]]:
    """(metric, labels the expression needs it to carry) for each selector under ``node``."""
    if isinstance(node, promql_parser.VectorSelector):
        matched = frozenset(m.name for m in node.matchers.matchers) - {"__name__"}
        yield node.name, matched | grouping
    elif isinstance(node, promql_parser.MatrixSelector):
        yield from _walk(node.vector_selector, grouping)
    elif isinstance(node, promql_parser.AggregateExpr):
        modifier = node.modifier
        if modifier is not None and modifier.type == promql_parser.AggModifierType.By:
            grouping = grouping | frozenset(modifier.labels)
        yield from _walk(node.expr, grouping)
    elif isinstance(node, promql_parser.BinaryExpr):
        matching = node.modifier.matching if node.modifier else None
        if matching is not None and matching.type == promql_parser.LabelModifierType.Include:
            grouping = grouping | frozenset(matching.labels)
        yield from _walk(node.lhs, grouping)
        yield from _walk(node.rhs, grouping)
    elif isinstance(node, promql_parser.Call):
        for argument in node.args:
            yield from _walk(argument, grouping)
    elif isinstance(
        node, promql_parser.ParenExpr | promql_parser.UnaryExpr | promql_parser.SubqueryExpr
    ):
        yield from _walk(node.expr, grouping)


def selectors(expr: str) -> list[tuple[str, frozenset[str]]]:
    """Each metric an expression reads, with the labels it matches or groups on."""
    return list(_walk(promql_parser.parse(expr), frozenset()))


def missing(expressions: dict[str, str], exported: dict[str, set[str]]) -> list[str]:
    """What the expressions need that ``exported`` (metric -> its label names) lacks."""
    problems = []
    for where, expr in expressions.items():
        for metric, labels in selectors(expr):
            if metric.startswith(EXTERNAL_PREFIXES):
                continue
            if metric not in exported:
                problems.append(f"{where}: no metric {metric}")
                continue
            lacking = labels - exported[metric] - TARGET_LABELS
            if lacking:
                problems.append(f"{where}: {metric} has no label {', '.join(sorted(lacking))}")
    return problems


def check_rules_file(promtool: str, path: Path) -> subprocess.CompletedProcess[str]:
    """``promtool check rules`` on a file."""
    return subprocess.run(
        [promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60
    )


def _get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


def _answers_ready(base_url: str) -> bool:
    """Whether a Prometheus or Alertmanager answers ``/-/ready`` with 200."""
    try:
        with urllib.request.urlopen(f"{base_url}/-/ready", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


class Prometheus(_EmbeddedProcess):
    """A Prometheus scraping ``targets`` every second and evaluating ``rule_files``."""

    name = "prometheus"

    def __init__(
        self, binary: str, targets: list[str], rule_files: list[Path], labels: dict[str, str]
    ) -> None:
        super().__init__(host="127.0.0.1", port=None, startup_timeout_s=30.0)
        self.binary = binary
        self.config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(path) for path in rule_files],
            "scrape_configs": [
                {"job_name": JOB, "static_configs": [{"targets": targets, "labels": labels}]}
            ],
        }

    def _command(self, workdir: Path) -> list[str]:
        config = workdir / "prometheus.yml"
        config.write_text(yaml.safe_dump(self.config))
        return [
            self.binary,
            f"--config.file={config}",
            f"--storage.tsdb.path={workdir / 'data'}",
            f"--web.listen-address={self.host}:{self.port}",
        ]

    def _is_ready(self) -> bool:
        return _answers_ready(self.api_url(""))

    def api_url(self, path: str) -> str:
        return f"http://{self.host}:{self.port}{path}"

    def series(self, match: str) -> list[dict[str, str]]:
        """Label sets of the series that ``match`` selects."""
        query = urllib.parse.urlencode({"match[]": match})
        return _get_json(self.api_url(f"/api/v1/series?{query}"))["data"]

    def firing(self) -> list[dict[str, str]]:
        """Labels of every firing alert."""
        alerts = _get_json(self.api_url("/api/v1/alerts"))["data"]["alerts"]
        return [alert["labels"] for alert in alerts if alert["state"] == "firing"]


class Alertmanager(_EmbeddedProcess):
    """An Alertmanager that routes everything to a receiver that sends nothing."""

    name = "alertmanager"

    def __init__(self, binary: str, port: int | None = None) -> None:
        super().__init__(host="127.0.0.1", port=port, startup_timeout_s=30.0)
        self.binary = binary

    def _command(self, workdir: Path) -> list[str]:
        config = workdir / "alertmanager.yml"
        route = {"receiver": "nobody", "group_wait": "1s", "group_interval": "1s"}
        config.write_text(yaml.safe_dump({"route": route, "receivers": [{"name": "nobody"}]}))
        return [
            self.binary,
            f"--config.file={config}",
            f"--storage.path={workdir / 'data'}",
            f"--web.listen-address={self.host}:{self.port}",
            "--cluster.listen-address=",  # a single instance: no gossip port
        ]

    def _is_ready(self) -> bool:
        return _answers_ready(self.url)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"
