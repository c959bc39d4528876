"""The harness's AnomalyLLM detector: window length, columns, where a window's score lands."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from stream_detector.devtools.tiny import tiny_model
from trainer.anomalyllm_detector import (
    AnomalyLLMDetector,
    choose_window_length,
    nearest_peak_score,
    recent_cuts,
)
from trainer.train import sliding_windows

pytestmark = pytest.mark.unit


def test_the_window_is_one_period_of_the_training_data() -> None:
    steps = np.arange(6000)
    noise = 0.05 * np.random.default_rng(0).normal(size=steps.size)
    train = (np.sin(2 * np.pi * steps / 100) + noise)[:, None]
    assert choose_window_length(train) == 104  # 100, rounded up to whole patches of 13


def test_a_window_without_a_period_falls_back_and_a_short_part_caps_it() -> None:
    noise = np.random.default_rng(1).normal(size=(6000, 1))
    assert choose_window_length(noise) == 128
    assert choose_window_length(noise[:100]) == 48  # at most half the training part


def test_each_point_takes_the_score_of_the_window_that_peaks_nearest() -> None:
    # Windows of 40 points every 10 points, peaking at their centres: 20, 30, 40, 50.
    scores = np.array([0.0, 0.0, 5.0, 0.0])
    points = nearest_peak_score(scores, np.array([20, 30, 40, 50]), 70)
    assert int(np.argmax(points)) == 36  # the first point nearer 40 than 30
    assert points[36:46].tolist() == [5.0] * 10  # a tie (45) goes to the earlier window
    assert points[46] == 0.0 and points[0] == 0.0 and points[69] == 0.0
    # The third window's point term found a spike at 57, which the fourth window, peaking
    # at its centre, also covers: the point takes the higher score of the two.
    points = nearest_peak_score(np.array([0.0, 1.0, 5.0, 2.0]), np.array([20, 30, 57, 57]), 70)
    assert int(np.argmax(points)) == 44 and points[44:].tolist() == [5.0] * 26


def test_a_detector_told_a_channel_reads_that_column_and_nothing_else() -> None:
    wide = np.column_stack([np.sin(np.arange(400) / 5), np.zeros((400, 2))])
    wide[300:320, 2] = 1.0  # a command flag that switches on only in the scored part
    model = tiny_model(channels=1, memory_size=64).eval()
    windows = torch.from_numpy(sliding_windows(wide[:200, :1], 32, 1))
    model.calibrate(windows[:140], windows[140:])

    def scores(channel: int | None, series: np.ndarray) -> np.ndarray:
        detector = AnomalyLLMDetector(channel=channel)
        detector.model = model
        return detector.score(series)

    assert np.array_equal(scores(0, wide), scores(None, wide[:, :1]))
    with pytest.raises(ValueError, match="channel 3"):
        scores(3, wide)


def _refreshing_detector(train: np.ndarray, every: int | None) -> AnomalyLLMDetector:
    """A causal detector around a tiny model calibrated on ``train`` (no training)."""
    model = tiny_model(channels=1, memory_size=256).eval()
    windows = sliding_windows(train, 32, 1)
    model.calibrate(torch.from_numpy(windows[:-60]), torch.from_numpy(windows[-60:]))
    detector = AnomalyLLMDetector(causal=True, refresh_every=every, refresh_span=400)
    detector.model, detector.training_rows = model, len(train)
    detector.threshold = detector._threshold(model, windows)
    return detector


def test_a_refreshed_model_follows_a_slow_drift_that_the_fitted_one_calls_anomalous() -> None:
    rows = np.arange(3000)
    noise = 0.05 * np.random.default_rng(2).normal(size=rows.size)
    series = (np.sin(2 * np.pi * rows / 32) + 0.002 * rows + noise)[:, None]
    fitted = _refreshing_detector(series[:400], every=None).score(series)
    refreshing = _refreshing_detector(series[:400], every=100)
    refreshing.refresh_learn_after = 100
    refreshed = refreshing.score(series)
    assert np.array_equal(fitted[:400], refreshed[:400])  # nothing changes before a refresh
    assert refreshed[-500:].mean() < fitted[-500:].mean() / 3


def test_a_refresh_reads_the_trailing_span_and_leaves_the_alerts_out() -> None:
    series = np.arange(1000, dtype=np.float32)[:, None]  # each row holds its index
    detector = _refreshing_detector(np.sin(series[:400] / 5), every=100)
    alert = (650 * 60_000, 699 * 60_000)  # rows 650..699, inclusive
    windows = detector._refresh_windows(series, 900, [alert])
    rows = np.unique(windows)
    assert rows.min() == 500 and rows.max() == 899  # the 400 rows before the cut
    # The alert, widened by a window (32 rows) on both sides, is left out.
    assert not np.any((rows >= 650 - 32) & (rows <= 699 + 32))
    assert {650 - 33, 699 + 33} <= set(rows.tolist())


def test_the_harness_scores_with_the_workers_edges_and_the_ablation_without() -> None:
    rows = np.arange(3000)
    noise = 0.05 * np.random.default_rng(3).normal(size=rows.size)
    series = (np.sin(2 * np.pi * rows / 32) + 0.0002 * rows + noise)[:, None]  # a slow drift
    with_edges = _refreshing_detector(series[:400], every=None)
    fixed = _refreshing_detector(series[:400], every=None)
    fixed.adapt_term_units = False
    edged, trained = with_edges.score(series), fixed.score(series)
    warmed = 200 + 32  # the policy's warm-up, in windows scored every row, and one window
    assert np.array_equal(edged[:warmed], trained[:warmed])  # the edges start at 1
    assert trained[-500:].min() > 1.1  # past the trained range: every window pages
    assert np.median(edged[-500:]) < 1.1  # the terms' edges followed the drift


def test_refresh_is_for_causal_scoring_only() -> None:
    with pytest.raises(ValueError, match="causal"):
        AnomalyLLMDetector(refresh_every=100)


def test_an_alert_open_longer_than_learn_after_is_read_after_that() -> None:
    series = np.arange(1000, dtype=np.float32)[:, None]
    detector = _refreshing_detector(np.sin(series[:400] / 5), every=100)
    detector.refresh_learn_after = 100
    alert = (650 * 60_000, 899 * 60_000)  # still open at the cut
    rows = np.unique(detector._refresh_windows(series, 900, [alert]))
    # Left out: a window before the alert, its first 100 rows and a window after them.
    assert not np.any((rows >= 650 - 32) & (rows <= 650 + 100 + 32))
    assert {650 - 33, 650 + 100 + 33, 899} <= set(rows.tolist())


def test_decisions_fall_on_the_rows_where_a_scored_window_ends() -> None:
    series = np.sin(np.arange(3000) / 5)[:, None]
    detector = _refreshing_detector(series[:400], every=None)
    detector.max_scored_windows = 500  # a stride of 6 rows
    rows = detector.decision_rows(len(series))
    assert rows[0] == 31 and set(np.diff(rows).tolist()) == {6}
    scores = detector.score(series)
    # Causal scores change only where a window ends: at a decision row.
    changed = np.flatnonzero(np.diff(scores)) + 1
    assert set(changed.tolist()) <= set(rows.tolist())


def test_a_causal_row_says_where_in_its_window_the_cause_lies() -> None:
    series = np.sin(np.arange(1000) / 5)[:, None]
    series[700] += 3.0  # a spike: the point term finds it in the window that judges it
    detector = _refreshing_detector(series[:400], every=None)
    scored = detector.score_rows(series)
    assert np.array_equal(scored.score, detector.score(series))
    rows = np.arange(len(series))
    assert np.array_equal(scored.evidence[:31], rows[:31])  # before the first window
    assert np.all((scored.evidence[31:] <= rows[31:]) & (scored.evidence[31:] > rows[31:] - 32))
    spiked = scored.score.argmax()
    assert scored.evidence[spiked] == 700 and spiked > 700


def test_the_recent_bank_a_window_is_scored_with_ends_a_window_before_its_refill() -> None:
    length, stride = 32, 5
    ends = np.arange(400) * stride + length - 1
    stretches = recent_cuts(ends, start=600, every=250, rows=2000, length=length)
    assert [first for first, _, _ in stretches] == [0, 114, 164, 214, 264, 314, 364]
    assert stretches[-1][1] == len(ends)
    for (first, last, known), cut in zip(stretches[1:], range(600, 2000, 250), strict=False):
        assert ends[first] >= cut > ends[first - 1]  # scored from the refill at `cut` on
        assert ends[known - 1] < cut - length <= ends[known]  # a window before it at most
        starts = ends[first:last] - length + 1
        assert starts.min() > ends[:known].max()  # no scored window overlaps one it knows
    assert stretches[0][2] == 0  # the training part: no refill yet


def test_a_novel_shape_stops_counting_for_the_memory_term_once_it_recurred_three_times() -> None:
    rows = np.arange(4000)
    series = np.sin(2 * np.pi * rows / 32)[:, None]
    bursts = range(1024, 3800, 320)  # at one phase of the slow cycle
    for start in bursts:  # a quicker cycle, which training never showed
        series[start : start + 48, 0] = np.sin(2 * np.pi * np.arange(48) / 12)
    detector = _refreshing_detector(series[:400], every=None)
    detector.recent_every = 100
    memory = detector.model.config.score_terms.index("memory")

    def burst_memory(recurring: bool) -> list[float]:
        detector.model.config = dataclasses.replace(
            detector.model.config, recurrence=3 if recurring else 0
        )
        # Windows every 4 rows: the bank keeps all of them (fewer than recent_size).
        terms = detector.window_scores(series, 4, adapted=False).terms[:, memory]
        return [float(terms[start // 4 : (start + 48) // 4].max()) for start in bursts]

    plain, recurring = burst_memory(False), burst_memory(True)
    assert min(plain) > 1  # every burst is beyond normal for training's bank alone
    assert recurring[:2] == pytest.approx(plain[:2])  # seen fewer than three times before
    assert max(recurring[3:]) < 0.01 * min(plain)  # from the fourth: a shape the sensor shows
