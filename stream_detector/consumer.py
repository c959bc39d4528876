"""Readings in from Kafka (the only Consumer); also the trainer's topic replay (``replay``).

Offsets are stored by hand (``enable.auto.offset.store=False``) and committed by
hand (``enable.auto.commit=False``): the worker calls ``store(messages)`` only after
the outputs for those messages are acknowledged, then ``commit()``. Offsets are also
committed when partitions are revoked (rebalance or ``close``), after the
``on_revoke`` hook has had the chance to finish and store the in-flight batch.
Messages that were polled but never stored are delivered again to whoever owns
the partition next, which is what makes the input at-least-once.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple

from confluent_kafka import (
    TIMESTAMP_NOT_AVAILABLE,
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    TopicPartition,
)

logger = logging.getLogger(__name__)

PartitionsHook = Callable[[list[tuple[str, int]]], None]
# Commit errors that mean this consumer no longer owns the partitions it stored offsets for.
_MEMBERSHIP_LOST = frozenset(
    {
        KafkaError._ASSIGNMENT_LOST,
        KafkaError.ILLEGAL_GENERATION,
        KafkaError.UNKNOWN_MEMBER_ID,
        KafkaError.REBALANCE_IN_PROGRESS,
        KafkaError.FENCED_INSTANCE_ID,
    }
)
# How far ahead of this host's clock the broker's may run before replay stops early.
_REPLAY_CLOCK_SKEW_MS = 60_000


class ConsumerError(RuntimeError):
    """The consumer hit an error it cannot continue from (fatal, or a failed commit)."""


# What the broker's client raises: a worker keeps its work and retries on either.
KAFKA_ERRORS = (ConsumerError, KafkaException)
# A partition of an input topic: (topic, partition number).
Partition = tuple[str, int]


class ConsumedMessage(NamedTuple):
    """One polled record, detached from librdkafka (a named tuple: one is built for every
    record, and a tuple builds several times faster than a frozen dataclass)."""

    key: bytes | None
    value: bytes | None
    topic: str
    partition: int
    offset: int
    timestamp_ms: int | None
    headers: tuple[tuple[str, bytes | None], ...] = ()

    @classmethod
    def of(cls, message: Message) -> ConsumedMessage:
        """Copy a librdkafka message (one without an error) out of the client."""
        timestamp_type, timestamp_ms = message.timestamp()
        return cls(
            message.key(),
            message.value(),
            message.topic(),
            message.partition(),
            message.offset(),
            timestamp_ms if timestamp_type != TIMESTAMP_NOT_AVAILABLE else None,
            tuple(message.headers() or ()),
        )


def next_offsets(messages: Iterable[ConsumedMessage]) -> list[TopicPartition]:
    """Per partition, the offset after the newest message: what a commit should record.

    The messages are in the order they were polled, in which a partition's offsets only
    grow, so its last message is its newest.
    """
    newest = {(message.topic, message.partition): message.offset for message in messages}
    return [TopicPartition(topic, part, last + 1) for (topic, part), last in newest.items()]


class ReadingConsumer:
    """Wraps one confluent_kafka.Consumer subscribed to the readings topic(s)."""

    def __init__(
        self,
        bootstrap_servers: str,
        group_id: str,
        topics: Sequence[str],
        *,
        config: Mapping[str, Any] | None = None,
        on_assign: PartitionsHook | None = None,
        on_revoke: PartitionsHook | None = None,
    ) -> None:
        self._consumer = Consumer(
            {
                "bootstrap.servers": bootstrap_servers,
                "group.id": group_id,
                "auto.offset.reset": "earliest",
                "isolation.level": "read_committed",
                **(config or {}),
                "enable.auto.offset.store": False,
                "enable.auto.commit": False,
            }
        )
        self._on_assign_hook = on_assign
        self._on_revoke_hook = on_revoke
        self._closed = False
        self._consumer.subscribe(
            list(topics),
            on_assign=self._on_assign,
            on_revoke=self._on_revoke,
            on_lost=self._on_lost,
        )

    @staticmethod
    def _names(partitions: list[TopicPartition]) -> list[tuple[str, int]]:
        return [(tp.topic, tp.partition) for tp in partitions]

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        logger.info("assigned %s", self._names(partitions))
        if self._on_assign_hook:
            self._on_assign_hook(self._names(partitions))

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        logger.info("revoked %s", self._names(partitions))
        if self._on_revoke_hook:
            self._on_revoke_hook(self._names(partitions))
        try:
            self.commit()
        except ConsumerError as error:
            # Raising here would abort the rebalance; the new owner replays from the last commit.
            logger.warning("commit on revoke failed: %s", error)

    def _on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # The group already gave these away: committing would fail, the new owner replays.
        logger.warning("lost %s without a clean revoke", self._names(partitions))
        if self._on_revoke_hook:
            self._on_revoke_hook(self._names(partitions))

    def poll_batch(self, max_messages: int, timeout_s: float) -> list[ConsumedMessage]:
        """Up to max_messages records, waiting at most timeout_s for the first; may be empty.

        Returns as soon as one record is there, with every record already fetched behind it
        (up to max_messages): a full batch under load, a short one only when nothing more
        has been fetched (the worker has caught up), and no wait to fill one.
        (``Consumer.consume(n, timeout)`` would wait out the timeout unless n records arrive.)
        """
        first = self._consumer.poll(timeout_s)
        if first is None:
            return []
        fetched = [first]
        while len(fetched) < max_messages:
            # Without waiting; each call may stop at the end of one partition's fetch.
            more = self._consumer.consume(max_messages - len(fetched), 0)
            if not more:
                break
            fetched += more
        batch = []
        for message in fetched:
            error = message.error()
            if error is not None:
                if error.fatal():
                    raise ConsumerError(f"fatal consumer error: {error.str()}")
                if error.code() != KafkaError._PARTITION_EOF:
                    logger.warning("consumer error (continuing): %s", error.str())
                continue
            batch.append(ConsumedMessage.of(message))
        return batch

    def store(self, messages: Iterable[ConsumedMessage]) -> None:
        """Mark these messages as done (their outputs are published); commit() sends the marks."""
        offsets = next_offsets(messages)
        if not offsets:
            return
        try:
            self._consumer.store_offsets(offsets=offsets)
        except KafkaException as exception:
            # A partition revoked meanwhile cannot be stored; its new owner replays it.
            logger.warning("could not store offsets %s: %s", offsets, exception.args[0].str())

    def commit(self) -> None:
        """Synchronously commit the stored offsets (nothing stored is fine).

        When the group has taken the partitions away meanwhile (a session that expired
        during a broker outage, a rebalance), the offsets are dropped: whoever owns the
        partitions next replays from the last commit, and the windows' offset guard skips
        what was already applied. Retrying would never succeed.
        """
        try:
            self._consumer.commit(asynchronous=False)
        except KafkaException as exception:
            error: KafkaError = exception.args[0]
            if error.code() == KafkaError._NO_OFFSET:
                return
            if error.code() in _MEMBERSHIP_LOST:
                logger.warning("offsets not committed, the partitions are gone: %s", error.str())
                return
            raise ConsumerError(f"offset commit failed: {error.str()}") from exception

    def lag(self, timeout_s: float = 5.0) -> dict[tuple[str, int], int]:
        """Per owned partition: high watermark minus the next offset to consume (never negative).

        Partitions with no position yet (nothing fetched) count from the committed offset.
        The high watermark is the larger of the broker's answer to a query (which raises
        when the broker is unreachable) and the one carried by the latest fetch response:
        some Kafka-compatible brokers (tansu) answer the query with a stale value.
        """
        assigned = self._consumer.assignment()
        if not assigned:
            # Still ask the brokers something: the caller takes an answer as "reachable", and
            # a worker whose group session just lapsed in an outage owns nothing.
            self._consumer.list_topics(timeout=timeout_s)
            return {}
        resume = self.resume_offsets(self._names(assigned), timeout_s)
        lags = {}
        for tp in assigned:
            name = (tp.topic, tp.partition)
            watermarks = self._consumer.get_watermark_offsets(tp, timeout=timeout_s)
            if watermarks is None:
                continue
            low, high = watermarks
            fetched = self._consumer.get_watermark_offsets(tp, cached=True)
            if fetched is not None:
                high = max(high, fetched[1])
            # No position and no committed offset: auto.offset.reset decides (earliest).
            lags[name] = max(high - resume.get(name, low), 0)
        return lags

    def offsets_for_time(
        self, partitions: Sequence[tuple[str, int]], since_ms: int, timeout_s: float = 10.0
    ) -> dict[tuple[str, int], int]:
        """Per partition, the first record stamped at or after ``since_ms`` (-1: none).

        Some Kafka-compatible brokers (tansu) ignore the time and answer with the earliest
        offset: callers skip the older records themselves.
        """
        wanted = [TopicPartition(topic, partition, since_ms) for topic, partition in partitions]
        if not wanted:
            return {}
        try:
            found = self._consumer.offsets_for_times(wanted, timeout=timeout_s)
        except KafkaException as exception:
            raise ConsumerError(f"could not look up offsets by time: {exception}") from exception
        return {(tp.topic, tp.partition): max(tp.offset, -1) for tp in found}

    def resume_offsets(
        self, partitions: Sequence[tuple[str, int]], timeout_s: float = 10.0
    ) -> dict[tuple[str, int], int]:
        """Per owned partition, the next record to fetch (position, else committed offset).

        Partitions with neither are absent.
        """
        if not partitions:
            return {}
        wanted = [TopicPartition(topic, partition) for topic, partition in partitions]
        try:
            positions = {
                (tp.topic, tp.partition): tp.offset for tp in self._consumer.position(wanted)
            }
        except KafkaException as exception:
            raise ConsumerError(f"could not read positions: {exception}") from exception
        unknown = [name for name, offset in positions.items() if offset < 0]
        positions.update(self.committed_offsets(unknown, timeout_s))
        return {name: offset for name, offset in positions.items() if offset >= 0}

    def seek(self, offsets: Mapping[tuple[str, int], int]) -> None:
        """Move owned partitions to these offsets (the next records to read)."""
        try:
            for (topic, partition), offset in offsets.items():
                self._consumer.seek(TopicPartition(topic, partition, offset))
        except KafkaException as exception:
            raise ConsumerError(f"could not seek to {dict(offsets)}: {exception}") from exception

    def committed_offsets(
        self, partitions: Sequence[tuple[str, int]], timeout_s: float = 10.0
    ) -> dict[tuple[str, int], int]:
        """The group's committed offset per partition (negative when it has none)."""
        if not partitions:
            return {}
        wanted = [TopicPartition(topic, partition) for topic, partition in partitions]
        try:
            found = self._consumer.committed(wanted, timeout=timeout_s)
        except KafkaException as exception:
            raise ConsumerError(f"could not read committed offsets: {exception}") from exception
        return {(tp.topic, tp.partition): tp.offset for tp in found}

    def group_metadata(self) -> object:
        """The consumer group metadata that Publisher.commit sends with a transaction."""
        return self._consumer.consumer_group_metadata()

    def close(self) -> None:
        """Commit stored offsets (through the revoke hook), leave the group, release."""
        if self._closed:
            return
        self._closed = True
        self._consumer.close()


def replay(
    bootstrap_servers: str,
    topic: str,
    since_ms: int,
    *,
    config: Mapping[str, Any] | None = None,
    group_id: str = "stream-detector-replay",
    batch_size: int = 1000,
    timeout_s: float = 300.0,
) -> Iterator[ConsumedMessage]:
    """Every record of ``topic`` from the first one stamped at or after ``since_ms``.

    The start offset of each partition comes from ``offsets_for_times`` (the broker's
    record timestamps, i.e. produce time unless producers set their own); records stamped
    before ``since_ms`` are skipped, so a broker that ignores the time in that lookup
    (tansu does) costs a longer read, not extra records. A partition ends at its
    end-of-partition event, or at the first record stamped after the replay began
    (produced meanwhile, allowing a minute of clock skew; not yielded). The end is not
    taken from the high watermark, which some Kafka-compatible brokers (tansu) report
    late. Partitions are assigned directly: no consumer group is joined and no offset is
    committed, so a replay never disturbs the workers. Raises ConsumerError when the
    topic does not exist or the end is not reached within ``timeout_s``.
    """
    end_ms = time.time_ns() // 1_000_000 + _REPLAY_CLOCK_SKEW_MS
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap_servers,
            "isolation.level": "read_committed",
            **(config or {}),
            "group.id": group_id,
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "enable.partition.eof": True,
        }
    )
    try:
        try:
            metadata = consumer.list_topics(topic, timeout=timeout_s)
            found = metadata.topics.get(topic)
            if found is None or found.error is not None or not found.partitions:
                raise ConsumerError(f"topic {topic!r} does not exist on {bootstrap_servers}")
            wanted = [TopicPartition(topic, p, since_ms) for p in sorted(found.partitions)]
            # A negative offset: no record at or after since_ms in that partition.
            starts = [
                tp for tp in consumer.offsets_for_times(wanted, timeout=timeout_s) if tp.offset >= 0
            ]
        except KafkaException as exception:
            raise ConsumerError(
                f"cannot look up offsets of topic {topic!r} on {bootstrap_servers}: "
                f"{exception.args[0].str()}"
            ) from exception
        pending = {tp.partition for tp in starts}
        consumer.assign(starts)
        deadline = time.monotonic() + timeout_s
        while pending:
            if time.monotonic() > deadline:
                raise ConsumerError(
                    f"replay of {topic!r} did not reach the end of partitions "
                    f"{sorted(pending)} within {timeout_s:.0f} s"
                )
            for message in consumer.consume(batch_size, 1.0):
                partition = message.partition()
                error = message.error()
                if error is not None:
                    if error.code() == KafkaError._PARTITION_EOF:
                        pending.discard(partition)
                        continue
                    if error.fatal():
                        raise ConsumerError(f"fatal consumer error: {error.str()}")
                    logger.warning("consumer error during replay (continuing): %s", error.str())
                    continue
                if partition not in pending:
                    continue
                consumed = ConsumedMessage.of(message)
                if consumed.timestamp_ms is not None and consumed.timestamp_ms > end_ms:
                    pending.discard(partition)
                    continue
                if consumed.timestamp_ms is not None and consumed.timestamp_ms < since_ms:
                    continue
                yield consumed
    finally:
        consumer.close()
