"""What every training-data source yields: per-sensor series, the spans not to train on,
and the time parsing, gap segmentation and exclusion they share."""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np

from stream_detector.series_files import DataFormatError, parse_time_ms

logger = logging.getLogger(__name__)

DEFAULT_MAX_READINGS_PER_SENSOR = 200_000
DEFAULT_GAP_FACTOR = 3.0
DEFAULT_FILE_INTERVAL_MS = 60_000

_DURATION = re.compile(r"^(?P<amount>\d+(?:\.\d+)?)(?P<unit>[smhdw])$")
_UNIT_MS = {"s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000, "w": 604_800_000}


@dataclass(frozen=True)
class Span:
    """A time range of one sensor, inclusive: an alert, an incident or a labelled anomaly."""

    sensor_id: str
    start_ts_ms: int
    end_ts_ms: int
    source: str  # "alert", "incident" or "label"

    def to_dict(self) -> dict[str, Any]:
        return {
            "sensor_id": self.sensor_id,
            "start": iso(self.start_ts_ms),
            "end": iso(self.end_ts_ms),
            "source": self.source,
        }


@dataclass(frozen=True, eq=False)
class SensorSeries:
    """One sensor's readings in time order; ``excluded`` marks readings never trained on."""

    sensor_id: str
    ts_ms: np.ndarray  # (T,) int64, strictly increasing
    values: np.ndarray  # (T, C) float32
    excluded: np.ndarray  # (T,) bool

    @property
    def channels(self) -> int:
        return int(self.values.shape[1])

    @property
    def interval_ms(self) -> float:
        """The median sampling interval (1 ms for a single reading)."""
        return median_interval_ms(self.ts_ms)


@dataclass(eq=False)
class TrainingData:
    """Everything a source read, ready to be windowed."""

    series: dict[str, SensorSeries]
    source: dict[str, Any]
    excluded_spans: list[Span] = field(default_factory=list)
    incidents: list[Span] = field(default_factory=list)
    dropped: Counter[str] = field(default_factory=Counter)

    @property
    def channels(self) -> int:
        return next(iter(self.series.values())).channels

    def digest(self) -> str:
        """sha256 of the data as trained on: same readings and exclusions, same digest."""
        digest = hashlib.sha256()
        for sensor_id in sorted(self.series):
            series = self.series[sensor_id]
            digest.update(sensor_id.encode() + b"\x00")
            for array in (series.ts_ms, series.values, series.excluded):
                digest.update(np.ascontiguousarray(array).tobytes())
        for span in sorted(self.incidents, key=lambda s: (s.sensor_id, s.start_ts_ms)):
            digest.update(json.dumps(span.to_dict(), sort_keys=True).encode())
        return digest.hexdigest()

    def summary(self) -> dict[str, Any]:
        """What the report says about the data."""
        starts = [int(s.ts_ms[0]) for s in self.series.values()]
        ends = [int(s.ts_ms[-1]) for s in self.series.values()]
        return {
            **self.source,
            "range": {"start": iso(min(starts)), "end": iso(max(ends))},
            "sensors": {
                sensor_id: {
                    "readings": len(series.ts_ms),
                    "excluded_readings": int(series.excluded.sum()),
                    "channels": series.channels,
                    "interval_s": round(series.interval_ms / 1000, 3),
                    "start": iso(int(series.ts_ms[0])),
                    "end": iso(int(series.ts_ms[-1])),
                }
                for sensor_id, series in sorted(self.series.items())
            },
            "excluded_spans": [span.to_dict() for span in self.excluded_spans],
            "incidents": [span.to_dict() for span in self.incidents],
            "dropped_readings": dict(sorted(self.dropped.items())),
        }


def iso(ts_ms: int) -> str:
    """An epoch-ms timestamp as ISO-8601 UTC."""
    return datetime.fromtimestamp(ts_ms / 1000, UTC).isoformat(timespec="seconds")


def parse_since(text: str, now_ms: int) -> int:
    """The start time of ``--since``: a duration back from now (``7d``, ``12h``) or a time."""
    match = _DURATION.match(text.strip())
    if match:
        return now_ms - round(float(match["amount"]) * _UNIT_MS[match["unit"]])
    try:
        return parse_time_ms(text)
    except DataFormatError:
        raise DataFormatError(
            f"--since {text!r}: give a duration such as 7d, 12h, 30m, 2w, or an ISO-8601 time"
        ) from None


def median_interval_ms(ts_ms: np.ndarray) -> float:
    """The median difference between consecutive timestamps (1 ms when undefined)."""
    if len(ts_ms) < 2:
        return 1.0
    return max(float(np.median(np.diff(ts_ms))), 1.0)


def segments(ts_ms: np.ndarray, usable: np.ndarray, gap_factor: float) -> list[tuple[int, int]]:
    """Maximal runs ``[start, stop)`` of usable readings with no gap over gap_factor intervals."""
    if len(ts_ms) == 0:
        return []
    limit = gap_factor * median_interval_ms(ts_ms)
    breaks = np.ones(len(ts_ms), dtype=bool)  # True: a segment cannot continue into i
    breaks[1:] = (np.diff(ts_ms) > limit) | ~usable[:-1]
    runs = []
    start = None
    for index in range(len(ts_ms)):
        if not usable[index]:
            if start is not None:
                runs.append((start, index))
            start = None
            continue
        if start is None or breaks[index]:
            if start is not None:
                runs.append((start, index))
            start = index
    if start is not None:
        runs.append((start, len(ts_ms)))
    return runs


def exclusion_mask(ts_ms: np.ndarray, spans: Iterable[Span], margin_ms: float) -> np.ndarray:
    """True for readings inside any span widened by ``margin_ms`` on both sides."""
    mask = np.zeros(len(ts_ms), dtype=bool)
    for span in spans:
        mask |= (ts_ms >= span.start_ts_ms - margin_ms) & (ts_ms <= span.end_ts_ms + margin_ms)
    return mask


def build_series(
    sensor_id: str, ts_ms: np.ndarray, values: np.ndarray, dropped: Counter[str]
) -> SensorSeries:
    order = np.argsort(ts_ms, kind="stable")
    ts_ms, values = ts_ms[order], values[order]
    # A replayed or resent reading repeats its timestamp: keep the last one.
    keep = np.ones(len(ts_ms), dtype=bool)
    keep[:-1] = ts_ms[1:] != ts_ms[:-1]
    dropped["duplicate_ts"] += int((~keep).sum())
    return SensorSeries(
        sensor_id,
        np.ascontiguousarray(ts_ms[keep], dtype=np.int64),
        np.ascontiguousarray(values[keep], dtype=np.float32),
        np.zeros(int(keep.sum()), dtype=bool),
    )


def consistent_channels(
    series: dict[str, SensorSeries], dropped: Counter[str]
) -> dict[str, SensorSeries]:
    """Keep the sensors with the most common channel count (one model, one input shape)."""
    counts = Counter(s.channels for s in series.values())
    if len(counts) <= 1:
        return series
    channels = counts.most_common(1)[0][0]
    odd = sorted(sensor for sensor, s in series.items() if s.channels != channels)
    logger.warning(
        "sensors %s have another channel count than the other %d sensors (%d); skipped",
        odd,
        counts[channels],
        channels,
    )
    dropped["other_channel_count"] += sum(len(series[sensor].ts_ms) for sensor in odd)
    return {sensor: s for sensor, s in series.items() if s.channels == channels}


def apply_spans(data: TrainingData, margin_windows: float, window_length: int) -> TrainingData:
    """Mark readings inside excluded spans and incidents (plus the margin) as excluded."""
    by_sensor: dict[str, list[Span]] = {}
    for span in [*data.excluded_spans, *data.incidents]:
        by_sensor.setdefault(span.sensor_id, []).append(span)
    for sensor_id, spans in by_sensor.items():
        series = data.series.get(sensor_id)
        if series is None:
            continue
        margin_ms = margin_windows * window_length * series.interval_ms
        excluded = series.excluded | exclusion_mask(series.ts_ms, spans, margin_ms)
        data.series[sensor_id] = SensorSeries(sensor_id, series.ts_ms, series.values, excluded)
    return data


def parse_learn_after(text: str) -> int | None:
    """``--learn-alerts-after``: a duration (``1d``, ``12h``) in ms, or None for ``never``."""
    if text.strip() == "never":
        return None
    match = _DURATION.match(text.strip())
    if not match:
        raise DataFormatError(
            f"--learn-alerts-after {text!r}: give a duration such as 1d, 12h, 30m, or never"
        )
    return round(float(match["amount"]) * _UNIT_MS[match["unit"]])
