"""The reference subscriber de-duplicates by event id, filters, and prints each change."""

from __future__ import annotations

import json

import pytest

from stream_detector.config import AlertPolicy
from stream_detector.schemas import AlertEvent
from stream_detector.subscriber import AlertFilter, Deduplicator, format_line, parse_event

pytestmark = pytest.mark.unit


def event(sequence: int = 0, sensor_id: str = "pump-1", severity: str = "major") -> AlertEvent:
    return AlertEvent(
        alert_id="a" * 20,
        sequence=sequence,
        sensor_id=sensor_id,
        state="open" if sequence == 0 else "update",
        severity=severity,
        start_ts_ms=1_700_000_000_000,
        end_ts_ms=None,
        event_ts_ms=1_700_000_060_000,
        peak_score=3.0,
        threshold=1.5,
        model_version="v1",
        nearest_prototype=2,
        channel_attribution=(1.0,),
    )


def test_each_event_id_passes_once() -> None:
    seen = Deduplicator()
    ids = [event(0).event_id, event(1).event_id, event(0).event_id, event(1).event_id]
    assert [seen.first_time(i) for i in ids] == [True, True, False, False]


def test_the_oldest_ids_are_forgotten_beyond_capacity() -> None:
    seen = Deduplicator(capacity=2)
    for event_id in ("a", "b", "c"):
        seen.first_time(event_id)
    assert seen.first_time("c") is False
    assert seen.first_time("a") is True  # forgotten, so shown again


def test_published_json_parses_back_to_the_same_event() -> None:
    original = event(3)
    assert parse_event(original.to_json()) == original


@pytest.mark.parametrize(
    "value",
    [
        b"",
        b"[]",
        b"{}",
        b"not json",
        json.dumps({**json.loads(event().to_json()), "event_id": "x:9"}).encode(),
    ],
)
def test_messages_that_are_not_alert_events_are_refused(value: bytes) -> None:
    with pytest.raises(ValueError):
        parse_event(value)


def test_filter_by_sensor_glob_and_lowest_severity() -> None:
    policy = AlertPolicy()
    majors = AlertFilter(sensor_glob="pump-*", min_severity="major")
    assert majors.matches(event(severity="critical"), policy)
    assert majors.matches(event(severity="major"), policy)
    assert not majors.matches(event(severity="warning"), policy)
    assert not majors.matches(event(sensor_id="fan-1", severity="critical"), policy)
    assert AlertFilter().matches(event(severity="warning"), policy)


def test_a_line_names_state_sensor_span_and_id() -> None:
    line = format_line(event(0))
    assert "OPEN" in line and "sensor=pump-1" in line
    assert "2023-11-14 22:13:20Z" in line
    assert event(0).event_id in line
