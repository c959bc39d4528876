"""Numenta Anomaly Benchmark (NAB v1.1): corpus loading, scoring and the ``nab`` command.

Scoring follows Lavin & Ahmad (2015) and numenta/NAB v1.1 (``nab/sweeper.py``):

- Each labelled anomaly window earns the reward of its *earliest* detected row,
  ``scaled_sigmoid(-(end - row + 1) / width) * tp_weight / scaled_sigmoid(-1)``
  (``tp_weight`` at the left edge, near 0 at the right edge); later detections in
  the same window neither add nor cost anything. A window without a detection costs
  ``fn_weight``.
- A detection outside every window costs ``fp_weight`` times a sigmoid of its
  distance past the previous window's end (milder just after a window), or the full
  ``fp_weight`` before the first window.
- Rows of the probationary period (NAB: the first 15% of a file, at most 750 rows)
  are ignored.
- A detector's threshold is optimised per profile over the combined scores of all
  files, and its raw score is normalised as ``100 * (raw - null) / (perfect - null)``
  where the null detector detects nothing and the perfect one detects every window
  at its first row.
"""

from __future__ import annotations

import argparse
import bisect
import fnmatch
import json
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.progress import track
from rich.table import Table

from stream_detector.config import AlertPolicy
from stream_detector.series_files import NAB_WINDOWS, read_csv, read_nab_windows
from trainer import detectors
from trainer.thresholds import REPLAY_ROW_MS, AlertReplay

PROBATION_FRACTION = 0.15
PROBATION_MAX_ROWS = 750  # NAB caps the probationary period at 15% of 5000 rows
# ``--decisions alerts``: the worker's running-quantile threshold at these levels.
QUANTILES = (0.9, 0.95, 0.98, 0.99, 0.995, 0.998, 0.999, 0.9995, 0.9999)
# The alert policies replayed: the worker's default, and one that opens on the first
# window above the threshold (the same hysteresis, minimum duration and cooldown).
DECISION_POLICIES: dict[str, dict[str, Any]] = {
    "default": {},
    "first_window": {"confirm_k": 1, "confirm_n": 1},
}


@dataclass(frozen=True)
class CostMatrix:
    """Weights of one NAB application profile (true negatives always weigh 0)."""

    tp_weight: float
    fp_weight: float
    fn_weight: float


PROFILES: dict[str, CostMatrix] = {
    "standard": CostMatrix(tp_weight=1.0, fp_weight=0.11, fn_weight=1.0),
    "reward_low_FP_rate": CostMatrix(tp_weight=1.0, fp_weight=0.22, fn_weight=1.0),
    "reward_low_FN_rate": CostMatrix(tp_weight=1.0, fp_weight=0.11, fn_weight=2.0),
}


class NabDataError(ValueError):
    """The NAB folder, a label file or a score file is missing or malformed."""


class DetectorContractError(ValueError):
    """A detector cannot be evaluated on NAB (not causal, or wrong output shape)."""


@dataclass(frozen=True, eq=False)
class NabSeries:
    """One NAB file: its values and its anomaly windows as inclusive row ranges."""

    name: str  # relative path inside data/, e.g. "realKnownCause/nyc_taxi.csv"
    values: np.ndarray  # [T] float64
    windows: np.ndarray  # [W, 2] int64, (first row, last row), ascending

    @property
    def probation(self) -> int:
        """Number of leading rows that are never scored."""
        return probation_length(len(self.values))


@dataclass(frozen=True, eq=False)
class ThresholdSweep:
    """Corpus score for every distinct threshold, highest threshold first.

    Entry ``k`` is the outcome of detecting every row whose anomaly score is
    ``>= thresholds[k]``; entry 0 lies above all scores, so nothing is detected.
    """

    thresholds: np.ndarray  # [K] strictly decreasing
    raw_scores: np.ndarray  # [K]
    detected_windows: np.ndarray  # [K] int
    false_positives: np.ndarray  # [K] int, detected rows outside every window
    windows: int  # windows with at least one scorable row
    null_score: float  # raw score of a detector that detects nothing
    perfect_score: float  # raw score of detecting every window at its first row

    def index_at(self, threshold: float) -> int:
        """The entry whose detections equal ``scores >= threshold``."""
        return max(int(np.count_nonzero(self.thresholds >= threshold)) - 1, 0)


@dataclass(frozen=True)
class ProfileResult:
    """A detector's NAB result under one application profile."""

    profile: str
    score: float  # normalised: null detector 0, perfect detector 100
    threshold: float
    raw_score: float
    null_score: float
    perfect_score: float
    detected_windows: int
    windows: int
    false_positives: int


def probation_length(num_rows: int) -> int:
    """NAB's probationary period: 15% of the rows, capped at 750."""
    return int(min(math.floor(PROBATION_FRACTION * num_rows), PROBATION_MAX_ROWS))


def scaled_sigmoid(relative_position: np.ndarray | float) -> np.ndarray:
    """NAB's reward curve ``2 * sigmoid(-5 x) - 1``, and -1 for ``x > 3``.

    ``x = -1`` is a window's left edge (0.987), ``x = 0`` its right edge (0);
    positive ``x`` lies after the window, where the value turns negative.
    """
    x = np.asarray(relative_position, dtype=np.float64)
    return np.where(x > 3.0, -1.0, 2.0 / (1.0 + np.exp(5.0 * np.minimum(x, 3.0))) - 1.0)


MAX_TP_REWARD = float(scaled_sigmoid(-1.0))


def row_rewards(
    num_rows: int, windows: np.ndarray, cost: CostMatrix
) -> tuple[np.ndarray, np.ndarray]:
    """What detecting each row would earn, and the window each row lies in (-1: none).

    Returns ``(rewards [T] float64, window_of_row [T] int64)``. Inside a window the
    reward is the true-positive reward of that row; outside, the (negative)
    false-positive reward.
    """
    rows = np.arange(num_rows)
    rewards = np.full(num_rows, -cost.fp_weight)  # before the first window: full FP cost
    window_of_row = np.full(num_rows, -1, dtype=np.int64)
    for window, (start, end) in enumerate(windows):
        width = end - start + 1
        inside = rows[start : end + 1]
        window_of_row[start : end + 1] = window
        rewards[start : end + 1] = (
            scaled_sigmoid(-(end - inside + 1) / width) * cost.tp_weight / MAX_TP_REWARD
        )
        next_start = windows[window + 1][0] if window + 1 < len(windows) else num_rows
        after = rows[end + 1 : next_start]
        # NAB divides by (width - 1); a one-row window would divide by zero there.
        rewards[end + 1 : next_start] = (
            scaled_sigmoid((after - end) / max(width - 1, 1)) * cost.fp_weight
        )
    return rewards, window_of_row


def score_detections(detections: np.ndarray, windows: np.ndarray, cost: CostMatrix) -> float:
    """Raw NAB score of one file's binary detections ([T] bool), row by row."""
    detections = np.asarray(detections, dtype=bool)
    rewards, window_of_row = row_rewards(len(detections), windows, cost)
    scorable = np.arange(len(detections)) >= probation_length(len(detections))
    hits = detections & scorable
    total = float(rewards[hits & (window_of_row < 0)].sum())
    for window in range(len(windows)):
        if not (scorable & (window_of_row == window)).any():
            continue
        detected_rows = np.flatnonzero(hits & (window_of_row == window))
        total += float(rewards[detected_rows[0]]) if len(detected_rows) else -cost.fn_weight
    return total


def sweep_thresholds(
    scores: Sequence[np.ndarray], windows: Sequence[np.ndarray], cost: CostMatrix
) -> ThresholdSweep:
    """Corpus raw score at every threshold, from one sort of all scorable rows.

    ``scores[i]`` are file i's anomaly scores ([T_i]), ``windows[i]`` its windows
    ([W_i, 2]). Rows are swept from the highest score down, as NAB's sweeper does:
    each detected row outside a window adds its false-positive reward, and a row
    inside a window changes the window's value only when it is the earliest
    detected row of that window so far.
    """
    if len(scores) != len(windows):
        raise ValueError(f"got scores for {len(scores)} files but windows for {len(windows)}")
    kept_scores, kept_rewards, kept_windows = [], [], []
    window_offset = 0
    scorable_windows = 0
    for file_scores, file_windows in zip(scores, windows, strict=True):
        file_scores = np.asarray(file_scores, dtype=np.float64)
        if file_scores.ndim != 1 or not np.isfinite(file_scores).all():
            raise ValueError("anomaly scores must be a 1-D array of finite floats per file")
        rewards, window_of_row = row_rewards(len(file_scores), file_windows, cost)
        keep = slice(probation_length(len(file_scores)), None)
        window_of_row = window_of_row[keep]
        scorable_windows += len(np.unique(window_of_row[window_of_row >= 0]))
        kept_scores.append(file_scores[keep])
        kept_rewards.append(rewards[keep])
        kept_windows.append(np.where(window_of_row >= 0, window_of_row + window_offset, -1))
        window_offset += len(file_windows)
    all_scores = np.concatenate(kept_scores)  # [N]
    all_rewards = np.concatenate(kept_rewards)  # [N]
    all_windows = np.concatenate(kept_windows)  # [N]
    if len(all_scores) == 0:
        raise ValueError("no rows left to score after the probationary periods")
    null_score = -cost.fn_weight * scorable_windows

    # Sweep order; a stable sort keeps tied rows of a window in time order.
    order = np.argsort(-all_scores, kind="stable")
    sorted_scores = all_scores[order]
    sorted_windows = all_windows[order]
    score_change = np.where(sorted_windows < 0, all_rewards[order], 0.0)  # [N]
    first_hit = np.zeros(len(order), dtype=bool)

    # Group the in-window rows by window, keeping sweep order inside each group. A
    # window is worth the reward of its earliest detected row, i.e. of the running
    # minimum of the (time-ordered) row position within the group.
    in_window = np.flatnonzero(sorted_windows >= 0)
    by_window = in_window[np.argsort(sorted_windows[in_window], kind="stable")]
    if len(by_window):
        group_window = sorted_windows[by_window]
        group_start = np.r_[True, group_window[1:] != group_window[:-1]]
        group_rank = np.cumsum(group_start) - 1
        # Shifting each later group below all earlier positions restarts the running min.
        shift = group_rank * len(order)
        earliest = np.minimum.accumulate(order[by_window] - shift) + shift
        best_reward = all_rewards[earliest]
        previous = np.where(group_start, -cost.fn_weight, np.r_[0.0, best_reward[:-1]])
        score_change[by_window] = best_reward - previous
        first_hit[by_window[group_start]] = True

    # Ties are detected together: keep the state after the last row of each tie.
    last_of_tie = np.r_[sorted_scores[1:] != sorted_scores[:-1], True]
    above_all = np.nextafter(sorted_scores[0], np.inf)
    return ThresholdSweep(
        thresholds=np.r_[above_all, sorted_scores[last_of_tie]],
        raw_scores=np.r_[null_score, null_score + np.cumsum(score_change)[last_of_tie]],
        detected_windows=np.r_[0, np.cumsum(first_hit)[last_of_tie]],
        false_positives=np.r_[0, np.cumsum(sorted_windows < 0)[last_of_tie]],
        windows=scorable_windows,
        null_score=null_score,
        perfect_score=cost.tp_weight * scorable_windows,
    )


def normalised_score(raw_score: float, null_score: float, perfect_score: float) -> float:
    """NAB's final score: 0 for the null detector, 100 for the perfect one."""
    if perfect_score == null_score:
        raise ValueError("the scored files hold no anomaly window, so the NAB score is undefined")
    return 100.0 * (raw_score - null_score) / (perfect_score - null_score)


def profile_result(sweep: ThresholdSweep, profile: str, index: int) -> ProfileResult:
    """The result of the sweep's entry ``index`` under ``profile``."""
    raw = float(sweep.raw_scores[index])
    return ProfileResult(
        profile=profile,
        score=normalised_score(raw, sweep.null_score, sweep.perfect_score),
        threshold=float(sweep.thresholds[index]),
        raw_score=raw,
        null_score=sweep.null_score,
        perfect_score=sweep.perfect_score,
        detected_windows=int(sweep.detected_windows[index]),
        windows=sweep.windows,
        false_positives=int(sweep.false_positives[index]),
    )


def score_corpus(
    scores: Sequence[np.ndarray],
    windows: Sequence[np.ndarray],
    profiles: dict[str, CostMatrix] = PROFILES,
) -> dict[str, ProfileResult]:
    """Per profile, the best threshold over all files and the normalised score there.

    Among equally good thresholds the highest wins, as in NAB.
    """
    results = {}
    for profile, cost in profiles.items():
        sweep = sweep_thresholds(scores, windows, cost)
        results[profile] = profile_result(sweep, profile, int(np.argmax(sweep.raw_scores)))
    return results


def causal_rank(raw_scores: np.ndarray) -> np.ndarray:
    """Rescale raw detector scores to a [0, 1] anomaly likelihood, causally.

    The likelihood of row t is the share of the earlier scores (rows 0..t-1) that
    score t exceeds, ties counting half: a new running maximum gets 1.0, a score
    at the 99th percentile of the history about 0.99, and a constant stretch 0.5.
    It depends only on rows up to t, and on the ranks, not the scale, of the raw
    scores. The first row, and NaN (e.g. a detector's warm-up), get 0; NaN is
    left out of the history.
    """
    history: list[float] = []  # sorted earlier scores
    likelihood = np.zeros(len(raw_scores))
    for row, score in enumerate(np.asarray(raw_scores, dtype=np.float64).tolist()):
        if math.isnan(score):
            continue
        if history:
            below = bisect.bisect_left(history, score)
            ties = bisect.bisect_right(history, score) - below
            likelihood[row] = (below + 0.5 * ties) / len(history)
        bisect.insort(history, score)
    return likelihood


def _window_rows(ts_ms: np.ndarray, limits: list[tuple[int, int]], name: str) -> np.ndarray:
    """Map window limits (epoch ms) to inclusive row ranges ([W, 2]).

    As in NAB, a limit is the first row carrying that exact timestamp (NAB files
    may repeat or reorder timestamps, e.g. around daylight-saving changes).
    """
    rows = np.zeros((len(limits), 2), dtype=np.int64)
    for window, limit in enumerate(limits):
        for edge, stamp in enumerate(limit):
            matches = np.flatnonzero(ts_ms == stamp)
            if len(matches) == 0:
                raise NabDataError(
                    f"{name}: window limit {np.datetime64(stamp, 'ms')} is not a timestamp "
                    "of the file"
                )
            rows[window, edge] = matches[0]
    ordered = rows[:, 0] <= rows[:, 1]
    if len(rows) and not (ordered.all() and (rows[1:, 0] > rows[:-1, 1]).all()):
        raise NabDataError(f"{name}: anomaly windows must be ascending and must not overlap")
    return rows


def load_corpus(data_dir: Path, patterns: Sequence[str] | None = None) -> list[NabSeries]:
    """Load NAB files (all, or those whose relative path matches a glob in ``patterns``).

    ``data_dir`` is the NAB root holding ``data/<category>/<file>.csv`` and
    ``labels/combined_windows.json``; only labelled files are loaded, in sorted order.
    """
    windows_path = data_dir / NAB_WINDOWS
    if not windows_path.is_file():
        raise NabDataError(
            f"{windows_path} not found: --data must be the NAB folder holding data/ and labels/"
        )
    labelled = read_nab_windows(windows_path)
    names = sorted(labelled)
    if patterns:
        names = [name for name in names if any(fnmatch.fnmatch(name, p) for p in patterns)]
        if not names:
            raise NabDataError(f"no NAB file matches {list(patterns)} (e.g. 'realKnownCause/*')")
    corpus = []
    for name in names:
        path = data_dir / "data" / name
        if not path.is_file():
            raise NabDataError(f"{path} is labelled in {windows_path} but missing")
        (rows,) = read_csv(path, ["value"]).values()
        corpus.append(
            NabSeries(
                name=name,
                values=rows.values[:, 0],
                windows=_window_rows(rows.ts_ms, labelled[name], name),
            )
        )
    return corpus


def load_reference_scores(reference_dir: Path, corpus: Sequence[NabSeries]) -> list[np.ndarray]:
    """A published detector's anomaly scores for each file of ``corpus``.

    Files live at ``<reference_dir>/<category>/<detector>_<file>.csv[.gz]`` where
    ``<detector>`` is the folder's name. Scores are matched to data rows by
    position, as NAB does.
    """
    detector = reference_dir.resolve().name
    scores = []
    for series in corpus:
        category, file_name = series.name.split("/")
        path = reference_dir / category / f"{detector}_{file_name}"
        if not path.is_file():
            path = path.with_name(path.name + ".gz")
        if not path.is_file():
            raise NabDataError(f"no score file for {series.name}: expected {path} (or without .gz)")
        (rows,) = read_csv(path, ["anomaly_score"]).values()
        if len(rows.values) != len(series.values):
            raise NabDataError(
                f"{path}: {len(rows.values)} scores for {len(series.values)} data rows"
            )
        scores.append(rows.values[:, 0])
    return scores


@dataclass(frozen=True, eq=False)
class DetectorRun:
    """Anomaly likelihoods of a detector over the files it finished within the time budget,
    and what the worker's alert policy needs: the raw scores, the rows where a window ends
    (every row for a per-reading detector) and the detector's own threshold, if it has one.
    """

    corpus: list[NabSeries]
    likelihoods: list[np.ndarray]
    settings: dict[str, Any]
    complete: bool
    raw: list[np.ndarray]
    decision_rows: list[np.ndarray]
    thresholds: list[float | None]


def run_detector(
    corpus: Sequence[NabSeries],
    name: str,
    time_budget_s: float | None = None,
    profile: str = "default",
) -> DetectorRun:
    """Run detector ``name`` over ``corpus`` as NAB prescribes.

    Per file, a fresh detector is fit on the probationary rows only and then
    scores the whole series ([T, 1]); raw scores become likelihoods with
    :func:`causal_rank`. Once ``time_budget_s`` has run out no further file is
    started (the first always runs) and the run is marked incomplete.
    """
    detector = detectors.get_detector(name, profile, streaming=True)
    if not detector.causal:
        raise DetectorContractError(
            f"detector '{name}' is not causal: NAB is a streaming benchmark, "
            "so score[t] may only depend on rows up to t"
        )
    settings = detector.settings()
    started = time.monotonic()
    finished: list[NabSeries] = []
    likelihoods, raws, decision_rows, thresholds = [], [], [], []
    for series in track(corpus, description=f"{name} on NAB"):
        if finished:
            if time_budget_s is not None and time.monotonic() - started > time_budget_s:
                break
            # A fresh detector for every file.
            detector = detectors.get_detector(name, profile, streaming=True)
        values = series.values[:, None]  # [T, 1]
        detector.fit(values[: series.probation])
        if hasattr(detector, "term_warmup_windows"):  # warmed up as the alert threshold is
            rows = detector.decision_rows(len(values))
            detector.term_warmup_windows = warmup_windows(rows, series.probation)
        raw = np.asarray(detector.score(values), dtype=np.float64)
        if raw.shape != (len(values),):
            raise DetectorContractError(
                f"detector '{name}' returned scores of shape {raw.shape} for {series.name}; "
                f"expected ({len(values)},)"
            )
        finished.append(series)
        likelihoods.append(causal_rank(raw))
        raws.append(raw)
        rows = getattr(detector, "decision_rows", None)
        decision_rows.append(np.arange(len(raw)) if rows is None else rows(len(raw)))
        thresholds.append(getattr(detector, "threshold", None))
    return DetectorRun(
        finished,
        likelihoods,
        settings,
        complete=len(finished) == len(corpus),
        raw=raws,
        decision_rows=decision_rows,
        thresholds=thresholds,
    )


def warmup_windows(decision_rows: np.ndarray, probation: int) -> int:
    """The windows a running estimate warms up on: those decided in the probationary part
    (at least five, the quantile sketch's minimum)."""
    return max(5, int(np.count_nonzero(decision_rows < probation)))


def alert_openings(
    scores: np.ndarray, rows: np.ndarray, threshold: float | None, policy: AlertPolicy
) -> np.ndarray:
    """The rows ([T] bool) where the worker's alert policy opens an alert, fed the score of
    each decision row (a window's last row) at ``threshold`` (None: its running quantile)."""
    replay = AlertReplay(policy)
    detected = np.zeros(len(scores), dtype=bool)
    for row in rows.tolist():
        events = replay.add(row * REPLAY_ROW_MS, float(scores[row]), threshold)
        detected[row] = any(event.state == "open" for event in events)
    return detected


def score_openings(
    detections: Sequence[np.ndarray], windows: Sequence[np.ndarray], profile: str
) -> ProfileResult:
    """The NAB result of binary detections per file under ``profile`` (no sweep)."""
    as_scores = [detected.astype(np.float64) for detected in detections]
    sweep = sweep_thresholds(as_scores, windows, PROFILES[profile])
    return profile_result(sweep, profile, sweep.index_at(1.0))


def decision_results(run: DetectorRun, policy: AlertPolicy) -> dict[str, Any]:
    """NAB scores of the alerts ``policy`` opens on the detector's raw scores.

    Detections are the rows where an alert opens (confirmation, hysteresis, minimum
    duration and cooldown as in the worker). ``quantile``: the worker's running-quantile
    threshold (the sensor's own past scores, warmed up on the probationary part), at
    every level of ``QUANTILES``, the best per profile as NAB picks a detector's threshold
    (``by_level``: every level's scores). ``trained``: the detector's own threshold
    (``trainer``'s peaks over threshold, for AnomalyLLM), fixed, no sweep; ``trained_adaptive``:
    the same with ``adapt_fitted_threshold`` (the running quantile at the policy's level,
    warmed up on the probationary part, raises it).
    """
    windows = [series.windows for series in run.corpus]
    warmups = [  # decision rows in the probationary part: what warms the running quantile
        warmup_windows(rows, series.probation)
        for series, rows in zip(run.corpus, run.decision_rows, strict=True)
    ]
    by_level: dict[float, dict[str, ProfileResult]] = {}
    for level in QUANTILES:
        detections = []
        for raw, rows, warmup in zip(run.raw, run.decision_rows, warmups, strict=True):
            at_level = policy.model_copy(
                update={"fallback_quantile": level, "fallback_warmup_windows": warmup}
            )
            detections.append(alert_openings(raw, rows, None, at_level))
        by_level[level] = {
            profile: score_openings(detections, windows, profile) for profile in PROFILES
        }
    best = {}
    for profile in PROFILES:
        level = max(by_level, key=lambda level: by_level[level][profile].raw_score)
        best[profile] = {"level": level, **asdict(by_level[level][profile])}
    results: dict[str, Any] = {
        "policy": policy.model_dump(),
        "quantile": best,
        "by_level": {
            str(level): {profile: result.score for profile, result in scores.items()}
            for level, scores in by_level.items()
        },
    }
    if all(threshold is not None for threshold in run.thresholds):
        fixed = policy.model_copy(update={"adapt_fitted_threshold": False})
        detections = [
            alert_openings(raw, rows, threshold, fixed)
            for raw, rows, threshold in zip(run.raw, run.decision_rows, run.thresholds, strict=True)
        ]
        results["trained"] = {
            profile: asdict(score_openings(detections, windows, profile)) for profile in PROFILES
        }
        detections = []
        for raw, rows, threshold, warmup in zip(
            run.raw, run.decision_rows, run.thresholds, warmups, strict=True
        ):
            adaptive = policy.model_copy(
                update={"adapt_fitted_threshold": True, "fallback_warmup_windows": warmup}
            )
            detections.append(alert_openings(raw, rows, threshold, adaptive))
        results["trained_adaptive"] = {
            profile: asdict(score_openings(detections, windows, profile)) for profile in PROFILES
        }
    return results


def _print_table(
    console: Console, title: str, results: dict[str, ProfileResult], published: dict[str, float]
) -> None:
    """Print the three profile results (and published scores when known)."""
    table = Table(title=title)
    table.add_column("profile", no_wrap=True)
    table.add_column("score", justify="right")
    if published:
        table.add_column("published", justify="right")
    for column in ("threshold", "raw", "windows", "FPs"):
        table.add_column(column, justify="right")
    for profile, result in results.items():
        cells = [profile, f"{result.score:.2f}"]
        if published:
            cells.append(f"{published[profile]:.2f}")
        cells += [
            f"{result.threshold:.6g}",
            f"{result.raw_score:.2f}",
            f"{result.detected_windows}/{result.windows}",
            str(result.false_positives),
        ]
        table.add_row(*cells)
    console.print(table)


def _print_decisions(console: Console, decisions: dict[str, dict[str, Any]]) -> None:
    """Print the NAB scores of the alerts the worker's policies opened."""
    table = Table(title="alerts the worker's policy opens (--decisions alerts)")
    table.add_column("policy", no_wrap=True)
    table.add_column("threshold", no_wrap=True)
    for profile in PROFILES:
        table.add_column(profile, justify="right")
    for name, results in decisions.items():
        best = results["quantile"]
        levels = ", ".join(f"{best[profile]['level']}" for profile in PROFILES)
        table.add_row(
            name,
            f"running quantile ({levels})",
            *(f"{best[profile]['score']:.2f}" for profile in PROFILES),
        )
        if "trained" in results:
            trained = results["trained"]
            scores = (f"{trained[profile]['score']:.2f}" for profile in PROFILES)
            table.add_row(name, "trainer's, fixed", *scores)
            adaptive = results["trained_adaptive"]
            scores = (f"{adaptive[profile]['score']:.2f}" for profile in PROFILES)
            table.add_row(name, "trainer's, adaptive", *scores)
    console.print(table)


def _save_scores(path: Path, run: DetectorRun) -> None:
    """Each file's raw scores and decision rows, as .npz (for re-scoring other policies)."""
    arrays: dict[str, np.ndarray] = {}
    for index, (raw, rows) in enumerate(zip(run.raw, run.decision_rows, strict=True)):
        arrays[f"raw_{index}"], arrays[f"rows_{index}"] = raw, rows
    names = np.array([series.name for series in run.corpus])
    thresholds = np.array([np.nan if t is None else t for t in run.thresholds])
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, names=names, thresholds=thresholds, **arrays)


def run_nab_command(args: argparse.Namespace) -> int:
    """Handle ``python -m trainer nab``: score a detector on NAB and write a JSON summary."""
    console = Console()
    started = time.monotonic()
    try:
        corpus = load_corpus(args.data, args.files)
        if args.reference is not None:
            detector_name = args.reference.resolve().name
            scores = load_reference_scores(args.reference, corpus)
            settings: dict[str, Any] = {}
            complete = True
        else:
            detector_name = args.detector
            run = run_detector(corpus, args.detector, args.time_budget_s, args.profile)
            corpus, scores, settings, complete = (
                run.corpus,
                run.likelihoods,
                run.settings,
                run.complete,
            )
        results = score_corpus(scores, [series.windows for series in corpus])
        decisions = None
        if args.decisions == "alerts":
            if args.reference is not None:
                raise ValueError(
                    "--decisions alerts needs a detector's raw scores, not --reference"
                )
            decisions = {
                name: decision_results(run, AlertPolicy(**overrides))
                for name, overrides in DECISION_POLICIES.items()
            }
            if args.save_scores is not None:
                _save_scores(args.save_scores, run)
    # ValueError: NabDataError, DetectorContractError, an unknown detector, unscorable
    # input; ImportError: a registered detector whose dependencies are missing.
    except (ValueError, ImportError) as error:
        print(f"nab: {error}", file=sys.stderr)
        return 2

    scoreboard_path = args.data / "scoreboard.json"
    scoreboard = json.loads(scoreboard_path.read_text()) if scoreboard_path.is_file() else {}
    published = scoreboard.get(detector_name, {}) if complete and not args.files else {}
    title = f"NAB v1.1: {detector_name} on {len(corpus)} files"
    _print_table(console, title, results, published)
    if not complete:
        console.print(
            f"[yellow]time budget spent after {len(corpus)} files: a partial NAB score, "
            "not comparable to the scoreboard[/yellow]"
        )

    if decisions is not None:
        _print_decisions(console, decisions)

    summary = {profile: result.score for profile, result in results.items()}
    summary |= {
        "detector": detector_name,
        "source": "reference" if args.reference is not None else "detector",
        "settings": settings,
        "files": [series.name for series in corpus],
        "complete": complete,
        "profiles": {profile: asdict(result) for profile, result in results.items()},
        "decisions": decisions,
        "wall_time_s": time.monotonic() - started,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2) + "\n")
    console.print(f"results written to {args.out}")
    return 0


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``nab`` subcommand to the trainer's command line."""
    parser = subparsers.add_parser(
        "nab",
        help="score a detector on the Numenta Anomaly Benchmark",
        description="Score a detector (or published detector outputs) with NAB v1.1 rules.",
    )
    parser.add_argument(
        "--data", type=Path, required=True, help="NAB folder holding data/ and labels/"
    )
    source = parser.add_mutually_exclusive_group()
    source.add_argument(
        "--reference",
        type=Path,
        help="score published outputs in this folder (e.g. DIR/reference/numenta)",
    )
    source.add_argument(
        "--detector", default="anomalyllm", help="registered detector to run (default: anomalyllm)"
    )
    parser.add_argument(
        "--files", nargs="+", metavar="GLOB", help="only files matching, e.g. 'realKnownCause/*'"
    )
    parser.add_argument(
        "--time-budget-s",
        type=float,
        help="stop starting new files after this many seconds (detector runs only)",
    )
    parser.add_argument(
        "--profile",
        choices=detectors.PROFILES,
        default="default",
        help="detector settings preset (default: default)",
    )
    parser.add_argument(
        "--decisions",
        choices=("scores", "alerts"),
        default="scores",
        help="also score the alerts the worker's alert policy opens (alerts); "
        "default: likelihoods only",
    )
    parser.add_argument(
        "--save-scores", type=Path, help="with --decisions alerts: raw scores as .npz here"
    )
    parser.add_argument("--out", type=Path, required=True, help="where to write the JSON results")
    parser.set_defaults(handler=run_nab_command)
