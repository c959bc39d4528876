"""Windows from training data: the train / calibration / hold-out split by time, and the
windows of labelled incidents."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from trainer.sources.series import DEFAULT_GAP_FACTOR, SensorSeries, Span, TrainingData, segments


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


def _window_views(
    series: SensorSeries, usable: np.ndarray, length: int, stride: int, gap_factor: float
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Each gap-free stretch of usable readings as windows at ``stride`` (n, C, L), a view
    that copies nothing, and the index of each window's last reading (n,)."""
    for start, stop in segments(series.ts_ms, usable, gap_factor):
        if stop - start < length:
            continue
        view = np.lib.stride_tricks.sliding_window_view(series.values[start:stop], length, axis=0)
        yield view[::stride], np.arange(start + length - 1, stop, stride)


def _windows_of(
    series: SensorSeries, usable: np.ndarray, length: int, stride: int, gap_factor: float
) -> SensorWindows:
    chunks, ends = [], []
    for view, last in _window_views(series, usable, length, stride, gap_factor):
        chunks.append(view)
        ends.append(series.ts_ms[last])
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


# Places of two sensors' windows lie this far apart, more than any window's length
# (``AnomalyLLM.recent_place``): exact in float64 for 2**21 sensors of 2**32 readings.
SENSOR_PLACES = 2**32


def recent_windows(
    data: TrainingData,
    window_length: int,
    stride: int,
    limit: int,
    gap_factor: float = DEFAULT_GAP_FACTOR,
) -> tuple[np.ndarray, np.ndarray]:
    """Every sensor's windows (N, C, L) of all its readings, alerts included, at ``stride``,
    ending at least ``window_length`` readings before its newest, evenly thinned to at most
    ``limit`` (only those are copied), and each window's place (N,): its last reading's
    index plus the sensor's own ``SENSOR_PLACES`` offset."""
    views, places = [], []
    for number, (_, series) in enumerate(sorted(data.series.items())):
        usable = np.ones(len(series.ts_ms), dtype=bool)
        usable[max(0, len(usable) - window_length) :] = False
        for view, last in _window_views(series, usable, window_length, stride, gap_factor):
            views.append(view)
            places.append(last + number * SENSOR_PLACES)
    total = sum(len(view) for view in views)
    keep = np.linspace(0, total - 1, min(limit, total)).round().astype(np.int64)
    chosen, first = [], 0
    for view in views:
        mine = keep[(keep >= first) & (keep < first + len(view))] - first
        chosen.append(view[mine])
        first += len(view)
    if not chosen:
        return np.zeros((0, data.channels, window_length), np.float32), np.zeros(0)
    windows = np.ascontiguousarray(np.concatenate(chosen), dtype=np.float32)
    return windows, np.concatenate(places)[keep].astype(np.float64)


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
