"""Training data for the retraining job: replayed from the readings topic, or read from files.

Every source yields per-sensor series (timestamps, values ``[T, C]``) plus the spans that
must not be trained on: alerts (from ``open`` to ``resolved``, still-open alerts to the end
of the data) and labelled incidents, each widened by a margin of one window length of the
sensor's sampling interval on both sides (an alert starts at the end of the first window
that breached, so the anomaly began up to a window earlier).

Memory: at most ``max_readings_per_sensor`` readings are kept per sensor; when a sensor
has more, its oldest readings are dropped (the newest data is what a retrain is for), and
the report counts them.

Gaps and irregular sampling: a sensor's sampling interval is the median of the
differences between its consecutive timestamps. Its readings are cut into segments
wherever two consecutive readings are more than ``gap_factor`` (default 3) intervals
apart, and wherever an excluded span or a split boundary falls. Windows are taken inside
segments only, so no window crosses a gap, an alert or the train/calibration/hold-out
boundaries; nothing is interpolated. Jitter below the gap factor is kept as it is: the
worker, too, windows readings by count, not by clock time.

Splits (per sensor, by time): the oldest part trains, the next ``calibration_fraction``
calibrates thresholds, the newest ``holdout_fraction`` is held back for the promotion gate.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import json
import logging
import math
import re
from collections import Counter, deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np

from stream_detector.config import Settings
from stream_detector.consumer import replay
from stream_detector.schemas import InvalidReading, decode_reading
from trainer.data import DataFormatError, DataNotFoundError, load_npz, load_ucr, parse_ucr_name

logger = logging.getLogger(__name__)

DEFAULT_MAX_READINGS_PER_SENSOR = 200_000
DEFAULT_GAP_FACTOR = 3.0
DEFAULT_FILE_INTERVAL_MS = 60_000
# Alerts are replayed from this long before --since, so an alert that opened earlier and is
# still open (or resolves later) is still excluded.
ALERT_LOOKBACK_MS = 7 * 24 * 3600 * 1000
NAB_WINDOWS = Path("labels") / "combined_windows.json"

_DURATION = re.compile(r"^(?P<amount>\d+(?:\.\d+)?)(?P<unit>[smhdw])$")
_UNIT_MS = {"s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000, "w": 604_800_000}
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_ONE_MS = timedelta(milliseconds=1)


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


@dataclass(frozen=True, eq=False)
class SensorWindows:
    """Windows of one sensor and the timestamp of each window's last reading."""

    windows: np.ndarray  # (N, C, L) float32
    end_ts_ms: np.ndarray  # (N,) int64


@dataclass(frozen=True, eq=False)
class Splits:
    """Training windows (all sensors, oldest first) and per-sensor calibration/hold-out."""

    train: np.ndarray  # (N, C, L) float32
    calibration: dict[str, SensorWindows]
    holdout: dict[str, SensorWindows]

    def summary(self) -> dict[str, int]:
        return {
            "train_windows": len(self.train),
            "calibration_windows": sum(len(w.end_ts_ms) for w in self.calibration.values()),
            "holdout_windows": sum(len(w.end_ts_ms) for w in self.holdout.values()),
        }


def iso(ts_ms: int) -> str:
    """An epoch-ms timestamp as ISO-8601 UTC."""
    return datetime.fromtimestamp(ts_ms / 1000, UTC).isoformat(timespec="seconds")


def parse_time_ms(text: str | int | float) -> int:
    """Epoch milliseconds from a number (epoch ms) or an ISO-8601 string (UTC if naive)."""
    if isinstance(text, int | float) and not isinstance(text, bool):
        return int(text)
    if isinstance(text, str):
        stripped = text.strip()
        if re.fullmatch(r"-?\d+(\.\d+)?", stripped):
            return int(float(stripped))
        try:
            parsed = datetime.fromisoformat(stripped)
        except ValueError:
            pass
        else:
            if parsed.tzinfo is None:
                parsed = parsed.replace(tzinfo=UTC)
            return (parsed - _EPOCH) // _ONE_MS
    raise DataFormatError(f"{text!r} is neither epoch milliseconds nor an ISO-8601 time")


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


def _windows_of(
    series: SensorSeries, usable: np.ndarray, length: int, stride: int, gap_factor: float
) -> SensorWindows:
    chunks, ends = [], []
    for start, stop in segments(series.ts_ms, usable, gap_factor):
        if stop - start < length:
            continue
        view = np.lib.stride_tricks.sliding_window_view(series.values[start:stop], length, axis=0)
        chunks.append(view[::stride])  # (n, C, L)
        ends.append(series.ts_ms[start + length - 1 : stop : stride])
    if not chunks:
        channels = series.channels
        return SensorWindows(np.zeros((0, channels, length), np.float32), np.zeros(0, np.int64))
    return SensorWindows(
        np.ascontiguousarray(np.concatenate(chunks), dtype=np.float32), np.concatenate(ends)
    )


def split_windows(
    data: TrainingData,
    window_length: int,
    stride: int,
    *,
    calibration_fraction: float = 0.25,
    holdout_fraction: float = 0.15,
    gap_factor: float = DEFAULT_GAP_FACTOR,
) -> Splits:
    """Window each sensor's usable readings into train, calibration and hold-out splits."""
    if calibration_fraction <= 0 or holdout_fraction <= 0:
        raise ValueError("calibration and hold-out fractions must be positive")
    if calibration_fraction + holdout_fraction >= 0.9:
        raise ValueError(
            "calibration_fraction + holdout_fraction must leave at least 10% to train on"
        )
    train_parts: list[SensorWindows] = []
    calibration, holdout = {}, {}
    for sensor_id, series in sorted(data.series.items()):
        usable = ~series.excluded
        order = np.flatnonzero(usable)
        if len(order) == 0:
            continue
        # Cut by the timestamps of usable readings, so exclusions do not skew the shares.
        cal_cut = series.ts_ms[
            order[
                min(int(len(order) * (1 - calibration_fraction - holdout_fraction)), len(order) - 1)
            ]
        ]
        hold_cut = series.ts_ms[
            order[min(int(len(order) * (1 - holdout_fraction)), len(order) - 1)]
        ]
        region = np.where(series.ts_ms >= hold_cut, 2, np.where(series.ts_ms >= cal_cut, 1, 0))
        parts = [
            _windows_of(series, usable & (region == r), window_length, stride, gap_factor)
            for r in range(3)
        ]
        train_parts.append(parts[0])
        calibration[sensor_id], holdout[sensor_id] = parts[1], parts[2]
    if train_parts:
        ends = np.concatenate([p.end_ts_ms for p in train_parts])
        stacked = np.concatenate([p.windows for p in train_parts])
        # Oldest first, so the trainer's validation split (the end) is the most recent data.
        train = np.ascontiguousarray(stacked[np.argsort(ends, kind="stable")])
    else:
        train = np.zeros((0, data.channels if data.series else 1, window_length), np.float32)
    return Splits(train, calibration, holdout)


def incident_windows(
    series: SensorSeries,
    incident: Span,
    window_length: int,
    stride: int,
    gap_factor: float = DEFAULT_GAP_FACTOR,
) -> SensorWindows:
    """Windows around an incident: from two windows before it to one window after it.

    Exclusions do not apply (the incident is what is being looked at); gaps still do.
    """
    reach_ms = window_length * series.interval_ms
    around = (series.ts_ms >= incident.start_ts_ms - 2 * reach_ms) & (
        series.ts_ms <= incident.end_ts_ms + reach_ms
    )
    return _windows_of(series, around, window_length, stride, gap_factor)


def _build_series(
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


def _consistent_channels(
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


def _apply_spans(data: TrainingData, margin_windows: float, window_length: int) -> TrainingData:
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
        series[sensor_id] = _build_series(sensor_id, ts_ms, values, dropped)
    series = _consistent_channels(series, dropped)
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
    return _apply_spans(data, margin_windows, window_length)


def _nab_labels(path: Path) -> tuple[str, list[list[str]]] | None:
    """(name inside data/, labelled windows) when ``path`` lies in a NAB folder."""
    for parent in path.resolve().parents:
        labels = parent / NAB_WINDOWS
        if labels.is_file() and (parent / "data") in path.resolve().parents:
            name = path.resolve().relative_to(parent / "data").as_posix()
            windows = json.loads(labels.read_text())
            return (name, windows[name]) if name in windows else None
    return None


def _read_csv(
    path: Path, columns: Sequence[str] | None
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """sensor -> (ts_ms, values) of a CSV with a header: optional ``timestamp``/``ts`` and
    ``sensor_id`` columns; the value columns are ``columns`` or every other column."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", newline="") as handle:
        reader = csv.DictReader(handle)
        header = list(reader.fieldnames or [])
        time_column = next((c for c in ("timestamp", "ts", "time") if c in header), None)
        value_columns = (
            list(columns)
            if columns
            else [c for c in header if c not in {time_column, "sensor_id", "label"}]
        )
        missing = [c for c in value_columns if c not in header]
        if missing or not value_columns:
            raise DataFormatError(
                f"{path}: value columns {missing or value_columns} not in the header {header}; "
                "name them with --columns"
            )
        rows: dict[str, list[tuple[int, list[float]]]] = {}
        for line, row in enumerate(reader, start=2):
            try:
                values = [float(row[c]) for c in value_columns]
                ts_ms = (
                    parse_time_ms(row[time_column])
                    if time_column
                    else (line - 2) * DEFAULT_FILE_INTERVAL_MS
                )
            except (TypeError, ValueError) as error:
                raise DataFormatError(f"{path}:{line}: {error}") from error
            if not all(math.isfinite(v) for v in values):
                raise DataFormatError(f"{path}:{line}: NaN or infinite value")
            sensor_id = row.get("sensor_id") or _sensor_name(path)
            rows.setdefault(sensor_id, []).append((ts_ms, values))
    if not rows:
        raise DataFormatError(f"{path}: no rows")
    return {
        sensor: (
            np.array([ts for ts, _ in data], dtype=np.int64),
            np.array([v for _, v in data], dtype=np.float32),
        )
        for sensor, data in rows.items()
    }


def _sensor_name(path: Path) -> str:
    name = path.name
    for suffix in (".gz", ".csv", ".npz", ".txt"):
        name = name.removesuffix(suffix)
    return name


def read_files(
    paths: Sequence[Path],
    *,
    window_length: int,
    columns: Sequence[str] | None = None,
    interval_ms: int = DEFAULT_FILE_INTERVAL_MS,
    max_readings_per_sensor: int = DEFAULT_MAX_READINGS_PER_SENSOR,
    margin_windows: float = 1.0,
    incidents: Sequence[Span] = (),
) -> TrainingData:
    """Read CSV, NAB, UCR and npz files; one sensor per file (or per ``sensor_id`` value).

    - CSV (``.csv``, ``.csv.gz``): header row; ``timestamp``/``ts``/``time`` (ISO-8601 or
      epoch ms) is optional, a ``sensor_id`` column is optional. A NAB file (inside a NAB
      folder with ``labels/combined_windows.json``) gets its labelled windows as
      incidents: excluded from training, checked by the gate.
    - UCR archive files (``NNN_UCR_Anomaly_...txt``): the labelled anomaly is an incident.
    - ``.npz`` with one array ``[T]`` or ``[T, C]``.
    Files without timestamps get one reading every ``interval_ms`` from the epoch.
    """
    if not paths:
        raise DataNotFoundError("--from-files needs at least one file")
    dropped: Counter[str] = Counter()
    raw: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    labelled: list[Span] = []
    for path in paths:
        path = Path(path)
        if not path.is_file():
            raise DataNotFoundError(f"no such file: {path}")
        name = path.name
        if name.endswith((".csv", ".csv.gz")):
            found = _read_csv(path, columns)
            nab = _nab_labels(path)
            if nab is not None and len(found) == 1:
                (sensor_id,) = found
                labelled += [
                    Span(sensor_id, parse_time_ms(start), parse_time_ms(end), "label")
                    for start, end in nab[1]
                ]
        elif name.endswith(".npz"):
            values = load_npz(path)
            found = {_sensor_name(path): (np.arange(len(values)) * interval_ms, values)}
        elif name.endswith((".txt", ".txt.gz")):
            parse_ucr_name(path)  # a clear error for a .txt that is not a UCR series
            ucr = load_ucr(path)
            sensor_id = _sensor_name(path)
            found = {sensor_id: (np.arange(len(ucr.values)) * interval_ms, ucr.values)}
            labelled.append(
                Span(
                    sensor_id,
                    (ucr.anomaly_begin - 1) * interval_ms,
                    (ucr.anomaly_end - 1) * interval_ms,
                    "label",
                )
            )
        else:
            raise DataFormatError(
                f"{path}: unknown file type; --from-files reads .csv[.gz], .npz and UCR "
                "archive .txt[.gz] files"
            )
        for sensor_id, (ts_ms, values) in found.items():
            if sensor_id in raw:
                raise DataFormatError(f"sensor {sensor_id!r} comes from two files; rename one")
            if len(ts_ms) > max_readings_per_sensor:
                dropped["over_cap_oldest"] += len(ts_ms) - max_readings_per_sensor
                ts_ms, values = ts_ms[-max_readings_per_sensor:], values[-max_readings_per_sensor:]
            raw[sensor_id] = (np.asarray(ts_ms, np.int64), np.asarray(values, np.float32))
    series = {
        sensor_id: _build_series(sensor_id, ts_ms, values, dropped)
        for sensor_id, (ts_ms, values) in raw.items()
    }
    series = _consistent_channels(series, dropped)
    data = TrainingData(
        series=series,
        source={"kind": "files", "files": [str(p) for p in paths]},
        incidents=[s for s in [*labelled, *incidents] if s.sensor_id in series],
        dropped=dropped,
    )
    return _apply_spans(data, margin_windows, window_length)


def read_incidents(path: Path) -> list[Span]:
    """Labelled incidents: a JSON list of ``[sensor, start, end]`` (or objects with
    ``sensor_id``, ``start``, ``end``); times are epoch ms or ISO-8601."""
    try:
        entries = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise DataNotFoundError(f"--incidents: no such file {path}") from None
    except json.JSONDecodeError as error:
        raise DataFormatError(f"--incidents {path}: not JSON ({error})") from error
    if not isinstance(entries, list):
        raise DataFormatError(f"--incidents {path}: expected a JSON list of [sensor, start, end]")
    spans = []
    for number, entry in enumerate(entries):
        if isinstance(entry, dict):
            entry = [entry.get("sensor_id"), entry.get("start"), entry.get("end")]
        if not (isinstance(entry, list) and len(entry) == 3 and isinstance(entry[0], str)):
            raise DataFormatError(
                f"--incidents {path}: entry {number} must be [sensor, start, end], got {entry!r}"
            )
        start, end = parse_time_ms(entry[1]), parse_time_ms(entry[2])
        if end < start:
            raise DataFormatError(f"--incidents {path}: entry {number} ends before it starts")
        spans.append(Span(entry[0], start, end, "incident"))
    return spans
