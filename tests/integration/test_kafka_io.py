"""Publisher and ReadingConsumer against a real broker: delivery, offsets, transactions."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Producer
from pydantic import BaseModel

from stream_detector.consumer import ConsumedMessage, ReadingConsumer, next_offsets
from stream_detector.devtools.services import free_port
from stream_detector.metrics import Metrics
from stream_detector.outbox import DeadLetter, Outbox
from stream_detector.publisher import Publisher, PublishError, ReadingProducer
from stream_detector.schemas import ScoreRecord
from tests.conftest import KafkaService, Topics

pytestmark = pytest.mark.integration


class AlertEvent(BaseModel):
    alert_id: str
    sensor_id: str
    phase: str


def produce_readings(bootstrap: str, topic: str, count: int) -> None:
    producer = Producer({"bootstrap.servers": bootstrap})
    for i in range(count):
        value = json.dumps({"sensor_id": f"s{i}", "ts": 1_700_000_000_000 + i, "value": i})
        producer.produce(topic, key=f"s{i}", value=value)
    assert producer.flush(10) == 0


def poll_until(
    consumer: ReadingConsumer, count: int, timeout_s: float = 30.0
) -> list[ConsumedMessage]:
    received: list[ConsumedMessage] = []
    deadline = time.monotonic() + timeout_s
    while len(received) < count and time.monotonic() < deadline:
        received += consumer.poll_batch(count - len(received), 0.5)
    return received


def poll_quietly(consumer: ReadingConsumer, quiet_s: float) -> list[ConsumedMessage]:
    """Everything that arrives until nothing has arrived for quiet_s."""
    received: list[ConsumedMessage] = []
    last = time.monotonic()
    while time.monotonic() - last < quiet_s:
        batch = consumer.poll_batch(100, 0.5)
        if batch:
            received += batch
            last = time.monotonic()
    return received


@pytest.fixture
def make_consumer(
    kafka_bootstrap: str, kafka_consumer_config: dict[str, Any]
) -> Iterator[Callable[..., ReadingConsumer]]:
    consumers: list[ReadingConsumer] = []

    def make(topics: list[str], group_id: str | None = None, **options: Any) -> ReadingConsumer:
        consumer = ReadingConsumer(
            kafka_bootstrap,
            group_id or f"group-{uuid.uuid4().hex[:10]}",
            topics,
            config={**kafka_consumer_config, **options},
        )
        consumers.append(consumer)
        return consumer

    yield make
    for consumer in consumers:
        consumer.close()


@pytest.fixture
def make_publisher(kafka_bootstrap: str, topics: Topics) -> Iterator[Callable[..., Publisher]]:
    publishers: list[Publisher] = []

    def make(bootstrap: str | None = None, **options: Any) -> Publisher:
        topic_names = {
            "scores_topic": topics.scores,
            "alerts_topic": topics.alerts,
            "dead_letter_topic": topics.dead_letter,
        }
        publisher = Publisher(bootstrap or kafka_bootstrap, **{**topic_names, **options})
        publishers.append(publisher)
        return publisher

    yield make
    for publisher in publishers:
        publisher.close(timeout_s=5)


def test_outputs_round_trip_with_keys_and_dead_letter_headers(
    topics: Topics,
    make_publisher: Callable[..., Publisher],
    make_consumer: Callable[..., ReadingConsumer],
) -> None:
    publisher = make_publisher()
    publisher.publish_scores([{"sensor_id": "s1", "score": 0.5}, {"sensor_id": "s2", "score": 2.0}])
    publisher.publish_alerts([AlertEvent(alert_id="a1", sensor_id="s2", phase="open")])
    publisher.publish_dead_letter(
        b"s3",
        b"\xffnot json",
        "invalid JSON",
        source_topic=topics.readings,
        source_partition=2,
        source_offset=41,
    )
    publisher.flush_and_check(10)

    consumer = make_consumer([topics.scores, topics.alerts, topics.dead_letter])
    by_topic: dict[str, list[ConsumedMessage]] = {}
    for message in poll_until(consumer, 4):
        by_topic.setdefault(message.topic, []).append(message)

    assert [(m.key, json.loads(m.value)) for m in by_topic[topics.scores]] == [
        (b"s1", {"sensor_id": "s1", "score": 0.5}),
        (b"s2", {"sensor_id": "s2", "score": 2.0}),
    ]
    (alert,) = by_topic[topics.alerts]
    assert alert.key == b"s2"
    assert AlertEvent.model_validate_json(alert.value).alert_id == "a1"
    (dead,) = by_topic[topics.dead_letter]
    assert (dead.key, dead.value) == (b"s3", b"\xffnot json")
    assert dict(dead.headers) == {
        "reason": b"invalid JSON",
        "source_topic": topics.readings.encode(),
        "source_partition": b"2",
        "source_offset": b"41",
    }


def test_records_without_a_sensor_id_are_refused(make_publisher: Callable[..., Publisher]) -> None:
    publisher = make_publisher()
    with pytest.raises(ValueError, match="sensor_id"):
        publisher.publish_scores([{"score": 1.0}])


def test_unacknowledged_outputs_raise_publish_error() -> None:
    publisher = Publisher(
        f"127.0.0.1:{free_port()}",  # nothing listens here
        scores_topic="scores",
        alerts_topic="alerts",
        dead_letter_topic="dead-letter",
        config={"message.timeout.ms": 500, "log_level": 0},
    )
    publisher.publish_scores([{"sensor_id": "s1", "score": 1.0}])
    with pytest.raises(PublishError, match="1 outputs failed"):
        publisher.flush_and_check(10)
    publisher.flush_and_check(1)  # the failure was reported once; nothing is pending
    publisher.close(timeout_s=1)


def test_undelivered_readings_raise_publish_error() -> None:
    producer = ReadingProducer(
        f"127.0.0.1:{free_port()}",  # nothing listens here
        "readings",
        config={"message.timeout.ms": 500, "log_level": 0},
    )
    producer.send(b"s1", b'{"sensor_id": "s1", "ts": 1700000000000, "value": 1.0}')
    with pytest.raises(PublishError, match="1 readings were not delivered"):
        producer.flush(10)
    producer.flush(1)  # the failure was reported once; nothing is pending


def test_a_poll_returns_what_has_arrived_without_waiting_to_fill_the_batch(
    kafka_bootstrap: str,
    topic_factory: Callable[..., list[str]],
    make_consumer: Callable[..., ReadingConsumer],
) -> None:
    (topic,) = topic_factory("readings", partitions=1)
    produce_readings(kafka_bootstrap, topic, 5)
    consumer = make_consumer([topic], f"group-{uuid.uuid4().hex[:10]}")
    started, received = time.monotonic(), []
    while len(received) < 5 and time.monotonic() - started < 120.0:
        received += consumer.poll_batch(500, timeout_s=60.0)  # waits only for the first
    assert time.monotonic() - started < 30.0  # a batch that waited to fill would take 60 s
    assert [m.offset for m in received] == list(range(5))


def test_close_commits_stored_offsets_and_unstored_messages_come_back(
    kafka_bootstrap: str,
    topic_factory: Callable[..., list[str]],
    make_consumer: Callable[..., ReadingConsumer],
) -> None:
    (topic,) = topic_factory("readings", partitions=1)
    produce_readings(kafka_bootstrap, topic, 10)
    group = f"group-{uuid.uuid4().hex[:10]}"

    first = make_consumer([topic], group)
    received = poll_until(first, 10)
    assert [m.offset for m in received] == list(range(10))
    first.store(received[:4])  # outputs of the first four are published, the rest are not
    first.close()

    second = make_consumer([topic], group)
    assert [m.offset for m in poll_until(second, 6)] == list(range(4, 10))
    assert poll_quietly(second, 1.0) == []


def test_stored_but_uncommitted_offsets_are_redelivered_after_a_crash(
    kafka_bootstrap: str,
    kafka_consumer_config: dict[str, Any],
    topic_factory: Callable[..., list[str]],
    make_consumer: Callable[..., ReadingConsumer],
) -> None:
    (topic,) = topic_factory("readings", partitions=1)
    produce_readings(kafka_bootstrap, topic, 10)
    group = f"group-{uuid.uuid4().hex[:10]}"
    crashing_worker = textwrap.dedent(
        f"""
        import os
        from stream_detector.consumer import ReadingConsumer
        consumer = ReadingConsumer({kafka_bootstrap!r}, {group!r}, [{topic!r}],
                                   config={kafka_consumer_config!r})
        received = []
        while len(received) < 10:
            received += consumer.poll_batch(10, 0.5)
        consumer.store(received[:7])
        consumer.commit()
        consumer.store(received)  # stored, then the process dies before committing
        os._exit(0)
        """
    )
    project_root = Path(__file__).resolve().parents[2]
    subprocess.run(
        [sys.executable, "-c", crashing_worker], cwd=project_root, check=True, timeout=60
    )

    survivor = make_consumer([topic], group)
    assert [m.offset for m in poll_until(survivor, 3)] == [7, 8, 9]


def test_lag_counts_unconsumed_messages(
    kafka_bootstrap: str,
    topic_factory: Callable[..., list[str]],
    make_consumer: Callable[..., ReadingConsumer],
) -> None:
    (topic,) = topic_factory("readings", partitions=1)
    # Multi-record batches: tansu 0.6.0 answers a watermark query with the base offset of
    # the last batch + 1, so the lag must also look at the fetch responses' watermark.
    produce_readings(kafka_bootstrap, topic, 10)
    consumer = make_consumer([topic])
    assert len(poll_until(consumer, 4)) == 4
    assert consumer.lag() == {(topic, 0): 6}


def test_transaction_commits_outputs_with_consumer_offsets(
    kafka_bootstrap: str,
    topics: Topics,
    make_publisher: Callable[..., Publisher],
    make_consumer: Callable[..., ReadingConsumer],
) -> None:
    produce_readings(kafka_bootstrap, topics.readings, 6)
    group = f"group-{uuid.uuid4().hex[:10]}"
    consumer = make_consumer([topics.readings], group)
    received = poll_until(consumer, 6)
    assert len(received) == 6
    try:
        publisher = make_publisher(transactional_id=f"worker-{uuid.uuid4().hex[:10]}")
    except PublishError as error:
        pytest.skip(f"broker does not support transactions: {error}")
    publisher.begin()
    publisher.publish_scores([{"sensor_id": m.key.decode(), "offset": m.offset} for m in received])
    publisher.commit(next_offsets(received), consumer.group_metadata())
    consumer.close()

    reader = make_consumer([topics.scores])
    assert len(poll_until(reader, 6)) == 6
    # The group's offsets were committed with the transaction: nothing is re-delivered.
    restarted = make_consumer([topics.readings], group)
    assert poll_quietly(restarted, 2.0) == []


def test_aborted_transaction_outputs_stay_invisible(
    kafka_service: KafkaService,
    topics: Topics,
    make_publisher: Callable[..., Publisher],
    make_consumer: Callable[..., ReadingConsumer],
    request: pytest.FixtureRequest,
) -> None:
    if kafka_service.source == "embedded":
        request.applymarker(
            pytest.mark.xfail(
                strict=True,
                reason="tansu 0.6.0 hands aborted transactional records to read_committed readers",
            )
        )
    publisher = make_publisher(transactional_id=f"worker-{uuid.uuid4().hex[:10]}")
    publisher.begin()
    publisher.publish_scores([{"sensor_id": "s1", "attempt": "aborted"}])
    publisher.flush_and_check(10)  # on the broker, not just purged from the local queue
    publisher.abort()
    publisher.begin()
    publisher.publish_scores([{"sensor_id": "s1", "attempt": "committed"}])
    publisher.commit([], None)

    reader = make_consumer([topics.scores])
    received = poll_until(reader, 1) + poll_quietly(reader, 1.0)
    assert [json.loads(m.value)["attempt"] for m in received] == ["committed"]


def test_a_dead_letter_too_large_for_its_topic_arrives_cut_with_the_original_named(
    topics: Topics,
    topic_factory: Callable[..., list[str]],
    make_publisher: Callable[..., Publisher],
    make_consumer: Callable[..., ReadingConsumer],
) -> None:
    (small,) = topic_factory("dead-letter-small", config={"max.message.bytes": "16384"})
    publisher = make_publisher(dead_letter_topic=small)
    assert publisher.max_bytes(small) == 16_384  # read from the broker's topic config
    original = bytes(range(256)) * 20_000  # 5.1 MB, over the producer's own limit too
    delivery = publisher.publish_dead_letter(
        b"m7", original, "too_large: ...", source_topic="r", source_partition=0, source_offset=9
    )
    publisher.flush_and_check(10)
    assert delivery.acknowledged and delivery.cut_from == len(original)

    (dead,) = poll_until(make_consumer([small]), 1)
    headers = dict(dead.headers)
    assert original.startswith(dead.value) and 15_000 < len(dead.value) < 16_384
    size = len(dead.key) + len(dead.value) + sum(len(k) + len(v) for k, v in dead.headers)
    assert size <= 16_384
    assert headers["truncated"] == b"true"
    assert headers["original_size"] == str(len(original)).encode()
    assert headers["original_sha256"] == hashlib.sha256(original).hexdigest().encode()
    assert headers["source_offset"] == b"9"


def test_a_score_record_too_large_for_its_topic_loses_only_its_attribution(
    topic_factory: Callable[..., list[str]],
    make_publisher: Callable[..., Publisher],
    make_consumer: Callable[..., ReadingConsumer],
) -> None:
    (small,) = topic_factory("scores-small", config={"max.message.bytes": "4096"})
    publisher = make_publisher(scores_topic=small)
    record = ScoreRecord("pump-1", 2, 1, 0.5, 1.0, "default", "v1", 3, (0.125,) * 2_000)
    publisher.publish_score(record)
    publisher.flush_and_check(10)

    (message,) = poll_until(make_consumer([small]), 1)
    received = json.loads(message.value)
    assert received == {**json.loads(record.to_json()), "channel_attribution": []}
    headers = dict(message.headers)
    assert headers["truncated"] == b"true"
    assert headers["original_sha256"] == hashlib.sha256(record.to_json()).hexdigest().encode()


class OverconfidentPublisher(Publisher):
    """Believes every topic takes 10 MB while its producer sends at most 20,000 bytes."""

    def max_bytes(self, topic: str) -> int:
        return 10_000_000


def test_records_refused_for_good_become_dead_letters_cut_further_and_nothing_blocks(
    kafka_bootstrap: str,
    topics: Topics,
    make_consumer: Callable[..., ReadingConsumer],
) -> None:
    publisher = OverconfidentPublisher(
        kafka_bootstrap,
        scores_topic=topics.scores,
        alerts_topic=topics.alerts,
        dead_letter_topic=topics.dead_letter,
        config={"message.max.bytes": 20_000},
    )
    metrics = Metrics()
    outbox = Outbox(publisher, metrics, topics.readings)
    small = ScoreRecord("pump-1", 2, 1, 0.5, 1.0, "default", "v1", 3, (0.25,))
    huge = ScoreRecord("pump-2", 2, 1, 0.5, 1.0, "default", "v1", 3, (0.125,) * 5_000)
    outbox.send(small)
    outbox.send(huge)
    outbox.send(DeadLetter(b"m7", b"x" * 50_000, "too_large: 50000 bytes", topics.readings, 0, 9))
    outbox.acknowledge()  # no PublishError: every record went somewhere
    publisher.close(5)

    received = poll_until(make_consumer([topics.scores, topics.dead_letter]), 3)
    (score,) = [m for m in received if m.topic == topics.scores]
    assert json.loads(score.value)["sensor_id"] == "pump-1"
    dead = {dict(m.headers)["reason"].split(b":")[0]: m for m in received if m not in [score]}
    assert set(dead) == {b"undeliverable", b"too_large"}
    for message in dead.values():  # refused whole, then cut to its first KiB
        headers = dict(message.headers)
        assert len(message.value) == 1024 and headers["truncated"] == b"true"
    assert dead[b"undeliverable"].value == huge.to_json()[:1024]
    assert dict(dead[b"too_large"].headers)["source_offset"] == b"9"
    refused = "detector_undeliverable_outputs_total"
    assert metrics.registry.get_sample_value(refused, {"topic": topics.scores}) == 1
    assert metrics.registry.get_sample_value(refused, {"topic": topics.dead_letter}) == 2
