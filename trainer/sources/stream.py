"""The stream source: the readings topic replayed since ``--since``, minus the alerts."""

from __future__ import annotations

import json
from collections import Counter, deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from stream_detector.config import Settings
from stream_detector.consumer import replay
from stream_detector.schemas import InvalidReading, decode_reading
from trainer.sources.series import (
    DEFAULT_MAX_READINGS_PER_SENSOR,
    Span,
    TrainingData,
    apply_spans,
    build_series,
    consistent_channels,
    iso,
)

# Alerts are replayed from this long before --since, so an alert that opened earlier and is
# still open (or resolves later) is still excluded.
ALERT_LOOKBACK_MS = 7 * 24 * 3600 * 1000


def alert_spans(
    events: Iterable[Mapping[str, Any]], end_ts_ms: int, learn_after_ms: int | None = None
) -> list[Span]:
    """Spans of alerts from their lifecycle events; an unresolved alert lasts to ``end_ts_ms``.

    An alert open for longer than ``learn_after_ms`` is a change of regime rather than an
    anomaly: its span ends that long after its start, so the readings after it are trained
    on and the next model learns the new normal (None: alerts are never trained on).
    """
    starts: dict[str, tuple[str, int]] = {}
    ends: dict[str, int] = {}
    for event in events:
        alert_id = event["alert_id"]
        starts.setdefault(alert_id, (event["sensor_id"], int(event["start_ts_ms"])))
        if event.get("state") == "resolved" and event.get("end_ts_ms") is not None:
            ends[alert_id] = max(int(event["end_ts_ms"]), int(event["event_ts_ms"]))
    longest = end_ts_ms if learn_after_ms is None else learn_after_ms
    return [
        Span(sensor_id, start, min(ends.get(alert_id, end_ts_ms), start + longest), "alert")
        for alert_id, (sensor_id, start) in sorted(starts.items(), key=lambda item: item[1])
    ]


def read_stream(
    settings: Settings,
    model_name: str,
    since_ms: int,
    *,
    window_length: int,
    now_ms: int,
    max_readings_per_sensor: int = DEFAULT_MAX_READINGS_PER_SENSOR,
    margin_windows: float = 1.0,
    learn_alerts_after_ms: int | None = None,
    incidents: Sequence[Span] = (),
    progress: Callable[[int], None] | None = None,
) -> TrainingData:
    """Replay the readings of ``model_name``'s sensors since ``since_ms``, minus alerts.

    Kafka settings (brokers, topics, security) are the worker's. Invalid readings are
    skipped (counted in ``dropped``), as are readings stamped before ``since_ms``. An
    alert is left out for at most ``learn_alerts_after_ms`` (`alert_spans`).
    """
    kafka = settings.kafka
    config = {**kafka.extra, "client.id": f"{kafka.instance_id}-trainer"}
    group_id = f"{kafka.group_id}-trainer-replay"
    buffers: dict[str, deque[tuple[int, tuple[float, ...]]]] = {}
    dropped: Counter[str] = Counter()
    routed: dict[str, bool] = {}
    count = 0
    for message in replay(
        kafka.bootstrap_servers, kafka.topics.readings, since_ms, config=config, group_id=group_id
    ):
        count += 1
        if progress is not None and count % 10_000 == 0:
            progress(count)
        try:
            reading = decode_reading(
                message.key,
                message.value,
                expected_channels=None,
                limits=settings.limits,
                now_ms=now_ms,
            )
        except InvalidReading as error:
            dropped[f"invalid_{error.code}"] += 1
            continue
        sensor_id = reading.sensor_id
        if sensor_id not in routed:
            routed[sensor_id] = settings.model.model_for(sensor_id) == model_name
        if not routed[sensor_id]:
            dropped["other_models"] += 1
            continue
        if reading.ts_ms < since_ms:
            dropped["before_since"] += 1
            continue
        buffer = buffers.get(sensor_id)
        if buffer is None:
            buffer = buffers[sensor_id] = deque(maxlen=max_readings_per_sensor)
        if len(buffer) == max_readings_per_sensor:
            dropped["over_cap_oldest"] += 1
        buffer.append((reading.ts_ms, reading.values))
    series = {}
    for sensor_id, buffer in buffers.items():
        width = Counter(len(values) for _, values in buffer).most_common(1)[0][0]
        rows = [(ts, values) for ts, values in buffer if len(values) == width]
        dropped["other_channel_count"] += len(buffer) - len(rows)
        ts_ms = np.fromiter((ts for ts, _ in rows), dtype=np.int64, count=len(rows))
        values = np.asarray([values for _, values in rows], dtype=np.float32).reshape(-1, width)
        series[sensor_id] = build_series(sensor_id, ts_ms, values, dropped)
    series = consistent_channels(series, dropped)
    events = []
    for message in replay(
        kafka.bootstrap_servers,
        kafka.topics.alerts,
        since_ms - ALERT_LOOKBACK_MS,
        config=config,
        group_id=group_id,
    ):
        try:
            event = json.loads(message.value or b"")
        except ValueError:
            dropped["unreadable_alert_events"] += 1
            continue
        if isinstance(event, dict) and event.get("sensor_id") in series:
            events.append(event)
    end_ts_ms = max((int(s.ts_ms[-1]) for s in series.values()), default=now_ms)
    data = TrainingData(
        series=series,
        source={
            "kind": "kafka",
            "topic": kafka.topics.readings,
            "alerts_topic": kafka.topics.alerts,
            "since": iso(since_ms),
            "messages_read": count,
            "max_readings_per_sensor": max_readings_per_sensor,
        },
        excluded_spans=[
            span
            for span in alert_spans(events, end_ts_ms, learn_alerts_after_ms)
            if span.end_ts_ms >= since_ms
        ],
        incidents=[span for span in incidents if span.sensor_id in series],
        dropped=dropped,
    )
    return apply_spans(data, margin_windows, window_length)
