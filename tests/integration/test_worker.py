"""The streaming worker end to end, against a real broker and Redis, with a tiny trained model.

Workers run in a thread of the test process; the helpers are in tests/worker_support.py.
"""

from __future__ import annotations

import contextlib
import json
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
from kafka import KafkaConsumer, TopicPartition

from stream_detector import store
from stream_detector.config import (
    KafkaTopics,
    Limits,
    RedisSettings,
    Settings,
)
from stream_detector.devtools import loadgen
from stream_detector.devtools.services import EmbeddedRedis, free_port
from stream_detector.devtools.workers import metric_value
from stream_detector.publisher import ReadingProducer
from tests.conftest import Topics
from tests.worker_support import (
    MODEL,
    STEP_MS,
    T0_MS,
    WINDOW,
    OutputReader,
    TrainedModel,
    expected_windows,
    make_plan,
    produce,
    running,
    thresholds_of,
    wait_for,
)

pytestmark = pytest.mark.integration


def stage_counts(port: int) -> set[float]:
    """The distinct counts of the worker's latency stages and of its end-to-end latency."""
    counts = {
        metric_value(port, "detector_stage_seconds_count", stage=stage)
        for stage in ("fetch", "batch", "score", "deliver")
    }
    return counts | {metric_value(port, "detector_end_to_end_seconds_count")}


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

    settings = settings_for(model_store)
    with running(settings):
        reader.read_until(lambda o: expected <= o.scored())
        # Every scored window is timed in each stage of its latency once its score is
        # acknowledged (the commit after it).
        wait_for(lambda: stage_counts(settings.metrics_port) == {len(expected)}, 10, "timings")
    outputs = reader.read_to_end()

    events = list(outputs.unique_alerts().values())
    assert {event["sensor_id"] for event in events} == {"s-00002"}, "normal sensors alerted"
    assert {event["alert_id"] for event in events} == {events[0]["alert_id"]}, "one alert"
    states = [event["state"] for event in sorted(events, key=lambda e: e["sequence"])]
    assert states[0] == "open" and states[-1] == "resolved"
    resolved = next(event for event in events if event["state"] == "resolved")
    # A window shows the anomaly from its first noisy reading until that leaves the window,
    # up to a window after it ends; the alert spans the readings that caused it.
    assert anomaly.start_ts_ms <= resolved["start_ts_ms"] <= anomaly.end_ts_ms
    half_a_window_after_ms = anomaly.end_ts_ms + WINDOW // 2 * STEP_MS
    assert anomaly.start_ts_ms < resolved["end_ts_ms"] <= half_a_window_after_ms
    assert outputs.dead_letters == []


def test_a_kafka_python_subscriber_reads_the_lz4_compressed_outputs_keyed_by_sensor(
    kafka_bootstrap: str,
    topics: Topics,
    model_store: Path,
    settings_for: Callable[..., Settings],
    reader: OutputReader,
) -> None:
    plan = make_plan(2, 40)
    expected = expected_windows(plan)
    produce(kafka_bootstrap, topics.readings, plan)
    with running(settings_for(model_store)):
        reader.read_until(lambda o: expected <= o.scored())
    # kafka-python decodes lz4 with the lz4 package (a dev dependency for this test).
    consumer = KafkaConsumer(
        topics.scores,
        bootstrap_servers=kafka_bootstrap,
        auto_offset_reset="earliest",
        consumer_timeout_ms=10_000,
    )
    seen = set()
    for record in consumer:
        score = json.loads(record.value)
        assert record.key.decode() == score["sensor_id"]
        seen.add((score["sensor_id"], score["ts_ms"]))
        if seen == expected:
            break
    consumer.close()
    assert seen == expected


def committed_readings(bootstrap: str, group: str, topic: str) -> int:
    """How many of ``topic``'s records ``group`` has committed, over all partitions."""
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=group)
    try:
        partitions = consumer.partitions_for_topic(topic) or set()
        offsets = (consumer.committed(TopicPartition(topic, p)) for p in partitions)
        return sum(offset or 0 for offset in offsets)
    finally:
        consumer.close()


def test_a_steady_backlog_is_committed_while_it_is_worked_off(
    kafka_bootstrap: str,
    topics: Topics,
    model_store: Path,
    settings_for: Callable[..., Settings],
) -> None:
    # Polls of one record come back full for as long as the backlog lasts, and batches
    # neither fill nor time out: only the flush after a commit interval of waiting input
    # lets the batcher empty, and the worker commit, before the backlog's end.
    plan = make_plan(8, 2000)
    produce(kafka_bootstrap, topics.readings, plan)
    total = plan.sensors * plan.readings_per_sensor
    settings = settings_for(model_store, kafka={"poll_batch_size": 1}).model_copy(
        update={"batch_size": 10**6, "batch_deadline_ms": 10**6}
    )
    group, seen = settings.kafka.group_id, []
    with running(settings):
        deadline = time.monotonic() + 180
        while (not seen or seen[-1] < total) and time.monotonic() < deadline:
            seen.append(committed_readings(kafka_bootstrap, group, topics.readings))
            time.sleep(0.2)
    assert seen[-1] == total, f"committed {seen[-1]} of {total}"
    # Until the windows fill nothing is queued, so the worker commits anyway: look after.
    filled = plan.sensors * WINDOW
    assert any(2 * filled < count < total for count in seen), f"none mid-backlog: {seen}"


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
        assert handle.metric("detector_invalid_readings_total", reason="bad_json") == 1
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
        assert handle.metric("detector_invalid_readings_total", reason="too_many_sensors") == 80
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
        assert handle.metric("detector_model_load_failures_total", model=MODEL) == 1
        assert handle.metric("detector_model_version_info", model=MODEL, version=second) == 1


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
    outputs = reader.read_to_end()
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
        while handle.metric("detector_retries_total", system="WindowStoreError") < 2:
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
