"""The promotion gate: a new version replaces CURRENT only if it is not worse.

Both versions are judged on the same held-back data (the newest slice of normal data,
never trained or calibrated on) and the same labelled incidents, each at its own
thresholds and under the worker's alert policy (``stream_detector.alerts.update``):

- false-alarm rate: the share of held-back windows scoring above the threshold; and the
  alerts the policy would open on them, per sensor and day;
- detection: an incident counts as detected when an alert opens between its start and
  one window length after its end.

The candidate passes when its false-alarm rate exceeds the current one's by at most
``max_false_alarm_increase`` plus ``noise_allowance`` binomial standard errors of the
current rate (so that a handful of windows on a short hold-out slice does not flip the
decision), its alert rate by at most ``max_alert_rate_increase``, and it misses at most
``max_missed_increase`` more incidents than the current version.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from stream_detector.alerts import Thresholds
from stream_detector.config import AlertPolicy
from trainer.sources import Span
from trainer.thresholds import SensorScores, days_covered, replay_alerts


@dataclass(frozen=True)
class GateConfig:
    """How much worse than CURRENT a candidate may be and still be promoted."""

    max_false_alarm_increase: float = 0.002  # absolute, share of held-back windows
    max_alert_rate_increase: float = 0.5  # alerts per sensor and day on held-back data
    max_missed_increase: int = 0  # labelled incidents
    noise_allowance: float = 2.0  # standard errors of CURRENT's false-alarm rate

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Evaluation:
    """How one version does on the held-back data and the incidents."""

    windows: int = 0
    above_threshold: int = 0
    alerts: int = 0
    sensor_days: float = 0.0
    incidents: int = 0
    detected: int = 0
    missed: list[dict[str, Any]] = field(default_factory=list)

    @property
    def false_alarm_rate(self) -> float:
        return self.above_threshold / self.windows if self.windows else 0.0

    @property
    def alerts_per_sensor_day(self) -> float:
        return self.alerts / self.sensor_days if self.sensor_days else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "holdout_windows": self.windows,
            "above_threshold": self.above_threshold,
            "false_alarm_rate": round(self.false_alarm_rate, 6),
            "alerts": self.alerts,
            "alerts_per_sensor_day": round(self.alerts_per_sensor_day, 4),
            "incidents": self.incidents,
            "detected": self.detected,
            "missed": self.missed,
        }


@dataclass(frozen=True)
class Decision:
    """Whether to promote, and why."""

    promote: bool
    passed: bool  # the gate's own verdict, before --force
    reasons: list[str]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def evaluate(
    holdout: Mapping[str, SensorScores],
    incidents: Sequence[tuple[Span, SensorScores, int]],
    thresholds: Thresholds,
    policy: AlertPolicy,
) -> Evaluation:
    """Judge one version: ``incidents`` are (span, scores around it, detection slack ms)."""
    result = Evaluation()
    for sensor_id, scores in holdout.items():
        if not len(scores.scores):
            continue
        above, opened = replay_alerts(
            scores, sensor_id, thresholds.for_sensor(sensor_id, policy), policy
        )
        result.windows += len(scores.scores)
        result.above_threshold += above
        result.alerts += len(opened)
        result.sensor_days += days_covered(scores.end_ts_ms)
    for span, scores, slack_ms in incidents:
        result.incidents += 1
        threshold = thresholds.for_sensor(span.sensor_id, policy)
        _, opened = replay_alerts(scores, span.sensor_id, threshold, policy)
        if any(span.start_ts_ms <= ts <= span.end_ts_ms + slack_ms for ts in opened):
            result.detected += 1
        else:
            result.missed.append(span.to_dict())
    return result


def decide(
    candidate: Evaluation,
    current: Evaluation | None,
    config: GateConfig,
    *,
    force: bool = False,
    incomparable: str | None = None,
) -> Decision:
    """Compare a candidate with CURRENT; ``incomparable`` says why no comparison is possible."""
    if current is None and incomparable is None:
        return Decision(True, True, ["no CURRENT version to compare with"])
    reasons = []
    if incomparable is not None:
        reasons.append(f"cannot compare with CURRENT: {incomparable}")
    else:
        assert current is not None
        rate = current.false_alarm_rate
        noise = config.noise_allowance * math.sqrt(rate * (1 - rate) / max(current.windows, 1))
        far_limit = rate + config.max_false_alarm_increase + noise
        if candidate.false_alarm_rate > far_limit:
            reasons.append(
                f"false-alarm rate {candidate.false_alarm_rate:.4f} on held-back data exceeds "
                f"CURRENT's {rate:.4f} + {config.max_false_alarm_increase} + {noise:.4f} (noise)"
            )
        alert_limit = current.alerts_per_sensor_day + config.max_alert_rate_increase
        if candidate.alerts_per_sensor_day > alert_limit:
            reasons.append(
                f"{candidate.alerts_per_sensor_day:.2f} alerts per sensor-day on held-back "
                f"data exceed CURRENT's {current.alerts_per_sensor_day:.2f} + "
                f"{config.max_alert_rate_increase}"
            )
        missed, current_missed = (
            candidate.incidents - candidate.detected,
            current.incidents - current.detected,
        )
        if missed > current_missed + config.max_missed_increase:
            reasons.append(
                f"misses {missed} of {candidate.incidents} labelled incidents, "
                f"CURRENT misses {current_missed}"
            )
    passed = not reasons
    if passed:
        reasons = ["not worse than CURRENT on held-back data and labelled incidents"]
    elif force:
        reasons.append("promoted anyway: --force")
    return Decision(passed or force, passed, reasons)
