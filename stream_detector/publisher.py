"""Scores, alerts and dead letters out to Kafka (the only Producer).

The producer is idempotent (acks=all, no duplicates from its own retries). The
worker publishes a batch, then calls ``flush_and_check``; only when that returns
are the input offsets stored, so outputs are never lost (at-least-once). With a
``transactional_id`` the outputs and the consumer offsets commit atomically
instead (``begin`` ... ``commit(offsets, group_metadata)``).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Protocol

from confluent_kafka import KafkaError, KafkaException, Message, Producer, TopicPartition
from pydantic import BaseModel

logger = logging.getLogger(__name__)

_MAX_REPORTED_FAILURES = 5


class JsonRecord(Protocol):
    """An output that serialises itself (``schemas.ScoreRecord``, ``schemas.AlertEvent``)."""

    sensor_id: str

    def to_json(self) -> bytes: ...


class PublishError(RuntimeError):
    """Outputs were not acknowledged by the broker; do not store or commit input offsets."""


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
    ) -> None:
        self.scores_topic = scores_topic
        self.alerts_topic = alerts_topic
        self.dead_letter_topic = dead_letter_topic
        settings: dict[str, Any] = {
            "bootstrap.servers": bootstrap_servers,
            "enable.idempotence": True,
            "acks": "all",
            **(config or {}),
        }
        if transactional_id is not None:
            settings["transactional.id"] = transactional_id
        self._producer = Producer(settings)
        self._failures: list[str] = []
        self._failure_count = 0
        self._closed = False
        self.transactional = transactional_id is not None
        if self.transactional:
            try:
                self._producer.init_transactions(init_timeout_s)
            except KafkaException as exception:
                raise PublishError(
                    f"broker {bootstrap_servers} did not initialise transactions for "
                    f"{transactional_id!r}: {exception.args[0].str()}"
                ) from exception

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
    ) -> None:
        while True:
            try:
                self._producer.produce(
                    topic, value=value, key=key, headers=headers, on_delivery=self._on_delivery
                )
                break
            except BufferError:
                # Local queue full: serve delivery reports until there is room.
                self._producer.poll(0.1)
        self._producer.poll(0)

    def publish_scores(self, records: Iterable[BaseModel | Mapping[str, Any] | JsonRecord]) -> None:
        """Queue score records (ScoreRecord, pydantic models or dicts with a sensor_id)."""
        for record in records:
            self._produce(self.scores_topic, *_encode(record))

    def publish_alerts(self, events: Iterable[BaseModel | Mapping[str, Any] | JsonRecord]) -> None:
        """Queue alert events (AlertEvent, pydantic models or dicts with a sensor_id)."""
        for event in events:
            self._produce(self.alerts_topic, *_encode(event))

    def publish_dead_letter(
        self,
        original_key: bytes | None,
        original_value: bytes | None,
        reason: str,
        *,
        source_topic: str,
        source_partition: int,
        source_offset: int,
    ) -> None:
        """Queue an invalid input unchanged, keyed as it was, with where it came from and why."""
        headers = [
            ("reason", reason.encode()),
            ("source_topic", source_topic.encode()),
            ("source_partition", str(source_partition).encode()),
            ("source_offset", str(source_offset).encode()),
        ]
        self._produce(self.dead_letter_topic, original_key, original_value, headers)

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
        while True:
            try:
                self._producer.produce(
                    self.topic, value=value, key=key, on_delivery=self._on_delivery
                )
                break
            except BufferError:
                self._producer.poll(0.1)
        self._producer.poll(0)

    def flush(self, timeout_s: float = 30.0) -> None:
        """Wait until every queued message is delivered; raise PublishError if some are not."""
        remaining = self._producer.flush(timeout_s)
        failures, self._failures = self._failures, []
        if remaining:
            raise PublishError(f"{remaining} readings still undelivered after {timeout_s:.0f}s")
        if failures:
            raise PublishError(f"{len(failures)} readings were not delivered, e.g. {failures[0]}")
