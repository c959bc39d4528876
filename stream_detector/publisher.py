"""Scores, alerts and dead letters out to Kafka (the only Producer).

The producer is idempotent (acks=all, no duplicates from its own retries). Each output
it queues comes back as a ``Delivery`` that the broker's report fills in; the worker
stores input offsets only once every output of a batch is acknowledged (at-least-once),
and after a failure it produces again only the outputs that were not. With a
``transactional_id`` the outputs and the consumer offsets commit atomically instead
(``begin`` ... ``commit(offsets, group_metadata)``).

Every output is made to fit before it is produced. The limit per topic is the smaller of
the producer's ``message.max.bytes`` and the topic's ``max.message.bytes`` as the broker
describes it. A dead letter that would not fit keeps the head of the original bytes and
says so in its headers (``truncated``, ``original_size``, ``original_sha256``); a score
record or alert event sheds its channel attribution, which is the only field that grows
with the number of channels.
"""

from __future__ import annotations

import enum
import hashlib
import json
import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from confluent_kafka import KafkaError, KafkaException, Message, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, ConfigResource
from pydantic import BaseModel

logger = logging.getLogger(__name__)

_MAX_REPORTED_FAILURES = 5
# librdkafka's own default for message.max.bytes, which Apache Kafka's brokers share.
DEFAULT_MAX_MESSAGE_BYTES = 1_000_000
# A record batch's header (61 bytes), the record's own varints and lz4's framing; and lz4
# may grow incompressible bytes by 1/255, so a payload keeps 1% below what is left.
_RECORD_OVERHEAD_BYTES = 512
_COMPRESSION_MARGIN = 0.99
# Client properties an AdminClient must not inherit from the producer's configuration.
_PRODUCER_ONLY = ("transactional.id", "enable.idempotence", "acks", "linger.ms")

# Delivery reports carry a bare error code (``retriable()`` is false on all of them), so
# the codes that no retry can fix are listed here; librdkafka's flags decide the rest.
_RECORD_ERRORS = frozenset(
    {
        KafkaError.MSG_SIZE_TOO_LARGE,
        KafkaError.RECORD_LIST_TOO_LARGE,
        KafkaError.INVALID_MSG,
        KafkaError.INVALID_MSG_SIZE,
        KafkaError.INVALID_RECORD,
        KafkaError.INVALID_TIMESTAMP,
        KafkaError._BAD_MSG,
        KafkaError._INVALID_ARG,
    }
)
_TOPIC_ERRORS = frozenset(
    {
        KafkaError.TOPIC_AUTHORIZATION_FAILED,
        KafkaError.CLUSTER_AUTHORIZATION_FAILED,
        KafkaError.TOPIC_EXCEPTION,
        KafkaError.UNKNOWN_TOPIC_OR_PART,
        KafkaError._UNKNOWN_TOPIC,
        KafkaError.POLICY_VIOLATION,
        KafkaError.UNSUPPORTED_COMPRESSION_TYPE,
    }
)


def produce_when_room(producer: Producer, topic: str, **message: Any) -> None:
    """Queue one message; while the local queue is full, serve delivery reports and retry.

    A ``KafkaException`` (refused before it was queued) propagates.
    """
    while True:
        try:
            producer.produce(topic, **message)
            return
        except BufferError:
            producer.poll(0.1)


class Failure(enum.Enum):
    """What a failed delivery means for the output, and so what the worker does next."""

    RETRY = "retry"  # transient (transport, leader change, timeout, full queue): again
    RECORD = "record"  # this record can never be produced: dead-letter it, cut to fit
    TOPIC = "topic"  # nothing can be produced to its topic: not ready until that changes
    FATAL = "fatal"  # the producer instance is unusable: replace it, then again


def classify(error: KafkaError) -> Failure:
    """The ``Failure`` a producer error stands for."""
    if error.fatal():
        return Failure.FATAL
    if error.retriable() or error.txn_requires_abort():
        return Failure.RETRY
    if error.code() in _RECORD_ERRORS:
        return Failure.RECORD
    if error.code() in _TOPIC_ERRORS:
        return Failure.TOPIC
    return Failure.RETRY


class JsonRecord(Protocol):
    """An output that serialises itself (``schemas.ScoreRecord``, ``schemas.AlertEvent``)."""

    sensor_id: str

    def to_json(self) -> bytes: ...


# The consumer's next offsets and its group metadata: what a transaction commits with the
# outputs (exactly-once mode).
ConsumerPosition = tuple[Sequence[TopicPartition], object]


class PublishError(RuntimeError):
    """Outputs were not acknowledged by the broker; do not store or commit input offsets."""


@dataclass(slots=True)
class Delivery:
    """One produced output, as the broker's delivery report (or ``produce``) left it."""

    topic: str
    size: int  # bytes of the value as produced
    cut_from: int | None = None  # the value's size before it was cut to fit, if it was
    acknowledged: bool = False
    error: KafkaError | None = None
    # Wall clock (ms) when the acknowledgement was handed to the worker: within a poll
    # of the broker's answer (delivery reports are served on each produce and flush).
    acknowledged_ms: int | None = None
    produced_ms: int = field(default_factory=lambda: time.time_ns() // 1_000_000)

    @property
    def failure(self) -> Failure | None:
        """``None`` while acknowledged or still in flight."""
        return None if self.error is None else classify(self.error)

    @property
    def reason(self) -> str | None:
        """The broker's (or ``produce``'s) refusal in words; ``None`` if there was none."""
        return None if self.error is None else self.error.str()

    def report(self, error: KafkaError | None) -> None:
        """Record the broker's (or ``produce``'s) answer."""
        self.acknowledged, self.error = error is None, error
        self.acknowledged_ms = time.time_ns() // 1_000_000 if error is None else None


def _encode(record: BaseModel | Mapping[str, Any] | JsonRecord) -> tuple[bytes, bytes]:
    """(key, value) for an output record: key = its sensor_id, value = compact JSON."""
    if callable(getattr(record, "to_json", None)):
        sensor_id = getattr(record, "sensor_id", None)
        value = record.to_json()
    elif isinstance(record, BaseModel):
        sensor_id = getattr(record, "sensor_id", None)
        value = record.model_dump_json().encode()
    else:
        sensor_id = record.get("sensor_id")
        value = json.dumps(record, separators=(",", ":"), allow_nan=False).encode()
    if not isinstance(sensor_id, str) or not sensor_id:
        raise ValueError(f"output record needs a non-empty string sensor_id, got {sensor_id!r}")
    return sensor_id.encode(), value


def cut_headers(original: bytes) -> list[tuple[str, bytes]]:
    """Headers that say a payload was cut, and how to find and check the original."""
    return [
        ("truncated", b"true"),
        ("original_size", str(len(original)).encode()),
        ("original_sha256", hashlib.sha256(original).hexdigest().encode()),
    ]


# As long as ``cut_headers`` of any original can be, for sizing before anything is hashed.
_LONGEST_CUT_HEADERS = [
    ("truncated", b"true"),
    ("original_size", b"9" * 12),
    ("original_sha256", b"0" * 64),
]


def payload_budget(limit: int, key: bytes | None, headers: Sequence[tuple[str, bytes]]) -> int:
    """The most value bytes a record with this key and headers may carry under ``limit``."""
    fixed = len(key or b"") + sum(len(name) + len(value) for name, value in headers)
    return max(0, int((limit - fixed - _RECORD_OVERHEAD_BYTES) * _COMPRESSION_MARGIN))


def topic_limits(
    config: Mapping[str, Any], topics: Iterable[str], timeout_s: float
) -> dict[str, int]:
    """``max.message.bytes`` of each topic that the broker describes; {} when it cannot."""
    admin_config = {k: v for k, v in config.items() if k not in _PRODUCER_ONLY}
    admin = AdminClient({**admin_config, "log_level": 0})
    resources = [ConfigResource(ConfigResource.Type.TOPIC, topic) for topic in topics]
    limits: dict[str, int] = {}
    try:
        futures = admin.describe_configs(resources, request_timeout=timeout_s)
    except KafkaException as error:
        logger.info("topic limits unknown (%s): using message.max.bytes", error)
        return limits
    for resource, future in futures.items():
        try:
            entry = future.result(timeout=timeout_s).get("max.message.bytes")
        except Exception as error:  # any failure: fall back to the producer's limit
            logger.info("max.message.bytes of %s unknown (%s)", resource.name, error)
            continue
        if entry is not None and entry.value and entry.value.isdigit():
            limits[resource.name] = int(entry.value)
    return limits


class Publisher:
    """Wraps one confluent_kafka.Producer for the scores, alerts and dead-letter topics."""

    def __init__(
        self,
        bootstrap_servers: str,
        *,
        scores_topic: str,
        alerts_topic: str,
        dead_letter_topic: str,
        config: Mapping[str, Any] | None = None,
        transactional_id: str | None = None,
        init_timeout_s: float = 30.0,
        describe_timeout_s: float = 5.0,
    ) -> None:
        self.scores_topic = scores_topic
        self.alerts_topic = alerts_topic
        self.dead_letter_topic = dead_letter_topic
        self._settings: dict[str, Any] = {
            "bootstrap.servers": bootstrap_servers,
            "enable.idempotence": True,
            "acks": "all",
            **(config or {}),
        }
        if transactional_id is not None:
            self._settings["transactional.id"] = transactional_id
        self._init_timeout_s = init_timeout_s
        self._describe_timeout_s = describe_timeout_s
        self._producer_max_bytes = int(
            self._settings.get("message.max.bytes", DEFAULT_MAX_MESSAGE_BYTES)
        )
        self._limits = self._read_limits()
        self._failures: list[str] = []
        self._failure_count = 0
        self._closed = False
        self.transactional = transactional_id is not None
        self._producer = self._open()

    def _open(self) -> Producer:
        settings = dict(self._settings)
        # librdkafka never splits a batch the broker refuses as too large, so no batch may
        # be larger than the smallest topic limit.
        smallest = min(self._limits.values(), default=self._producer_max_bytes)
        batch_size = int(settings.get("batch.size", 1_000_000))  # librdkafka's default
        settings["batch.size"] = max(1, min(batch_size, smallest - _RECORD_OVERHEAD_BYTES))
        producer = Producer(settings)
        if self.transactional:
            try:
                producer.init_transactions(self._init_timeout_s)
            except KafkaException as exception:
                raise PublishError(
                    f"broker {settings['bootstrap.servers']} did not initialise transactions "
                    f"for {settings['transactional.id']!r}: {exception.args[0].str()}"
                ) from exception
        return producer

    def reopen(self) -> None:
        """Replace a producer that hit a fatal error; what it still held is purged."""
        logger.error("replacing the producer after a fatal error")
        self._producer.purge()
        self._producer.flush(0)
        self._producer = self._open()

    def _read_limits(self) -> dict[str, int]:
        """Each output topic's record limit: its ``max.message.bytes``, at most the producer's."""
        topics = [self.scores_topic, self.alerts_topic, self.dead_letter_topic]
        described = topic_limits(self._settings, topics, self._describe_timeout_s)
        return {
            topic: min(self._producer_max_bytes, described.get(topic, self._producer_max_bytes))
            for topic in topics
        }

    def max_bytes(self, topic: str) -> int:
        """The largest record (key, value and headers) that ``topic`` accepts."""
        return self._limits.get(topic, self._producer_max_bytes)

    def _on_delivery(self, error: KafkaError | None, message: Message) -> None:
        if error is not None:
            self._failure_count += 1
            if len(self._failures) < _MAX_REPORTED_FAILURES:
                self._failures.append(f"{message.topic()}: {error.str()}")

    def _produce(
        self,
        topic: str,
        key: bytes | None,
        value: bytes | None,
        headers: list[tuple[str, bytes]] | None = None,
        cut_from: int | None = None,
    ) -> Delivery:
        delivery = Delivery(topic, len(value or b""), cut_from)

        def on_delivery(error: KafkaError | None, message: Message) -> None:
            self._on_delivery(error, message)
            delivery.report(error)

        try:
            produce_when_room(
                self._producer,
                topic,
                value=value,
                key=key,
                headers=headers,
                on_delivery=on_delivery,
            )
        except KafkaException as exception:
            # Refused before it was queued (too large, bad argument, fatal producer).
            delivery.report(exception.args[0])
            self._failure_count += 1
        self._producer.poll(0)
        return delivery

    def _publish_record(
        self, topic: str, record: BaseModel | Mapping[str, Any] | JsonRecord
    ) -> Delivery:
        key, value = _encode(record)
        shrink = getattr(record, "shrunk", None)
        limit = payload_budget(self.max_bytes(topic), key, _LONGEST_CUT_HEADERS)
        if len(value) <= limit or not callable(shrink):
            return self._produce(topic, key, value)
        _, shrunk = _encode(shrink())
        return self._produce(topic, key, shrunk, cut_headers(value), cut_from=len(value))

    def publish_score(self, record: BaseModel | Mapping[str, Any] | JsonRecord) -> Delivery:
        """Queue one score record (ScoreRecord, a pydantic model or a dict with a sensor_id)."""
        return self._publish_record(self.scores_topic, record)

    def publish_alert(self, event: BaseModel | Mapping[str, Any] | JsonRecord) -> Delivery:
        """Queue one alert event (AlertEvent, a pydantic model or a dict with a sensor_id)."""
        return self._publish_record(self.alerts_topic, event)

    def publish_scores(
        self, records: Iterable[BaseModel | Mapping[str, Any] | JsonRecord]
    ) -> list[Delivery]:
        """Queue score records."""
        return [self.publish_score(record) for record in records]

    def publish_alerts(
        self, events: Iterable[BaseModel | Mapping[str, Any] | JsonRecord]
    ) -> list[Delivery]:
        """Queue alert events."""
        return [self.publish_alert(event) for event in events]

    def publish_dead_letter(
        self,
        original_key: bytes | None,
        original_value: bytes | None,
        reason: str,
        *,
        source_topic: str,
        source_partition: int,
        source_offset: int,
        max_value_bytes: int | None = None,
    ) -> Delivery:
        """Queue an invalid input, keyed as it was, with where it came from and why.

        The value is the original's head when the whole would not fit the dead-letter
        topic (or ``max_value_bytes``), with headers saying so.
        """
        headers = [
            ("reason", reason.encode()),
            ("source_topic", source_topic.encode()),
            ("source_partition", str(source_partition).encode()),
            ("source_offset", str(source_offset).encode()),
        ]
        if original_value is None:
            return self._produce(self.dead_letter_topic, original_key, None, headers)
        budget = payload_budget(
            self.max_bytes(self.dead_letter_topic), original_key, headers + _LONGEST_CUT_HEADERS
        )
        if max_value_bytes is not None:
            budget = min(budget, max_value_bytes)
        if len(original_value) <= budget:
            return self._produce(self.dead_letter_topic, original_key, original_value, headers)
        return self._produce(
            self.dead_letter_topic,
            original_key,
            original_value[:budget] or None,
            headers + cut_headers(original_value),
            cut_from=len(original_value),
        )

    def flush(self, timeout_s: float = 30.0) -> int:
        """Serve delivery reports until nothing is queued (at most ``timeout_s``)."""
        return self._producer.flush(timeout_s)

    def flush_and_check(self, timeout_s: float = 30.0) -> None:
        """Wait for every queued output's delivery report; raise PublishError if any failed."""
        remaining = self._producer.flush(timeout_s)
        failures, count = self._failures, self._failure_count
        self._failures, self._failure_count = [], 0
        if remaining:
            raise PublishError(
                f"{remaining} outputs still unacknowledged after {timeout_s:.0f}s; "
                "is the broker reachable?"
            )
        if count:
            raise PublishError(f"{count} outputs failed to publish, e.g. {'; '.join(failures)}")

    def begin(self) -> None:
        """Start a transaction (transactional mode only)."""
        self._require_transactions()
        self._producer.begin_transaction()

    def commit(
        self,
        consumer_offsets: Sequence[TopicPartition],
        group_metadata: object,
        timeout_s: float = 30.0,
    ) -> None:
        """Commit the outputs together with the consumer's next offsets; abort on failure."""
        self._require_transactions()
        try:
            if consumer_offsets:
                self._producer.send_offsets_to_transaction(
                    list(consumer_offsets), group_metadata, timeout_s
                )
            self._producer.commit_transaction(timeout_s)
        except KafkaException as exception:
            error: KafkaError = exception.args[0]
            if error.txn_requires_abort():
                self.abort(timeout_s)
                raise PublishError(f"transaction aborted: {error.str()}") from exception
            raise PublishError(
                f"transaction commit failed ({'fatal' if error.fatal() else 'retriable'}): "
                f"{error.str()}"
            ) from exception
        finally:
            self._failures, self._failure_count = [], 0

    def abort(self, timeout_s: float = 30.0) -> None:
        """Abort the current transaction; read_committed readers never see its outputs."""
        self._require_transactions()
        try:
            self._producer.abort_transaction(timeout_s)
        except KafkaException as exception:
            raise PublishError(
                f"transaction abort failed: {exception.args[0].str()}"
            ) from exception

    def _require_transactions(self) -> None:
        if not self.transactional:
            raise PublishError("transactions need Publisher(..., transactional_id=...)")

    def close(self, timeout_s: float = 30.0) -> None:
        """Deliver what is queued (at most timeout_s), drop the rest, release the producer."""
        if self._closed:
            return
        self._closed = True
        remaining = self._producer.flush(timeout_s)
        if remaining:
            logger.warning("closing publisher: dropping %d undelivered outputs", remaining)
            self._producer.purge()
        self._producer.close()


class ReadingProducer:
    """Raw messages into the readings topic: for load generators and the demo, not the worker."""

    def __init__(
        self, bootstrap_servers: str, topic: str, *, config: Mapping[str, Any] | None = None
    ) -> None:
        self.topic = topic
        self._producer = Producer(
            {"bootstrap.servers": bootstrap_servers, "linger.ms": 5, **(config or {})}
        )
        self._failures: list[str] = []

    def _on_delivery(self, error: KafkaError | None, message: Message) -> None:
        if error is not None:
            self._failures.append(error.str())

    def send(self, key: bytes | None, value: bytes | None) -> None:
        """Queue one message (blocks while the local queue is full)."""
        produce_when_room(
            self._producer, self.topic, value=value, key=key, on_delivery=self._on_delivery
        )
        self._producer.poll(0)

    def flush(self, timeout_s: float = 30.0) -> None:
        """Wait until every queued message is delivered; raise PublishError if some are not."""
        remaining = self._producer.flush(timeout_s)
        failures, self._failures = self._failures, []
        if remaining:
            raise PublishError(f"{remaining} readings still undelivered after {timeout_s:.0f}s")
        if failures:
            raise PublishError(f"{len(failures)} readings were not delivered, e.g. {failures[0]}")
