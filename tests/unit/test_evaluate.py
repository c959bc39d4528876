"""The evaluation harness: UCR hit rule, event-level metrics, the ucr and msl runs."""

from __future__ import annotations

import argparse
import csv
import gzip
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from stream_detector.config import AlertPolicy
from trainer import evaluate
from trainer.data import DataNotFoundError, list_ucr
from trainer.evaluate import (
    DetectorOutputError,
    EventCounts,
    alert_mask,
    checked_scores,
    event_counts,
    find_events,
    holdout_threshold,
    parse_id_tokens,
    pooled_best_threshold,
    run_msl,
    run_ucr,
    select_ucr,
    ucr_hit,
    ucr_location,
)
from trainer.thresholds import ThresholdConfig, pot_threshold

pytestmark = pytest.mark.unit


class MagnitudeDetector:
    """Scores each point by its absolute value: finds any spike."""

    name = "magnitude"
    causal = True

    def fit(self, train: np.ndarray) -> None:
        self.fitted_length = train.shape[0]

    def score(self, series: np.ndarray) -> np.ndarray:
        return np.abs(series[:, 0])

    def settings(self) -> dict[str, Any]:
        return {"kind": "abs"}


class BrokenDetector(MagnitudeDetector):
    """Fails on every series, as a detector with a bug in its input handling would."""

    name = "broken"

    def score(self, series: np.ndarray) -> np.ndarray:
        raise ValueError("cannot score this")


def _fake_registry(
    name: str, profile: str = "default", streaming: bool = False, **settings: Any
) -> Any:
    return {"magnitude": MagnitudeDetector, "broken": BrokenDetector}[name]()


@pytest.mark.parametrize(
    ("location", "hit"),
    [(899, False), (900, True), (1000, True), (1150, True), (1151, False)],
)
def test_ucr_hit_allows_exactly_100_points_either_side(location: int, hit: bool) -> None:
    assert ucr_hit(location, begin=1000, end=1050) == hit


def test_ucr_location_is_1_based_and_ignores_the_training_part() -> None:
    scores = np.zeros(20)
    scores[3] = 10.0  # training part: must be ignored
    scores[12] = 5.0
    assert ucr_location(scores, train_end=10) == 13


def test_parse_id_tokens_accepts_singles_ranges_and_commas() -> None:
    assert parse_id_tokens(["1", "7-9", "12,14"]) == ([1, 12, 14], [(7, 9)])
    with pytest.raises(ValueError, match="bad id"):
        parse_id_tokens(["a"])
    with pytest.raises(ValueError, match="end comes before"):
        parse_id_tokens(["9-7"])


def _ucr_folder(folder: Path, ids: list[int], spike_inside: bool = True) -> Path:
    """Series of 600 zeros with a spike, anomaly labelled at 1-based 400..420."""
    for series_id in ids:
        values = np.zeros(600)
        values[409 if spike_inside else 200] = 1.0  # 1-based 410 (hit) or 201 (in train)
        values[550 if not spike_inside else 0] = 0.5  # 1-based 551: a miss by 131 points
        path = folder / f"{series_id:03d}_UCR_Anomaly_toy{series_id}_300_400_420.txt.gz"
        with gzip.open(path, "wt") as handle:
            handle.write("\n".join(str(value) for value in values))
    return folder


def test_select_ucr_takes_ranges_over_gaps_but_not_missing_singles(tmp_path: Path) -> None:
    _ucr_folder(tmp_path, [1, 2, 5])
    assert [entry.id for entry in select_ucr(tmp_path, ["1-4"])] == [1, 2]
    assert [entry.id for entry in select_ucr(tmp_path, None)] == [1, 2, 5]
    with pytest.raises(DataNotFoundError, match=r"\[3\]"):
        select_ucr(tmp_path, ["3", "5"])


def test_run_ucr_scores_every_detector_on_the_same_series(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(evaluate, "get_detector", _fake_registry)
    _ucr_folder(tmp_path, [1])
    _ucr_folder(tmp_path, [2], spike_inside=False)

    result = run_ucr(list_ucr(tmp_path), ["magnitude", "broken"])

    assert result["detector"] == "magnitude" and result["accuracy"] == 0.5
    first, second = result["detectors"]["magnitude"]["series"]
    assert (first["location"], first["hit"], first["anomaly"]) == (410, True, [400, 420])
    assert (second["location"], second["hit"]) == (551, False)
    broken = result["detectors"]["broken"]
    assert broken["accuracy"] == 0.0 and broken["errors"] == 2
    assert "cannot score this" in broken["series"][0]["error"]
    json.dumps(result)  # the result must be writable as JSON


def test_run_ucr_stops_starting_series_once_the_budget_is_spent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(evaluate, "get_detector", _fake_registry)
    _ucr_folder(tmp_path, [1, 2, 3])

    result = run_ucr(list_ucr(tmp_path), ["magnitude"], time_budget_s=0.0)

    assert [row["id"] for row in result["series"]] == [1]
    assert result["skipped_ids"] == [2, 3]


def test_checked_scores_rejects_wrong_shape_and_nan() -> None:
    with pytest.raises(DetectorOutputError, match="shape"):
        checked_scores(np.zeros((5, 1)), 5, "x")
    with pytest.raises(DetectorOutputError, match="NaN"):
        checked_scores(np.array([0.0, np.nan]), 2, "x")


def test_find_events_returns_inclusive_runs() -> None:
    mask = np.array([1, 1, 0, 0, 1, 0, 1, 1, 1], dtype=bool)
    assert find_events(mask) == [(0, 1), (4, 4), (6, 8)]
    assert find_events(np.zeros(4, dtype=bool)) == []


def test_event_counts_on_a_hand_made_case() -> None:
    scores = np.zeros(30)
    scores[[2, 3]] = 1.0  # event (2, 3): overlaps label (3, 5) by 1 of its 2 points
    scores[10] = 1.0  # event (10, 10): no label -> FP
    scores[15:17] = 1.0  # event (15, 16): no label -> FP
    scores[20] = 1.0  # event (20, 20): inside label (18, 25)
    scores[22] = 1.0  # a second event inside the same label: not a false positive
    # label (27, 29) has no event -> FN
    counts = event_counts(scores, 0.5, [(3, 5), (18, 25), (27, 29)])

    assert (counts.tp, counts.fn, counts.fp, counts.events) == (2, 1, 2, 5)
    assert counts.precision == pytest.approx((0.5 + 0 + 0 + 1 + 1) / 5)
    assert counts.recall == pytest.approx(2 / 3)
    assert counts.f1 == pytest.approx(2 * 0.5 * (2 / 3) / (0.5 + 2 / 3))


def test_event_counts_on_the_label_edges() -> None:
    scores = np.zeros(10)
    scores[6] = 1.0  # just after the inclusive end 5: a false positive and a miss
    assert event_counts(scores, 0.5, [(3, 5)]) == EventCounts(tp=0, fn=1, fp=1, events=1)
    scores[5] = 1.0  # now the event (5, 6) touches the range's last point
    assert event_counts(scores, 0.5, [(3, 5)]) == EventCounts(tp=1, events=1, inside=0.5)
    assert EventCounts().f1 == 0.0


def test_flagging_everything_does_not_score_well() -> None:
    scores = np.ones(1000)
    counts = event_counts(scores, 0.0, [(100, 109), (500, 509)])

    assert (counts.tp, counts.fp, counts.events) == (2, 0, 1)
    assert counts.precision == pytest.approx(20 / 1000)
    assert counts.f1 < 0.05


def test_pooled_best_threshold_finds_the_separating_threshold() -> None:
    first = np.array([0.1, 0.2, 0.9, 0.95, 0.1, 0.3])
    second = np.array([0.4, 0.1, 0.2, 0.1, 0.8, 0.1])
    threshold, counts = pooled_best_threshold([first, second], [[(2, 3)], [(4, 4)]])

    assert 0.4 <= threshold < 0.8
    assert counts == EventCounts(tp=2, events=2, inside=2.0)


def test_holdout_threshold_is_the_highest_held_out_score() -> None:
    train = np.arange(100, dtype=np.float64)[:, None]
    assert holdout_threshold(MagnitudeDetector, train) == 99.0
    assert holdout_threshold(MagnitudeDetector, train, quantile=0.0) == 75.0


def test_the_pot_threshold_is_the_one_trainer_fit_would_write() -> None:
    values = np.random.default_rng(0).exponential(size=4000)
    train = values[:, None]
    held_out = np.abs(values[3000:])
    expected = pot_threshold(held_out, ThresholdConfig()).threshold
    assert holdout_threshold(MagnitudeDetector, train, method="pot") == expected
    assert expected != holdout_threshold(MagnitudeDetector, train)
    with pytest.raises(ValueError, match="threshold method"):
        holdout_threshold(MagnitudeDetector, train, method="best")


def _msl_folder(folder: Path) -> Path:
    with (folder / "labeled_anomalies.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["chan_id", "spacecraft", "anomaly_sequences", "class", "num_values"])
        writer.writerow(["A-1", "MSL", "[[40, 45], [80, 85]]", "[point, point]", "100"])
    rng = np.random.default_rng(0)
    train = rng.uniform(-1, 1, (200, 3))
    test = rng.uniform(-0.5, 0.5, (100, 3))  # inside the training range
    test[42, 0] = 5.0  # found
    test[75:90, 0] = 0.0  # the range (80, 85) is missed at any threshold
    test[10, 0] = 3.0  # a false alarm
    np.savez(folder / "A-1.npz", train=train, test=test)
    return folder


def test_run_msl_reports_label_free_and_oracle_f1(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(evaluate, "get_detector", _fake_registry)
    folder = _msl_folder(tmp_path)

    result = run_msl(folder, ["A-1"], ["magnitude"])

    summary = result["detectors"]["magnitude"]
    assert summary["label_free"] == EventCounts(tp=1, fn=1, fp=1, events=2, inside=1.0).as_dict()
    assert summary["oracle_best_f1"]["f1"] == pytest.approx(2 / 3)
    assert 3.0 <= summary["oracle_best_f1"]["threshold"] < 5.0
    assert result["f1_label_free"] == pytest.approx(0.5)
    assert "ORACLE" in result["oracle_best_f1_threshold"]
    json.dumps(result)  # the result must be writable as JSON


def test_ucr_command_writes_json_and_fails_cleanly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    parser = argparse.ArgumentParser()
    evaluate.register(parser.add_subparsers(dest="command", required=True))
    folder = tmp_path / "ucr"
    folder.mkdir()
    _ucr_folder(folder, [7])
    out = tmp_path / "out" / "results.json"

    bad = parser.parse_args(["ucr", "--data", str(folder), "--detector", "nope"])
    assert bad.handler(bad) == 2
    assert "unknown detector" in capsys.readouterr().err

    monkeypatch.setattr(evaluate, "get_detector", _fake_registry)
    args = parser.parse_args(
        ["ucr", "--data", str(folder), "--detector", "magnitude", "--ids", "7", "--out", str(out)]
    )
    assert args.handler(args) == 0
    assert json.loads(out.read_text())["accuracy"] == 1.0


def test_the_alert_policy_turns_blips_into_nothing_and_a_run_into_one_alert() -> None:
    scores = np.zeros(100)
    scores[10] = 1.5  # one window above: never confirmed (3 of 5)
    scores[40:43] = 1.5  # confirmed; open 5 windows at least, then 3 calm ones resolve it
    scores[45] = 1.5  # within the open alert: extends it
    mask = alert_mask(scores, 1.0, AlertPolicy())
    assert evaluate.find_events(mask) == [(40, 45)]
    assert not alert_mask(scores, 10.0, AlertPolicy()).any()
    scores[10] = 2.5  # twice the threshold and more: opens at once (``open_at_once_ratio``)
    assert evaluate.find_events(alert_mask(scores, 1.0, AlertPolicy()))[0][0] == 10


def test_an_alert_still_open_at_the_end_counts_up_to_its_last_hot_window() -> None:
    scores = np.zeros(50)
    scores[45:] = 5.0
    assert evaluate.find_events(alert_mask(scores, 1.0, AlertPolicy())) == [(45, 49)]


def test_an_alert_spans_its_evidence_when_the_detector_says_where_it_lies() -> None:
    scores = np.zeros(100)
    scores[40:60] = 1.5  # windows of 20 rows: all that hold an anomaly at rows 40 and 41
    evidence = np.arange(100)
    evidence[40:60] = np.minimum(np.arange(40, 60), 41)
    assert evaluate.find_events(alert_mask(scores, 1.0, AlertPolicy())) == [(40, 59)]
    assert evaluate.find_events(alert_mask(scores, 1.0, AlertPolicy(), evidence)) == [(40, 41)]


def test_run_msl_with_alert_decisions_counts_alerts_not_threshold_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(evaluate, "get_detector", _fake_registry)
    folder = _msl_folder(tmp_path)

    result = run_msl(folder, ["A-1"], ["magnitude"], decisions="alerts")

    # The lone spikes at rows 10 and 42 are single windows far above the threshold: the
    # default policy opens each at once; one that confirms every alert opens neither.
    summary = result["detectors"]["magnitude"]
    assert summary["label_free"]["events"] == 2
    assert summary["label_free_policy_variants"]["every alert confirmed"]["events"] == 0
    assert result["decisions"] == "alerts"
    assert "AlertPolicy" in result["metric"]
    with pytest.raises(ValueError, match="decisions"):
        run_msl(folder, ["A-1"], ["magnitude"], decisions="votes")
    with pytest.raises(ValueError, match="columns"):
        run_msl(folder, ["A-1"], ["magnitude"], columns="flags")
