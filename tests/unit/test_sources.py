"""Training data from files: gaps, exclusions, the memory cap and the splits."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from trainer.data import DataFormatError
from trainer.sources import (
    Span,
    TrainingData,
    alert_spans,
    parse_learn_after,
    parse_since,
    read_files,
    read_incidents,
    recent_windows,
    segments,
    split_windows,
)
from trainer.sources.series import apply_spans, build_series

pytestmark = pytest.mark.unit

MINUTE_MS = 60_000


def _series_data(ts_ms: np.ndarray, spans: list[Span] = ()) -> TrainingData:
    values = np.arange(len(ts_ms), dtype=np.float32)[:, None]
    series = build_series("s", np.asarray(ts_ms, np.int64), values, Counter())
    data = TrainingData({"s": series}, {"kind": "test"}, excluded_spans=list(spans))
    return apply_spans(data, margin_windows=1.0, window_length=8)


def test_segments_break_at_gaps_longer_than_the_gap_factor() -> None:
    ts = np.array([0, 1, 2, 3, 10, 11, 12, 13, 14, 16, 17], dtype=np.int64) * MINUTE_MS
    usable = np.ones(len(ts), dtype=bool)
    assert segments(ts, usable, gap_factor=3) == [(0, 4), (4, 11)]  # a 2-minute step is jitter
    usable[6] = False
    assert segments(ts, usable, gap_factor=3) == [(0, 4), (4, 6), (7, 11)]


def test_no_training_window_crosses_a_gap_or_an_excluded_span() -> None:
    ts = np.concatenate([np.arange(0, 300), np.arange(400, 1000)]) * MINUTE_MS  # 100-min gap
    alert = Span("s", 600 * MINUTE_MS, 620 * MINUTE_MS, "alert")
    data = _series_data(ts, [alert])
    series = data.series["s"]
    excluded_ts = series.ts_ms[series.excluded]
    # One window length (8 readings at 1 min) of margin on both sides.
    assert excluded_ts.min() == 592 * MINUTE_MS and excluded_ts.max() == 628 * MINUTE_MS

    splits = split_windows(data, 8, 1, calibration_fraction=0.2, holdout_fraction=0.2)
    index_of = {int(v): i for i, v in enumerate(series.values[:, 0])}
    for window in [*splits.train, *splits.calibration["s"].windows, *splits.holdout["s"].windows]:
        positions = [index_of[int(v)] for v in window[0]]
        stamps = series.ts_ms[positions]
        assert np.all(np.diff(positions) == 1)
        assert np.all(np.diff(stamps) == MINUTE_MS), "a window crosses the gap"
        assert not series.excluded[positions].any(), "a window overlaps the alert"
    # The newest slice is held back; calibration comes before it, training before that.
    assert splits.holdout["s"].end_ts_ms.min() > splits.calibration["s"].end_ts_ms.max()


def test_recent_windows_take_alerts_too_but_no_gap_nor_the_newest_window() -> None:
    ts = np.concatenate([np.arange(0, 300), np.arange(400, 1000)]) * MINUTE_MS  # 100-min gap
    data = _series_data(ts, [Span("s", 600 * MINUTE_MS, 620 * MINUTE_MS, "alert")])
    other = build_series("t", ts[:50], np.full((50, 1), -1.0, np.float32), Counter())
    data.series["t"] = other
    windows, places = recent_windows(data, 8, 4, limit=10_000)
    mine = places < 2**32
    for window, place in zip(windows[mine], places[mine], strict=True):
        rows = window[0].astype(int)  # each reading holds its index
        assert np.all(np.diff(rows) == 1), "a window crosses the gap"
        assert rows[-1] == place  # its place: the index of its newest reading
    # The alert's readings are among them; the newest window's are not.
    assert {600, 620} <= set(windows[mine].ravel().astype(int).tolist())
    assert places[mine].max() == 899 - 8 and places[mine].min() == 7  # a window before 899
    # The second sensor's windows lie a sensor's offset away: none overlaps the first's.
    assert places[~mine].min() == 2**32 + 7 and (windows[~mine] == -1).all()
    # Thinned evenly, the first and the last kept.
    thinned, kept = recent_windows(data, 8, 4, limit=20)
    assert len(thinned) == 20 and kept[0] == places[0] and kept[-1] == places[-1]
    assert np.array_equal(thinned[:, 0, -1][kept < 2**32], kept[kept < 2**32])


def test_alert_spans_pair_open_and_resolved_and_keep_open_alerts_open() -> None:
    events = [
        {
            "alert_id": "a",
            "sensor_id": "s",
            "state": "open",
            "start_ts_ms": 100,
            "event_ts_ms": 150,
        },
        {
            "alert_id": "b",
            "sensor_id": "t",
            "state": "open",
            "start_ts_ms": 500,
            "event_ts_ms": 510,
        },
        {
            "alert_id": "a",
            "sensor_id": "s",
            "state": "resolved",
            "start_ts_ms": 100,
            "end_ts_ms": 300,
            "event_ts_ms": 350,
        },
    ]
    assert alert_spans(events, end_ts_ms=9_999) == [
        Span("s", 100, 350, "alert"),
        Span("t", 500, 9_999, "alert"),
    ]
    # Open longer than learn_after_ms: a change of regime, trained on after that long.
    assert alert_spans(events, end_ts_ms=9_999, learn_after_ms=1_000) == [
        Span("s", 100, 350, "alert"),
        Span("t", 500, 1_500, "alert"),
    ]


def test_learn_alerts_after_takes_a_duration_or_never() -> None:
    assert parse_learn_after("1d") == 86_400_000
    assert parse_learn_after("12h") == 43_200_000
    assert parse_learn_after("never") is None
    with pytest.raises(DataFormatError, match="learn-alerts-after"):
        parse_learn_after("tomorrow")


def test_files_keep_the_newest_readings_under_the_cap_and_labels_become_incidents(
    tmp_path: Path,
) -> None:
    csv_path = tmp_path / "pumps.csv"
    rows = ["ts,sensor_id,value"] + [
        f"{i * MINUTE_MS},{sensor},{i}" for i in range(100) for sensor in ("a", "b")
    ]
    csv_path.write_text("\n".join(rows) + "\n")
    ucr = tmp_path / "001_UCR_Anomaly_test_50_60_70.txt"
    ucr.write_text("\n".join(str(np.sin(i / 5)) for i in range(120)))
    data = read_files([csv_path, ucr], window_length=8, max_readings_per_sensor=80)
    assert data.dropped["over_cap_oldest"] == 20 + 20 + 40
    assert data.series["a"].ts_ms[0] == 20 * MINUTE_MS  # the oldest went
    (incident,) = data.incidents
    assert incident.sensor_id == "001_UCR_Anomaly_test_50_60_70" and incident.source == "label"
    assert data.series[incident.sensor_id].excluded.any()


def test_incidents_and_since_are_parsed_or_refused_clearly(tmp_path: Path) -> None:
    path = tmp_path / "incidents.json"
    path.write_text(json.dumps([["s", "2024-01-01T00:00:00", 1704070800000]]))
    assert read_incidents(path) == [Span("s", 1704067200000, 1704070800000, "incident")]
    path.write_text(json.dumps([["s", 5]]))
    with pytest.raises(DataFormatError, match=r"must be \[sensor, start, end\]"):
        read_incidents(path)
    assert parse_since("7d", now_ms=10 * 86_400_000) == 3 * 86_400_000
    with pytest.raises(DataFormatError, match="duration such as 7d"):
        parse_since("last week", now_ms=0)
