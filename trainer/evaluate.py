"""Evaluation harness and the ``ucr`` and ``msl`` commands.

Every detector named on the command line runs on the same series in the same process,
so each number has peers measured under the same conditions.

UCR anomaly archive (Wu & Keogh 2021): per series a fresh detector is fit on
``[0, train_end)`` and scores the whole series; its location is the arg-max of the score
at or after ``train_end``; it is correct when the location lies within 100 points of the
labelled anomaly. Positions in results are 1-based, as in the archive's file names.

NASA MSL (Hundman et al. 2018): per channel a fresh detector is fit on ``train`` and
scores ``test``. Event-level metrics without point adjustment: predicted events are
maximal runs of scores above a threshold. Recall counts labelled ranges: one overlapping
a predicted event is a true positive, one overlapping none a false negative. Precision
counts predicted events, each credited with the share of its points inside labelled
ranges (range-based precision, Tatbul et al. 2018, with no existence reward and flat
bias): an event overlapping no range (a false positive) earns 0, one inside a range 1.
Counting every overlapping event as fully correct instead would let a threshold below
every score win: the whole test set becomes one event overlapping every range, so F1 = 1
(on MSL that is what the oracle sweep picked for all three baselines).
Two thresholds are reported:

- label-free (deployable): per channel, a second detector is fit on the first 75% of
  ``train`` and scores the last 25%; the threshold is a quantile (default: the maximum)
  of those held-out scores, i.e. the highest score seen on normal data, or with
  ``--threshold pot`` the product's own: peaks over threshold on those scores with the
  settings ``trainer fit`` writes into ``thresholds.json`` (``trainer.thresholds``);
- oracle best-F1: one threshold for all channels, swept over the pooled test scores and
  chosen on the test labels. An upper bound, not a result a deployment could reach.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from stream_detector.config import AlertPolicy
from trainer.data import (
    DataNotFoundError,
    MslChannel,
    UcrFile,
    UcrSeries,
    list_msl,
    list_ucr,
    load_msl,
    load_ucr,
)
from trainer.detectors import PROFILES, Detector, get_detector, score_rows
from trainer.thresholds import REPLAY_ROW_MS, AlertReplay, ThresholdConfig, pot_threshold

UCR_MARGIN = 100
THRESHOLD_METHODS = ("quantile", "pot")
MSL_COLUMNS = ("telemetry", "all")
# How predicted events are formed: runs of scores above the threshold, or the alerts the
# worker's alert policy raises (`alert_mask`).
MSL_DECISIONS = ("threshold", "alerts")
# With ``decisions="alerts"`` the same scores are also decided under these variants of the
# worker's default policy (``AlertPolicy`` settings), reported beside the default.
MSL_POLICY_VARIANTS: dict[str, dict[str, Any]] = {
    "fixed threshold": {"adapt_fitted_threshold": False},
    "every alert confirmed": {"open_at_once_ratio": None},
    "neither (stop 23's policy)": {"adapt_fitted_threshold": False, "open_at_once_ratio": None},
}
# The alert spans of stops 23 to 25, recorded beside the policy variants: from and to the
# windows' ends rather than the readings that caused them.
WINDOW_END_SPANS = "spans at window ends"
HOLDOUT_FRACTION = 0.25
THRESHOLD_SWEEP_SIZE = 1000

# Failures recorded against one series instead of ending the whole run: bad input or
# settings (ValueError), a detector's runtime failure (RuntimeError, CUDA out of memory).
SERIES_ERRORS = (ValueError, RuntimeError, MemoryError)

_ID_TOKEN = re.compile(r"^(\d+)(?:-(\d+))?$")

Log = Callable[[str], None]


class DetectorOutputError(ValueError):
    """A detector returned scores of the wrong shape or with NaN/inf values."""


# ---------------------------------------------------------------------------------------
# UCR


def parse_id_tokens(tokens: Sequence[str]) -> tuple[list[int], list[tuple[int, int]]]:
    """Split ``["1", "5", "7-20", "30,31"]`` into single ids and inclusive ranges."""
    singles: list[int] = []
    ranges: list[tuple[int, int]] = []
    for token in (part for raw in tokens for part in raw.split(",") if part):
        match = _ID_TOKEN.match(token.strip())
        if match is None:
            raise ValueError(f"bad id {token!r}: use numbers and ranges like 7-20")
        first = int(match[1])
        if match[2] is None:
            singles.append(first)
            continue
        last = int(match[2])
        if last < first:
            raise ValueError(f"bad id range {token!r}: the end comes before the start")
        ranges.append((first, last))
    return singles, ranges


def select_ucr(data_dir: Path, tokens: Sequence[str] | None) -> list[UcrFile]:
    """The archive files chosen by ``--ids``; all when ``tokens`` is None.

    Single ids must exist; ranges take whichever ids the folder holds (the archive
    copy has gaps).
    """
    available = list_ucr(data_dir)
    if tokens is None:
        return available
    singles, ranges = parse_id_tokens(tokens)
    have = {entry.id for entry in available}
    missing = sorted(set(singles) - have)
    if missing:
        raise DataNotFoundError(f"UCR ids not found in {data_dir}: {missing}")
    chosen = [
        entry
        for entry in available
        if entry.id in singles or any(first <= entry.id <= last for first, last in ranges)
    ]
    if not chosen:
        raise DataNotFoundError(f"no UCR series in {data_dir} match ids {list(tokens)}")
    return chosen


def checked_scores(scores: np.ndarray, length: int, detector: str) -> np.ndarray:
    """``scores`` as float64 ``[length]``, or DetectorOutputError."""
    scores = np.asarray(scores, dtype=np.float64)
    if scores.shape != (length,):
        raise DetectorOutputError(
            f"{detector} returned scores of shape {scores.shape}; expected ({length},)"
        )
    if not np.all(np.isfinite(scores)):
        raise DetectorOutputError(f"{detector} returned NaN or infinite scores")
    return scores


def ucr_location(scores: np.ndarray, train_end: int) -> int:
    """The 1-based position of the highest score at or after ``train_end`` (first if tied)."""
    if not 0 <= train_end < scores.size:
        raise ValueError(f"train_end {train_end} leaves nothing to search in {scores.size} scores")
    return train_end + int(np.argmax(scores[train_end:])) + 1


def ucr_hit(location: int, begin: int, end: int, margin: int = UCR_MARGIN) -> bool:
    """The archive's rule: correct when ``begin - margin <= location <= end + margin``."""
    return begin - margin <= location <= end + margin


def _rounded(seconds: float) -> float:
    return round(seconds, 3)


def _fitted_changes(base: dict[str, Any], fitted: dict[str, Any]) -> dict[str, Any]:
    """Settings a detector chose while fitting (e.g. discord's ``m``)."""
    return {key: value for key, value in fitted.items() if base.get(key) != value}


def evaluate_ucr_series(
    detector: Detector, series: UcrSeries, base_settings: dict[str, Any]
) -> dict[str, Any]:
    """Fit on the training part, score the whole series, locate and judge the anomaly."""
    record: dict[str, Any] = {
        "id": series.id,
        "name": series.name,
        "length": int(series.values.shape[0]),
        "train_end": series.train_end,
        "anomaly": [series.anomaly_begin, series.anomaly_end],
        "location": None,
        "hit": False,
        "fit_s": None,
        "score_s": None,
    }
    started = time.perf_counter()
    try:
        detector.fit(series.values[: series.train_end])
        record["fit_s"] = _rounded(time.perf_counter() - started)
        started = time.perf_counter()
        raw = detector.score(series.values)
        record["score_s"] = _rounded(time.perf_counter() - started)
        scores = checked_scores(raw, series.values.shape[0], detector.name)
    except SERIES_ERRORS as error:
        record["error"] = f"{type(error).__name__}: {error}"
        return record
    location = ucr_location(scores, series.train_end)
    record["location"] = location
    record["hit"] = ucr_hit(location, series.anomaly_begin, series.anomaly_end)
    fitted = _fitted_changes(base_settings, detector.settings())
    if fitted:
        record["fitted"] = fitted
    return record


def _summary(records: list[dict[str, Any]]) -> dict[str, Any]:
    hits = sum(record["hit"] for record in records)
    return {
        "accuracy": hits / len(records) if records else None,
        "hits": hits,
        "evaluated": len(records),
        "errors": sum("error" in record for record in records),
        "fit_s": _rounded(sum(record["fit_s"] or 0.0 for record in records)),
        "score_s": _rounded(sum(record["score_s"] or 0.0 for record in records)),
    }


def _over_budget(started: float, time_budget_s: float | None, position: int) -> bool:
    """Whether to skip the ``position``-th (1-based) series: the first always runs."""
    if time_budget_s is None or position == 1:
        return False
    return time.perf_counter() - started > time_budget_s


def _detector_settings(
    names: Sequence[str], profile: str, streaming: bool = False, **overrides: Any
) -> dict[str, dict[str, Any]]:
    """Build each detector once up front, so a bad name fails before any work."""
    if len(set(names)) != len(names):
        raise ValueError(f"a detector is named twice: {list(names)}")
    settings = {}
    for name in names:
        detector = get_detector(name, profile, streaming, **overrides)
        settings[name] = {"causal": detector.causal, **detector.settings()}
    return settings


def run_ucr(
    files: Sequence[UcrFile],
    detector_names: Sequence[str],
    profile: str = "default",
    time_budget_s: float | None = None,
    log: Log | None = None,
) -> dict[str, Any]:
    """Every detector on every series (a fresh instance per series); the JSON result."""
    started = time.perf_counter()
    settings = _detector_settings(detector_names, profile)
    records: dict[str, list[dict[str, Any]]] = {name: [] for name in detector_names}
    skipped: list[int] = []
    for position, entry in enumerate(files, start=1):
        if _over_budget(started, time_budget_s, position):
            skipped.append(entry.id)
            continue
        series = load_ucr(entry.path)
        outcomes = []
        for name in detector_names:
            detector = get_detector(name, profile=profile)
            record = evaluate_ucr_series(detector, series, settings[name])
            records[name].append(record)
            outcomes.append(_outcome(name, record))
        if log is not None:
            log(f"[{position}/{len(files)}] {series.id} {series.name}: " + ", ".join(outcomes))
    detectors = {
        name: {
            **_summary(records[name]),
            "settings": settings[name],
            "series": records[name],
        }
        for name in detector_names
    }
    first = detector_names[0]
    return {
        "benchmark": "ucr",
        "conventions": (
            "anomaly and location are 1-based inclusive positions as in the archive's file "
            f"names; hit iff anomaly_begin - {UCR_MARGIN} <= location <= anomaly_end + "
            f"{UCR_MARGIN}; location = arg-max of the score at 0-based index >= train_end"
        ),
        "detector": first,
        "settings": settings[first],
        "accuracy": detectors[first]["accuracy"],
        "profile": profile,
        "wall_s": _rounded(time.perf_counter() - started),
        "time_budget_s": time_budget_s,
        "requested_ids": [entry.id for entry in files],
        "skipped_ids": skipped,
        "detectors": detectors,
        "series": detectors[first]["series"],
    }


def _outcome(name: str, record: dict[str, Any]) -> str:
    if "error" in record:
        return f"{name} error"
    seconds = (record["fit_s"] or 0.0) + (record["score_s"] or 0.0)
    return f"{name} {'hit' if record['hit'] else 'miss'} ({seconds:.1f} s)"


def _ucr_table(result: dict[str, Any]) -> Table:
    names = list(result["detectors"])
    table = Table(title=f"UCR anomaly archive: {len(result['series'])} series")
    for column in ("id", "name", "length", "anomaly"):
        table.add_column(column, justify="left" if column == "name" else "right")
    for name in names:
        table.add_column(name, justify="right")
    by_detector = [result["detectors"][name]["series"] for name in names]
    for rows in zip(*by_detector, strict=True):
        first = rows[0]
        cells = [str(first["id"]), first["name"], str(first["length"])]
        cells.append(f"{first['anomaly'][0]}-{first['anomaly'][1]}")
        for row in rows:
            if "error" in row:
                cells.append("[red]error[/red]")
            else:
                mark = "[green]✓[/green]" if row["hit"] else "[red]✗[/red]"
                cells.append(f"{row['location']} {mark}")
        table.add_row(*cells)
    table.add_section()
    accuracy_cells, seconds_cells = [], []
    for name in names:
        summary = result["detectors"][name]
        accuracy = "-" if summary["accuracy"] is None else f"{summary['accuracy']:.3f}"
        accuracy_cells.append(f"{accuracy} ({summary['hits']}/{summary['evaluated']})")
        seconds_cells.append(f"{summary['fit_s'] + summary['score_s']:.1f}")
    table.add_row("", "fit + score seconds", "", "", *seconds_cells)
    table.add_row("", "accuracy", "", "", *accuracy_cells)
    return table


# ---------------------------------------------------------------------------------------
# Event metrics (MSL)


@dataclass(frozen=True)
class EventCounts:
    """Event-level counts, summable over channels (see the module docstring)."""

    tp: int = 0  # labelled ranges overlapped by a predicted event
    fn: int = 0  # labelled ranges overlapped by none
    fp: int = 0  # predicted events overlapping no labelled range
    events: int = 0  # predicted events
    inside: float = 0.0  # sum over predicted events of the share of their points in a range

    def __add__(self, other: EventCounts) -> EventCounts:
        return EventCounts(
            self.tp + other.tp,
            self.fn + other.fn,
            self.fp + other.fp,
            self.events + other.events,
            self.inside + other.inside,
        )

    @property
    def precision(self) -> float:
        """Mean share of a predicted event's points that lie in a labelled range; 0 if none."""
        return self.inside / self.events if self.events else 0.0

    @property
    def recall(self) -> float:
        """Share of labelled ranges found; 0 when there are none."""
        labelled = self.tp + self.fn
        return self.tp / labelled if labelled else 0.0

    @property
    def f1(self) -> float:
        """Harmonic mean of precision and recall."""
        total = self.precision + self.recall
        return 2 * self.precision * self.recall / total if total else 0.0

    def as_dict(self) -> dict[str, float]:
        """Counts and the three ratios, for the JSON result."""
        return {
            "tp": self.tp,
            "fn": self.fn,
            "fp": self.fp,
            "events": self.events,
            "inside": self.inside,
            "precision": self.precision,
            "recall": self.recall,
            "f1": self.f1,
        }


def find_events(mask: np.ndarray) -> list[tuple[int, int]]:
    """Maximal runs of True in a boolean array, as inclusive ``(start, end)`` pairs."""
    padded = np.concatenate([[False], np.asarray(mask, dtype=bool), [False]])
    edges = np.flatnonzero(np.diff(padded.astype(np.int8)))
    return [
        (int(start), int(stop) - 1) for start, stop in zip(edges[::2], edges[1::2], strict=True)
    ]


def event_counts(
    scores: np.ndarray, threshold: float, anomalies: Sequence[tuple[int, int]]
) -> EventCounts:
    """Event-level counts for ``scores > threshold`` against inclusive labelled ranges."""
    return detection_counts(scores > threshold, anomalies)


def alert_mask(
    scores: np.ndarray,
    threshold: float,
    policy: AlertPolicy,
    evidence: np.ndarray | None = None,
) -> np.ndarray:
    """The rows inside the alerts the worker's alert policy raises on ``scores``.

    Each row's score is fed to `stream_detector.alerts.update` as the window ending at
    that row (``REPLAY_ROW_MS`` apart), with its cause at row ``evidence[row]`` (the row
    itself when None), so confirmation, hysteresis, minimum duration and cooldown apply
    as in the worker. An alert covers the rows from its ``start_ts_ms`` to its
    ``end_ts_ms`` (its evidence); one still open at the end, up to its latest evidence.
    """
    rows = np.arange(scores.size) if evidence is None else evidence
    replay = AlertReplay(policy)
    for row, (score, cause) in enumerate(zip(scores.tolist(), rows.tolist(), strict=True)):
        replay.add(row * REPLAY_ROW_MS, score, threshold, cause * REPLAY_ROW_MS)
    mask = np.zeros(scores.size, dtype=bool)
    for start, end in replay.spans():
        mask[start // REPLAY_ROW_MS : end // REPLAY_ROW_MS + 1] = True
    return mask


def detection_counts(detected: np.ndarray, anomalies: Sequence[tuple[int, int]]) -> EventCounts:
    """Event-level counts for detected rows (a boolean mask) against labelled ranges."""
    detected = np.asarray(detected, dtype=bool)
    label_mask = np.zeros(detected.size, dtype=bool)
    for start, end in anomalies:
        label_mask[start : end + 1] = True
    labelled_before = np.concatenate([[0], np.cumsum(label_mask)])  # labelled points in [0, i)
    events = find_events(detected)
    inside = [labelled_before[end + 1] - labelled_before[start] for start, end in events]
    found = sum(bool(detected[start : end + 1].any()) for start, end in anomalies)
    return EventCounts(
        tp=found,
        fn=len(anomalies) - found,
        fp=int(sum(count == 0 for count in inside)),
        events=len(events),
        inside=float(
            sum(
                count / (end - start + 1)
                for count, (start, end) in zip(inside, events, strict=True)
            )
        ),
    )


def pooled_best_threshold(
    scores: Sequence[np.ndarray],
    anomalies: Sequence[Sequence[tuple[int, int]]],
    sweep_size: int = THRESHOLD_SWEEP_SIZE,
) -> tuple[float, EventCounts]:
    """The single threshold, over quantiles of all scores pooled, with the best summed F1."""
    pooled = np.concatenate(scores)
    candidates = np.unique(np.quantile(pooled, np.linspace(0.0, 1.0, sweep_size + 1)))
    best_threshold, best = float(candidates[0]), EventCounts()
    best_f1 = -1.0
    for threshold in candidates:
        total = EventCounts()
        for channel_scores, channel_anomalies in zip(scores, anomalies, strict=True):
            total = total + event_counts(channel_scores, threshold, channel_anomalies)
        if total.f1 > best_f1:
            best_threshold, best, best_f1 = float(threshold), total, total.f1
    return best_threshold, best


def holdout_threshold(
    make_detector: Callable[[], Detector],
    train: np.ndarray,
    quantile: float = 1.0,
    holdout_fraction: float = HOLDOUT_FRACTION,
    method: str = "quantile",
) -> float:
    """A threshold without test labels, from held-out training scores.

    A fresh detector fits the first ``1 - holdout_fraction`` of ``train`` and scores the
    rest, data known to be normal. ``method="quantile"``: their ``quantile`` (1 = the
    highest); ``"pot"``: the product's peaks-over-threshold fit (``trainer.thresholds``).
    """
    if method not in THRESHOLD_METHODS:
        raise ValueError(f"threshold method must be one of {THRESHOLD_METHODS}, not {method!r}")
    if not 0.0 < holdout_fraction < 1.0 or not 0.0 <= quantile <= 1.0:
        raise ValueError("holdout_fraction must lie in (0, 1) and quantile in [0, 1]")
    cut = round(train.shape[0] * (1.0 - holdout_fraction))
    detector = make_detector()
    detector.fit(train[:cut])
    held_out = checked_scores(detector.score(train[cut:]), train.shape[0] - cut, detector.name)
    if method == "pot":
        return pot_threshold(held_out, ThresholdConfig()).threshold
    return float(np.quantile(held_out, quantile))


def evaluate_msl_channel(
    make_detector: Callable[[], Detector],
    channel: MslChannel,
    quantile: float,
    threshold_method: str = "quantile",
    decisions: str = "threshold",
) -> tuple[dict[str, Any], np.ndarray | None]:
    """Fit on train, score test, count events at the label-free threshold.

    Events are the runs of scores above it (``decisions="threshold"``) or the alerts the
    worker's default alert policy raises with it (``"alerts"``). Returns the channel's
    record and its test scores (None when scoring failed). When no label-free threshold
    can be set, the channel counts as reporting nothing.
    """
    record: dict[str, Any] = {
        "channel": channel.channel,
        "train_length": int(channel.train.shape[0]),
        "test_length": int(channel.test.shape[0]),
        "anomalies": [list(pair) for pair in channel.anomalies],
        "threshold": None,
    }
    nothing_reported = EventCounts(fn=len(channel.anomalies))
    try:
        started = time.perf_counter()
        detector = make_detector()
        detector.fit(channel.train)
        record["fit_s"] = _rounded(time.perf_counter() - started)
        started = time.perf_counter()
        raw, evidence = score_rows(detector, channel.test)
        record["score_s"] = _rounded(time.perf_counter() - started)
        scores = checked_scores(raw, channel.test.shape[0], detector.name)
    except SERIES_ERRORS as error:
        record |= {"error": f"{type(error).__name__}: {error}", **nothing_reported.as_dict()}
        return record, None
    try:
        started = time.perf_counter()
        threshold = holdout_threshold(
            make_detector, channel.train, quantile, method=threshold_method
        )
        record["calibration_s"] = _rounded(time.perf_counter() - started)
    except SERIES_ERRORS as error:
        record |= {"calibration_error": f"{type(error).__name__}: {error}"}
        record |= nothing_reported.as_dict()
        return record, scores
    if decisions == "alerts":
        policies = {"default": AlertPolicy()} | {
            name: AlertPolicy(**changes) for name, changes in MSL_POLICY_VARIANTS.items()
        }
        masks = {
            name: alert_mask(scores, threshold, policy, evidence)
            for name, policy in policies.items()
        }
        masks[WINDOW_END_SPANS] = alert_mask(scores, threshold, AlertPolicy())
        variants = {name: detection_counts(mask, channel.anomalies) for name, mask in masks.items()}
        counts = variants.pop("default")
        record["policy_variants"] = {name: value.as_dict() for name, value in variants.items()}
    else:
        counts = event_counts(scores, threshold, channel.anomalies)
    record |= {"threshold": threshold, **counts.as_dict()}
    return record, scores


def run_msl(
    data_dir: Path,
    channels: Sequence[str],
    detector_names: Sequence[str],
    profile: str = "default",
    time_budget_s: float | None = None,
    quantile: float = 1.0,
    log: Log | None = None,
    threshold_method: str = "quantile",
    columns: str = "telemetry",
    decisions: str = "threshold",
) -> dict[str, Any]:
    """Every detector on every channel; the JSON result.

    ``columns="telemetry"`` gives every detector column 0 only, the value the labels are
    about; ``"all"`` gives a multichannel detector the command flags too.
    ``decisions="alerts"`` runs every detector causally, as the worker scores, and counts
    the alerts the worker's alert policy raises (`alert_mask`).
    """
    if columns not in MSL_COLUMNS:
        raise ValueError(f"columns must be one of {MSL_COLUMNS}, not {columns!r}")
    if decisions not in MSL_DECISIONS:
        raise ValueError(f"decisions must be one of {MSL_DECISIONS}, not {decisions!r}")
    overrides = {"channel": 0} if columns == "telemetry" else {}
    streaming = decisions == "alerts"
    started = time.perf_counter()
    settings = _detector_settings(detector_names, profile, streaming, **overrides)
    records: dict[str, list[dict[str, Any]]] = {name: [] for name in detector_names}
    scores: dict[str, list[np.ndarray]] = {name: [] for name in detector_names}
    labels: dict[str, list[tuple[tuple[int, int], ...]]] = {name: [] for name in detector_names}
    skipped: list[str] = []
    width = None
    for position, channel_name in enumerate(channels, start=1):
        if _over_budget(started, time_budget_s, position):
            skipped.append(channel_name)
            continue
        channel = load_msl(data_dir, channel_name)
        width = channel.test.shape[1]
        outcomes = []
        for name in detector_names:
            record, channel_scores = evaluate_msl_channel(
                lambda name=name: get_detector(name, profile, streaming, **overrides),
                channel,
                quantile,
                threshold_method,
                decisions,
            )
            records[name].append(record)
            if channel_scores is not None:
                scores[name].append(channel_scores)
                labels[name].append(channel.anomalies)
            outcomes.append(f"{name} F1 {record['f1']:.2f}" if "error" not in record else name)
        if log is not None:
            log(f"[{position}/{len(channels)}] {channel_name}: " + ", ".join(outcomes))
    detectors = {}
    for name in detector_names:
        total = _summed_counts(records[name])
        summary: dict[str, Any] = {
            "label_free": total.as_dict(),
            "oracle_best_f1": None,
            "errors": sum("error" in row for row in records[name]),
            "fit_s": _rounded(sum(row.get("fit_s", 0.0) for row in records[name])),
            "score_s": _rounded(sum(row.get("score_s", 0.0) for row in records[name])),
            "calibration_s": _rounded(sum(row.get("calibration_s", 0.0) for row in records[name])),
        }
        if decisions == "alerts":
            summary["label_free_policy_variants"] = {
                variant: _summed_counts(
                    [row.get("policy_variants", {}).get(variant, row) for row in records[name]]
                ).as_dict()
                for variant in [*MSL_POLICY_VARIANTS, WINDOW_END_SPANS]
            }
        if scores[name]:
            threshold, best = pooled_best_threshold(scores[name], labels[name])
            summary["oracle_best_f1"] = {"threshold": threshold, **best.as_dict()}
        detectors[name] = {**summary, "settings": settings[name], "channels": records[name]}
    first = detector_names[0]
    return {
        "benchmark": "msl",
        "metric": (
            "event-level, no point adjustment; predicted events = "
            + (
                "maximal runs of score > threshold"
                if decisions == "threshold"
                else "the alerts the worker's default AlertPolicy raises on causal scores at "
                "the threshold (one row a minute; open to last hot window)"
            )
            + "; recall = labelled ranges overlapping a predicted event (tp) / all "
            "ranges; precision = mean over predicted events of the share of their points "
            "inside labelled ranges (range-based, Tatbul et al. 2018); fp = predicted events "
            "overlapping no range; counts summed over channels"
        ),
        "label_free_threshold": (
            f"per channel: fit on the first {1 - HOLDOUT_FRACTION:.0%} of train, score the "
            f"rest; threshold = quantile {quantile} of those scores"
            if threshold_method == "quantile"
            else f"per channel: fit on the first {1 - HOLDOUT_FRACTION:.0%} of train, score the "
            "rest; threshold = peaks over threshold on those scores (trainer.thresholds, "
            f"{ThresholdConfig()})"
        ),
        "oracle_best_f1_threshold": (
            "ORACLE: one threshold for all channels chosen on the test labels (best summed F1 "
            f"over {THRESHOLD_SWEEP_SIZE + 1} quantiles of the pooled test scores)"
        ),
        "input": (
            f"[T, {width}] per channel: column 0 is the telemetry value, the rest command "
            "flags; "
            + (
                "every detector reads column 0 only"
                if columns == "telemetry"
                else "multichannel detectors read all columns, the others column 0"
            )
        ),
        "columns": columns,
        "decisions": decisions,
        "detector": first,
        "settings": settings[first],
        "f1_label_free": detectors[first]["label_free"]["f1"],
        "best_f1_oracle": (detectors[first]["oracle_best_f1"] or {}).get("f1"),
        "profile": profile,
        "wall_s": _rounded(time.perf_counter() - started),
        "time_budget_s": time_budget_s,
        "requested_channels": list(channels),
        "skipped_channels": skipped,
        "detectors": detectors,
    }


def _summed_counts(rows: Sequence[dict[str, Any]]) -> EventCounts:
    """The event counts of channel records (or their policy variants), summed."""
    return sum(
        (EventCounts(**{key.name: row[key.name] for key in fields(EventCounts)}) for row in rows),
        EventCounts(),
    )


def _msl_table(result: dict[str, Any]) -> Table:
    names = list(result["detectors"])
    table = Table(title="NASA MSL, event-level F1 (no point adjustment)")
    table.add_column("channel")
    table.add_column("events", justify="right")
    for name in names:
        table.add_column(f"{name} P/R/F1", justify="right")
    by_detector = [result["detectors"][name]["channels"] for name in names]
    for rows in zip(*by_detector, strict=True):
        cells = [rows[0]["channel"], str(len(rows[0]["anomalies"]))]
        for row in rows:
            ratios = f"{row['precision']:.2f}/{row['recall']:.2f}/{row['f1']:.2f}"
            cells.append("[red]error[/red]" if "error" in row else ratios)
        table.add_row(*cells)
    table.add_section()
    label_free, oracle = [], []
    for name in names:
        summary = result["detectors"][name]
        counts = summary["label_free"]
        label_free.append(f"{counts['precision']:.2f}/{counts['recall']:.2f}/{counts['f1']:.3f}")
        best = summary["oracle_best_f1"]
        oracle.append(
            "-"
            if best is None
            else f"{best['precision']:.2f}/{best['recall']:.2f}/{best['f1']:.3f}"
        )
    table.add_row("summed, label-free threshold", "", *label_free)
    for variant in [*MSL_POLICY_VARIANTS, WINDOW_END_SPANS]:
        cells = []
        for name in names:
            counts = result["detectors"][name].get("label_free_policy_variants", {}).get(variant)
            cells.append(
                "-"
                if counts is None
                else f"{counts['precision']:.2f}/{counts['recall']:.2f}/{counts['f1']:.3f}"
            )
        table.add_row(f"summed, policy with {variant}", "", *cells)
    table.add_row("ORACLE best-F1 (test labels)", "", *oracle)
    return table


# ---------------------------------------------------------------------------------------
# Command line


def _write(result: dict[str, Any], out: Path | None, console: Console) -> None:
    if out is None:
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    console.print(f"results written to {out}")


def run_ucr_command(args: argparse.Namespace) -> int:
    """Handle ``python -m trainer ucr``."""
    console, progress = Console(), Console(stderr=True)
    try:
        files = select_ucr(args.data, args.ids)
        result = run_ucr(
            files,
            args.detector or ["anomalyllm"],
            profile=args.profile,
            time_budget_s=args.time_budget_s,
            log=progress.log,
        )
    # ValueError: malformed data or ids, unknown detector or profile; ImportError: a
    # registered detector whose module or dependencies are missing; OSError: no data.
    except (ValueError, ImportError, OSError) as error:
        print(f"ucr: {error}", file=sys.stderr)
        return 2
    console.print(_ucr_table(result))
    if result["skipped_ids"]:
        console.print(f"[yellow]time budget spent: skipped ids {result['skipped_ids']}[/yellow]")
    _write(result, args.out, console)
    return 0


def run_msl_command(args: argparse.Namespace) -> int:
    """Handle ``python -m trainer msl``."""
    console, progress = Console(), Console(stderr=True)
    try:
        available = list_msl(args.data)
        channels = args.channels or available
        unknown = sorted(set(channels) - set(available))
        if unknown:
            raise DataNotFoundError(f"MSL channels not found in {args.data}: {unknown}")
        result = run_msl(
            args.data,
            channels,
            args.detector or ["anomalyllm"],
            profile=args.profile,
            time_budget_s=args.time_budget_s,
            quantile=args.threshold_quantile,
            log=progress.log,
            threshold_method=args.threshold,
            columns=args.columns,
            decisions=args.decisions,
        )
    # As in run_ucr_command.
    except (ValueError, ImportError, OSError) as error:
        print(f"msl: {error}", file=sys.stderr)
        return 2
    console.print(_msl_table(result))
    if result["skipped_channels"]:
        console.print(
            f"[yellow]time budget spent: skipped channels {result['skipped_channels']}[/yellow]"
        )
    _write(result, args.out, console)
    return 0


def _common_arguments(parser: argparse.ArgumentParser, data_help: str) -> None:
    parser.add_argument("--data", type=Path, required=True, help=data_help)
    parser.add_argument("--out", type=Path, help="where to write the JSON results")
    parser.add_argument(
        "--detector",
        action="append",
        help="registered detector; repeat to run several on the same data (default: anomalyllm)",
    )
    parser.add_argument(
        "--time-budget-s", type=float, help="stop starting new series after this many seconds"
    )
    parser.add_argument(
        "--profile", choices=PROFILES, default="default", help="detector settings profile"
    )


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``ucr`` and ``msl`` subcommands to the trainer's command line."""
    ucr = subparsers.add_parser(
        "ucr",
        help="accuracy on the UCR anomaly archive",
        description="Locate the one anomaly of each UCR archive series (+-100 points).",
    )
    _common_arguments(ucr, "folder of archive-named series files (NNN_UCR_Anomaly_...)")
    ucr.add_argument(
        "--ids", nargs="+", metavar="ID", help="series ids and ranges, e.g. 1 5 7-20 (default: all)"
    )
    ucr.set_defaults(handler=run_ucr_command)

    msl = subparsers.add_parser(
        "msl",
        help="event-level F1 on NASA MSL telemetry",
        description="Event-level precision, recall and F1 on the NASA MSL channels.",
    )
    _common_arguments(msl, "folder with <chan>.npz files and labeled_anomalies.csv")
    msl.add_argument("--channels", nargs="+", metavar="CHAN", help="e.g. C-1 T-4 (default: all)")
    msl.add_argument(
        "--threshold-quantile",
        type=float,
        default=1.0,
        help="label-free threshold: this quantile of held-out training scores (default: max)",
    )
    msl.add_argument(
        "--threshold",
        choices=THRESHOLD_METHODS,
        default="quantile",
        help="label-free threshold rule: a quantile, or the product's peaks over threshold",
    )
    msl.add_argument(
        "--columns",
        choices=MSL_COLUMNS,
        default="telemetry",
        help="what every detector reads: the telemetry value (column 0, what the labels are "
        "about) or all 55 columns, command flags included (default: telemetry)",
    )
    msl.add_argument(
        "--decisions",
        choices=MSL_DECISIONS,
        default="threshold",
        help="predicted events: runs of scores above the threshold, or the alerts of the "
        "worker's alert policy on causal scores (default: threshold)",
    )
    msl.set_defaults(handler=run_msl_command)
