"""Rebuilding windows and alert states from Kafka when Redis loses them.

Redis can lose a partition's state in two ways the worker sees:

- while the worker runs: a write meets a changed epoch marker (``RedisStateLost``);
- before the worker arrived: a newly assigned partition that the group has committed
  offsets for holds no applied offset in Redis (Redis restarted together with the
  workers, or between their runs), which the epoch marker cannot tell.

Either way the partitions go back ``redis.rebuild_lookback_s`` (or to their first
unprocessed record, if that is older), so the windows refill from the input. Records
older than the lookback are not recovered; brokers that ignore the time in an
offsets-for-times lookup send them anyway, and ``skip`` drops them.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from stream_detector.consumer import ConsumedMessage, Partition, ReadingConsumer

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Rewind:
    """Where each partition goes back to, and the records a rebuild replays."""

    seeks: dict[Partition, int]  # partition -> the offset it resumes from
    replay: dict[Partition, tuple[int, float]]  # lost one -> (lookback start ms, first unread)
    since_ms: int

    def replayed_records(self) -> int:
        """Records the rebuild reads again (of the partitions whose end is known)."""
        return sum(
            int(until) - self.seeks[partition]
            for partition, (_, until) in self.replay.items()
            if until != math.inf
        )


class Recovery:
    """Which partitions to check for lost state, how far back to rewind, what to skip."""

    def __init__(self, consumer: ReadingConsumer, lookback_s: float) -> None:
        self.consumer = consumer
        self.lookback_s = lookback_s
        self.unchecked: set[Partition] = set()  # assigned; Redis not yet checked
        # Partitions a rebuild rewound -> (lookback start ms, first unprocessed offset).
        self._replay: dict[Partition, tuple[int, float]] = {}
        self.last_rebuild: dict[str, Any] | None = None

    def assigned(self, partitions: Iterable[Partition]) -> None:
        self.unchecked |= set(partitions)

    def revoked(self, partitions: Iterable[Partition]) -> None:
        for partition in partitions:
            self._replay.pop(partition, None)
            self.unchecked.discard(partition)

    def lost_before_arrival(self, applied: set[Partition]) -> set[Partition]:
        """The unchecked partitions the group has read from but that hold no ``applied``
        offset in Redis; all of them count as checked afterwards."""
        partitions = sorted(self.unchecked)
        committed = self.consumer.committed_offsets(partitions)
        self.unchecked -= set(partitions)
        return {p for p in partitions if committed.get(p, -1) > 0 and p not in applied}

    def skip(self, message: ConsumedMessage) -> bool:
        """True for an already processed record older than a rebuild's lookback."""
        partition = (message.topic, message.partition)
        if partition not in self._replay:
            return False
        since_ms, until = self._replay[partition]
        if message.offset >= until or (
            message.timestamp_ms is not None and message.timestamp_ms >= since_ms
        ):
            del self._replay[partition]
            return False
        return message.timestamp_ms is not None

    def rewind(
        self,
        owned: set[Partition],
        lost: set[Partition],
        uncommitted: Iterable[ConsumedMessage],
    ) -> Rewind:
        """Seek the ``lost`` partitions back to their first record of the lookback, or to
        their first unprocessed one if that is older, and the other ``owned`` ones to
        their first ``uncommitted`` record."""
        since_ms = time.time_ns() // 1_000_000 - int(self.lookback_s * 1000)
        oldest = self.consumer.offsets_for_time(sorted(lost), since_ms)
        resume = self.consumer.resume_offsets(sorted(lost))
        seeks: dict[Partition, int] = {}
        for message in uncommitted:
            partition = (message.topic, message.partition)
            if partition in owned:
                seeks[partition] = min(seeks.get(partition, message.offset), message.offset)
                resume[partition] = min(resume.get(partition, message.offset), message.offset)
        replay: dict[Partition, tuple[int, float]] = {}
        for partition in lost:
            first = oldest.get(partition, -1)
            until = resume.get(partition, math.inf)
            if 0 <= first < until:
                seeks[partition] = first
                replay[partition] = (since_ms, until)
        self.consumer.seek(seeks)
        return Rewind(seeks, replay, since_ms)

    def rebuilt(self, lost: set[Partition], rewind: Rewind) -> None:
        """Record a rebuild whose state reset is done: skip what predates its lookback."""
        self._replay.update(rewind.replay)
        replayed = {
            f"{topic}:{partition}": (rewind.seeks[(topic, partition)], until)
            for (topic, partition), (_, until) in rewind.replay.items()
        }
        self.last_rebuild = {
            "at_ms": time.time_ns() // 1_000_000,
            "lookback_s": self.lookback_s,
            "replay_from": {name: start for name, (start, _) in replayed.items()},
        }
        logger.error(
            "Redis lost the window and alert state of %s: rebuilding from Kafka, replaying "
            "%s (records since %d ms). Readings older than %.0f s are not recovered: sensors "
            "whose windows need them score again once refilled.",
            sorted(f"{t}:{p}" for t, p in lost),
            replayed,
            rewind.since_ms,
            self.lookback_s,
        )
