"""NAB's machine-temperature failure, run as a new user would: ``trainer fit``, then the worker.

The model trains on the first 2,000 readings of ``machine_temperature_system_failure.csv``
(before the first labelled window), with the default model configuration (the fused
score) on a tiny random backbone. An independent Kafka client (kafka-python) then feeds
the rest of the file to a worker on a real broker and Redis, and the alerts topic is read
back. The February failure, when the temperature falls far below anything seen in
training, must raise an alert, and most alerts must lie inside NAB's labelled windows.
"""

from __future__ import annotations

import csv
import json
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from stream_detector.config import (
    KafkaSettings,
    KafkaTopics,
    ModelSettings,
    RedisSettings,
    Settings,
)
from stream_detector.devtools.services import free_port
from stream_detector.devtools.tiny import tiny_config
from tests.conftest import Topics
from tests.shared_data import DATA_DIR
from tests.worker_support import OutputReader, Outputs, running
from trainer.__main__ import main

pytestmark = pytest.mark.integration

NAB_DIR = DATA_DIR / "nab"
SERIES = "realKnownCause/machine_temperature_system_failure.csv"
TRAIN_ROWS = 2000
WINDOW = 64
STRIDE = 4
FEBRUARY_FAILURE = 3  # the last labelled window: the catastrophic failure


def _ts_ms(text: str) -> int:
    return int(datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp() * 1000)


@pytest.fixture(scope="module")
def series() -> tuple[list[tuple[int, float]], list[tuple[int, int]]]:
    """The readings as (ts_ms, value) and NAB's labelled windows as (start_ms, end_ms)."""
    path = NAB_DIR / "data" / SERIES
    if not path.is_file():
        pytest.skip(f"NAB data not found at {path} (set DETECTOR_DATA_DIR)")
    with path.open() as handle:
        rows = [(_ts_ms(row["timestamp"]), float(row["value"])) for row in csv.DictReader(handle)]
    labels = json.loads((NAB_DIR / "labels" / "combined_windows.json").read_text())[SERIES]
    return rows, [(_ts_ms(start), _ts_ms(end)) for start, end in labels]


def test_the_february_failure_raises_an_alert_and_most_alerts_lie_in_labelled_windows(
    series: tuple[list[tuple[int, float]], list[tuple[int, int]]],
    kafka_bootstrap: str,
    kafka_consumer_config: dict[str, Any],
    redis_url: str,
    key_prefix: str,
    topic_factory: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from kafka import KafkaProducer

    rows, labelled = series
    assert rows[TRAIN_ROWS - 1][0] < labelled[0][0], "training would see a labelled window"
    head = tmp_path / "machine_temperature.csv"
    with head.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["ts", "value"])
        writer.writerows(rows[:TRAIN_ROWS])
    config = {
        key: value
        for key, value in tiny_config().to_dict().items()
        if key not in ("channels", "window_length", "score_terms", "memory_size")
    }
    model_config = tmp_path / "tiny.json"
    model_config.write_text(json.dumps(config))  # the default score, on a tiny backbone
    root = tmp_path / "models"
    monkeypatch.setenv("DETECTOR_WINDOW_LENGTH", str(WINDOW))
    monkeypatch.setenv("DETECTOR_STRIDE", str(STRIDE))
    fit = ["fit", "--from-files", str(head), "--store", str(root), "--model", "default"]
    assert main([*fit, "--profile", "quick", "--model-config", str(model_config), "--quiet"]) == 0

    readings, scores, alerts, dead = topic_factory("readings", "scores", "alerts", "dlq")
    settings = Settings(
        kafka=KafkaSettings(
            bootstrap_servers=kafka_bootstrap,
            group_id=f"workers-{uuid.uuid4().hex[:8]}",
            topics=KafkaTopics(readings=readings, scores=scores, alerts=alerts, dead_letters=dead),
            session_timeout_ms=kafka_consumer_config.get("session.timeout.ms", 6000),
        ),
        redis=RedisSettings(url=redis_url, key_prefix=key_prefix),
        model=ModelSettings(store=str(root)),
        window_length=WINDOW,
        stride=STRIDE,
        device="cpu",
        metrics_port=free_port(),
    )
    live = rows[TRAIN_ROWS:]
    last_ts_ms = live[-1][0]
    end_ts_ms = last_ts_ms - STRIDE * 300_000  # the last full window's, within a stride

    def scored_to(outputs: Outputs) -> int:
        return max((record["ts_ms"] for record in outputs.scores), default=0)

    def scored_the_file(outputs: Outputs) -> bool:
        assert handle.error is None, handle.error
        return scored_to(outputs) >= end_ts_ms

    with running(settings) as handle:
        producer = KafkaProducer(bootstrap_servers=kafka_bootstrap, linger_ms=5)
        for ts_ms, value in live:
            reading = {"sensor_id": "machine_temperature", "ts": ts_ms, "value": value}
            producer.send(readings, key=b"machine_temperature", value=json.dumps(reading).encode())
        producer.flush()
        producer.close()
        reader = OutputReader(
            kafka_bootstrap, Topics(readings, scores, alerts, dead), kafka_consumer_config
        )
        try:
            reader.read_until(scored_the_file, timeout_s=300)
            # The topics are fetched independently: alerts may still be on their way when
            # the last score arrives.
            outputs = reader.read_to_end()
        finally:
            reader.close()
    assert scored_to(outputs) >= end_ts_ms, "the worker did not score the whole file"

    events = outputs.unique_alerts()
    opened = {e["alert_id"]: e for e in events.values() if e["state"] == "open"}
    ends = {e["alert_id"]: e["end_ts_ms"] for e in events.values() if e["state"] == "resolved"}
    spans = [(e["start_ts_ms"], ends.get(alert_id) or last_ts_ms) for alert_id, e in opened.items()]

    def overlaps(span: tuple[int, int], window: tuple[int, int]) -> bool:
        return span[0] <= window[1] and window[0] <= span[1]

    inside = [span for span in spans if any(overlaps(span, w) for w in labelled)]
    assert any(overlaps(span, labelled[FEBRUARY_FAILURE]) for span in spans), spans
    assert len(inside) > len(spans) / 2, f"{len(inside)} of {len(spans)} alerts in windows"
