"""Ingest turns a message into a reading or a dead letter; recovery decides what a rebuild
skips. (The rewinds themselves run against a real broker in tests/reliability.)"""

from __future__ import annotations

import json
import math

import pytest

from stream_detector.config import Limits
from stream_detector.consumer import ConsumedMessage
from stream_detector.ingest import PositionedReading, SensorRoster, dead_letter, decode
from stream_detector.recovery import Recovery, Rewind
from stream_detector.schemas import InvalidReading

pytestmark = pytest.mark.unit

NOW_MS = 1_750_000_000_000
MODELS = {"pump": ("pumps", 1), "fan": ("fans", 2), "valve": ("valves", None)}


def message(value: dict, offset: int = 7, timestamp_ms: int | None = NOW_MS) -> ConsumedMessage:
    """A record of partition 3, keyed by its sensor id as producers key readings."""
    key = str(value.get("sensor_id", "")).encode()
    return ConsumedMessage(key, json.dumps(value).encode(), "readings", 3, offset, timestamp_ms)


def channels_of(sensor_id: str) -> tuple[str, int | None]:
    return MODELS[sensor_id.split("-")[0]]


def test_a_valid_message_becomes_a_reading_that_knows_its_offset() -> None:
    consumed = message({"sensor_id": "fan-1", "ts": NOW_MS, "values": [1.0, 2.0]})
    reading = decode(consumed, Limits(), channels_of, NOW_MS)
    assert PositionedReading.of(reading, consumed) == (
        "fan-1",
        NOW_MS,
        (1.0, 2.0),
        "readings",
        3,
        7,
    )


@pytest.mark.parametrize(
    ("sensor_id", "values", "code"),
    [
        ("valve-1", [1.0], "no_model"),  # its model has no version loaded
        ("fan-1", [1.0], "wrong_channels"),  # the fans' model takes two
    ],
)
def test_a_reading_its_model_cannot_take_is_refused_with_the_reason(
    sensor_id: str, values: list[float], code: str
) -> None:
    consumed = message({"sensor_id": sensor_id, "ts": NOW_MS, "values": values})
    with pytest.raises(InvalidReading) as refused:
        decode(consumed, Limits(), channels_of, NOW_MS)
    assert refused.value.code == code
    letter = dead_letter(consumed, refused.value.reason)
    assert (letter.value, letter.offset, letter.reason) == (
        consumed.value,
        7,
        refused.value.reason,
    )


def test_the_roster_refuses_a_sensor_over_the_limit_until_one_expires_or_goes() -> None:
    roster = SensorRoster(limit=2, ttl_s=60.0)
    roster.admit("a", ("readings", 0), now_s=0.0)
    roster.admit("b", ("readings", 1), now_s=30.0)
    roster.admit("a", ("readings", 0), now_s=40.0)  # seen again: not a new sensor
    with pytest.raises(InvalidReading, match="too_many_sensors"):
        roster.admit("c", ("readings", 0), now_s=50.0)
    roster.admit("c", ("readings", 0), now_s=95.0)  # b, silent for 65 s, has expired
    assert len(roster) == 2
    roster.forget([("readings", 0)])  # a and c's partition was revoked
    assert len(roster) == 0


def test_after_a_rebuild_only_records_older_than_the_lookback_are_skipped() -> None:
    recovery = Recovery(consumer=None, lookback_s=60.0)  # type: ignore[arg-type]
    since_ms, lost = NOW_MS - 60_000, ("readings", 3)
    recovery.rebuilt({lost}, Rewind({lost: 100}, {lost: (since_ms, 150)}, since_ms))
    assert recovery.last_rebuild is not None
    assert recovery.last_rebuild["replay_from"] == {"readings:3": 100}
    other_partition = message({}, offset=100, timestamp_ms=since_ms - 1)._replace(partition=0)
    assert not recovery.skip(other_partition)
    assert recovery.skip(message({}, offset=100, timestamp_ms=since_ms - 1))
    assert not recovery.skip(message({}, offset=101, timestamp_ms=since_ms))  # the lookback
    # ...which ends the skipping: later records are not looked at again.
    assert not recovery.skip(message({}, offset=102, timestamp_ms=since_ms - 1))


def test_a_rewind_counts_the_records_it_reads_again_where_their_end_is_known() -> None:
    rewind = Rewind(
        seeks={("r", 0): 10, ("r", 1): 40, ("r", 2): 5},
        replay={("r", 0): (0, 25), ("r", 1): (0, math.inf)},
        since_ms=0,
    )
    assert rewind.replayed_records() == 15
