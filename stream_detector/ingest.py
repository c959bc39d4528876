"""From a polled message to a reading its window can take, or to a dead letter and why.

``decode`` checks a message against the schema, the limits and the model that scores its
sensor; ``SensorRoster`` bounds how many sensors one worker holds. A message either
side refuses becomes a ``DeadLetter`` carrying the reason and its source offset.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import NamedTuple

from stream_detector.config import Limits
from stream_detector.consumer import ConsumedMessage, Partition
from stream_detector.outbox import DeadLetter
from stream_detector.schemas import InvalidReading, Reading, decode_reading


class PositionedReading(NamedTuple):
    """A valid reading and where in Kafka it came from (what ``WindowStore`` needs; a named
    tuple, as one is built for every reading)."""

    sensor_id: str
    ts_ms: int
    values: tuple[float, ...]
    topic: str
    partition: int
    offset: int

    @classmethod
    def of(cls, reading: Reading, message: ConsumedMessage) -> PositionedReading:
        return cls(
            reading.sensor_id,
            reading.ts_ms,
            reading.values,
            message.topic,
            message.partition,
            message.offset,
        )


def decode(
    message: ConsumedMessage,
    limits: Limits,
    channels_of: Callable[[str], tuple[str, int | None]],
    now_ms: int,
) -> Reading:
    """The message's reading, or ``InvalidReading`` when the schema or the limits refuse
    it, or the model that scores its sensor is not loaded or expects other channels.

    ``channels_of(sensor_id)``: the model's name and its channel count (None: not loaded).
    """
    reading = decode_reading(
        message.key, message.value, expected_channels=None, limits=limits, now_ms=now_ms
    )
    model_name, channels = channels_of(reading.sensor_id)
    if channels is None:
        raise InvalidReading(
            f"no_model: sensor {reading.sensor_id!r} is scored by model {model_name!r}, "
            "which has no version loaded"
        )
    if len(reading.values) != channels:
        raise InvalidReading(
            f"wrong_channels: {len(reading.values)} channels, model {model_name!r} "
            f"expects {channels}"
        )
    return reading


def dead_letter(message: ConsumedMessage, reason: str) -> DeadLetter:
    """The message as it came, bound for the dead-letter topic with ``reason``."""
    return DeadLetter(
        message.key, message.value, reason, message.topic, message.partition, message.offset
    )


class SensorRoster:
    """The sensors one worker holds, oldest seen first, at most ``limit``.

    Sensors silent for ``ttl_s`` (whose windows Redis has expired) and the sensors of
    revoked partitions no longer count.
    """

    def __init__(self, limit: int, ttl_s: float) -> None:
        self.limit = limit
        self.ttl_s = ttl_s
        self._seen: OrderedDict[str, tuple[Partition, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._seen)

    def admit(self, sensor_id: str, partition: Partition, now_s: float) -> None:
        """Track the sensor (seen at ``now_s``), or raise ``InvalidReading`` when the
        worker holds too many."""
        if sensor_id in self._seen:
            self._seen[sensor_id] = (partition, now_s)
            self._seen.move_to_end(sensor_id)
            return
        expired_before_s = now_s - self.ttl_s
        while self._seen and next(iter(self._seen.values()))[1] < expired_before_s:
            self._seen.popitem(last=False)
        if len(self._seen) >= self.limit:
            raise InvalidReading(
                f"too_many_sensors: this worker already holds {self.limit} sensors "
                "(limits.max_sensors_per_worker)"
            )
        self._seen[sensor_id] = (partition, now_s)

    def forget(self, partitions: Iterable[Partition]) -> None:
        """Stop counting the sensors of ``partitions``."""
        gone = set(partitions)
        for sensor_id in [s for s, (part, _) in self._seen.items() if part in gone]:
            del self._seen[sensor_id]
