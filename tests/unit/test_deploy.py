"""Deployment artefacts: the image recipe, its entry point and the Kubernetes manifests.

Every overlay is rendered with kustomize (`kubectl kustomize`), validated offline against the
Kubernetes OpenAPI schemas (kubernetes-validate) and the CRD schemas in k8s/schemas/, and
policy-checked with checkov; the Dockerfile is linted with hadolint. The tools come from
scripts/install-k8s-tools.sh; a test whose tool is missing is skipped with that reason.
"""

from __future__ import annotations

import base64
import functools
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from packaging.requirements import Requirement
from pydantic import BaseModel

from stream_detector.config import Settings

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
OVERLAYS = ("dev", "prod")
COMPONENTS = ("worker", "trainer", "alertmanager")
NAMESPACES = {"dev": "stream-detector-dev", "prod": "stream-detector"}
# The oldest Kubernetes the manifests support, and the newest schemas kubernetes-validate has.
KUBERNETES_VERSIONS = ("1.29.0", "1.37.0")
CRD_SCHEMAS = {
    ("keda.sh/v1alpha1", "ScaledObject"): "scaledobject-keda-v1alpha1.json",
    ("keda.sh/v1alpha1", "TriggerAuthentication"): "triggerauthentication-keda-v1alpha1.json",
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "servicemonitor-monitoring-v1.json",
    ("monitoring.coreos.com/v1", "PrometheusRule"): "prometheusrule-monitoring-v1.json",
}
# Keys of the Secret stream-detector-secrets that operators create (docs/deploy.md).
SECRET_SETTINGS = frozenset({"DETECTOR_REDIS__URL", "DETECTOR_KAFKA__EXTRA"})
# Settings the manifests leave at their default on purpose.
UNSET_SETTINGS = {
    # None cannot be written as an environment variable; it only matters together with
    # DETECTOR_ALERTS__THRESHOLD_FALLBACK=fixed, when the operator sets a number.
    "DETECTOR_ALERTS__FALLBACK_THRESHOLD",
    # Fault injection for tests/reliability only: a deployment never sets it.
    "DETECTOR_FAILPOINTS",
}
# checkov findings accepted with a checkov.io/skip annotation in the manifests.
ACCEPTED_CHECKOV = {
    "dev": {"CKV_K8S_15", "CKV_K8S_35", "CKV_K8S_43"},
    "prod": {"CKV_K8S_35", "CKV_K8S_43"},
}


def _tool(name: str) -> str | None:
    """The venv's copy of a tool (scripts/install-k8s-tools.sh), else one on PATH."""
    in_venv = Path(sys.executable).parent / name
    return str(in_venv) if in_venv.exists() else shutil.which(name)


def _require_tool(name: str) -> str:
    path = _tool(name)
    if path is None:
        pytest.skip(f"{name} is not installed: run scripts/install-k8s-tools.sh")
    return path


@functools.cache
def _rendered_text(overlay: str) -> str:
    kubectl = _require_tool("kubectl")
    result = subprocess.run(
        [kubectl, "kustomize", str(REPO / "k8s" / "overlays" / overlay)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, f"kustomize build of {overlay} failed:\n{result.stderr}"
    return result.stdout


def _render(overlay: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(_rendered_text(overlay)) if doc]


def _find(docs: list[dict[str, Any]], kind: str, name_prefix: str) -> dict[str, Any]:
    matches = [
        d for d in docs if d["kind"] == kind and d["metadata"]["name"].startswith(name_prefix)
    ]
    assert len(matches) == 1, f"expected one {kind} {name_prefix}*, found {len(matches)}"
    return matches[0]


def _pod_spec(workload: dict[str, Any]) -> dict[str, Any]:
    if workload["kind"] == "CronJob":
        return workload["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    return workload["spec"]["template"]["spec"]


def _container(docs: list[dict[str, Any]], component: str) -> dict[str, Any]:
    kind, name = {
        "worker": ("Deployment", "stream-detector-worker"),
        "trainer": ("CronJob", "stream-detector-trainer"),
        "alertmanager": ("Deployment", "stream-detector-alertmanager"),
    }[component]
    (container,) = _pod_spec(_find(docs, kind, name))["containers"]
    return container


def _config_map(docs: list[dict[str, Any]]) -> dict[str, str]:
    return _find(docs, "ConfigMap", "stream-detector-config")["data"]


@pytest.fixture(params=OVERLAYS)
def overlay(request: pytest.FixtureRequest) -> str:
    return request.param


# --- rendering and schemas -------------------------------------------------------------------


def test_overlay_renders_the_objects_an_operator_expects(overlay: str) -> None:
    docs = _render(overlay)
    kinds = {(d["kind"], re.sub(r"-[a-z0-9]{10}$", "", d["metadata"]["name"])) for d in docs}
    common = {
        ("Namespace", NAMESPACES[overlay]),
        ("ServiceAccount", "stream-detector"),
        ("ConfigMap", "stream-detector-config"),
        ("Deployment", "stream-detector-worker"),
        ("Service", "stream-detector-metrics"),
        ("CronJob", "stream-detector-trainer"),
        ("CronJob", "stream-detector-recent"),
        ("Deployment", "stream-detector-alertmanager"),
        ("Service", "stream-detector-alertmanager"),
        ("NetworkPolicy", "stream-detector-alertmanager"),
        ("PodDisruptionBudget", "stream-detector-worker"),
        ("NetworkPolicy", "stream-detector-worker"),
        ("NetworkPolicy", "stream-detector-trainer"),
        ("PersistentVolumeClaim", "stream-detector-backbones"),
    }
    only = {
        "dev": {
            ("Secret", "stream-detector-secrets"),
            ("PersistentVolumeClaim", "stream-detector-models"),
        },
        "prod": {
            ("ScaledObject", "stream-detector-worker"),
            ("TriggerAuthentication", "stream-detector-kafka"),
            ("ServiceMonitor", "stream-detector-worker"),
            ("PrometheusRule", "stream-detector"),
            ("ConfigMap", "stream-detector-grafana-dashboard"),
        },
    }[overlay]
    assert kinds == common | only
    for doc in docs:
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == NAMESPACES[overlay], doc["metadata"]["name"]


def _schema_errors(doc: dict[str, Any]) -> list[str]:
    """Errors of one object against its Kubernetes or CRD schema, for every supported version."""
    key = (doc["apiVersion"], doc["kind"])
    if key in CRD_SCHEMAS:
        jsonschema = pytest.importorskip("jsonschema", reason="run scripts/install-k8s-tools.sh")
        schema = json.loads((REPO / "k8s" / "schemas" / CRD_SCHEMAS[key]).read_text())
        validator = jsonschema.Draft202012Validator(schema)
        return [f"{list(e.path)}: {e.message}" for e in validator.iter_errors(doc)]
    kubernetes_validate = pytest.importorskip(
        "kubernetes_validate", reason="run scripts/install-k8s-tools.sh"
    )
    errors = []
    for version in KUBERNETES_VERSIONS:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as error:
            errors.append(f"{version} {list(error.path)}: {error.message}")
        except kubernetes_validate.SchemaNotFoundError as error:
            errors.append(f"{version}: {error.message} (add its CRD schema to k8s/schemas)")
    return errors


def test_every_rendered_object_matches_its_schema(overlay: str) -> None:
    errors = {
        f"{doc['kind']}/{doc['metadata']['name']}": found
        for doc in _render(overlay)
        if (found := _schema_errors(doc))
    }
    assert errors == {}


def test_hpa_alternative_matches_its_schema_and_the_scaledobject_bounds() -> None:
    (hpa,) = yaml.safe_load_all((REPO / "k8s" / "base" / "hpa-alternative.yaml").read_text())
    assert _schema_errors(hpa) == []
    (scaled_object,) = yaml.safe_load_all((REPO / "k8s" / "base" / "scaledobject.yaml").read_text())
    assert hpa["spec"]["scaleTargetRef"] == scaled_object["spec"]["scaleTargetRef"]
    assert hpa["spec"]["maxReplicas"] == scaled_object["spec"]["maxReplicaCount"]
    kustomization = yaml.safe_load((REPO / "k8s" / "base" / "kustomization.yaml").read_text())
    assert "hpa-alternative.yaml" not in kustomization["resources"]


def test_schema_validation_catches_a_misspelt_field() -> None:
    docs = _render("prod")
    worker = json.loads(json.dumps(_find(docs, "Deployment", "stream-detector-worker")))
    _pod_spec(worker)["containers"][0]["imagePullPolicyy"] = "Always"
    scaled_object = json.loads(json.dumps(_find(docs, "ScaledObject", "stream-detector-worker")))
    scaled_object["spec"]["maxReplicas"] = 3
    assert _schema_errors(worker)
    assert _schema_errors(scaled_object)


# --- policy checks ---------------------------------------------------------------------------


def test_checkov_finds_nothing_beyond_the_accepted_findings(tmp_path: Path) -> None:
    checkov = _require_tool("checkov")
    for overlay in OVERLAYS:
        (tmp_path / f"{overlay}.yaml").write_text(_rendered_text(overlay))
    result = subprocess.run(
        [
            checkov,
            "--directory",
            str(tmp_path),
            "--framework",
            "kubernetes",
            "--output",
            "json",
            "--skip-download",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        # No network here: skip fetching the guideline links.
        env={**os.environ, "BC_SKIP_MAPPING": "TRUE"},
    )
    assert result.returncode in (0, 1), result.stderr[-2000:]
    report = json.loads(result.stdout)
    results = report["results"]
    failed = [(c["check_id"], c["resource"]) for c in results["failed_checks"]]
    assert failed == []
    assert report["summary"]["passed"] > 0
    for overlay in OVERLAYS:
        skipped = {
            c["check_id"]
            for c in results["skipped_checks"]
            if c["file_path"].endswith(f"/{overlay}.yaml")
        }
        assert skipped == ACCEPTED_CHECKOV[overlay]


# --- the image -------------------------------------------------------------------------------


def test_dockerfile_passes_hadolint() -> None:
    hadolint = _require_tool("hadolint")
    result = subprocess.run(
        [hadolint, str(REPO / "deploy" / "Dockerfile")], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


def _dockerfile() -> tuple[dict[str, str], dict[str, dict[str, Any]]]:
    """Global ARG defaults, and each stage: its base and its (instruction, arguments) list."""
    text = (REPO / "deploy" / "Dockerfile").read_text()
    joined = re.sub(
        r"\\\n",
        " ",
        "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#")),
    )
    global_args: dict[str, str] = {}
    stages: dict[str, dict[str, Any]] = {}
    current: dict[str, Any] | None = None
    for line in filter(None, (raw.strip() for raw in joined.splitlines())):
        instruction, _, arguments = line.partition(" ")
        instruction = instruction.upper()
        if instruction == "FROM":
            base, _, name = arguments.partition(" AS ")
            current = {"base": base.strip(), "instructions": []}
            stages[name.strip()] = current
        elif current is None:
            if instruction == "ARG":
                key, _, value = arguments.partition("=")
                global_args[key] = value
        else:
            current["instructions"].append((instruction, arguments))
    return global_args, stages


def _lineage(stages: dict[str, dict[str, Any]], name: str) -> Iterator[dict[str, Any]]:
    """The stage and its ancestors, nearest first."""
    while name in stages:
        yield stages[name]
        name = stages[name]["base"]


@pytest.mark.parametrize("target", ["cpu", "gpu"])
def test_final_image_runs_as_a_fixed_non_root_user(target: str) -> None:
    _, stages = _dockerfile()
    users = [
        arguments
        for stage in _lineage(stages, target)
        for instruction, arguments in reversed(stage["instructions"])
        if instruction == "USER"
    ]
    assert users, f"{target} sets no USER"
    user, _, group = users[0].partition(":")
    assert user.isdigit() and int(user) == 10001
    assert group == "" or group.isdigit()


@pytest.mark.parametrize("target", ["cpu", "gpu"])
def test_final_image_has_no_build_tools(target: str) -> None:
    global_args, stages = _dockerfile()
    lineage = list(_lineage(stages, target))
    root_image = re.sub(r"\$\{(\w+)\}", lambda m: global_args[m.group(1)], lineage[-1]["base"])
    assert re.fullmatch(r"python:3\.11-slim(-\w+)?", root_image), root_image
    build_tools = re.compile(r"\b(gcc|g\+\+|build-essential|clang|make|apt-get install)\b")
    for stage in lineage:
        for instruction, arguments in stage["instructions"]:
            assert not (instruction == "RUN" and build_tools.search(arguments)), arguments


def test_image_has_no_healthcheck_and_bakes_no_backbone_by_default() -> None:
    _, stages = _dockerfile()
    instructions = [i for stage in stages.values() for i in stage["instructions"]]
    assert not [i for i in instructions if i[0] == "HEALTHCHECK"], "Kubernetes probes are used"
    bake_defaults = {a for i, a in instructions if i == "ARG" and a.startswith("BAKE_BACKBONE")}
    assert bake_defaults == {"BAKE_BACKBONE=false"}


def test_image_torch_pin_is_within_the_project_requirement() -> None:
    global_args, _ = _dockerfile()
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    (torch,) = [
        Requirement(spec)
        for spec in pyproject["project"]["dependencies"]
        if spec.startswith("torch")
    ]
    assert torch.specifier.contains(global_args["TORCH_VERSION"])


def _dockerignore_rule(pattern: str) -> re.Pattern[str]:
    """A .dockerignore pattern as a regex: ** spans folders, * and ? stay within one name."""
    regex = re.escape(pattern.strip("/"))
    for escaped, meaning in (
        (r"\*\*/", "(?:.*/)?"),
        (r"\*\*", ".*"),
        (r"\*", "[^/]*"),
        (r"\?", "[^/]"),
        (r"\[", "["),
        (r"\]", "]"),
    ):
        regex = regex.replace(escaped, meaning)
    return re.compile(regex)


def _docker_context_includes(path: str) -> bool:
    """Whether .dockerignore lets a file into the build context.

    As in Docker: a rule matching the file or one of its folders decides, the last one wins,
    and ! lets back in what an earlier rule kept out.
    """
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    included = True
    for line in (REPO / ".dockerignore").read_text().splitlines():
        rule = line.strip()
        if not rule or rule.startswith("#"):
            continue
        negated = rule.startswith("!")
        pattern = _dockerignore_rule(rule.removeprefix("!"))
        if any(pattern.fullmatch(candidate) for candidate in candidates):
            included = negated
    return included


def test_build_context_holds_the_sources_and_nothing_local() -> None:
    for sent in (
        "pyproject.toml",
        "stream_detector/config.py",
        "trainer/__main__.py",
        "deploy/entrypoint.sh",
    ):
        assert _docker_context_includes(sent), sent
    for kept_out in (
        ".venv/bin/python",
        ".git/HEAD",
        "benchmarks/results/run.json",
        "tests/unit/test_deploy.py",
        "stream_detector/__pycache__/config.cpython-311.pyc",
        ".pytest_cache/v/cache",
        "k8s/base/deployment.yaml",
    ):
        assert not _docker_context_includes(kept_out), kept_out


# --- the entry point -------------------------------------------------------------------------

ENTRYPOINT = REPO / "deploy" / "entrypoint.sh"


def test_entrypoint_is_valid_posix_shell() -> None:
    result = subprocess.run(
        ["sh", "-n", str(ENTRYPOINT)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr


@pytest.fixture
def fake_python(tmp_path: Path) -> dict[str, str]:
    """An environment whose `python` prints its arguments, one per line."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "python"
    fake.write_text('#!/bin/sh\nprintf "%s\\n" "$@"\n')
    fake.chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}


@pytest.mark.parametrize(
    ("arguments", "python_argv"),
    [
        ([], ["-m", "stream_detector", "run"]),
        (["worker"], ["-m", "stream_detector", "run"]),
        (
            ["worker", "--log-level", "debug"],
            ["-m", "stream_detector", "run", "--log-level", "debug"],
        ),
        (
            ["trainer", "fit", "--store", "s3://bucket/models", "--since", "7d"],
            ["-m", "trainer", "fit", "--store", "s3://bucket/models", "--since", "7d"],
        ),
        (["trainer", "models", "rollback"], ["-m", "trainer", "models", "rollback"]),
        (["alertmanager"], ["-m", "stream_detector", "alertmanager"]),
    ],
)
def test_entrypoint_dispatches_to_the_programs(
    fake_python: dict[str, str], arguments: list[str], python_argv: list[str]
) -> None:
    result = subprocess.run(
        [str(ENTRYPOINT), *arguments], env=fake_python, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == python_argv


def test_entrypoint_runs_any_other_command_as_given(fake_python: dict[str, str]) -> None:
    result = subprocess.run(
        [str(ENTRYPOINT), "sh", "-c", 'echo "$0 $1"', "one", "two"],
        env=fake_python,
        capture_output=True,
        text=True,
        check=False,
    )
    assert (result.returncode, result.stdout) == (0, "one two\n")


# --- configuration: the manifests and the settings class agree -------------------------------


def _setting_names(model: type[BaseModel] = Settings, prefix: str = "DETECTOR_") -> set[str]:
    """Every leaf setting as its environment variable (nested groups joined with __)."""
    names = set()
    for field_name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            names |= _setting_names(annotation, f"{prefix}{field_name.upper()}__")
        else:
            names.add(f"{prefix}{field_name.upper()}")
    return names


def _environment(docs: list[dict[str, Any]], component: str) -> dict[str, str | None]:
    """Variables a component's container gets: name -> value, None where the manifests do not
    hold the value (downward API, a Secret the operator creates)."""
    container = _container(docs, component)
    environment: dict[str, str | None] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            environment.update(_find(docs, "ConfigMap", source["configMapRef"]["name"])["data"])
            continue
        name = source["secretRef"]["name"]
        rendered = [d for d in docs if d["kind"] == "Secret" and d["metadata"]["name"] == name]
        if rendered:  # dev generates its Secret
            data = rendered[0]["data"]
            environment.update({k: base64.b64decode(v).decode() for k, v in data.items()})
        else:  # created by the operator as docs/deploy.md shows
            environment.update(dict.fromkeys(SECRET_SETTINGS))
    for variable in container.get("env", []):
        environment[variable["name"]] = variable.get("value")
    return environment


@pytest.mark.parametrize("component", COMPONENTS)
def test_every_setting_is_reachable_from_the_manifests(overlay: str, component: str) -> None:
    provided = set(_environment(_render(overlay), component))
    assert _setting_names() - UNSET_SETTINGS - provided == set()


@pytest.mark.parametrize("component", COMPONENTS)
def test_every_detector_variable_in_the_manifests_is_a_setting(
    overlay: str, component: str
) -> None:
    provided = {n for n in _environment(_render(overlay), component) if n.startswith("DETECTOR_")}
    assert provided - _setting_names() == set()


def test_secrets_stay_out_of_the_config_map(overlay: str) -> None:
    assert SECRET_SETTINGS.isdisjoint(_config_map(_render(overlay)))


def test_deploy_guide_creates_the_secret_the_manifests_read() -> None:
    guide = (REPO / "docs" / "deploy.md").read_text()
    assert "create secret generic stream-detector-secrets" in guide
    for name in SECRET_SETTINGS:
        assert f"--from-literal={name}=" in guide


@pytest.mark.parametrize("component", COMPONENTS)
def test_rendered_configuration_is_accepted_by_the_settings_class(
    overlay: str, component: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in list(os.environ):
        if name.startswith("DETECTOR_"):
            monkeypatch.delenv(name)
    placeholders = {
        "DETECTOR_REDIS__URL": "rediss://detector:secret@redis.example.com:6380/0",
        "DETECTOR_KAFKA__EXTRA": '{"security.protocol": "SASL_SSL", "sasl.username": "detector"}',
        "DETECTOR_KAFKA__INSTANCE_ID": "stream-detector-worker-7d9f8-abcde",
    }
    for name, value in _environment(_render(overlay), component).items():
        if name.startswith("DETECTOR_"):
            monkeypatch.setenv(name, value if value is not None else placeholders[name])
    settings = Settings()
    assert settings.device == {"dev": "cpu", "prod": "cuda"}[overlay]
    assert settings.model.store.startswith({"dev": "/var/lib/", "prod": "s3://"}[overlay])


# --- the workloads ---------------------------------------------------------------------------


def test_probes_and_metrics_port_agree_with_the_configuration(overlay: str) -> None:
    docs = _render(overlay)
    port = int(_config_map(docs)["DETECTOR_METRICS_PORT"])
    worker = _container(docs, "worker")
    assert {p["name"]: p["containerPort"] for p in worker["ports"]} == {"metrics": port}
    assert worker["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert worker["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    service = _find(docs, "Service", "stream-detector-metrics")
    assert service["spec"]["ports"] == [
        {"name": "metrics", "port": port, "targetPort": "metrics", "protocol": "TCP"}
    ]
    grace = _pod_spec(_find(docs, "Deployment", "stream-detector-worker"))
    assert grace["terminationGracePeriodSeconds"] >= 60


def test_pods_run_locked_down(overlay: str) -> None:
    docs = _render(overlay)
    for workload in (d for d in docs if d["kind"] in ("Deployment", "CronJob")):
        pod = _pod_spec(workload)
        assert pod["automountServiceAccountToken"] is False
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        for container in pod["containers"]:
            context = container["securityContext"]
            assert context["runAsUser"] == 10001
            assert context["readOnlyRootFilesystem"] is True
            assert context["allowPrivilegeEscalation"] is False
            assert context["capabilities"] == {"drop": ["ALL"]}
            writable = {m["mountPath"] for m in container["volumeMounts"] if not m.get("readOnly")}
            assert {"/tmp", "/var/cache/stream-detector"} <= writable


def test_only_prod_asks_for_gpus(overlay: str) -> None:
    docs = _render(overlay)
    for workload in (d for d in docs if d["kind"] in ("Deployment", "CronJob")):
        pod = _pod_spec(workload)
        limits = pod["containers"][0]["resources"]["limits"]
        if workload["metadata"]["name"] == "stream-detector-alertmanager":
            assert "nvidia.com/gpu" not in limits, "the bridge runs no model"
        elif overlay == "prod":
            assert limits["nvidia.com/gpu"] == 1
            assert pod["nodeSelector"] and pod["tolerations"]
        else:
            assert "nvidia.com/gpu" not in limits
            assert "nodeSelector" not in pod


def test_trainer_cronjob_retrains_into_the_model_store(overlay: str) -> None:
    docs = _render(overlay)
    cronjob = _find(docs, "CronJob", "stream-detector-trainer")
    assert cronjob["spec"]["concurrencyPolicy"] == "Forbid"
    assert cronjob["spec"]["startingDeadlineSeconds"] > 0
    fit = ["trainer", "fit", "--from-kafka", "--since", "7d"]
    fit += ["--store", "$(DETECTOR_MODEL__STORE)", "--model", "default", "--profile", "default"]
    fit += ["--keep-versions", "10"]
    assert _container(docs, "trainer")["args"] == fit
    store_mounts = {
        component: [
            m
            for m in _container(docs, component)["volumeMounts"]
            if m["mountPath"] == "/var/lib/stream-detector/models"
        ]
        for component in ("worker", "trainer")
    }
    if overlay == "prod":  # object storage: no volume
        assert store_mounts == {"worker": [], "trainer": []}
    else:
        assert store_mounts["worker"][0]["readOnly"] is True
        assert not store_mounts["trainer"][0].get("readOnly")


def test_a_cronjob_refreshes_only_the_recent_windows_four_times_a_day_into_the_same_store(
    overlay: str,
) -> None:
    docs = _render(overlay)
    cronjob = _find(docs, "CronJob", "stream-detector-recent")
    assert cronjob["spec"]["concurrencyPolicy"] == "Forbid"
    assert cronjob["spec"]["schedule"].split()[1:] == ["*/6", "*", "*", "*"]  # 4 times a day
    (container,) = _pod_spec(cronjob)["containers"]
    recent = ["trainer", "refresh", "--recent-only", "--from-kafka", "--since", "7d"]
    assert container["args"] == [
        *recent,
        "--store",
        "$(DETECTOR_MODEL__STORE)",
        "--model",
        "default",
        "--keep-versions",
        "10",
    ]
    trainer = _container(docs, "trainer")
    assert container["envFrom"] == trainer["envFrom"]
    mounts = [m for m in container["volumeMounts"] if m["mountPath"].endswith("/models")]
    assert mounts == [m for m in trainer["volumeMounts"] if m["mountPath"].endswith("/models")]


def test_keda_scales_on_the_group_and_topic_the_worker_consumes() -> None:
    docs = _render("prod")
    config = _config_map(docs)
    scaled_object = _find(docs, "ScaledObject", "stream-detector-worker")
    (trigger,) = scaled_object["spec"]["triggers"]
    assert trigger["type"] == "kafka"
    assert trigger["metadata"]["bootstrapServers"] == config["DETECTOR_KAFKA__BOOTSTRAP_SERVERS"]
    assert trigger["metadata"]["consumerGroup"] == config["DETECTOR_KAFKA__GROUP_ID"]
    assert trigger["metadata"]["topic"] == config["DETECTOR_KAFKA__TOPICS__READINGS"]
    assert scaled_object["spec"]["minReplicaCount"] <= scaled_object["spec"]["maxReplicaCount"]
