"""Reference subscriber: tail the alerts topic, de-duplicate by event id, print each change.

The worker's outputs are at-least-once: after a crash or a broker failure an alert event
can arrive twice, always with the same ``event_id`` (alert id + sequence). A subscriber
therefore remembers the ids it has seen; this one keeps the most recent ``capacity``.
"""

from __future__ import annotations

import fnmatch
import json
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from rich.console import Console
from rich.markup import escape

from stream_detector.config import AlertPolicy, Settings
from stream_detector.consumer import ReadingConsumer
from stream_detector.schemas import AlertEvent

_STATE_STYLES = {"open": "bold red", "update": "yellow", "resolved": "green"}


class Deduplicator:
    """Remembers the last ``capacity`` event ids; ``first_time`` is True once per id."""

    def __init__(self, capacity: int = 100_000) -> None:
        self.capacity = capacity
        self._seen: OrderedDict[str, None] = OrderedDict()

    def __contains__(self, event_id: str) -> bool:
        return event_id in self._seen

    def first_time(self, event_id: str) -> bool:
        """True the first time an id is seen (within the remembered window)."""
        if event_id in self._seen:
            self._seen.move_to_end(event_id)
            return False
        self._seen[event_id] = None
        if len(self._seen) > self.capacity:
            self._seen.popitem(last=False)
        return True


def parse_event(value: bytes | None) -> AlertEvent:
    """An alert event from its JSON; ValueError when the message is not one."""
    if not value:
        raise ValueError("empty message")
    data: dict[str, Any] = json.loads(value)
    if not isinstance(data, dict):
        raise ValueError("alert event is not a JSON object")
    data.pop("schema_version", None)
    event_id = data.pop("event_id", None)
    try:
        data["channel_attribution"] = tuple(data["channel_attribution"])
        event = AlertEvent(**data)
    except (KeyError, TypeError) as error:
        raise ValueError(f"not an alert event: {error}") from None
    if event_id is not None and event_id != event.event_id:
        raise ValueError(f"event_id {event_id!r} does not match alert_id and sequence")
    return event


@dataclass(frozen=True)
class AlertFilter:
    """Which events to show: sensor id glob and lowest severity."""

    sensor_glob: str = "*"
    min_severity: str | None = None

    def matches(self, event: AlertEvent, policy: AlertPolicy) -> bool:
        """Whether ``event`` passes the filter (unknown severities rank lowest)."""
        if not fnmatch.fnmatchcase(event.sensor_id, self.sensor_glob):
            return False
        if self.min_severity is None:
            return True
        ranks = {name: rank for rank, (name, _) in enumerate(policy.bands_ascending)}
        return ranks.get(event.severity, -1) >= ranks[self.min_severity]


def _iso(ts_ms: int | None) -> str:
    if ts_ms is None:
        return "-"
    return datetime.fromtimestamp(ts_ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def format_line(event: AlertEvent) -> str:
    """One human-readable line (rich markup) per lifecycle change."""
    style = _STATE_STYLES.get(event.state, "")
    span = f"{_iso(event.start_ts_ms)} .. {_iso(event.end_ts_ms)}"
    return (
        f"[{style}]{event.state.upper():8}[/] {escape(event.severity):8} "
        f"sensor={escape(event.sensor_id)} span={span} peak={event.peak_score:.3f} "
        f"threshold={event.threshold:.3f} model={escape(event.model_version)} "
        f"id={event.event_id}"
    )


def format_json(event: AlertEvent) -> str:
    """The event as one JSON line, as published."""
    return event.to_json().decode()


def tail_events(
    settings: Settings,
    *,
    from_beginning: bool,
    stop: threading.Event,
    timeout_s: float | None = None,
) -> Iterator[AlertEvent]:
    """Yield de-duplicated alert events until ``stop`` is set or ``timeout_s`` passes."""
    consumer = ReadingConsumer(
        settings.kafka.bootstrap_servers,
        f"{settings.kafka.group_id}-alerts-tail-{uuid.uuid4().hex[:8]}",
        [settings.kafka.topics.alerts],
        config={
            **settings.kafka.extra,
            "session.timeout.ms": settings.kafka.session_timeout_ms,
            "auto.offset.reset": "earliest" if from_beginning else "latest",
        },
    )
    seen = Deduplicator()
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    try:
        while not stop.is_set() and (deadline is None or time.monotonic() < deadline):
            for message in consumer.poll_batch(500, 0.5):
                try:
                    event = parse_event(message.value)
                except ValueError:
                    continue
                if seen.first_time(event.event_id):
                    yield event
    finally:
        consumer.close()


def run(
    settings: Settings,
    *,
    alert_filter: AlertFilter,
    from_beginning: bool,
    as_json: bool,
    stop: threading.Event,
    timeout_s: float | None = None,
    max_events: int | None = None,
    print_line: Callable[[str], None] | None = None,
) -> int:
    """Print each matching lifecycle change; returns the number printed."""
    console = Console(highlight=False, soft_wrap=True)
    emit = print_line or ((lambda line: print(line, flush=True)) if as_json else console.print)
    printed = 0
    events = tail_events(settings, from_beginning=from_beginning, stop=stop, timeout_s=timeout_s)
    for event in events:
        if not alert_filter.matches(event, settings.alerts):
            continue
        emit(format_json(event) if as_json else format_line(event))
        printed += 1
        if max_events is not None and printed >= max_events:
            break
    events.close()
    return printed
