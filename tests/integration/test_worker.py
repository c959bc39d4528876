"""The streaming worker end to end, against a real broker and Redis, with a tiny trained model.

Workers run in a thread of the test process. ``settings_env`` turns settings into the
DETECTOR_* variables of a ``python -m stream_detector run`` subprocess, for the tests that
kill one (tests/reliability).
"""

from __future__ import annotations

import contextlib
import json
import os
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

from stream_detector import loadgen, store, worker
from stream_detector.config import (
    AlertPolicy,
    KafkaSettings,
    KafkaTopics,
    Limits,
    ModelSettings,
    RedisSettings,
    Settings,
)
from stream_detector.consumer import ConsumedMessage, ReadingConsumer
from stream_detector.model import AnomalyLLM
from stream_detector.publisher import ReadingProducer
from stream_detector.services import EmbeddedRedis, free_port
from tests.conftest import Topics
from tests.tiny import tiny_config, tiny_model
from trainer.train import fit, profile, sliding_windows

pytestmark = pytest.mark.integration

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
    ends = range(WINDOW - 1, plan.readings_per_sensor, STRIDE)
    return {
        (plan.sensor_id(i), plan.ts_ms(step))
        for i in range(plan.sensors)
        for step in ends
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


def settings_env(settings: Settings) -> dict[str, str]:
    """DETECTOR_* variables that reproduce ``settings`` in a subprocess."""
    data = settings.model_dump(mode="json")
    data["redis"]["url"] = settings.redis.url.get_secret_value()
    env = {k: v for k, v in os.environ.items() if not k.startswith("DETECTOR_")}
    env["OMP_NUM_THREADS"] = "1"
    for name, value in data.items():
        env[f"DETECTOR_{name.upper()}"] = (
            json.dumps(value) if isinstance(value, dict) else str(value)
        )
    return env


def scrape(port: int, name: str, labels: str = "") -> float:
    """One sample from a worker's /metrics (0 when absent)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        body = response.read().decode()
    for line in body.splitlines():
        if line.startswith(f"{name}{{{labels}}} " if labels else f"{name} "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


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

    def metric(self, name: str, labels: str = "") -> float:
        return scrape(self.settings.metrics_port, name, labels)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(60)
        assert not self.thread.is_alive(), "worker did not stop within 60 s"
        if self.error is not None:
            raise self.error


@contextmanager
def running(settings: Settings) -> Iterator[WorkerThread]:
    handle = WorkerThread(settings)
    handle.thread.start()
    try:
        yield handle
    finally:
        handle.close()


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

    def read_quietly(self, quiet_s: float = 1.0) -> Outputs:
        """Read until nothing has arrived for ``quiet_s``."""
        last = [time.monotonic(), 0]

        def quiet(outputs: Outputs) -> bool:
            count = len(outputs.scores) + len(outputs.alerts) + len(outputs.dead_letters)
            if count != last[1]:
                last[:] = [time.monotonic(), count]
            return time.monotonic() - last[0] > quiet_s

        return self.read_until(quiet)

    def close(self) -> None:
        self._consumer.close()


@pytest.fixture
def reader(
    kafka_bootstrap: str, kafka_consumer_config: dict[str, Any], topics: Topics
) -> Iterator[OutputReader]:
    reader = OutputReader(kafka_bootstrap, topics, kafka_consumer_config)
    yield reader
    reader.close()


def test_an_injected_anomaly_raises_one_alert_on_its_sensor_and_time(
    kafka_bootstrap: str,
    topics: Topics,
    model_store: Path,
    settings_for: Callable[..., Settings],
    reader: OutputReader,
) -> None:
    anomaly = loadgen.InjectedAnomaly("s-00002", T0_MS + 100 * STEP_MS, T0_MS + 123 * STEP_MS, 1.5)
    plan = make_plan(4, 200, (anomaly,))
    produce(kafka_bootstrap, topics.readings, plan)
    expected = expected_windows(plan)

    with running(settings_for(model_store)):
        outputs = reader.read_until(lambda o: expected <= o.scored())
        outputs = reader.read_quietly()

    events = list(outputs.unique_alerts().values())
    assert {event["sensor_id"] for event in events} == {"s-00002"}, "normal sensors alerted"
    assert {event["alert_id"] for event in events} == {events[0]["alert_id"]}, "one alert"
    states = [event["state"] for event in sorted(events, key=lambda e: e["sequence"])]
    assert states[0] == "open" and states[-1] == "resolved"
    resolved = next(event for event in events if event["state"] == "resolved")
    # A window shows the anomaly from its first noisy reading until that leaves the window.
    last_affected_ms = anomaly.end_ts_ms + (WINDOW - 1) * STEP_MS
    assert anomaly.start_ts_ms <= resolved["start_ts_ms"] <= anomaly.end_ts_ms
    assert anomaly.start_ts_ms < resolved["end_ts_ms"] <= last_affected_ms
    assert outputs.dead_letters == []


def test_two_workers_split_partitions_and_one_takes_over_without_replay(
    kafka_bootstrap: str,
    topic_factory: Callable[..., list[str]],
    topics: Topics,
    model_store: Path,
    settings_for: Callable[..., Settings],
    reader: OutputReader,
) -> None:
    (readings,) = topic_factory("readings4", partitions=4)
    topic_settings = {
        "topics": KafkaTopics(
            readings=readings,
            scores=topics.scores,
            alerts=topics.alerts,
            dead_letters=topics.dead_letter,
        )
    }
    plan = make_plan(8, 160)
    with (
        running(settings_for(model_store, kafka=topic_settings)) as leaver,
        running(settings_for(model_store, kafka=topic_settings)) as stayer,
    ):
        deadline = time.monotonic() + 60
        while len(leaver.partitions()) != 2 or len(stayer.partitions()) != 2:
            assert time.monotonic() < deadline, (leaver.partitions(), stayer.partitions())
            time.sleep(0.2)
        assert sorted(leaver.partitions() + stayer.partitions()) == [0, 1, 2, 3]

        produce(kafka_bootstrap, readings, plan, range(0, 80))
        reader.read_until(lambda o: expected_windows(make_plan(8, 80)) <= o.scored())
        leaver.close()
        deadline = time.monotonic() + 60
        while stayer.partitions() != [0, 1, 2, 3]:
            assert time.monotonic() < deadline, stayer.partitions()
            time.sleep(0.2)
        produce(kafka_bootstrap, readings, plan, range(80, 160))
        outputs = reader.read_until(lambda o: expected_windows(plan) <= o.scored())
        assert stayer.metric("detector_replayed_readings_total") == 0
    # The windows right after the handover were scored: they continued from Redis.
    assert sorted(outputs.scored()) == sorted(expected_windows(plan))
    assert len(outputs.scores) == len(expected_windows(plan)), "a window was scored twice"


def test_bad_input_goes_to_the_dead_letter_topic_and_the_worker_carries_on(
    kafka_bootstrap: str,
    topics: Topics,
    model_store: Path,
    settings_for: Callable[..., Settings],
    reader: OutputReader,
) -> None:
    settings = settings_for(
        model_store,
        model={"default_model": "no-such-model", "routes": {"s-*": MODEL}},
        limits=Limits(max_message_bytes=256),
    )
    producer = ReadingProducer(kafka_bootstrap, topics.readings)
    bad = {
        "bad_json": b'{"sensor_id": "s-00000", "ts": ',
        "non_finite": b'{"sensor_id": "s-00000", "ts": 1700000000000, "value": NaN}',
        "wrong_channels": b'{"sensor_id": "s-00000", "ts": 1700000000000, "values": [1, 2]}',
        "bad_sensor_id": b'{"ts": 1700000000000, "value": 1.0}',
        "bad_ts": b'{"sensor_id": "s-00000", "value": 1.0}',
        "too_large": b'{"sensor_id": "s-00000", "pad": "' + b"x" * 300 + b'"}',
        "no_model": b'{"sensor_id": "pump-7", "ts": 1700000000000, "value": 1.0}',
    }
    for value in bad.values():
        producer.send(None, value)
    producer.flush()
    plan = make_plan(2, 40)
    produce(kafka_bootstrap, topics.readings, plan)

    with running(settings) as handle:
        outputs = reader.read_until(
            lambda o: len(o.dead_letters) >= len(bad) and expected_windows(plan) <= o.scored()
        )
        assert handle.metric("detector_invalid_readings_total", 'reason="bad_json"') == 1
        assert handle.http("/healthz")[0] == 200
        status, body = handle.http("/readyz")
        assert status == 200, body
        assert json.loads(body)["checks"] == {
            "consumer": True,
            "redis": True,
            "model": True,
            "broker": True,
            "output_topics": True,
        }
    reasons = {}
    for message in outputs.dead_letters:
        headers = dict(message.headers)
        reasons[headers["reason"].decode().split(":", 1)[0]] = message.value
        assert headers["source_topic"] == topics.readings.encode()
    assert reasons == bad


def test_sensors_beyond_the_per_worker_limit_go_to_the_dead_letter_topic(
    kafka_bootstrap: str,
    topics: Topics,
    model_store: Path,
    settings_for: Callable[..., Settings],
    reader: OutputReader,
) -> None:
    plan = make_plan(5, 40)
    produce(kafka_bootstrap, topics.readings, plan)
    settings = settings_for(model_store, limits=Limits(max_sensors_per_worker=3))
    with running(settings) as handle:
        per_sensor = len(expected_windows(make_plan(1, 40)))
        outputs = reader.read_until(
            lambda o: len(o.scored()) == 3 * per_sensor and len(o.dead_letters) == 2 * 40
        )
        assert handle.metric("detector_sensors") == 3
        assert handle.metric("detector_invalid_readings_total", 'reason="too_many_sensors"') == 80
    admitted = {sensor_id for sensor_id, _ in outputs.scored()}
    refused = {message.key.decode() for message in outputs.dead_letters}
    assert admitted | refused == {plan.sensor_id(i) for i in range(5)}
    assert not admitted & refused
    assert outputs.scored() == {key for key in expected_windows(plan) if key[0] in admitted}
    for message in outputs.dead_letters:
        assert dict(message.headers)["reason"].startswith(b"too_many_sensors:")


def test_hot_swap_serves_a_promoted_version_and_refuses_a_tampered_one(
    kafka_bootstrap: str,
    topics: Topics,
    model_store: Path,
    trained: TrainedModel,
    settings_for: Callable[..., Settings],
    reader: OutputReader,
) -> None:
    plan = make_plan(2, 120)
    first = store.current_version(model_store, MODEL)

    def versions_scoring(steps: range) -> set[str]:
        before = len(reader.outputs.scores)
        produce(kafka_bootstrap, topics.readings, plan, steps)
        wanted = {
            key for key in expected_windows(plan, steps.start) if key[1] <= plan.ts_ms(steps[-1])
        }
        outputs = reader.read_until(lambda o: wanted <= o.scored())
        return {record["model_version"] for record in outputs.scores[before:]}

    with running(settings_for(model_store)) as handle:
        assert versions_scoring(range(0, 40)) == {first}
        second = store.publish_version(
            model_store, MODEL, trained.model, thresholds=thresholds_of(trained)
        )
        time.sleep(1.0)  # the worker looks at CURRENT every 0.2 s
        assert versions_scoring(range(40, 80)) == {second}

        third = store.publish_version(
            model_store, MODEL, trained.model, thresholds=thresholds_of(trained), promote=False
        )
        weights = store.version_dir(model_store, MODEL, third) / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:-8] + b"tampered")
        store.promote(model_store, MODEL, third)
        time.sleep(1.0)
        assert versions_scoring(range(80, 120)) == {second}
        assert handle.metric("detector_model_load_failures_total", f'model="{MODEL}"') == 1
        assert (
            handle.metric("detector_model_version_info", f'model="{MODEL}",version="{second}"') == 1
        )


def test_exactly_once_mode_commits_offsets_with_the_outputs(
    kafka_bootstrap: str,
    topics: Topics,
    model_store: Path,
    settings_for: Callable[..., Settings],
    reader: OutputReader,
) -> None:
    plan = make_plan(2, 80)
    produce(kafka_bootstrap, topics.readings, plan)
    kafka = {"exactly_once": True, "instance_id": f"eos-{uuid.uuid4().hex[:8]}"}
    settings = settings_for(model_store, kafka=kafka)

    with running(settings):
        outputs = reader.read_until(lambda o: expected_windows(plan) <= o.scored())
    # The offsets went with the last transaction: a restarted worker has nothing to redo.
    with running(settings) as restarted:
        deadline = time.monotonic() + 30
        while restarted.partitions() != [0, 1, 2]:
            assert time.monotonic() < deadline, "the restarted worker got no partitions"
            time.sleep(0.2)
        time.sleep(1.0)
        assert restarted.metric("detector_readings_total") == 0
    outputs = reader.read_quietly()
    assert len(outputs.scores) == len(expected_windows(plan))


def test_a_redis_outage_makes_the_worker_unready_and_it_resumes_after(
    kafka_bootstrap: str,
    topics: Topics,
    model_store: Path,
    settings_for: Callable[..., Settings],
    reader: OutputReader,
) -> None:
    port = free_port()
    plan = make_plan(2, 140)
    with contextlib.ExitStack() as stack:
        own_redis = stack.enter_context(EmbeddedRedis(port=port))
        settings = settings_for(model_store)
        settings = settings.model_copy(
            update={"redis": RedisSettings(url=own_redis.url, key_prefix="outage")}
        )
        handle = stack.enter_context(running(settings))
        produce(kafka_bootstrap, topics.readings, plan, range(0, 40))
        reader.read_until(lambda o: expected_windows(make_plan(2, 40)) <= o.scored())

        own_redis.stop()
        produce(kafka_bootstrap, topics.readings, plan, range(40, 140))
        deadline = time.monotonic() + 30
        while handle.metric("detector_retries_total", 'system="WindowStoreError"') < 2:
            assert time.monotonic() < deadline, "the worker did not retry without Redis"
            time.sleep(0.2)
        status, body = handle.http("/readyz")
        assert status == 503 and json.loads(body)["checks"]["redis"] is False
        assert handle.http("/healthz")[0] == 200 and handle.thread.is_alive()

        own_redis.start()  # same port, empty: the worker notices the lost state
        last = (plan.sensor_id(0), plan.ts_ms(139))
        reader.read_until(lambda o: last in o.scored())
        assert handle.metric("detector_redis_state_losses_total") == 1
        assert handle.http("/readyz")[0] == 200
