"""The retraining job end to end: from the stream or files, tiny backbone, quick profile.

The Kafka test replays three days of synthetic readings (with alert events for the
injected anomalies) from a real broker, and checks that a worker serves the result.
"""

from __future__ import annotations

import contextlib
import csv
import json
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from confluent_kafka import Producer

from stream_detector import store
from stream_detector.checkpoint import Checkpoint
from stream_detector.config import (
    KafkaTopics,
    Settings,
)
from stream_detector.consumer import ConsumerError, ReadingConsumer, replay
from stream_detector.devtools import loadgen
from stream_detector.devtools.tiny import tiny_model_config_json
from stream_detector.publisher import Publisher, ReadingProducer
from stream_detector.schemas import AlertEvent
from tests.worker_support import STRIDE, WINDOW, running
from trainer import jobs, thresholds, train
from trainer.__main__ import main

pytestmark = pytest.mark.integration

MINUTE_MS = 60_000
MODEL = "default"
ENV = {
    "DETECTOR_WINDOW_LENGTH": str(WINDOW),
    "DETECTOR_STRIDE": str(STRIDE),
    "DETECTOR_DEVICE": "cpu",
    "DETECTOR_ALERTS__CONFIRM_K": "2",
    "DETECTOR_ALERTS__CONFIRM_N": "3",
    "DETECTOR_ALERTS__MIN_DURATION_WINDOWS": "2",
    "DETECTOR_ALERTS__COOLDOWN_MS": "0",
}


def _set_env(patch: pytest.MonkeyPatch, extra: dict[str, str] | None = None) -> None:
    for name, value in {**ENV, **(extra or {})}.items():
        patch.setenv(name, value)


@pytest.fixture(scope="module")
def tiny_json(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """--model-config for a randomly initialised tiny backbone (no pretrained weights)."""
    path = tmp_path_factory.mktemp("config") / "tiny.json"
    path.write_text(json.dumps(tiny_model_config_json()))
    return path


def _plan(start_ms: int, readings: int, anomalies: tuple[tuple[str, int, int], ...], seed: int):
    injected = tuple(
        loadgen.InjectedAnomaly(sensor, start_ms + a * MINUTE_MS, start_ms + b * MINUTE_MS, 1.5)
        for sensor, a, b in anomalies
    )
    return loadgen.LoadPlan(3, 1 / 60, readings, start_ms, injected, seed=seed, sensor_prefix="s")


def _write_csv(path: Path, plan: loadgen.LoadPlan) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["ts", "sensor_id", "value"])
        for index in range(plan.sensors):
            values = loadgen.series(plan, index)
            for step in range(plan.readings_per_sensor):
                writer.writerow([plan.ts_ms(step), plan.sensor_id(index), f"{values[step]:.6f}"])
    return path


FILE_START_MS = 1_700_000_000_000
INCIDENT = ("s-00001", 2000, 2040)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two CSV periods of three sensors (the second one newer), and a labelled incident."""
    directory = tmp_path_factory.mktemp("data")
    first = _plan(FILE_START_MS, 3000, (INCIDENT,), seed=1)
    later = _plan(FILE_START_MS + 3000 * MINUTE_MS, 3000, (), seed=2)
    incidents = directory / "incidents.json"
    sensor, start, end = INCIDENT
    incidents.write_text(
        json.dumps([[sensor, FILE_START_MS + start * MINUTE_MS, FILE_START_MS + end * MINUTE_MS]])
    )
    return {
        "first": _write_csv(directory / "first.csv", first),
        "later": _write_csv(directory / "later.csv", later),
        "incidents": incidents,
    }


def _fit_args(root: Path, files: dict[str, Path], tiny_json: Path, *extra: str) -> list[str]:
    return [
        "fit",
        "--from-files",
        str(files["first"]),
        "--incidents",
        str(files["incidents"]),
        "--store",
        str(root),
        "--model",
        MODEL,
        "--profile",
        "quick",
        "--model-config",
        str(tiny_json),
        "--quiet",
        *extra,
    ]


@pytest.fixture(scope="module")
def fitted(
    tmp_path_factory: pytest.TempPathFactory, files: dict[str, Path], tiny_json: Path
) -> tuple[Path, dict[str, Any]]:
    """A store whose CURRENT was fitted on the first period (copied by each test)."""
    root = tmp_path_factory.mktemp("fitted") / "models"
    report = root.parent / "report.json"
    with pytest.MonkeyPatch.context() as patch:
        _set_env(patch)
        assert main(_fit_args(root, files, tiny_json, "--report", str(report))) == 0
    return root, json.loads(report.read_text())


@pytest.fixture
def store_copy(tmp_path: Path, fitted: tuple[Path, dict[str, Any]]) -> Path:
    root = tmp_path / "models"
    shutil.copytree(fitted[0], root)
    return root


def test_a_fit_report_accounts_for_data_training_thresholds_and_decision(
    fitted: tuple[Path, dict[str, Any]],
) -> None:
    root, report = fitted
    assert store.current_version(root, MODEL) == report["version"]
    assert report["decision"]["promote"] and report["exit_code"] == 0
    assert set(report["data"]["sensors"]) == {"s-00000", "s-00001", "s-00002"}
    assert report["data"]["sensors"]["s-00001"]["excluded_readings"] >= 41  # the incident
    assert report["training"]["epochs_run"] >= 1 and report["training"]["train_loss"]
    assert report["thresholds"]["sensors"] == 3
    assert report["comparison"]["candidate"]["incidents"] == 1
    stored = store.read_version_file(root, MODEL, report["version"], "report.json")
    assert json.loads(stored)["fingerprint"] == report["fingerprint"]


def test_a_versions_metadata_records_the_normalisation_and_score_it_was_fitted_with(
    tmp_path: Path, files: dict[str, Path], tiny_json: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = {**json.loads(tiny_json.read_text()), "normalisation": "global"}
    config["score_terms"] = ["discrepancy", "level"]
    global_json = tmp_path / "global.json"
    global_json.write_text(json.dumps(config))
    root = tmp_path / "models"
    _set_env(monkeypatch)
    args = _fit_args(root, files, tiny_json)
    args[args.index(str(tiny_json))] = str(global_json)
    assert main(args) == 0
    version = store.load_version(root, MODEL, store.current_version(root, MODEL))
    assert version.metadata["normalisation"] == "per-channel statistics of the training data"
    assert version.metadata["score_terms"] == ["discrepancy", "level"]
    assert version.model.config.normalisation == "global"


def test_rerunning_with_the_same_data_and_settings_is_a_no_op(
    store_copy: Path,
    files: dict[str, Path],
    tiny_json: Path,
    fitted: tuple[Path, dict[str, Any]],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    _set_env(monkeypatch)
    report = tmp_path / "again.json"
    assert main(_fit_args(store_copy, files, tiny_json, "--report", str(report))) == 0
    again = json.loads(report.read_text())
    assert again["no_op"] is True and again["version"] == fitted[1]["version"]
    assert store.list_versions(store_copy, MODEL) == [fitted[1]["version"]]


def _refresh(
    store_copy: Path, later: Path, fitted_version: str, tmp_path: Path, *options: str
) -> tuple[dict[str, Any], Checkpoint, set[str]]:
    """Refresh the fitted version on the later file: the report, the refreshed version and
    the names of the weights and buffers that changed."""
    report_path = tmp_path / "refresh.json"
    args = ["refresh", *options, "--from-files", str(later), "--store", str(store_copy)]
    code = main([*args, "--model", MODEL, "--quiet", "--report", str(report_path)])
    report = json.loads(report_path.read_text())
    assert code in (jobs.EXIT_OK, jobs.EXIT_REFUSED), report.get("error")
    before = store.load_version(store_copy, MODEL, fitted_version).model.state_dict()
    refreshed = store.load_version(store_copy, MODEL, report["version"])
    after = refreshed.model.state_dict()
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    return report, refreshed, changed


def test_refresh_changes_prototypes_score_calibration_and_thresholds_but_no_other_weight(
    store_copy: Path,
    files: dict[str, Path],
    fitted: tuple[Path, dict[str, Any]],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    _set_env(monkeypatch)
    parent = fitted[1]["version"]
    _, refreshed, changed = _refresh(store_copy, files["later"], parent, tmp_path)
    # The memory banks (windows, and two lengths of stretches of changes) and the terms'
    # scales are recalibrated on the new data; the recent windows are the new data's (at the
    # same places: the indices of as many readings as before).
    banks = {"memory", "step_memory", "short_step_memory", "recent_memory"}
    assert changed == {"student.prototypes", *banks, "term_centre", "term_spread"}
    assert refreshed.thresholds != store.load_version(store_copy, MODEL, parent).thresholds
    assert refreshed.metadata["training"]["parent_version"] == parent


def test_a_recent_only_refresh_changes_nothing_but_the_recent_windows(
    store_copy: Path,
    files: dict[str, Path],
    fitted: tuple[Path, dict[str, Any]],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    _set_env(monkeypatch)
    parent = fitted[1]["version"]
    report, refreshed, changed = _refresh(
        store_copy, files["later"], parent, tmp_path, "--recent-only"
    )
    assert changed == {"recent_memory"}  # at the same places, as in the refresh above
    assert refreshed.thresholds == store.load_version(store_copy, MODEL, parent).thresholds
    # Every sensor's windows up to one window before its newest reading, thinned.
    kept = report["training"]["recent_windows"]
    assert kept == refreshed.model.recent_memory.shape[1] and 0 < kept <= 2048
    assert refreshed.model.recent_place.max() >= 2 * 2**32  # the third sensor's


def test_a_job_prunes_the_versions_beyond_its_retention(
    store_copy: Path,
    files: dict[str, Path],
    fitted: tuple[Path, dict[str, Any]],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    _set_env(monkeypatch)
    parent = fitted[1]["version"]
    checkpoint = store.load_version(store_copy, MODEL, parent)
    # An older version, never promoted (names sort by publication time).
    old = store.publish_version(
        store_copy, MODEL, checkpoint.model, version="20000101T000000000000Z-old", promote=False
    )
    refresh = ["refresh", "--from-files", str(files["later"]), "--store", str(store_copy)]
    assert main([*refresh, "--model", MODEL, "--keep-versions", "-1"]) == jobs.EXIT_FAILED
    report, _, _ = _refresh(
        store_copy, files["later"], parent, tmp_path, "--recent-only", "--keep-versions", "1"
    )
    # Kept: the new version (the newest) and the fitted one (CURRENT, or the target of a
    # rollback once the new one is promoted).
    assert report["pruned"] == [old]
    assert store.list_versions(store_copy, MODEL) == [parent, report["version"]]
    common = ["--store", str(store_copy), "--model", MODEL]
    assert main(["models", "prune", *common, "--keep", "1"]) == 0
    assert store.list_versions(store_copy, MODEL) == [parent, report["version"]]
    capsys.readouterr()
    assert main(["models", "history", *common, "--json"]) == 0
    entries = json.loads(capsys.readouterr().out)["history"]
    assert [entry["versions"] for entry in entries if entry["action"] == "prune"] == [[old]]
    assert main(["models", "history", *common]) == 0
    assert old in capsys.readouterr().out  # the lines, for people


def test_the_gate_refuses_a_worse_model_and_rollback_restores_the_previous(
    store_copy: Path,
    files: dict[str, Path],
    tiny_json: Path,
    fitted: tuple[Path, dict[str, Any]],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    _set_env(monkeypatch)
    good = fitted[1]["version"]
    calibrate = thresholds.calibrate

    def huge(*args: Any, **kwargs: Any) -> dict[str, Any]:
        result = calibrate(*args, **kwargs)
        for entry in [result["default"], *result["sensors"].values()]:
            entry["threshold"] *= 1000  # blind to every incident
        return result

    monkeypatch.setattr(thresholds, "calibrate", huge)
    report_path = tmp_path / "worse.json"
    # Another risk level, so this is not a rerun of the fitted version.
    args = _fit_args(store_copy, files, tiny_json, "--risk-level", "5e-4")
    assert main([*args, "--report", str(report_path)]) == jobs.EXIT_REFUSED
    report = json.loads(report_path.read_text())
    worse = report["version"]
    assert store.list_versions(store_copy, MODEL) == sorted([good, worse])
    assert store.current_version(store_copy, MODEL) == good
    assert report["comparison"]["candidate"]["detected"] == 0
    assert report["comparison"]["current"]["detected"] == 1
    assert any("misses 1 of 1" in reason for reason in report["decision"]["reasons"])

    common = ["--store", str(store_copy), "--model", MODEL]
    assert main(["models", "promote", *common, "--version", worse, "--reason", "test"]) == 0
    assert store.current_version(store_copy, MODEL) == worse
    assert main(["models", "rollback", *common]) == 0
    assert store.current_version(store_copy, MODEL) == good
    capsys.readouterr()
    assert main(["models", "list", *common, "--json"]) == 0
    listing = json.loads(capsys.readouterr().out)
    assert listing["current"] == good
    gates = {row["version"]: row["gate_passed"] for row in listing["versions"]}
    assert gates == {good: True, worse: False}
    assert [entry["action"] for entry in store.history(store_copy, MODEL)] == [
        "promote",
        "promote",
        "rollback",
    ]


def test_two_concurrent_fits_on_one_store_one_wins_the_other_fails_clearly(
    tmp_path: Path,
    files: dict[str, Path],
    tiny_json: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    _set_env(monkeypatch)
    root = tmp_path / "models"
    settings = Settings()
    options = jobs.JobOptions(
        mode="fit",
        store=str(root),
        model_name=MODEL,
        files=(files["first"],),
        profile="quick",
        model_config=tiny_json,
        progress=False,
    )
    training, release = threading.Event(), threading.Event()
    real_fit = train.fit

    def fit_slowly(*args: Any, **kwargs: Any) -> train.TrainResult:
        training.set()
        assert release.wait(120)
        return real_fit(*args, **kwargs)

    monkeypatch.setattr(train, "fit", fit_slowly)
    results: dict[str, jobs.JobResult] = {}
    first = threading.Thread(target=lambda: results.update(a=jobs.run(options, settings)))
    first.start()
    try:
        assert training.wait(120), "the first job never started training"
        second = jobs.run(options, settings)
        assert second.exit_code == jobs.EXIT_LOCKED
        assert "is locked by" in second.report["error"] and "(fit)" in second.report["error"]
        # The command line says so too, with its own exit code.
        capsys.readouterr()
        assert main(_fit_args(root, files, tiny_json)) == jobs.EXIT_LOCKED
        assert "another job is writing to it" in capsys.readouterr().out
    finally:
        release.set()
        first.join(300)
    assert results["a"].exit_code == jobs.EXIT_OK
    assert store.list_versions(root, MODEL) == [results["a"].report["version"]]
    assert not (root / MODEL / store.LOCK_FILE).exists()


# ---------------------------------------------------------------------------------------
# From the stream


def test_replay_starts_at_the_time_asked_for_and_reads_to_the_end(
    kafka_bootstrap: str, topic_factory: Any
) -> None:
    (topic,) = topic_factory("replayed", partitions=2)
    now_ms = time.time_ns() // 1_000_000
    producer = Producer({"bootstrap.servers": kafka_bootstrap})
    for i in range(40):
        stamp = now_ms - (3_600_000 if i < 20 else 600_000) + i
        producer.produce(topic, key=f"k{i % 5}", value=str(i), timestamp=stamp)
    assert producer.flush(10) == 0
    replayed = list(replay(kafka_bootstrap, topic, now_ms - 1_800_000, timeout_s=60))
    assert sorted(int(m.value) for m in replayed) == list(range(20, 40))
    with pytest.raises(ConsumerError, match="does not exist"):
        list(replay(kafka_bootstrap, f"missing-{uuid.uuid4().hex}", 0, timeout_s=10))


def _alert_events(sensor: str, start_ms: int, end_ms: int) -> list[AlertEvent]:
    common = {
        "alert_id": uuid.uuid4().hex[:20],
        "sensor_id": sensor,
        "severity": "major",
        "start_ts_ms": start_ms,
        "peak_score": 9.0,
        "threshold": 3.0,
        "model_version": "old",
        "nearest_prototype": 0,
        "channel_attribution": (1.0,),
    }
    return [
        AlertEvent(**common, sequence=0, state="open", end_ts_ms=None, event_ts_ms=start_ms),
        AlertEvent(**common, sequence=1, state="resolved", end_ts_ms=end_ms, event_ts_ms=end_ms),
    ]


@pytest.fixture
def workers() -> Iterator[contextlib.ExitStack]:
    """Workers entered here (``running``) stop, and re-raise their errors, after the test."""
    with contextlib.ExitStack() as stack:
        yield stack


def test_fit_from_kafka_skips_alerted_spans_and_a_running_worker_serves_the_result(
    kafka_bootstrap: str,
    kafka_consumer_config: dict[str, Any],
    redis_url: str,
    key_prefix: str,
    topic_factory: Any,
    tiny_json: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    workers: contextlib.ExitStack,
    settings_for: Callable[..., Settings],
) -> None:
    history, live = topic_factory("history", "live", partitions=2)
    alerts, scores, worker_alerts, dead = topic_factory("alerts", "scores", "walerts", "dlq")
    root = tmp_path / "models"
    now_ms = time.time_ns() // 1_000_000
    start_ms = now_ms - 3 * 24 * 60 * MINUTE_MS
    anomalies = (("s-00001", 1500, 1540), ("s-00002", 3000, 3030))
    plan = _plan(start_ms, 3 * 24 * 60, anomalies, seed=1)

    producer = ReadingProducer(kafka_bootstrap, history)
    for _, key, value in loadgen.messages(plan):
        producer.send(key, value)
    for step in range(300):  # a sensor of another model: not trained on
        reading = {"sensor_id": "other-1", "ts": plan.ts_ms(step), "value": 1.0}
        producer.send(b"other-1", json.dumps(reading).encode())
    producer.flush()
    publisher = Publisher(
        kafka_bootstrap, scores_topic=scores, alerts_topic=alerts, dead_letter_topic=dead
    )
    spans = {}
    for sensor, first, last in anomalies:
        # The worker notices a few readings late and resolves a few readings after the end.
        alert_start, alert_end = plan.ts_ms(first + 3), plan.ts_ms(last + 4)
        publisher.publish_alerts(_alert_events(sensor, alert_start, alert_end))
        spans[sensor] = (alert_start, alert_end)
    publisher.flush_and_check()
    publisher.close()

    # A worker is already running, waiting for a model: it must pick the new one up.
    worker_topics = KafkaTopics(
        readings=live, scores=scores, alerts=worker_alerts, dead_letters=dead
    )
    worker_settings = settings_for(
        root, kafka={"topics": worker_topics}, model={"current_poll_interval_s": 1.0}
    )
    workers.enter_context(running(worker_settings))

    _set_env(
        monkeypatch,
        {
            "DETECTOR_KAFKA__BOOTSTRAP_SERVERS": kafka_bootstrap,
            "DETECTOR_KAFKA__TOPICS__READINGS": history,
            "DETECTOR_KAFKA__TOPICS__ALERTS": alerts,
            "DETECTOR_MODEL__ROUTES": json.dumps({"other-*": "other"}),
        },
    )
    report_path = tmp_path / "report.json"
    args = ["fit", "--from-kafka", "--since", "4d", "--store", str(root), "--model", MODEL]
    args += ["--profile", "quick", "--model-config", str(tiny_json), "--quiet"]
    assert main([*args, "--report", str(report_path)]) == 0
    report = json.loads(report_path.read_text())
    version = report["version"]
    assert store.current_version(root, MODEL) == version

    data = report["data"]
    assert set(data["sensors"]) == {"s-00000", "s-00001", "s-00002"}
    assert data["messages_read"] == 3 * plan.readings_per_sensor + 300
    assert data["dropped_readings"]["other_models"] == 300
    assert {span["sensor_id"] for span in data["excluded_spans"]} == {"s-00001", "s-00002"}
    margin_ms = WINDOW * MINUTE_MS
    for sensor, (alert_start, alert_end) in spans.items():
        ts = np.array([plan.ts_ms(step) for step in range(plan.readings_per_sensor)])
        expected = (ts >= alert_start - margin_ms) & (ts <= alert_end + margin_ms)
        assert data["sensors"][sensor]["excluded_readings"] == int(expected.sum())
        first, last = next((a, b) for s, a, b in anomalies if s == sensor)
        assert expected[first : last + 1].all(), "the anomaly is not inside the exclusion"
    assert data["sensors"]["s-00000"]["excluded_readings"] == 0

    # Same topic contents and settings: nothing new.
    assert main([*args, "--report", str(report_path)]) == 0
    assert json.loads(report_path.read_text())["no_op"] is True
    assert store.list_versions(root, MODEL) == [version]

    live_producer = ReadingProducer(kafka_bootstrap, live)
    live_start = time.time_ns() // 1_000_000 - 60 * MINUTE_MS
    for step in range(WINDOW + 2 * STRIDE):
        for sensor in ("s-00000", "s-00001"):
            reading = {"sensor_id": sensor, "ts": live_start + step * MINUTE_MS, "value": 0.5}
            live_producer.send(sensor.encode(), json.dumps(reading).encode())
    live_producer.flush()
    reader = ReadingConsumer(
        kafka_bootstrap, f"reader-{uuid.uuid4().hex[:8]}", [scores], config=kafka_consumer_config
    )
    try:
        records: list[dict[str, Any]] = []
        deadline = time.monotonic() + 90
        while len(records) < 6 and time.monotonic() < deadline:
            records += [json.loads(m.value) for m in reader.poll_batch(100, 0.5)]
    finally:
        reader.close()
    assert len(records) >= 6, f"the worker published {len(records)} scores"
    assert {record["model_version"] for record in records} == {version}
