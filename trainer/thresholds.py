"""Per-sensor alert thresholds from scores on recent normal data, as ``thresholds.json``.

Peaks over threshold (Siffer et al., KDD 2017): take the ``initial_quantile`` of the
scores as ``u``, fit a generalised Pareto distribution (``scipy.stats.genpareto``, location
0) to the excesses over ``u``, and put the threshold where the fitted tail has probability
``risk_level`` (q) per window:

    z_q = u + (sigma / xi) * ((q * n / N_u) ** (-xi) - 1)
    z_q = u - sigma * log(q * n / N_u)                          (when xi = 0)

With fewer than ``min_peaks`` excesses (or a fit that does not give a finite threshold
above ``u``) the empirical ``1 - q`` quantile is used instead (``"method": "quantile"``).

Optional alert budget: at most ``max_alerts_per_day`` alerts per sensor and day of
calibration data. The calibration scores are replayed through the worker's own alert
policy (``stream_detector.alerts.update``: k-of-n confirmation, hysteresis, cooldown);
while they open more alerts than the budget allows, the threshold is raised (bisection
over the observed scores, assuming fewer alerts at a higher threshold).

Output, the format ``stream_detector.alerts.Thresholds.from_dict`` reads: ``default`` (the
pooled scores of all sensors, no budget) and ``sensors`` (one entry per sensor with at
least ``min_windows`` calibration windows; the others use ``default``). Each entry keeps
its method and parameters next to ``threshold``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy.stats import genpareto

from stream_detector.alerts import SensorAlertState, update
from stream_detector.config import AlertPolicy
from stream_detector.schemas import AlertEvent

_DAY_MS = 86_400_000
# The clock of a replay over rows without timestamps (the evaluation corpora): one row a
# minute, so the policy's times (cooldown in ms) mean the same in every harness.
REPLAY_ROW_MS = 60_000
_SMALLEST_THRESHOLD = 1e-9  # thresholds.json needs a positive threshold


@dataclass(frozen=True)
class ThresholdConfig:
    """How thresholds are calibrated."""

    risk_level: float = 1e-3  # q: chance that a normal window scores above the threshold
    initial_quantile: float = 0.98  # u for peaks over threshold
    min_peaks: int = 30  # fewer excesses over u: the empirical quantile instead
    min_windows: int = 50  # fewer calibration windows: the sensor uses the default entry
    max_alerts_per_day: float | None = None  # per sensor, on the calibration data

    def __post_init__(self) -> None:
        if not 0 < self.risk_level < 1:
            raise ValueError(f"risk_level must lie in (0, 1), got {self.risk_level}")
        if not 0 < self.initial_quantile < 1:
            raise ValueError(f"initial_quantile must lie in (0, 1), got {self.initial_quantile}")
        if self.risk_level >= 1 - self.initial_quantile:
            raise ValueError(
                f"risk_level {self.risk_level} must be below 1 - initial_quantile "
                f"({1 - self.initial_quantile:g}): the threshold lies in the fitted tail"
            )
        if self.max_alerts_per_day is not None and self.max_alerts_per_day < 0:
            raise ValueError("max_alerts_per_day must be >= 0")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True, eq=False)
class SensorScores:
    """Scores of one sensor's windows, in time order, with each window's end timestamp."""

    end_ts_ms: np.ndarray  # (N,) int64
    scores: np.ndarray  # (N,) float


@dataclass(frozen=True)
class Estimate:
    """One threshold and how it was obtained."""

    threshold: float
    method: str  # "pot" or "quantile"
    parameters: dict[str, Any]

    def entry(self) -> dict[str, Any]:
        """The ``thresholds.json`` entry."""
        return {"threshold": self.threshold, "method": self.method, **self.parameters}


def quantile_threshold(scores: np.ndarray, risk_level: float, reason: str) -> Estimate:
    """The empirical ``1 - risk_level`` quantile."""
    threshold = float(np.quantile(scores, 1 - risk_level))
    return Estimate(
        max(threshold, _SMALLEST_THRESHOLD),
        "quantile",
        {"risk_level": risk_level, "windows": len(scores), "reason": reason},
    )


def pot_threshold(scores: np.ndarray, config: ThresholdConfig) -> Estimate:
    """Peaks-over-threshold threshold at ``config.risk_level``, or the quantile fallback."""
    scores = np.asarray(scores, dtype=np.float64)
    scores = scores[np.isfinite(scores)]
    if len(scores) == 0:
        raise ValueError("no finite scores to calibrate a threshold on")
    n = len(scores)
    initial = float(np.quantile(scores, config.initial_quantile))
    excesses = scores[scores > initial] - initial
    peaks = len(excesses)
    if peaks < config.min_peaks:
        return quantile_threshold(
            scores, config.risk_level, f"{peaks} peaks over u < min_peaks {config.min_peaks}"
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the optimiser's probing steps
        shape, _, scale = genpareto.fit(excesses, floc=0)
    ratio = config.risk_level * n / peaks
    if abs(shape) < 1e-6:
        threshold = initial - scale * math.log(ratio)
    else:
        threshold = initial + scale / shape * (ratio ** (-shape) - 1)
    if not math.isfinite(threshold) or threshold <= initial or scale <= 0:
        return quantile_threshold(
            scores, config.risk_level, f"GPD fit unusable (shape {shape:.3g}, scale {scale:.3g})"
        )
    return Estimate(
        float(threshold),
        "pot",
        {
            "risk_level": config.risk_level,
            "windows": n,
            "initial_quantile": config.initial_quantile,
            "initial_threshold": initial,
            "peaks": peaks,
            "shape": float(shape),
            "scale": float(scale),
        },
    )


class AlertReplay:
    """The worker's alert policy run over one sensor's scores, window by window.

    Keeps the spans of the alerts it raised: what ``trainer refresh`` leaves out of its
    data (`trainer.sources.alert_spans`) and what the evaluation counts as detections.
    """

    def __init__(self, policy: AlertPolicy, sensor_id: str = "replay") -> None:
        self.policy = policy
        self.state = SensorAlertState(sensor_id)
        self.closed: list[tuple[int, int]] = []

    def add(
        self, ts_ms: int, score: float, threshold: float | None, evidence_ts_ms: int | None = None
    ) -> list[AlertEvent]:
        """Fold in the score of the window ending at ``ts_ms`` whose cause lies at
        ``evidence_ts_ms`` (`stream_detector.alerts.update`); the events it caused."""
        self.state, events = update(
            self.state,
            score=score,
            ts_ms=ts_ms,
            threshold=threshold,
            policy=self.policy,
            model_version="replay",
            nearest_prototype=0,
            attribution=(1.0,),
            evidence_ts_ms=evidence_ts_ms,
        )
        self.closed += [
            (event.start_ts_ms, event.end_ts_ms) for event in events if event.state == "resolved"
        ]
        return events

    def spans(self, open_until_ms: int | None = None) -> list[tuple[int, int]]:
        """(start, end) of every alert so far, inclusive. One still open ends at
        ``open_until_ms``, or at its latest evidence so far when that is None."""
        alert = self.state.open_alert
        if alert is None:
            return list(self.closed)
        end = alert.last_hot_ts_ms if open_until_ms is None else open_until_ms
        return [*self.closed, (alert.start_ts_ms, end)]


def replay_alerts(
    scores: SensorScores, sensor_id: str, threshold: float | None, policy: AlertPolicy
) -> tuple[int, list[int]]:
    """Run the worker's alert policy over these scores.

    Returns the windows above the threshold in force and the event times of the alerts
    that opened (``threshold=None`` is the worker's quantile fallback).
    """
    replay = AlertReplay(policy, sensor_id)
    above, opened = 0, []
    for ts_ms, score in zip(scores.end_ts_ms.tolist(), scores.scores.tolist(), strict=True):
        events = replay.add(ts_ms, score, threshold)
        if replay.state.threshold is not None and score > replay.state.threshold:
            above += 1
        opened += [event.event_ts_ms for event in events if event.state == "open"]
    return above, opened


def count_alerts(scores: SensorScores, threshold: float, policy: AlertPolicy) -> int:
    """Alerts the worker's policy would open on these scores at ``threshold``."""
    return len(replay_alerts(scores, "calibration", threshold, policy)[1])


def days_covered(end_ts_ms: np.ndarray) -> float:
    """Days between the first and the last window (at least one hour's worth)."""
    if len(end_ts_ms) < 2:
        return 1 / 24
    return max(float(end_ts_ms[-1] - end_ts_ms[0]) / _DAY_MS, 1 / 24)


def apply_budget(
    estimate: Estimate, scores: SensorScores, per_day: float, policy: AlertPolicy
) -> Estimate:
    """Raise the threshold until the calibration data opens at most ``per_day`` alerts a day."""
    allowed = per_day * days_covered(scores.end_ts_ms)
    opened = count_alerts(scores, estimate.threshold, policy)
    budget = {"max_alerts_per_day": per_day, "allowed": round(allowed, 3)}
    if opened <= allowed:
        return Estimate(
            estimate.threshold,
            estimate.method,
            {**estimate.parameters, "budget": {**budget, "alerts": opened, "raised_from": None}},
        )
    candidates = np.unique(scores.scores[scores.scores > estimate.threshold])
    # At the highest score nothing is above the threshold, so nothing opens.
    low, high = 0, len(candidates) - 1
    while low < high:
        middle = (low + high) // 2
        if count_alerts(scores, float(candidates[middle]), policy) <= allowed:
            high = middle
        else:
            low = middle + 1
    threshold = float(candidates[low])
    return Estimate(
        threshold,
        f"{estimate.method}+budget",
        {
            **estimate.parameters,
            "budget": {
                **budget,
                "alerts": count_alerts(scores, threshold, policy),
                "alerts_before": opened,
                "raised_from": estimate.threshold,
            },
        },
    )


def calibrate(
    per_sensor: Mapping[str, SensorScores], config: ThresholdConfig, policy: AlertPolicy
) -> dict[str, Any]:
    """``thresholds.json`` content from each sensor's calibration scores."""
    pooled = [s.scores for s in per_sensor.values() if len(s.scores)]
    if not pooled:
        raise ValueError("no calibration windows: give more recent data to calibrate on")
    default = pot_threshold(np.concatenate(pooled), config)
    sensors = {}
    for sensor_id, scores in sorted(per_sensor.items()):
        if len(scores.scores) < config.min_windows:
            continue
        estimate = pot_threshold(scores.scores, config)
        if config.max_alerts_per_day is not None:
            estimate = apply_budget(estimate, scores, config.max_alerts_per_day, policy)
        sensors[sensor_id] = estimate.entry()
    return {"default": default.entry(), "sensors": sensors}


def summary(thresholds: Mapping[str, Any]) -> dict[str, Any]:
    """A short account of a ``thresholds.json`` for reports."""
    sensors = thresholds.get("sensors", {})
    values = [entry["threshold"] for entry in sensors.values()]
    methods: dict[str, int] = {}
    for entry in sensors.values():
        methods[entry.get("method", "?")] = methods.get(entry.get("method", "?"), 0) + 1
    default = thresholds.get("default", {})
    return {
        "default": {"threshold": default.get("threshold"), "method": default.get("method")},
        "sensors": len(sensors),
        "methods": methods,
        "min": min(values, default=None),
        "median": float(np.median(values)) if values else None,
        "max": max(values, default=None),
    }
