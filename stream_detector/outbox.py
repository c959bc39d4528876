"""The outputs produced since the last commit, each with its delivery, until all are safe.

The pipeline sends every score record, alert event and dead letter through the outbox.
``acknowledge`` waits for the broker's reports; after a failure, the next call produces
again only the outputs that were not acknowledged (in exactly-once mode the aborted
transaction's outputs, all of them). What no retry can deliver never blocks a partition:

- a record the broker refuses for itself (too large, invalid) goes to the dead-letter
  topic instead, cut to fit; a dead letter refused again is cut further, to its first
  KiB, then to its headers (which still name the source offset, the original size and
  its sha256), and one refused even so is dropped, with an error logged;
- a topic that refuses every record (authorization, unknown or invalid topic) is listed
  in ``unavailable_topics``, which makes the worker not ready, and its outputs are kept
  and retried until it accepts them.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

from stream_detector.metrics import Metrics
from stream_detector.publisher import (
    ConsumerPosition,
    Delivery,
    Failure,
    Publisher,
    PublishError,
)
from stream_detector.schemas import AlertEvent, ScoreRecord

logger = logging.getLogger(__name__)

FLUSH_TIMEOUT_S = 30.0
# Value bytes a dead letter keeps each time the broker refuses it again.
_RECUT_BYTES = (1024, 0)


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """An input (or an output) that goes to the dead-letter topic, and why."""

    key: bytes | None
    value: bytes | None
    reason: str
    topic: str
    partition: int
    offset: int
    max_value_bytes: int | None = None  # set when the broker refused a larger cut


Output = ScoreRecord | AlertEvent | DeadLetter


class Outbox:
    """Produces outputs through ``publisher`` and tracks each one's delivery."""

    def __init__(self, publisher: Publisher, metrics: Metrics, source_topic: str) -> None:
        self.publisher = publisher
        self.metrics = metrics
        self._source_topic = source_topic  # named as the source of an undeliverable output
        self.unavailable_topics: dict[str, str] = {}  # topic -> the broker's refusal
        # None: not produced yet (a replacement waiting for the next transaction).
        self._entries: list[tuple[Output, Delivery | None]] = []
        self._retry = False  # the last attempt failed: produce the failed ones again
        self._in_transaction = False

    @property
    def outputs(self) -> list[Output]:
        """Every output since the last ``clear``."""
        return [output for output, _ in self._entries]

    def send(self, output: Output) -> Delivery:
        """Produce ``output`` and keep it until it is acknowledged; its delivery report."""
        if self.publisher.transactional and not self._in_transaction:
            self.publisher.begin()
            self._in_transaction = True
        delivery = self._produce(output)
        if delivery.cut_from is not None:
            self.metrics.cut_outputs.labels(delivery.topic).inc()
            logger.warning(
                "%s of %d bytes cut to %d to fit %s (at most %d bytes a record)",
                _describe(output),
                delivery.cut_from,
                delivery.size,
                delivery.topic,
                self.publisher.max_bytes(delivery.topic),
            )
        self._entries.append((output, delivery))
        return delivery

    def acknowledge(self, offsets: ConsumerPosition | None = None) -> None:
        """Return once the broker holds every output; raise ``PublishError`` if it does not.

        In exactly-once mode ``offsets`` (the consumer's next offsets and its group
        metadata) commit in the same transaction as the outputs.
        """
        try:
            if self._retry:
                self._produce_again()
            if self.publisher.transactional:
                self._commit_transaction(offsets or ([], None))
            else:
                self._flush()
        except Exception:
            self._retry = True
            raise
        self._retry = False
        self._mark_unavailable({})

    def clear(self) -> None:
        """Forget every output (they are acknowledged, or the next owner replays them)."""
        self._entries, self._retry = [], False

    def abort(self) -> None:
        """Abort the open transaction, if there is one."""
        try:
            self.publisher.abort()
        except PublishError as error:
            logger.debug("no transaction to abort: %s", error)
        self._in_transaction = False

    def _flush(self) -> None:
        # Each round settles the refusals of the last: a dead letter is cut at most
        # len(_RECUT_BYTES) more times before it is dropped.
        for _ in range(len(_RECUT_BYTES) + 2):
            self.publisher.flush(FLUSH_TIMEOUT_S)
            if not self._replace_refused(produce=True):
                break
        self._raise_unless_acknowledged()

    def _commit_transaction(self, offsets: ConsumerPosition) -> None:
        # Records that produce() itself refused never joined the transaction, so their
        # replacements can go into it; the broker's refusals abort it.
        self._replace_refused(produce=True)
        # Refused for another reason (an unknown topic, say): committing would lose them.
        unqueued = [d for _, d in self._entries if d is not None and d.error is not None]
        if unqueued:
            self._mark_unavailable(self._topic_refusals())
            raise PublishError(
                f"{len(unqueued)} outputs were refused before they joined the transaction, "
                f"e.g. {unqueued[0].reason}"
            )
        if not self._in_transaction:  # nothing was produced: commit the offsets alone
            self.publisher.begin()
        self._in_transaction = False
        try:
            self.publisher.commit(*offsets)
        except PublishError:
            self._replace_refused(produce=False)
            self._mark_unavailable(self._topic_refusals())
            raise

    def _produce_again(self) -> None:
        if self.publisher.transactional:
            again = list(range(len(self._entries)))
            self.abort()
            self.publisher.begin()
            self._in_transaction = True
        else:
            again = [
                index
                for index, (_, delivery) in enumerate(self._entries)
                if delivery is None or delivery.error is not None
            ]
        logger.warning(
            "producing %d of %d outputs again after a broker failure",
            len(again),
            len(self._entries),
        )
        for index in again:
            output, _ = self._entries[index]
            self._entries[index] = (output, self._produce(output))

    def _replace_refused(self, *, produce: bool) -> bool:
        """Put a dead letter in the place of each record the broker refused for itself."""
        replaced = False
        kept: list[tuple[Output, Delivery | None]] = []
        for output, delivery in self._entries:
            if delivery is None or delivery.failure is not Failure.RECORD:
                kept.append((output, delivery))
                continue
            assert delivery.reason is not None
            self.metrics.undeliverable_outputs.labels(delivery.topic).inc()
            replacement = self._dead_letter_for(output, delivery.topic, delivery.reason)
            if replacement is not None:
                kept.append((replacement, self._produce(replacement) if produce else None))
                replaced = True
        self._entries = kept
        return replaced

    def _dead_letter_for(self, output: Output, topic: str, reason: str) -> DeadLetter | None:
        if not isinstance(output, DeadLetter):
            logger.warning(
                "%s refused by %s (%s): sent to the dead-letter topic instead",
                _describe(output),
                topic,
                reason,
            )
            return DeadLetter(
                output.sensor_id.encode(),
                output.to_json(),
                f"undeliverable: {topic} refused it: {reason}",
                self._source_topic,
                -1,
                -1,
            )
        smaller = [
            size
            for size in _RECUT_BYTES
            if output.max_value_bytes is None or size < output.max_value_bytes
        ]
        if output.value is None or not smaller:
            self.metrics.dropped_outputs.labels(topic).inc()
            logger.error(
                "%s refused by %s even with its value cut (%s): dropped",
                _describe(output),
                topic,
                reason,
            )
            return None
        logger.warning(
            "%s refused by %s (%s): cut to %d bytes",
            _describe(output),
            topic,
            reason,
            smaller[0],
        )
        return dataclasses.replace(output, max_value_bytes=smaller[0])

    def _raise_unless_acknowledged(self) -> None:
        pending = [
            delivery for _, delivery in self._entries if not (delivery and delivery.acknowledged)
        ]
        self._mark_unavailable(self._topic_refusals())
        if not pending:
            return
        if any(delivery and delivery.failure is Failure.FATAL for delivery in pending):
            self.publisher.reopen()
        errors = [delivery.reason for delivery in pending if delivery and delivery.reason]
        in_flight = len(pending) - len(errors)
        example = f", e.g. {errors[0]}" if errors else "; is the broker reachable?"
        raise PublishError(
            f"{len(pending)} of {len(self._entries)} outputs not acknowledged "
            f"({in_flight} still in flight){example}"
        )

    def _topic_refusals(self) -> dict[str, str]:
        return {
            delivery.topic: delivery.reason
            for _, delivery in self._entries
            if delivery is not None
            and delivery.reason is not None
            and delivery.failure is Failure.TOPIC
        }

    def _mark_unavailable(self, refusals: dict[str, str]) -> None:
        for topic in self.unavailable_topics.keys() - refusals.keys():
            self.metrics.unavailable_topics.labels(topic).set(0)
        for topic in refusals:
            self.metrics.unavailable_topics.labels(topic).set(1)
        self.unavailable_topics = refusals

    def _produce(self, output: Output) -> Delivery:
        if isinstance(output, ScoreRecord):
            return self.publisher.publish_score(output)
        if isinstance(output, AlertEvent):
            return self.publisher.publish_alert(output)
        return self.publisher.publish_dead_letter(
            output.key,
            output.value,
            output.reason,
            source_topic=output.topic,
            source_partition=output.partition,
            source_offset=output.offset,
            max_value_bytes=output.max_value_bytes,
        )


def _describe(output: Output) -> str:
    """One line naming an output for a log message."""
    if isinstance(output, DeadLetter):
        return f"dead letter of {output.topic}:{output.partition}@{output.offset}"
    kind = "score record" if isinstance(output, ScoreRecord) else "alert event"
    return f"{kind} of sensor {output.sensor_id!r}"
