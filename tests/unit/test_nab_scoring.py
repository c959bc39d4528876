"""NAB scoring rules on tiny hand-made series, and the detector runner with a toy detector."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from stream_detector.config import AlertPolicy
from trainer import detectors, nab
from trainer.__main__ import main

pytestmark = pytest.mark.unit

STANDARD = nab.PROFILES["standard"]
LENGTH = 100  # probationary period: rows 0..14
WINDOW = np.array([[40, 49]])  # one window of 10 rows


def detect(*rows: int, length: int = LENGTH) -> np.ndarray:
    """Binary detections at ``rows``."""
    detections = np.zeros(length, dtype=bool)
    detections[list(rows)] = True
    return detections


def test_scaled_sigmoid_matches_nab_reference_values() -> None:
    values = nab.scaled_sigmoid(np.array([-1.0, -0.5, 0.0, 1.0, 3.0, 3.5]))
    expected = [0.98661, 0.84828, 0.0, -0.98661, -0.99999939, -1.0]
    np.testing.assert_allclose(values, expected, atol=1e-5)


@pytest.mark.parametrize(("rows", "expected"), [(100, 15), (4999, 749), (5000, 750), (22695, 750)])
def test_probationary_period_is_15_percent_capped_at_750_rows(rows: int, expected: int) -> None:
    assert nab.probation_length(rows) == expected


def test_detection_at_left_edge_earns_full_tp_weight() -> None:
    assert nab.score_detections(detect(40), WINDOW, STANDARD) == pytest.approx(1.0)


def test_detection_at_right_edge_earns_little() -> None:
    expected = float(nab.scaled_sigmoid(-1 / 10)) / nab.MAX_TP_REWARD
    assert nab.score_detections(detect(49), WINDOW, STANDARD) == pytest.approx(expected)
    assert 0 < expected < 0.3


def test_only_the_first_detection_in_a_window_counts() -> None:
    first_only = nab.score_detections(detect(42), WINDOW, STANDARD)
    assert nab.score_detections(detect(42, 45, 49), WINDOW, STANDARD) == first_only
    assert nab.score_detections(detect(45, 42), WINDOW, STANDARD) == first_only


def test_missed_window_costs_fn_weight_per_profile() -> None:
    nothing = detect()
    assert nab.score_detections(nothing, WINDOW, STANDARD) == -1.0
    assert nab.score_detections(nothing, WINDOW, nab.PROFILES["reward_low_FN_rate"]) == -2.0


def test_false_positive_before_any_window_costs_full_fp_weight() -> None:
    assert nab.score_detections(detect(20), WINDOW, STANDARD) == pytest.approx(-1.0 - 0.11)
    low_fp = nab.PROFILES["reward_low_FP_rate"]
    assert nab.score_detections(detect(20), WINDOW, low_fp) == pytest.approx(-1.0 - 0.22)


def test_false_positive_cost_grows_with_distance_after_a_window() -> None:
    def fp_cost(row: int) -> float:
        return -1.0 - nab.score_detections(detect(row), WINDOW, STANDARD)

    just_after, later, far = fp_cost(50), fp_cost(60), fp_cost(90)
    assert 0 < just_after < later < far == pytest.approx(0.11)
    position = (50 - 49) / (10 - 1)  # distance past the window, in window widths
    assert just_after == pytest.approx(-0.11 * float(nab.scaled_sigmoid(position)))


def test_detections_in_the_probationary_period_are_ignored() -> None:
    windows = np.array([[10, 20]])  # starts inside the probationary period
    score = nab.score_detections(detect(5, 12), windows, STANDARD)
    assert score == nab.score_detections(detect(), windows, STANDARD) == -1.0
    # The window's scorable part still counts: row 16 is its 7th of 11 rows.
    expected = float(nab.scaled_sigmoid(-(20 - 16 + 1) / 11)) / nab.MAX_TP_REWARD
    assert nab.score_detections(detect(16), windows, STANDARD) == pytest.approx(expected)


def test_window_fully_inside_probation_is_not_counted() -> None:
    sweep = nab.sweep_thresholds([np.zeros(LENGTH)], [np.array([[2, 5]])], STANDARD)
    assert sweep.windows == 0
    with pytest.raises(ValueError, match="no anomaly window"):
        nab.score_corpus([np.zeros(LENGTH)], [np.array([[2, 5]])])


def small_corpus() -> list[np.ndarray]:
    """Windows of three files, one of them without anomalies."""
    return [np.array([[30, 39], [70, 79]]), np.zeros((0, 2), dtype=np.int64), np.array([[50, 64]])]


def test_perfect_detector_scores_100_and_null_detector_0() -> None:
    windows = small_corpus()
    perfect = [np.zeros(LENGTH) for _ in windows]
    for scores, file_windows in zip(perfect, windows, strict=True):
        scores[file_windows[:, 0]] = 1.0
    null = [np.zeros(LENGTH) for _ in windows]
    for profile in nab.PROFILES:
        assert nab.score_corpus(perfect, windows)[profile].score == pytest.approx(100.0)
        assert nab.score_corpus(null, windows)[profile].score == 0.0


def test_normalisation_is_linear_between_null_and_perfect() -> None:
    assert nab.normalised_score(raw_score=0.0, null_score=-4.0, perfect_score=4.0) == 50.0
    assert nab.normalised_score(raw_score=-6.0, null_score=-4.0, perfect_score=4.0) == -25.0


@pytest.mark.parametrize("seed", range(5))
def test_sweep_matches_row_by_row_scoring_at_every_threshold(seed: int) -> None:
    rng = np.random.default_rng(seed)
    windows = small_corpus()
    # Rounded scores create ties, which must be detected together.
    scores = [np.round(rng.random(LENGTH), 1 + seed % 2) for _ in windows]
    for cost in nab.PROFILES.values():
        sweep = nab.sweep_thresholds(scores, windows, cost)
        assert np.all(np.diff(sweep.thresholds) < 0)
        for index, threshold in enumerate(sweep.thresholds):
            direct = sum(
                nab.score_detections(file_scores >= threshold, file_windows, cost)
                for file_scores, file_windows in zip(scores, windows, strict=True)
            )
            assert sweep.raw_scores[index] == pytest.approx(direct, abs=1e-9)
            assert sweep.index_at(threshold) == index


def test_best_threshold_is_the_highest_among_equal_scores() -> None:
    windows = [np.array([[50, 59]])]
    scores = np.zeros(LENGTH)
    scores[50] = 0.9  # detected at the left edge by any threshold in (0, 0.9]
    result = nab.score_corpus([scores], windows)["standard"]
    assert result.threshold == 0.9
    assert result.score == pytest.approx(100.0)
    assert (result.detected_windows, result.windows, result.false_positives) == (1, 1, 0)


def test_sweep_refuses_non_finite_scores() -> None:
    scores = np.zeros(LENGTH)
    scores[60] = np.nan
    with pytest.raises(ValueError, match="finite"):
        nab.sweep_thresholds([scores], [WINDOW], STANDARD)


def test_causal_rank_is_causal_and_in_unit_interval() -> None:
    raw = np.random.default_rng(0).normal(size=300)
    raw[:3] = np.nan
    likelihood = nab.causal_rank(raw)
    assert likelihood[:4].tolist() == [0.0, 0.0, 0.0, 0.0]  # NaN, then no history yet
    assert np.all((likelihood >= 0) & (likelihood <= 1))
    np.testing.assert_array_equal(nab.causal_rank(raw[:150]), likelihood[:150])
    new_maximum = int(np.nanargmax(raw))
    assert likelihood[new_maximum] == 1.0


def test_causal_rank_gives_a_constant_stretch_one_half_and_a_spike_one() -> None:
    raw = np.zeros(50)
    raw[30] = 5.0
    likelihood = nab.causal_rank(raw)
    assert likelihood[30] == 1.0
    np.testing.assert_allclose(likelihood[1:30], 0.5)
    assert np.all(likelihood[31:] < 0.5)


class ToyDetector:
    """Distance from the mean of the training rows; logs what it was fitted on."""

    name = "toy"

    def __init__(
        self, fit_log: list[np.ndarray], causal: bool = True, output_length_offset: int = 0
    ) -> None:
        self.fit_log = fit_log
        self.causal = causal
        self.output_length_offset = output_length_offset
        self.mean = 0.0

    def fit(self, train: np.ndarray) -> None:
        self.fit_log.append(train)
        self.mean = float(train.mean())

    def score(self, series: np.ndarray) -> np.ndarray:
        return np.abs(series[: len(series) + self.output_length_offset, 0] - self.mean)

    def settings(self) -> dict[str, Any]:
        return {"output_length_offset": self.output_length_offset}


@pytest.fixture
def fit_log(monkeypatch: pytest.MonkeyPatch) -> list[np.ndarray]:
    """Make ``detectors.get_detector`` build ToyDetectors; returns the arrays they were fit on."""
    registry: dict[str, dict[str, Any]] = {
        "toy": {},
        "toy-noncausal": {"causal": False},
        "toy-short": {"output_length_offset": -1},
    }
    log: list[np.ndarray] = []

    def get_detector(
        name: str, profile: str = "default", streaming: bool = False, **settings: Any
    ) -> ToyDetector:
        assert streaming, "NAB must ask for the streaming (causal) variant"
        return ToyDetector(log, **registry[name], **settings)

    monkeypatch.setattr(detectors, "get_detector", get_detector, raising=False)
    return log


def toy_series(name: str, length: int, spike: int, windows: np.ndarray) -> nab.NabSeries:
    """A flat series with one spike."""
    values = np.ones(length)
    values[spike] = 10.0
    return nab.NabSeries(name=name, values=values, windows=windows)


def test_runner_fits_on_probation_only_and_finds_the_spike(fit_log: list[np.ndarray]) -> None:
    corpus = [
        toy_series("a/one.csv", 200, spike=120, windows=np.array([[115, 130]])),
        toy_series("a/two.csv", 100, spike=60, windows=np.array([[55, 64]])),
    ]
    run = nab.run_detector(corpus, "toy")
    assert run.complete and len(run.likelihoods) == 2
    assert [len(train) for train in fit_log] == [30, 15]
    assert all(train.shape[1] == 1 for train in fit_log)
    results = nab.score_corpus(run.likelihoods, [series.windows for series in corpus])
    assert all(result.detected_windows == 2 for result in results.values())


def test_an_alert_opens_where_the_policy_confirms_it_and_only_once() -> None:
    scores = np.zeros(100)
    scores[40:60] = 1.5  # one long excursion above the threshold
    rows = np.arange(0, 100, 2)  # a window ends every second row
    detected = nab.alert_openings(scores, rows, 1.0, AlertPolicy())
    # 3 of 5 windows above: the third hot window, row 44, opens the alert; it stays open.
    assert np.flatnonzero(detected).tolist() == [44]
    scores[40:60] = 5.0  # at twice the threshold or more the first hot window opens it
    assert np.flatnonzero(nab.alert_openings(scores, rows, 1.0, AlertPolicy())).tolist() == [40]


def test_openings_score_as_nab_scores_those_rows() -> None:
    windows = [np.array([[50, 70]]), np.array([[20, 30]])]
    detections = [np.zeros(100, dtype=bool), np.zeros(100, dtype=bool)]
    detections[0][[30, 55]] = True  # a false positive, then a hit
    result = nab.score_openings(detections, windows, "standard")
    cost = nab.PROFILES["standard"]
    raw = sum(nab.score_detections(d, w, cost) for d, w in zip(detections, windows, strict=True))
    assert result.raw_score == pytest.approx(raw)
    assert (result.detected_windows, result.false_positives) == (1, 1)


def test_the_worker_policy_decides_on_a_detectors_own_and_quantile_thresholds(
    fit_log: list[np.ndarray],
) -> None:
    corpus = [toy_series("a/one.csv", 400, spike=300, windows=np.array([[290, 330]]))]
    corpus[0].values[300:306] = 10.0  # long enough for 3-of-5 confirmation
    run = nab.run_detector(corpus, "toy")
    decisions = nab.decision_results(run, AlertPolicy())
    assert set(decisions["by_level"]) == {str(level) for level in nab.QUANTILES}
    best = decisions["quantile"]["standard"]
    assert best["level"] in nab.QUANTILES
    assert (best["detected_windows"], best["false_positives"]) == (1, 0)
    assert "trained" not in decisions  # the toy detector has no threshold of its own


def test_runner_refuses_non_causal_detectors(fit_log: list[np.ndarray]) -> None:
    corpus = [toy_series("a/one.csv", 100, spike=60, windows=WINDOW)]
    with pytest.raises(nab.DetectorContractError, match="not causal"):
        nab.run_detector(corpus, "toy-noncausal")


def test_runner_refuses_scores_of_the_wrong_length(fit_log: list[np.ndarray]) -> None:
    corpus = [toy_series("a/one.csv", 100, spike=60, windows=WINDOW)]
    with pytest.raises(nab.DetectorContractError, match="shape"):
        nab.run_detector(corpus, "toy-short")


def test_runner_stops_starting_files_when_the_time_budget_is_spent(
    fit_log: list[np.ndarray],
) -> None:
    corpus = [toy_series(f"a/{i}.csv", 100, spike=60, windows=WINDOW) for i in range(3)]
    run = nab.run_detector(corpus, "toy", time_budget_s=0.0)
    assert not run.complete
    assert [series.name for series in run.corpus] == ["a/0.csv"]


def write_mini_nab(root: Path) -> None:
    """A two-file NAB folder; one file repeats and reorders timestamps, as NAB files do."""
    stamps = [f"2020-01-01 {hour:02d}:{minute:02d}:00" for hour in range(4) for minute in range(60)]
    shuffled = stamps[:100] + stamps[90:95] + stamps[100:]  # rows 100..104 repeat 90..94
    (root / "data" / "cat").mkdir(parents=True)
    (root / "labels").mkdir()
    for name, rows, spike in (("flat.csv", stamps, 150), ("dup.csv", shuffled, 180)):
        values = ["1.0"] * len(rows)
        values[spike] = "9.0"
        lines = ["timestamp,value"] + [f"{t},{v}" for t, v in zip(rows, values, strict=True)]
        (root / "data" / "cat" / name).write_text("\n".join(lines) + "\n")
    windows = {
        "cat/flat.csv": [["2020-01-01 02:25:00.000000", "2020-01-01 02:40:00.000000"]],
        "cat/dup.csv": [["2020-01-01 01:32:00.000000", "2020-01-01 03:00:00.000000"]],
    }
    (root / "labels" / "combined_windows.json").write_text(json.dumps(windows))


def test_window_limits_map_to_the_first_row_with_that_timestamp(tmp_path: Path) -> None:
    write_mini_nab(tmp_path)
    corpus = {series.name: series for series in nab.load_corpus(tmp_path)}
    assert corpus["cat/flat.csv"].windows.tolist() == [[145, 160]]
    # 01:32 first appears at row 92 (again at 102); 03:00 follows the 5 repeated rows.
    assert corpus["cat/dup.csv"].windows.tolist() == [[92, 185]]
    assert [series.name for series in nab.load_corpus(tmp_path, ["*/flat*"])] == ["cat/flat.csv"]


def test_missing_labels_give_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(nab.NabDataError, match="--data must be the NAB folder"):
        nab.load_corpus(tmp_path)


def test_cli_runs_a_detector_and_writes_the_three_profiles(
    tmp_path: Path, fit_log: list[np.ndarray], capsys: pytest.CaptureFixture[str]
) -> None:
    write_mini_nab(tmp_path)
    out = tmp_path / "results" / "toy.json"
    assert main(["nab", "--data", str(tmp_path), "--detector", "toy", "--out", str(out)]) == 0
    results = json.loads(out.read_text())
    assert list(results)[:3] == ["standard", "reward_low_FP_rate", "reward_low_FN_rate"]
    assert all(math.isfinite(results[profile]) for profile in nab.PROFILES)
    assert results["detector"] == "toy" and results["complete"]
    assert "reward_low_FN_rate" in capsys.readouterr().out


def test_cli_scores_the_alerts_of_each_policy_and_keeps_the_raw_scores(
    tmp_path: Path, fit_log: list[np.ndarray]
) -> None:
    write_mini_nab(tmp_path)
    out, saved = tmp_path / "toy.json", tmp_path / "toy.npz"
    arguments = ["nab", "--data", str(tmp_path), "--detector", "toy", "--out", str(out)]
    assert main([*arguments, "--decisions", "alerts", "--save-scores", str(saved)]) == 0
    decisions = json.loads(out.read_text())["decisions"]
    assert set(decisions) == set(nab.DECISION_POLICIES)
    assert decisions["first_window"]["policy"]["confirm_k"] == 1
    assert all(math.isfinite(decisions["default"]["quantile"][p]["score"]) for p in nab.PROFILES)
    with np.load(saved) as arrays:
        assert len(arrays["names"]) == len(arrays["thresholds"]) >= 1
        assert arrays["raw_0"].shape == arrays["rows_0"].shape


def test_cli_reports_bad_input_without_a_traceback(
    tmp_path: Path, fit_log: list[np.ndarray], capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out.json"
    assert main(["nab", "--data", str(tmp_path), "--detector", "toy", "--out", str(out)]) == 2
    assert "combined_windows.json not found" in capsys.readouterr().err
    assert not out.exists()
