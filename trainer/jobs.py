"""The retraining job (``fit``, ``refresh``): ``run(options, settings)``.

Its command line (``python -m trainer fit|refresh``) and the model-store operations
(``python -m trainer models``) are in ``trainer.commands``.

A run, under the model's store lock (so two CronJob runs never overlap):

1. read the data: the readings topic replayed since ``--since`` for the sensors routed to
   the model (``DETECTOR_*`` settings, as the worker), minus alert spans; or files. See
   ``trainer.sources`` for gaps, the memory cap and the train/calibration/hold-out split;
2. ``fit``: train teacher and student from scratch (``trainer.train.fit``, ``--profile``).
   ``refresh``: load CURRENT, keep every weight but the prototypes, re-fit those with
   k-means on the recent training windows (``--recent-only``: keep the prototypes too);
3. calibrate per-sensor thresholds on the calibration split (``trainer.thresholds``;
   ``--recent-only`` keeps CURRENT's);
4. judge the candidate and CURRENT on the hold-out split and labelled incidents
   (``trainer.gate``);
5. keep every sensor's recent windows for the memory term's recurrence
   (``AnomalyLLM.fill_recent``): every reading read, alerts included, up to a window's
   length before each sensor's newest. After the gate, so no window it judges is among
   them; store the version (with ``report.json``) either way, and promote it only if it
   is not worse, or with ``--force``;
6. prune the store (``store.prune_versions``): keep CURRENT, the ``--keep-versions``
   newest versions and as many rollback targets; delete the rest.

Idempotent: a run's fingerprint covers the data as trained on and every setting; a rerun
with the same fingerprint publishes nothing and repeats the earlier outcome.

Exit codes: 0 promoted (or nothing to do), 1 failed, 3 stored but refused by the gate,
4 another job holds the model's lock.

Tests and experiments can train a randomly initialised backbone of any size with
``JobOptions.model_config`` (``--model-config FILE``): a JSON object of ``ModelConfig``
fields; when it contains a non-empty ``backbone_config`` (a Hugging Face config dict), no
pretrained weights are read.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from stream_detector import store
from stream_detector.alerts import InvalidThresholds, Thresholds
from stream_detector.checkpoint import Checkpoint, CheckpointError
from stream_detector.config import Settings, mask_url
from stream_detector.consumer import ConsumerError
from stream_detector.model import SMOLLM2, AnomalyLLM, BackboneError, ModelConfig
from stream_detector.scorer import resolve_device
from trainer import gate, sources, thresholds, train
from trainer.data import DataFormatError, DataNotFoundError

logger = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_REFUSED = 3
EXIT_LOCKED = 4


class JobError(RuntimeError):
    """The job cannot run as asked; the message says what to change."""


@dataclass(frozen=True)
class JobOptions:
    """Everything a ``fit`` or ``refresh`` run is told (the command line, parsed)."""

    mode: str  # "fit" or "refresh"
    store: str
    model_name: str
    from_kafka: bool = False
    since: str = "7d"
    files: tuple[Path, ...] = ()
    columns: tuple[str, ...] | None = None
    file_interval_ms: int = sources.DEFAULT_FILE_INTERVAL_MS
    incidents: Path | None = None
    profile: str = "default"
    backbone: str = SMOLLM2
    backbone_layers: int = 6
    window_length: int | None = None
    model_config: Path | None = None
    threshold_config: thresholds.ThresholdConfig = field(default_factory=thresholds.ThresholdConfig)
    gate_config: gate.GateConfig = field(default_factory=gate.GateConfig)
    max_readings_per_sensor: int = sources.DEFAULT_MAX_READINGS_PER_SENSOR
    gap_factor: float = sources.DEFAULT_GAP_FACTOR
    margin_windows: float = 1.0
    learn_alerts_after: str = "never"
    calibration_fraction: float = 0.25
    holdout_fraction: float = 0.15
    force: bool = False
    # refresh: only the recent windows of the memory term's recurrence are new (a cheap
    # CronJob at a short cadence; README, "Recurring shapes").
    recent_only: bool = False
    # Versions kept by the pruning after a run (``store.prune_versions``); 0 keeps all.
    keep_versions: int = 10
    report: Path | None = None
    lock_lease_s: float = store.DEFAULT_LEASE_S
    progress: bool = True


@dataclass
class JobResult:
    """The exit code and the report of one run."""

    exit_code: int
    report: dict[str, Any]


class _Phases:
    """Wall-clock seconds per phase, for the report (and the refresh-vs-fit benchmark)."""

    def __init__(self, console: Console) -> None:
        self.seconds: dict[str, float] = {}
        self._console = console

    @contextmanager
    def __call__(self, name: str, message: str) -> Iterator[None]:
        started = time.perf_counter()
        with self._console.status(message):
            yield
        self.seconds[name] = round(time.perf_counter() - started, 3)
        self._console.log(f"{message} done in {self.seconds[name]:.1f} s")


def _package_version() -> str:
    try:
        return metadata.version("stream-detector")
    except metadata.PackageNotFoundError:
        return "unknown"


def score_windows(
    models: Sequence[AnomalyLLM], windows: np.ndarray, device: torch.device
) -> list[np.ndarray]:
    """Each model's scores of windows (N, C, L), as the worker scores (``AnomalyLLM.score``)
    with the trained edges of normal: thresholds are fitted, and candidates judged, on
    windows the model was trained to call normal, where the worker's per-sensor edges
    (``alerts.adapt_terms``) would not have moved."""
    return [model.to(device).eval().score_windows(windows).score for model in models]


def _scores_of(
    models: Sequence[AnomalyLLM],
    split: dict[str, sources.SensorWindows],
    device: torch.device,
) -> list[dict[str, thresholds.SensorScores]]:
    per_model: list[dict[str, thresholds.SensorScores]] = [{} for _ in models]
    for sensor_id, w in split.items():
        scored = score_windows(models, w.windows, device)
        for result, scores in zip(per_model, scored, strict=True):
            result[sensor_id] = thresholds.SensorScores(w.end_ts_ms, scores)
    return per_model


def _incident_scores(
    models: Sequence[AnomalyLLM],
    data: sources.TrainingData,
    stride: int,
    gap_factor: float,
    device: torch.device,
) -> list[list[tuple[sources.Span, thresholds.SensorScores, int]]]:
    length = models[0].config.window_length
    per_model: list[list[tuple[sources.Span, thresholds.SensorScores, int]]] = [[] for _ in models]
    for span in data.incidents:
        series = data.series[span.sensor_id]
        windows = sources.incident_windows(series, span, length, stride, gap_factor)
        if not len(windows.end_ts_ms):
            logger.warning("incident %s has no complete window of data; not judged", span)
            continue
        slack_ms = int(length * series.interval_ms)
        scored = score_windows(models, windows.windows, device)
        for result, scores in zip(per_model, scored, strict=True):
            result.append((span, thresholds.SensorScores(windows.end_ts_ms, scores), slack_ms))
    return per_model


def _evaluate(
    models: Sequence[tuple[AnomalyLLM, dict[str, Any] | None]],
    splits: sources.Splits,
    data: sources.TrainingData,
    settings: Settings,
    options: JobOptions,
    device: torch.device,
) -> list[gate.Evaluation]:
    """Judge (model, its thresholds.json) pairs on the same hold-out data and incidents."""
    networks = [model for model, _ in models]
    holdout = _scores_of(networks, splits.holdout, device)
    incidents = _incident_scores(networks, data, settings.stride, options.gap_factor, device)
    return [
        gate.evaluate(
            holdout[index],
            incidents[index],
            Thresholds.from_dict(thresholds_json or {}),
            settings.alerts,
        )
        for index, (_, thresholds_json) in enumerate(models)
    ]


def _model_config(
    options: JobOptions, channels: int, window_length: int, stride: int
) -> ModelConfig:
    overrides: dict[str, Any] = {}
    if options.model_config is not None:
        try:
            overrides = json.loads(options.model_config.read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise JobError(f"--model-config {options.model_config}: {error}") from error
        if not isinstance(overrides, dict):
            raise JobError(f"--model-config {options.model_config} must hold a JSON object")
    base = {
        "backbone": options.backbone,
        "backbone_layers": options.backbone_layers,
        # The tail and point terms weigh every reading since the worker's
        # previous scoring of the sensor (DETECTOR_STRIDE).
        "tail_readings": min(stride, window_length - 1),
    }
    try:
        config = ModelConfig.from_dict(
            {**base, **overrides, "channels": channels, "window_length": window_length}
        )
        config.validate()
    except (TypeError, ValueError) as error:
        raise JobError(f"model configuration: {error}") from error
    return config


def _read_data(
    options: JobOptions, settings: Settings, window_length: int, now_ms: int, console: Console
) -> sources.TrainingData:
    incidents = sources.read_incidents(options.incidents) if options.incidents else []
    if options.from_kafka:
        since_ms = sources.parse_since(options.since, now_ms)

        def progress(count: int) -> None:
            console.log(f"{count} messages replayed")

        data = sources.read_stream(
            settings,
            options.model_name,
            since_ms,
            window_length=window_length,
            now_ms=now_ms,
            max_readings_per_sensor=options.max_readings_per_sensor,
            margin_windows=options.margin_windows,
            learn_alerts_after_ms=sources.parse_learn_after(options.learn_alerts_after),
            incidents=incidents,
            progress=progress if options.progress else None,
        )
    else:
        data = sources.read_files(
            list(options.files),
            window_length=window_length,
            columns=options.columns,
            interval_ms=options.file_interval_ms,
            max_readings_per_sensor=options.max_readings_per_sensor,
            margin_windows=options.margin_windows,
            incidents=incidents,
        )
    if not data.series:
        where = "the readings topic" if options.from_kafka else "the files"
        raise JobError(
            f"no readings of model {options.model_name!r} in {where}; check --since, the "
            "topic names and the model routes (DETECTOR_MODEL__ROUTES)"
        )
    return data


def _fingerprint(parts: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def _published_with(root: str, model_name: str, fingerprint: str) -> str | None:
    for version in reversed(store.list_versions(root, model_name)):
        try:
            config = store.version_metadata(root, model_name, version)
        except store.ModelStoreError:
            continue
        if config.get("training", {}).get("fingerprint") == fingerprint:
            return version
    return None


def _repeat(
    options: JobOptions, version: str, current: str | None, lock: store.StoreLock
) -> JobResult:
    """A rerun with the same fingerprint: publish nothing, repeat the earlier outcome."""
    earlier = store.read_version_file(options.store, options.model_name, version, store.REPORT_FILE)
    earlier_report = json.loads(earlier) if earlier else {}
    promoted_before = earlier_report.get("decision", {}).get("promote", False)
    report: dict[str, Any] = {
        "job": options.mode,
        "model": options.model_name,
        "store": mask_url(options.store),
        "version": version,
        "no_op": True,
        "current_version": current,
    }
    if current == version:
        report["decision"] = {"promote": False, "reasons": [f"{version} is already CURRENT"]}
        return JobResult(EXIT_OK, report)
    if options.force:
        store.promote(
            options.store, options.model_name, version, reason="--force on a rerun", lock=lock
        )
        report["decision"] = {"promote": True, "reasons": ["same data and settings; --force"]}
        return JobResult(EXIT_OK, report)
    if promoted_before:
        report["decision"] = {
            "promote": False,
            "reasons": [f"{version} was promoted before and has since been replaced; not redone"],
        }
        return JobResult(EXIT_OK, report)
    report["decision"] = {
        "promote": False,
        "reasons": [f"{version} was refused by the gate before; use --force to promote it"],
        "earlier": earlier_report.get("decision"),
    }
    return JobResult(EXIT_REFUSED, report)


def _load_current(
    options: JobOptions, current: str | None, device: torch.device
) -> tuple[Checkpoint | None, str | None]:
    """CURRENT's checkpoint, or None and why it cannot be compared with."""
    if current is None:
        return None, None
    try:
        return store.load_version(options.store, options.model_name, current, device), None
    except (CheckpointError, store.ModelStoreError, OSError) as error:
        return None, f"CURRENT {current} cannot be loaded ({error})"


def run(options: JobOptions, settings: Settings, now_ms: int | None = None) -> JobResult:
    """Run one ``fit`` or ``refresh``; never raises for data, broker or store trouble."""
    console = Console(stderr=True, quiet=not options.progress)
    started = time.perf_counter()
    report: dict[str, Any] = {
        "job": options.mode,
        "model": options.model_name,
        "store": mask_url(options.store),
        "started": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    try:
        with store.StoreLock(
            options.store, options.model_name, purpose=options.mode, lease_s=options.lock_lease_s
        ) as lock:
            result = _run_locked(options, settings, lock, report, console, now_ms)
    except store.StoreLockedError as error:
        result = JobResult(EXIT_LOCKED, {**report, "error": str(error)})
    except (
        JobError,
        DataFormatError,
        DataNotFoundError,
        ConsumerError,
        CheckpointError,
        BackboneError,
        InvalidThresholds,
        store.ModelStoreError,
        ValueError,
        OSError,
    ) as error:
        result = JobResult(EXIT_FAILED, {**report, "error": f"{type(error).__name__}: {error}"})
    result.report["exit_code"] = result.exit_code
    result.report["seconds"] = round(time.perf_counter() - started, 3)
    if "error" in result.report:
        console.print(f"[red]{options.mode} failed:[/red] {result.report['error']}")
    if options.report is not None:
        options.report.parent.mkdir(parents=True, exist_ok=True)
        options.report.write_text(json.dumps(result.report, indent=2, default=str) + "\n")
    return result


def _run_locked(
    options: JobOptions,
    settings: Settings,
    lock: store.StoreLock,
    report: dict[str, Any],
    console: Console,
    now_ms: int | None,
) -> JobResult:
    """The steps of a run, in order; each fills its part of ``report``."""
    phase = _Phases(console)
    device = resolve_device(settings.device)
    now_ms = now_ms if now_ms is not None else time.time_ns() // 1_000_000
    current = store.current_version(options.store, options.model_name)
    report["current_version"] = current
    with phase("load_current", f"loading CURRENT ({current})"):
        current_checkpoint, incomparable = _load_current(options, current, device)
    window_length = _window_length(options, settings, current_checkpoint, incomparable)
    with phase("read", "reading data"):
        data, splits = _read_splits(options, settings, window_length, now_ms, console)
    report["data"] = {**data.summary(), "windows": splits.summary()}
    incomparable = _channel_mismatch(options, current_checkpoint, data.channels) or incomparable
    model_config = (
        current_checkpoint.model.config
        if options.mode == "refresh" and current_checkpoint is not None
        else _model_config(options, data.channels, window_length, settings.stride)
    )
    train_config = train.profile(options.profile)
    fingerprint = _job_fingerprint(
        options, settings, data, model_config, train_config, current_checkpoint
    )
    report["fingerprint"] = fingerprint
    existing = _published_with(options.store, options.model_name, fingerprint)
    if existing is not None:
        console.log(f"same data and settings as version {existing}: nothing to do")
        return _repeat(options, existing, current, lock)

    candidate, report["training"] = _train_candidate(
        options, phase, splits, model_config, train_config, current_checkpoint, current, device
    )
    lock.verify()
    thresholds_json = None
    if options.recent_only and current_checkpoint is not None:
        thresholds_json = current_checkpoint.thresholds
    if thresholds_json is None:
        with phase("calibrate", "calibrating thresholds"):
            (calibration,) = _scores_of([candidate], splits.calibration, device)
            thresholds_json = thresholds.calibrate(
                calibration, options.threshold_config, settings.alerts
            )
    report["thresholds"] = {
        **thresholds.summary(thresholds_json),
        "config": options.threshold_config.to_dict(),
    }
    incomparable = incomparable or _window_mismatch(current_checkpoint, window_length)
    judged: list[tuple[AnomalyLLM, dict[str, Any] | None]] = [(candidate, thresholds_json)]
    if current_checkpoint is not None and incomparable is None:
        judged.append((current_checkpoint.model, current_checkpoint.thresholds))
    with phase("gate", "comparing with CURRENT on held-back data"):
        candidate_eval, *others = _evaluate(judged, splits, data, settings, options, device)
    current_eval = others[0] if others else None
    decision = _decide(
        options, current, current_checkpoint, incomparable, candidate_eval, current_eval
    )
    report["comparison"] = {
        "candidate": candidate_eval.to_dict(),
        "current": current_eval.to_dict() if current_eval else None,
        "gate": options.gate_config.to_dict(),
    }
    report["decision"] = decision.to_dict()
    with phase("recent", "keeping the recent windows of recurring shapes"):
        report["training"]["recent_windows"] = _fill_recent(
            candidate, data, window_length, settings.stride
        )
    version = store.new_version(fingerprint)
    report["version"] = version
    report["timings_s"] = phase.seconds
    lock.verify()
    with phase("publish", f"storing version {version}"):
        _publish(options, settings, lock, report, candidate, thresholds_json, data, decision)
    if options.keep_versions:
        with phase("prune", f"keeping the {options.keep_versions} newest versions"):
            report["pruned"] = _prune(options, lock, console)
    _print_outcome(console, version, decision, candidate_eval, current_eval)
    return JobResult(EXIT_OK if decision.promote else EXIT_REFUSED, report)


def _read_splits(
    options: JobOptions, settings: Settings, window_length: int, now_ms: int, console: Console
) -> tuple[sources.TrainingData, sources.Splits]:
    """The job's data, windowed into train, calibration and hold-out splits."""
    data = _read_data(options, settings, window_length, now_ms, console)
    splits = sources.split_windows(
        data,
        window_length,
        settings.stride,
        calibration_fraction=options.calibration_fraction,
        holdout_fraction=options.holdout_fraction,
        gap_factor=options.gap_factor,
    )
    if not splits.summary()["calibration_windows"]:
        raise JobError(
            "no calibration windows: every sensor needs more than "
            f"{window_length} consecutive readings in its recent data; read a longer period"
        )
    return data, splits


def _window_mismatch(current_checkpoint: Checkpoint | None, window_length: int) -> str | None:
    """Why CURRENT cannot be judged beside a candidate of ``window_length``, if it cannot."""
    if current_checkpoint is None:
        return None
    current_length = current_checkpoint.model.config.window_length
    if current_length == window_length:
        return None
    return f"CURRENT's window length is {current_length}, the candidate's {window_length}"


def _window_length(
    options: JobOptions,
    settings: Settings,
    current_checkpoint: Checkpoint | None,
    incomparable: str | None,
) -> int:
    """CURRENT's window length for a refresh; the configured one for a fit."""
    if options.mode == "refresh":
        if current_checkpoint is None:
            raise JobError(
                f"refresh needs a loadable CURRENT version of {options.model_name}: "
                f"{incomparable or 'there is none'}; run fit first"
            )
        return current_checkpoint.model.config.window_length
    window_length = options.window_length or settings.window_length
    if window_length != settings.window_length:
        logger.warning(
            "window length %d differs from the workers' DETECTOR_WINDOW_LENGTH %d: "
            "workers will refuse this model until the two agree",
            window_length,
            settings.window_length,
        )
    return window_length


def _channel_mismatch(
    options: JobOptions, current_checkpoint: Checkpoint | None, channels: int
) -> str | None:
    """Why CURRENT cannot be compared with a model of ``channels`` (refresh: an error)."""
    if current_checkpoint is None or current_checkpoint.model.config.channels == channels:
        return None
    mismatch = (
        f"CURRENT takes {current_checkpoint.model.config.channels} channels, "
        f"the data has {channels}"
    )
    if options.mode == "refresh":
        raise JobError(f"refresh impossible: {mismatch}; run fit")
    return mismatch


def _job_fingerprint(
    options: JobOptions,
    settings: Settings,
    data: sources.TrainingData,
    model_config: ModelConfig,
    train_config: train.TrainConfig,
    current_checkpoint: Checkpoint | None,
) -> str:
    """What the run's outcome depends on: the data as trained on and every setting."""
    return _fingerprint(
        {
            "mode": options.mode,
            "data": data.digest(),
            "model": model_config.to_dict() if options.mode == "fit" else None,
            "train": dataclasses.asdict(train_config) if options.mode == "fit" else None,
            "parent": (
                current_checkpoint.metadata.get("weights_sha256")
                if options.mode == "refresh" and current_checkpoint is not None
                else None
            ),
            "thresholds": options.threshold_config.to_dict(),
            "splits": [options.calibration_fraction, options.holdout_fraction, options.gap_factor],
            "stride": settings.stride,
            "alerts": settings.alerts.model_dump(mode="json"),
            "margin_windows": options.margin_windows,
            "learn_alerts_after": options.learn_alerts_after,
            **({"recent_only": True} if options.recent_only else {}),
            "package": _package_version(),
        }
    )


def _train_candidate(
    options: JobOptions,
    phase: _Phases,
    splits: sources.Splits,
    model_config: ModelConfig,
    train_config: train.TrainConfig,
    current_checkpoint: Checkpoint | None,
    current: str | None,
    device: torch.device,
) -> tuple[AnomalyLLM, dict[str, Any]]:
    """``fit``: a model trained from scratch; ``refresh``: CURRENT with new prototypes
    (``recent_only``: CURRENT as it is)."""
    if options.mode == "fit":
        with phase("train", f"training ({options.profile} profile)"):
            return _fit(options, splits.train, model_config, train_config, device)
    assert current_checkpoint is not None
    candidate = copy.deepcopy(current_checkpoint.model)
    if options.recent_only:
        return candidate, {"parent_version": current, "kmeans_windows": 0}
    with phase("train", "re-fitting prototypes (k-means)"):
        try:
            kmeans_windows = train.refresh(
                candidate, splits.train, train_config.validation_fraction
            )
        except ValueError as error:
            raise JobError(str(error)) from error
    return candidate, {"parent_version": current, "kmeans_windows": kmeans_windows}


def _fill_recent(
    model: AnomalyLLM, data: sources.TrainingData, window_length: int, stride: int
) -> int:
    """Fill the model's recent bank from every sensor's readings; the windows kept."""
    if not model.config.recurs:
        return 0
    limit = model.config.recent_size
    windows, places = sources.recent_windows(data, window_length, stride, limit)
    model.fill_recent(torch.from_numpy(windows), torch.from_numpy(places))
    return len(model.recent_place)


def _decide(
    options: JobOptions,
    current: str | None,
    current_checkpoint: Checkpoint | None,
    incomparable: str | None,
    candidate_eval: gate.Evaluation,
    current_eval: gate.Evaluation | None,
) -> gate.Decision:
    """The gate's verdict; a CURRENT no worker can load loses to anything."""
    if current is not None and incomparable is not None and current_checkpoint is None:
        return gate.Decision(True, True, [f"{incomparable}; nothing to compare with"])
    return gate.decide(
        candidate_eval,
        current_eval,
        options.gate_config,
        force=options.force,
        incomparable=incomparable,
    )


def _publish(
    options: JobOptions,
    settings: Settings,
    lock: store.StoreLock,
    report: dict[str, Any],
    candidate: AnomalyLLM,
    thresholds_json: dict[str, Any],
    data: sources.TrainingData,
    decision: gate.Decision,
) -> None:
    """Store the candidate as ``report["version"]`` with its provenance; promote it if passed."""
    version = report["version"]
    provenance = {
        "fingerprint": report["fingerprint"],
        "mode": options.mode,
        "parent_version": report["current_version"],
        "profile": options.profile if options.mode == "fit" else None,
        "train_config": (
            dataclasses.asdict(train.profile(options.profile)) if options.mode == "fit" else None
        ),
        "summary": report["training"],
        "trained_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    store.publish_version(
        options.store,
        options.model_name,
        candidate,
        thresholds=thresholds_json,
        metadata_extra={
            "training": provenance,
            "normalisation": _NORMALISATIONS[candidate.config.normalisation],
            "score_terms": list(candidate.config.score_terms),
            "data_window": {
                "start": report["data"]["range"]["start"],
                "end": report["data"]["range"]["end"],
                "sensors": sorted(data.series),
                "window_length": candidate.config.window_length,
                "stride": settings.stride,
            },
            "metrics": {"holdout": report["comparison"]["candidate"]},
        },
        version=version,
        promote=False,
        extra_files={store.REPORT_FILE: _report_bytes(report)},
        lock=lock,
    )
    if decision.promote:
        store.promote(
            options.store,
            options.model_name,
            version,
            reason=f"{options.mode}: {'; '.join(decision.reasons)}",
            lock=lock,
        )


def _prune(options: JobOptions, lock: store.StoreLock, console: Console) -> list[str]:
    """The versions pruned. The new version is stored whatever happens here: a store that
    refuses a deletion leaves the old versions in place, with a warning."""
    try:
        return store.prune_versions(
            options.store, options.model_name, options.keep_versions, lock=lock
        )
    except (store.ModelStoreError, OSError) as error:
        logger.warning("pruning %s failed: %s", options.model_name, error)
        console.print(f"[yellow]pruning old versions failed:[/yellow] {error}")
        return []


_NORMALISATIONS = {
    "instance": "per-window, per-channel instance normalisation",
    "global": "per-channel statistics of the training data",
}


def _report_bytes(report: dict[str, Any]) -> bytes:
    return (json.dumps(report, indent=2, default=str) + "\n").encode()


def _fit(
    options: JobOptions,
    windows: np.ndarray,
    model_config: ModelConfig,
    train_config: train.TrainConfig,
    device: torch.device,
) -> tuple[AnomalyLLM, dict[str, Any]]:
    initial = None
    if model_config.backbone_config:
        torch.manual_seed(train_config.seed)
        initial = AnomalyLLM.from_config(model_config)
    result = train.fit(
        windows, model_config, train_config, device, model=initial, progress=options.progress
    )
    return result.model, {
        **result.summary(),
        "train_loss": [round(x, 5) for x in result.train_loss],
        "validation_loss": [round(x, 5) for x in result.validation_loss],
    }


def _print_outcome(
    console: Console,
    version: str,
    decision: gate.Decision,
    candidate: gate.Evaluation,
    current: gate.Evaluation | None,
) -> None:
    table = Table(title=f"version {version}")
    table.add_column("")
    table.add_column("candidate")
    table.add_column("CURRENT")
    rows = [
        ("false-alarm rate", "false_alarm_rate", "{:.4f}"),
        ("alerts / sensor-day", "alerts_per_sensor_day", "{:.2f}"),
        ("incidents detected", "detected", "{}"),
    ]
    for label, attribute, fmt in rows:
        table.add_row(
            label,
            fmt.format(getattr(candidate, attribute)),
            fmt.format(getattr(current, attribute)) if current else "-",
        )
    console.print(table)
    verdict = "[green]promoted[/green]" if decision.promote else "[red]not promoted[/red]"
    console.print(f"{verdict}: {'; '.join(decision.reasons)}")
