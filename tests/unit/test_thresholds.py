"""Threshold calibration: peaks over threshold, the quantile fallback, the alert budget."""

from __future__ import annotations

import numpy as np
import pytest

from stream_detector.alerts import Thresholds
from stream_detector.config import AlertPolicy
from trainer.gate import Evaluation, GateConfig, decide
from trainer.thresholds import (
    Estimate,
    SensorScores,
    ThresholdConfig,
    apply_budget,
    calibrate,
    count_alerts,
    pot_threshold,
)

pytestmark = pytest.mark.unit

POLICY = AlertPolicy(confirm_k=2, confirm_n=3, min_duration_windows=2, cooldown_ms=0)
MINUTE_MS = 60_000


@pytest.mark.parametrize(
    ("name", "draw"),
    [
        ("exponential", lambda rng, n: rng.exponential(size=n)),
        ("pareto", lambda rng, n: rng.pareto(3.0, size=n)),
        ("half-normal", lambda rng, n: np.abs(rng.normal(size=n))),
    ],
)
@pytest.mark.parametrize("risk_level", [1e-2, 1e-3])
def test_pot_achieves_the_target_false_alarm_rate(name: str, draw, risk_level: float) -> None:
    rng = np.random.default_rng(7)
    estimate = pot_threshold(draw(rng, 50_000), ThresholdConfig(risk_level=risk_level))
    fresh = draw(rng, 2_000_000)
    achieved = float((fresh > estimate.threshold).mean())
    assert estimate.method == "pot"
    assert risk_level / 1.6 < achieved < risk_level * 1.6, (name, achieved)


def test_pot_extrapolates_beyond_the_data_where_a_quantile_cannot() -> None:
    rng = np.random.default_rng(3)
    scores = rng.exponential(size=5_000)  # expects 0.5 windows above the 1e-4 threshold
    estimate = pot_threshold(scores, ThresholdConfig(risk_level=1e-4))
    assert estimate.method == "pot"
    assert estimate.threshold == pytest.approx(np.log(1e4), rel=0.15)
    assert estimate.parameters["shape"] == pytest.approx(0.0, abs=0.2)


def test_too_few_peaks_fall_back_to_the_quantile() -> None:
    scores = np.random.default_rng(0).exponential(size=1_000)  # 20 peaks over the 98th pct
    estimate = pot_threshold(scores, ThresholdConfig(risk_level=1e-2))
    assert estimate.method == "quantile"
    assert "peaks" in estimate.parameters["reason"]
    assert estimate.threshold == pytest.approx(np.quantile(scores, 0.99))


def test_risk_level_must_lie_in_the_fitted_tail() -> None:
    with pytest.raises(ValueError, match="below 1 - initial_quantile"):
        ThresholdConfig(risk_level=0.05, initial_quantile=0.98)


def _bursty(days: int, bursts_per_day: int, seed: int = 0) -> SensorScores:
    """One window a minute; ``bursts_per_day`` bursts of 10 high windows a day."""
    rng = np.random.default_rng(seed)
    count = days * 24 * 60
    scores = rng.exponential(size=count)
    for start in rng.choice(count - 10, size=days * bursts_per_day, replace=False):
        scores[start : start + 10] += 6 + rng.uniform(0, 6)
    return SensorScores(np.arange(count, dtype=np.int64) * MINUTE_MS, scores)


def test_the_alert_budget_raises_the_threshold_until_it_is_met() -> None:
    scores = _bursty(days=3, bursts_per_day=8)
    base = Estimate(6.0, "pot", {"risk_level": 1e-3})
    assert count_alerts(scores, base.threshold, POLICY) > 3 * 2

    budgeted = apply_budget(base, scores, per_day=2, policy=POLICY)
    assert budgeted.threshold > base.threshold
    assert budgeted.method == "pot+budget"
    assert count_alerts(scores, budgeted.threshold, POLICY) <= 2 * 3
    assert budgeted.parameters["budget"]["alerts_before"] > 6
    # Not raised further than needed: just below it, the budget is exceeded.
    assert count_alerts(scores, budgeted.threshold * 0.97, POLICY) > 6


def test_calibrate_writes_what_the_worker_reads() -> None:
    rng = np.random.default_rng(1)
    per_sensor = {
        "pump-1": SensorScores(np.arange(5_000) * MINUTE_MS, rng.exponential(size=5_000)),
        "pump-2": SensorScores(np.arange(5_000) * MINUTE_MS, 3 * rng.exponential(size=5_000)),
        "pump-3": SensorScores(np.arange(10) * MINUTE_MS, rng.exponential(size=10)),
    }
    data = calibrate(per_sensor, ThresholdConfig(risk_level=1e-3), POLICY)
    parsed = Thresholds.from_dict(data)
    assert set(parsed.per_sensor) == {"pump-1", "pump-2"}  # pump-3: too few windows
    assert parsed.for_sensor("pump-3", POLICY) == parsed.default
    assert parsed.per_sensor["pump-2"] == pytest.approx(3 * parsed.per_sensor["pump-1"], rel=0.3)
    assert data["sensors"]["pump-1"]["method"] == "pot"
    assert data["sensors"]["pump-1"]["risk_level"] == 1e-3
    assert {"shape", "scale", "initial_threshold", "peaks"} <= set(data["sensors"]["pump-1"])


def _evaluation(windows: int, above: int, incidents: int = 0, detected: int = 0) -> Evaluation:
    return Evaluation(
        windows=windows,
        above_threshold=above,
        sensor_days=10.0,
        incidents=incidents,
        detected=detected,
    )


def test_the_gate_refuses_more_false_alarms_or_missed_incidents() -> None:
    current = _evaluation(10_000, 10, incidents=2, detected=2)
    assert decide(_evaluation(10_000, 12, 2, 2), current, GateConfig()).promote
    worse = decide(_evaluation(10_000, 60, 2, 2), current, GateConfig())
    assert not worse.promote and "false-alarm rate" in worse.reasons[0]
    blind = decide(_evaluation(10_000, 0, 2, 0), current, GateConfig())
    assert not blind.promote and "misses 2 of 2" in blind.reasons[0]
    forced = decide(_evaluation(10_000, 0, 2, 0), current, GateConfig(), force=True)
    assert forced.promote and not forced.passed
    assert decide(_evaluation(100, 50), None, GateConfig()).promote
