"""What the worker tests share: a tiny trained model, load plans, workers, output readers,
and the Alertmanager bridge.

Used by the worker's end-to-end tests (tests/integration/test_worker.py), the fault suite
(tests/reliability), the worker fuzz test and the machine-temperature test. Workers run in
a thread of the test process (``running``); the tests that kill one start it as a process
of its own (``stream_detector.devtools.workers``). The fixtures here are found by name
where a test module or conftest imports them.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from stream_detector import alertmanager, store, worker
from stream_detector.config import (
    AlertmanagerSettings,
    AlertPolicy,
    KafkaSettings,
    KafkaTopics,
    ModelSettings,
    RedisSettings,
    Settings,
)
from stream_detector.consumer import ConsumedMessage, ReadingConsumer
from stream_detector.devtools import loadgen
from stream_detector.devtools.services import free_port
from stream_detector.devtools.tiny import tiny_config, tiny_model
from stream_detector.devtools.workers import metric_value
from stream_detector.model import AnomalyLLM
from stream_detector.publisher import ReadingProducer
from stream_detector.windows import due_ends
from tests.conftest import Topics
from trainer.train import fit, profile, sliding_windows

T0_MS = 1_700_000_000_000
STEP_MS = 1000
WINDOW = 32  # the tiny model's window_length
STRIDE = 4
SEED = 1
MODEL = "default"
# Quick decisions, so that short streams open and resolve alerts.
POLICY = AlertPolicy(confirm_k=2, confirm_n=3, min_duration_windows=2, cooldown_ms=0)


@dataclass(frozen=True)
class TrainedModel:
    model: AnomalyLLM
    threshold: float


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread() -> Iterator[None]:
    """Tiny models gain nothing from threads, and on a busy machine they lose a lot."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def trained() -> TrainedModel:
    """A tiny model trained on the normal signal of sensors 0..7 (about 10 s on a CPU)."""
    series = [loadgen.normal_series(i, np.arange(400), SEED, 0.05) for i in range(8)]
    windows = np.concatenate(
        [sliding_windows(s[:, None].astype(np.float32), WINDOW, STRIDE) for s in series]
    )
    config = profile("quick", epochs=20, max_train_windows=512, patience=100)
    model = fit(windows, tiny_config(), config, model=tiny_model(), progress=False).model
    scores = model.score(torch.from_numpy(windows)).score.numpy()
    return TrainedModel(model, threshold=float(scores.max()) * 1.5)


def thresholds_of(trained: TrainedModel) -> dict[str, Any]:
    return {"default": {"threshold": trained.threshold, "method": "max_x1.5"}}


@pytest.fixture
def model_store(tmp_path: Path, trained: TrainedModel) -> Path:
    root = tmp_path / "models"
    store.publish_version(root, MODEL, trained.model, thresholds=thresholds_of(trained))
    return root


def make_plan(sensors: int, readings: int, anomalies: tuple[loadgen.InjectedAnomaly, ...] = ()):
    return loadgen.LoadPlan(
        sensors, 1000 / STEP_MS, readings, T0_MS, anomalies, seed=SEED, sensor_prefix="s"
    )


def expected_windows(plan: loadgen.LoadPlan, first: int = 0) -> set[tuple[str, int]]:
    """(sensor, end ts) of every window the worker must score for readings first..end."""
    return {
        (sensor_id, plan.ts_ms(step))
        for sensor_id in map(plan.sensor_id, range(plan.sensors))
        for step in due_ends(sensor_id, plan.readings_per_sensor, WINDOW, STRIDE, spread=True)
        if step >= first
    }


def produce(bootstrap: str, topic: str, plan: loadgen.LoadPlan, steps: range | None = None) -> None:
    producer = ReadingProducer(bootstrap, topic)
    for step, key, value in loadgen.messages(plan):
        if steps is None or step in steps:
            producer.send(key, value)
    producer.flush()


@pytest.fixture
def settings_for(
    kafka_bootstrap: str,
    kafka_consumer_config: dict[str, Any],
    redis_url: str,
    key_prefix: str,
    topics: Topics,
) -> Callable[..., Settings]:
    """Worker settings for this test's topics, Redis keys and a model store."""
    group = f"workers-{uuid.uuid4().hex[:8]}"
    session_ms = kafka_consumer_config.get("session.timeout.ms", 6000)
    heartbeat_ms = kafka_consumer_config.get("heartbeat.interval.ms", 1000)

    def make(model_store: Path, **overrides: Any) -> Settings:
        kafka = {
            "bootstrap_servers": kafka_bootstrap,
            "group_id": group,
            "topics": KafkaTopics(
                readings=topics.readings,
                scores=topics.scores,
                alerts=topics.alerts,
                dead_letters=topics.dead_letter,
            ),
            "session_timeout_ms": session_ms,
            "extra": {"heartbeat.interval.ms": str(heartbeat_ms)},
            "poll_timeout_ms": 50,
            **overrides.pop("kafka", {}),
        }
        model = {"store": str(model_store), "current_poll_interval_s": 0.2}
        model.update(overrides.pop("model", {}))
        return Settings(
            kafka=KafkaSettings(**kafka),
            redis=RedisSettings(url=redis_url, key_prefix=key_prefix),
            model=ModelSettings(**model),
            alerts=POLICY,
            window_length=WINDOW,
            stride=STRIDE,
            batch_size=64,
            batch_deadline_ms=0,
            device="cpu",
            metrics_port=free_port(),
            **overrides,
        )

    return make


class WorkerThread:
    """A worker running in a thread of the test process."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            worker.run(self.settings, self.stop)
        except BaseException as error:
            self.error = error

    def http(self, path: str) -> tuple[int, str]:
        url = f"http://127.0.0.1:{self.settings.metrics_port}{path}"
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as error:
            return error.code, error.read().decode()

    def partitions(self) -> list[int]:
        try:
            _, body = self.http("/readyz")
        except OSError:
            return []
        return sorted(partition for _, partition in json.loads(body).get("partitions", []))

    def metric(self, name: str, **labels: str) -> float:
        return metric_value(self.settings.metrics_port, name, **labels)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(60)
        assert not self.thread.is_alive(), "worker did not stop within 60 s"
        if self.error is not None:
            raise self.error


def wait_for(condition: Callable[[], bool], timeout_s: float, what: str) -> float:
    """Poll ``condition`` every 0.1 s; return the seconds it took."""
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < timeout_s, f"timed out waiting for {what}"
        time.sleep(0.1)
    return time.monotonic() - started


@contextmanager
def running(settings: Settings) -> Iterator[WorkerThread]:
    handle = WorkerThread(settings)
    handle.thread.start()
    try:
        yield handle
    finally:
        handle.close()


@contextmanager
def bridge(settings: Settings, url: str) -> Iterator[Settings]:
    """The Alertmanager bridge, forwarding to ``url`` from a thread of the test process."""
    stop = threading.Event()
    errors: list[BaseException] = []

    def forward() -> None:
        try:
            alertmanager.run(settings, stop, url)
        except BaseException as error:
            errors.append(error)

    thread = threading.Thread(target=forward, daemon=True)
    thread.start()
    try:
        yield settings
    finally:
        stop.set()
        thread.join(30)
        assert not thread.is_alive(), "the bridge did not stop within 30 s"
        assert errors == []


def bridge_settings(settings: Settings, group_id: str, resend_interval_s: float = 2.0) -> Settings:
    """A bridge's settings: its own consumer group and metrics port, a short resend interval."""
    alertmanager = AlertmanagerSettings(group_id=group_id, resend_interval_s=resend_interval_s)
    return settings.model_copy(
        update={
            "alertmanager": alertmanager,
            "metrics_port": free_port(),
        }
    )


@dataclass
class Outputs:
    """Everything the workers published, as read back from the output topics."""

    scores: list[dict[str, Any]] = field(default_factory=list)
    alerts: list[dict[str, Any]] = field(default_factory=list)
    dead_letters: list[ConsumedMessage] = field(default_factory=list)

    def scored(self) -> set[tuple[str, int]]:
        return {(s["sensor_id"], s["ts_ms"]) for s in self.scores}

    def unique_alerts(self) -> dict[str, dict[str, Any]]:
        return {event["event_id"]: event for event in self.alerts}


class OutputReader:
    def __init__(self, bootstrap: str, topics: Topics, config: dict[str, Any]) -> None:
        self.topics = topics
        self.outputs = Outputs()
        self._consumer = ReadingConsumer(
            bootstrap,
            f"reader-{uuid.uuid4().hex[:8]}",
            [topics.scores, topics.alerts, topics.dead_letter],
            config=config,
        )

    def read_until(self, done: Callable[[Outputs], bool], timeout_s: float = 60.0) -> Outputs:
        deadline = time.monotonic() + timeout_s
        while not done(self.outputs):
            assert time.monotonic() < deadline, f"timed out; got {len(self.outputs.scores)} scores"
            for message in self._consumer.poll_batch(1000, 0.2):
                if message.topic == self.topics.scores:
                    self.outputs.scores.append(json.loads(message.value))
                elif message.topic == self.topics.alerts:
                    self.outputs.alerts.append(json.loads(message.value))
                else:
                    self.outputs.dead_letters.append(message)
        return self.outputs

    def read_to_end(self, timeout_s: float = 60.0) -> Outputs:
        """Read every output partition to its end.

        Exact once the workers have stopped: a stopped worker has every output acknowledged,
        so nothing can arrive later.
        """

        topics = {self.topics.scores, self.topics.alerts, self.topics.dead_letter}

        def at_end(outputs: Outputs) -> bool:
            # Every output topic assigned to the reader, none with records left to read.
            lag = self._consumer.lag()
            return {topic for topic, _ in lag} == topics and not any(lag.values())

        return self.read_until(at_end, timeout_s)

    def close(self) -> None:
        self._consumer.close()


@pytest.fixture
def reader(
    kafka_bootstrap: str, kafka_consumer_config: dict[str, Any], topics: Topics
) -> Iterator[OutputReader]:
    reader = OutputReader(kafka_bootstrap, topics, kafka_consumer_config)
    yield reader
    reader.close()
