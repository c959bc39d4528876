"""From window scores to alert lifecycles: pure decisions, no I/O.

Per sensor, ``update`` folds one window score into a ``SensorAlertState`` and returns the
new state with the ``AlertEvent`` objects it caused. The state round-trips through
``to_dict``/``from_dict`` (compact JSON-ready data) so that it can live in Redis (the Redis
I/O is elsewhere).

The rules, with their parameters in ``AlertPolicy`` (``settings.alerts``):

- Confirmation: an alert opens when at least ``confirm_k`` of the last ``confirm_n``
  windows scored above the threshold. Only a confirmed alert is ever published; its
  ``start_ts_ms`` is the first above-threshold window of the run that led to it (a run
  ends when ``confirm_n`` windows in a row stay at or below the threshold).
- Severe windows (``open_at_once_ratio``): a window scoring at least that multiple of the
  threshold opens an alert at once (a spike that one window sees, as the point term
  judges each reading in one window only, cannot be confirmed by the next ones).
- Updates: while open, an ``update`` is emitted when the peak has grown by
  ``update_peak_increase`` (relative) since the last event, or when the severity band
  rises; so at most logarithmically many updates per alert, not one per window.
- Hysteresis and minimum duration: an open alert resolves once ``confirm_k`` consecutive
  windows score below ``threshold * hysteresis_ratio``, and not before it has been open for
  ``min_duration_windows`` windows (counting the window that opened it).
- Cooldown: for ``cooldown_ms`` after a resolve no alert opens. Windows scored meanwhile
  still count towards the next confirmation but extend nothing: neither the cooldown nor
  the resolved alert. An anomaly that persists through the cooldown therefore opens a new
  alert (with a new id) on the first window after the cooldown.
- Severity: the highest band in ``severity_bands`` whose ratio is <= peak / threshold.
- Replays: a score whose ``ts_ms`` is not after the state's ``last_ts_ms`` is ignored, and
  alert ids are derived from (sensor, the window that opened it, model version), so
  replaying scores produces no duplicate events, and a replay from an older state the same
  ids.
- Span: an alert's ``start_ts_ms`` and ``end_ts_ms`` say where its evidence lies, not
  when it was decided: from the reading that caused the first window above the threshold
  to the latest such reading of a window at or above the resolve level (``update``'s
  ``evidence_ts_ms``). A window ends up to its length after the readings that made it
  hot, so its end would stretch the alert that far past the anomaly.
- Quantile fallback (``threshold=None``): the threshold is a running estimate of the
  ``fallback_quantile`` of the sensor's own scores (``QuantileSketch``). Scores of an
  open alert never enter it, and a breach enters only once it has left the last
  ``confirm_n`` windows without opening an alert, so an anomaly does not raise its own bar.
- Adaptive fitted threshold (``adapt_fitted_threshold``): the same sketch runs beside a
  fitted threshold, and once warmed up the threshold is the larger of the two. A new
  fitted threshold (a new model version or a refresh: scores on another scale) starts a
  new sketch.
- Non-finite scores are skipped (they advance ``last_ts_ms`` and decide nothing).

Before ``update``, ``adapt_terms`` turns the terms of a fused score into the window's
score with each term measured from the sensor's own edge of normal (``adapt_term_units``;
one ``QuantileSketch`` per term in the same state), so that a term that drifted past its
training range stops paging while the others keep their sensitivity.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import math
import struct
from bisect import bisect_right
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from pydantic import TypeAdapter

from stream_detector.config import AlertPolicy
from stream_detector.schemas import AlertEvent, AlertState

__all__ = [
    "AlertPolicy",
    "InvalidAlertState",
    "InvalidThresholds",
    "OpenAlert",
    "Peak",
    "QuantileSketch",
    "SensorAlertState",
    "Thresholds",
    "adapt_terms",
    "make_alert_id",
    "severity_for",
    "update",
]


class InvalidThresholds(ValueError):
    """A ``thresholds.json`` that does not follow the documented format."""


class InvalidAlertState(ValueError):
    """Stored alert state that cannot be read back (corrupt, or from another format)."""


@dataclass(frozen=True, slots=True)
class Thresholds:
    """Per-sensor calibrated thresholds of one model version, from its ``thresholds.json``.

    Format (written by the trainer; extra keys in an entry, such as fit parameters, are kept
    out of decisions)::

        {"default": {"threshold": 3.1, "method": "pot"},
         "sensors": {"pump-17": {"threshold": 2.4, "method": "quantile"}}}

    Both keys are optional. A sensor uses its own entry, else ``default``, else the policy's
    fallback (``AlertPolicy`` documents it); ``Thresholds()`` is a model without the file.
    """

    default: float | None = None
    per_sensor: Mapping[str, float] = field(default_factory=dict)
    method: str | None = None

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Thresholds:
        """Read the parsed ``thresholds.json``; raise ``InvalidThresholds`` if malformed."""
        if not isinstance(data, Mapping):
            raise InvalidThresholds("thresholds.json must hold a JSON object")
        unknown = set(data) - {"default", "sensors"}
        if unknown:
            raise InvalidThresholds(
                f"thresholds.json has unknown keys {sorted(unknown)}; "
                "expected 'default' and/or 'sensors'"
            )
        default = method = None
        if "default" in data:
            default = _entry_threshold(data["default"], "default")
            method = data["default"].get("method")
            if method is not None and not isinstance(method, str):
                raise InvalidThresholds("thresholds.json default.method must be a string")
        sensors = data.get("sensors", {})
        if not isinstance(sensors, Mapping):
            raise InvalidThresholds("thresholds.json 'sensors' must map sensor ids to entries")
        per_sensor = {
            sensor_id: _entry_threshold(entry, f"sensors.{sensor_id}")
            for sensor_id, entry in sensors.items()
        }
        return cls(default=default, per_sensor=per_sensor, method=method)

    def for_sensor(self, sensor_id: str, policy: AlertPolicy) -> float | None:
        """The sensor's threshold; ``None`` means "use the running quantile fallback"."""
        threshold = self.per_sensor.get(sensor_id, self.default)
        if threshold is not None:
            return threshold
        if policy.threshold_fallback == "fixed":
            return policy.fallback_threshold
        return None


def _entry_threshold(entry: object, where: str) -> float:
    if not isinstance(entry, Mapping) or "threshold" not in entry:
        raise InvalidThresholds(f"thresholds.json {where} must be an object with a 'threshold'")
    threshold = entry["threshold"]
    if (
        isinstance(threshold, bool)
        or not isinstance(threshold, int | float)
        or not math.isfinite(threshold)
        or threshold <= 0
    ):
        raise InvalidThresholds(
            f"thresholds.json {where}.threshold must be a positive finite number, got {threshold!r}"
        )
    return float(threshold)


@dataclass(frozen=True, slots=True)
class QuantileSketch:
    """Running estimate of one quantile in constant space (P², Jain & Chlamtac 1985)."""

    quantile: float
    count: int = 0
    heights: tuple[float, ...] = ()
    positions: tuple[int, ...] = ()
    # The fitted threshold it runs beside (``adapt_fitted_threshold``), None for the
    # fallback: another fitted threshold means a model whose scores have another scale.
    floor: float | None = None

    def add(self, x: float) -> QuantileSketch:
        """Return the sketch with ``x`` observed."""
        # Built directly rather than with ``replace``, which inspects the fields on every
        # call: a scored window adds to six sketches (the threshold's and one per term).
        count = self.count + 1
        if count <= 5:
            heights = tuple(sorted((*self.heights, x)))
            positions = (0, 1, 2, 3, 4) if count == 5 else ()
            return QuantileSketch(self.quantile, count, heights, positions, self.floor)
        q = list(self.heights)
        n = list(self.positions)
        if x < q[0]:
            q[0] = x
            cell = 0
        elif x >= q[4]:
            q[4] = x
            cell = 3
        else:
            cell = bisect_right(q, x) - 1
        for i in range(cell + 1, 5):
            n[i] += 1
        p = self.quantile
        desired = (0.0, (count - 1) * p / 2, (count - 1) * p, (count - 1) * (1 + p) / 2)
        for i in (1, 2, 3):
            offset = desired[i] - n[i]
            if (offset >= 1 and n[i + 1] - n[i] > 1) or (offset <= -1 and n[i - 1] - n[i] < -1):
                step = 1 if offset > 0 else -1
                parabolic = q[i] + step / (n[i + 1] - n[i - 1]) * (
                    (n[i] - n[i - 1] + step) * (q[i + 1] - q[i]) / (n[i + 1] - n[i])
                    + (n[i + 1] - n[i] - step) * (q[i] - q[i - 1]) / (n[i] - n[i - 1])
                )
                if q[i - 1] < parabolic < q[i + 1]:
                    q[i] = parabolic
                else:
                    q[i] += step * (q[i + step] - q[i]) / (n[i + step] - n[i])
                n[i] += step
        return QuantileSketch(self.quantile, count, tuple(q), tuple(n), self.floor)

    def estimate(self) -> float | None:
        """The current estimate, or ``None`` before five observations."""
        return self.heights[2] if self.count >= 5 else None


@dataclass(frozen=True, slots=True)
class Peak:
    """The highest-scoring window of an alert (or of a run that may become one)."""

    score: float
    ts_ms: int
    nearest_prototype: int
    channel_attribution: tuple[float, ...]


@dataclass(frozen=True, slots=True)
class OpenAlert:
    """An alert that has opened and not yet resolved."""

    alert_id: str
    start_ts_ms: int
    model_version: str  # the version at open; part of the id, kept across hot swaps
    threshold: float  # in force at open; used if no threshold is known later
    peak: Peak
    severity: str  # as last published
    sequence: int  # of the last published event
    reported_peak: float  # peak score as last published
    windows: int  # windows since open, counting the one that opened it
    clear_run: int  # consecutive windows below the resolve level
    last_hot_ts_ms: int  # latest evidence of a window at or above the resolve level


@dataclass(frozen=True, slots=True)
class SensorAlertState:
    """Everything ``update`` remembers about one sensor between windows."""

    sensor_id: str
    last_ts_ms: int | None = None
    threshold: float | None = None  # in force at the last window: the score record's
    history: int = 0  # bit i set: the window i steps back scored above the threshold
    recent_breaches: tuple[float, ...] = ()  # their scores, oldest first
    candidate_start_ts_ms: int | None = None
    candidate_peak: Peak | None = None
    open_alert: OpenAlert | None = None
    cooldown_until_ms: int | None = None
    sketch: QuantileSketch | None = None
    term_sketches: tuple[QuantileSketch, ...] = ()  # one per score term (``adapt_terms``)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready data without the sensor id (the Redis key holds it) and without the
        fields at their defaults: a quiet sensor's state is a few dozen bytes. The term
        sketches are packed (``_pack_sketches``): five of them as JSON objects would take
        four times the rest of the state."""
        data = _STATE_ADAPTER.dump_python(
            self, mode="json", exclude={"sensor_id", "term_sketches"}, exclude_defaults=True
        )
        if self.term_sketches:
            data["term_edges"] = _pack_sketches(self.term_sketches)
        return data

    @classmethod
    def from_dict(cls, sensor_id: str, data: Mapping[str, Any]) -> SensorAlertState:
        """Inverse of ``to_dict``; raise ``InvalidAlertState`` on anything else."""
        try:
            data = dict(data)
            packed = data.pop("term_edges", None)
            if packed is not None:
                data["term_sketches"] = _unpack_sketches(packed)
            return _STATE_ADAPTER.validate_python({**data, "sensor_id": sensor_id})
        except (TypeError, ValueError, struct.error, binascii.Error) as exc:
            raise InvalidAlertState(f"unreadable alert state: {exc}") from None


# Packed term sketches: the quantile and the fitted threshold they run beside (NaN for
# none), then per sketch its count, its heights (as many as it has seen, up to five) and,
# once it has five, its three middle marker positions (P²'s first marker stays at 0 and
# its last at count - 1). Little-endian, base64 in the JSON.
_SHARED = struct.Struct("<dd")
_COUNT = struct.Struct("<I")
_MIDDLE_POSITIONS = struct.Struct("<3I")


def _pack_sketches(sketches: Sequence[QuantileSketch]) -> str:
    floor = sketches[0].floor
    parts = [_SHARED.pack(sketches[0].quantile, math.nan if floor is None else floor)]
    for sketch in sketches:
        parts.append(_COUNT.pack(sketch.count))
        parts.append(struct.pack(f"<{len(sketch.heights)}d", *sketch.heights))
        if sketch.positions:
            parts.append(_MIDDLE_POSITIONS.pack(*sketch.positions[1:4]))
    return base64.b64encode(b"".join(parts)).decode()


def _unpack_sketches(packed: object) -> tuple[QuantileSketch, ...]:
    if not isinstance(packed, str):
        raise TypeError("term_edges must be a base64 string")
    data = base64.b64decode(packed, validate=True)
    (quantile, floor), offset, sketches = _SHARED.unpack_from(data), _SHARED.size, []
    threshold = None if math.isnan(floor) else floor
    while offset < len(data):
        (count,) = _COUNT.unpack_from(data, offset)
        seen = min(count, 5)
        heights = struct.unpack_from(f"<{seen}d", data, offset + _COUNT.size)
        offset += _COUNT.size + 8 * seen
        positions: tuple[int, ...] = ()
        if count >= 5:
            positions = (0, *_MIDDLE_POSITIONS.unpack_from(data, offset), count - 1)
            offset += _MIDDLE_POSITIONS.size
        sketches.append(QuantileSketch(quantile, count, heights, positions, threshold))
    return tuple(sketches)


_STATE_ADAPTER = TypeAdapter(SensorAlertState)


def adapt_terms(
    state: SensorAlertState,
    terms: Sequence[float],
    *,
    names: Sequence[str],
    ts_ms: int,
    threshold: float | None,
    policy: AlertPolicy,
) -> tuple[SensorAlertState, float, int]:
    """The score of the window ending at ``ts_ms`` whose fused score has these scaled
    ``terms`` (at least one; 1 = the most extreme normal training window), called
    ``names`` (``ModelConfig.score_terms``), each term measured from this sensor's edge of
    normal. Call it before ``update``.

    Returns the state with the terms learnt, the score (at least 0) and the index of the
    term that gave it. The edge of a term is 1 until ``fallback_warmup_windows`` windows
    have warmed up its sketch, then the larger of 1 and the running ``term_quantile`` of
    the sensor's values of that term; a term is shifted down by its edge's rise. A value
    of one of the policy's ``bounded_terms`` above ``term_learn_limit`` is not learnt
    (their edges never pass it, and an excursion cannot raise the edge it is measured
    from as it grows); the other terms learn every value. Nor is a replay
    (``ts_ms`` not after ``last_ts_ms``, which ``update`` ignores too). ``threshold`` is
    the fitted threshold (``Thresholds.for_sensor``): another one, like another count of
    terms, means a model whose terms have another scale (a new version or a refresh),
    and starts new sketches, as it starts the threshold's own. With ``adapt_term_units``
    off the score is the largest term, as the model fuses them.
    """
    values = [max(0.0, float(term)) for term in terms]
    if not policy.adapt_term_units:
        largest = max(range(len(values)), key=values.__getitem__)
        return state, values[largest], largest
    sketches = state.term_sketches
    started = (len(sketches), sketches[0].quantile, sketches[0].floor) if sketches else None
    if started != (len(values), policy.term_quantile, threshold):
        sketches = tuple(QuantileSketch(policy.term_quantile, floor=threshold) for _ in values)
    adapted = [
        value - edge_rise(sketch, policy.fallback_warmup_windows)
        for value, sketch in zip(values, sketches, strict=True)
    ]
    largest = max(range(len(adapted)), key=adapted.__getitem__)
    score = max(0.0, adapted[largest])
    if state.last_ts_ms is None or ts_ms > state.last_ts_ms:  # a replay is not learnt
        sketches = tuple(
            sketch
            if name in policy.bounded_terms and value > policy.term_learn_limit
            else sketch.add(value)
            for sketch, value, name in zip(sketches, values, names, strict=True)
        )
    return replace(state, term_sketches=sketches), score, largest


def edge_rise(sketch: QuantileSketch, warmup_windows: int) -> float:
    """How far a term's edge of normal has risen above 1 (0 until warmed up)."""
    estimate = sketch.estimate() if sketch.count >= warmup_windows else None
    return 0.0 if estimate is None else max(0.0, estimate - 1.0)


def make_alert_id(sensor_id: str, opened_ts_ms: int, model_version: str) -> str:
    """Deterministic alert id: 20 hex digits of sha1(sensor, the end of the window that
    opened the alert, model version). One alert opens per window at most, and a sensor's
    windows end at increasing times, so the id is unique per sensor and model version."""
    key = f"{sensor_id}\x00{opened_ts_ms}\x00{model_version}".encode()
    return hashlib.sha1(key, usedforsecurity=False).hexdigest()[:20]


def severity_for(ratio: float, policy: AlertPolicy) -> str:
    """The severity band of a peak/threshold ratio (the lowest band below all bands)."""
    bands = policy.bands_ascending
    severity = bands[0][0]
    for name, lowest_ratio in bands:
        if ratio >= lowest_ratio:
            severity = name
    return severity


def update(
    state: SensorAlertState,
    *,
    score: float,
    ts_ms: int,
    threshold: float | None,
    policy: AlertPolicy,
    model_version: str,
    nearest_prototype: int,
    attribution: Sequence[float],
    evidence_ts_ms: int | None = None,
) -> tuple[SensorAlertState, list[AlertEvent]]:
    """Fold the score of the window ending at ``ts_ms`` into ``state``.

    ``threshold`` comes from ``Thresholds.for_sensor``; ``None`` selects the running
    quantile of this sensor's scores (no decision until it has warmed up).
    ``evidence_ts_ms`` is where in the window the score's cause lies (the reading at
    ``Scores.peak_offset``; the window's end when not given): an alert spans from the
    evidence of its first window above the threshold to the latest evidence of its windows
    at or above the resolve level, so it covers the readings that caused it rather than
    the windows' ends, which trail them by up to a window. Decisions (confirmation,
    cooldown, events) still happen at ``ts_ms``. Returns the new state (whose ``threshold``
    is the one applied) and the events to publish, in order.
    """
    ts_ms = int(ts_ms)  # numpy integers would not survive the JSON round trip
    evidence = ts_ms if evidence_ts_ms is None else min(int(evidence_ts_ms), ts_ms)
    if state.last_ts_ms is not None and ts_ms <= state.last_ts_ms:
        return state, []
    if not math.isfinite(score):
        return replace(state, last_ts_ms=ts_ms), []
    fitted = threshold
    use_sketch = fitted is None or policy.adapt_fitted_threshold
    sketch = state.sketch
    if use_sketch:
        if sketch is None or (sketch.quantile, sketch.floor) != (policy.fallback_quantile, fitted):
            sketch = QuantileSketch(policy.fallback_quantile, floor=fitted)
        if sketch.count >= policy.fallback_warmup_windows:
            estimate = sketch.estimate()
            threshold = estimate if fitted is None or estimate is None else max(fitted, estimate)
        elif state.open_alert is not None and fitted is None:
            threshold = state.open_alert.threshold
        # Scores of an open alert never enter the sketch, so an anomaly does not raise its
        # own bar; a breach enters only once it leaves the confirmation window unconfirmed.
        if state.open_alert is None and (threshold is None or score <= threshold):
            sketch = sketch.add(score)
    state = replace(state, last_ts_ms=ts_ms, threshold=threshold, sketch=sketch)
    if threshold is None:
        return state, []
    window = Peak(
        score=float(score),
        ts_ms=ts_ms,
        nearest_prototype=int(nearest_prototype),
        channel_attribution=tuple(float(a) for a in attribution),
    )
    if state.open_alert is None:
        return _while_closed(state, window, evidence, threshold, policy, model_version, use_sketch)
    return _while_open(state, state.open_alert, window, evidence, threshold, policy)


def _while_closed(
    state: SensorAlertState,
    window: Peak,
    evidence_ts_ms: int,
    threshold: float,
    policy: AlertPolicy,
    model_version: str,
    use_sketch: bool,
) -> tuple[SensorAlertState, list[AlertEvent]]:
    above = window.score > threshold
    shifted = (state.history << 1) | above
    history = shifted & ((1 << policy.confirm_n) - 1)
    breaches = (*state.recent_breaches, window.score) if above else state.recent_breaches
    expired = shifted.bit_count() - history.bit_count()
    sketch = state.sketch
    if use_sketch and sketch is not None:
        for breach in breaches[:expired]:
            sketch = sketch.add(breach)
    breaches = breaches[expired:]
    start_ts_ms, peak = state.candidate_start_ts_ms, state.candidate_peak
    if above:
        if start_ts_ms is None:
            start_ts_ms = evidence_ts_ms
        if peak is None or window.score > peak.score:
            peak = window
    elif history == 0:
        start_ts_ms = peak = None
    cooling = state.cooldown_until_ms is not None and window.ts_ms < state.cooldown_until_ms
    confirmed = history.bit_count() >= policy.confirm_k or _opens_at_once(window, threshold, policy)
    if not confirmed or cooling or start_ts_ms is None or peak is None:
        new_state = replace(
            state,
            history=history,
            recent_breaches=breaches,
            sketch=sketch,
            candidate_start_ts_ms=start_ts_ms,
            candidate_peak=peak,
        )
        return new_state, []
    alert = OpenAlert(
        alert_id=make_alert_id(state.sensor_id, window.ts_ms, model_version),
        start_ts_ms=start_ts_ms,
        model_version=model_version,
        threshold=threshold,
        peak=peak,
        severity=severity_for(_ratio(peak.score, threshold), policy),
        sequence=0,
        reported_peak=peak.score,
        windows=1,
        clear_run=0,
        last_hot_ts_ms=max(start_ts_ms, evidence_ts_ms),
    )
    new_state = replace(
        state,
        history=0,
        recent_breaches=(),
        sketch=sketch,
        candidate_start_ts_ms=None,
        candidate_peak=None,
        cooldown_until_ms=None,
        open_alert=alert,
    )
    return new_state, [_event(state.sensor_id, alert, "open", threshold, window.ts_ms)]


def _while_open(
    state: SensorAlertState,
    alert: OpenAlert,
    window: Peak,
    evidence_ts_ms: int,
    threshold: float,
    policy: AlertPolicy,
) -> tuple[SensorAlertState, list[AlertEvent]]:
    if window.score < threshold * policy.hysteresis_ratio:
        clear_run, last_hot_ts_ms = alert.clear_run + 1, alert.last_hot_ts_ms
    else:
        clear_run, last_hot_ts_ms = 0, max(alert.last_hot_ts_ms, evidence_ts_ms)
    alert = replace(
        alert,
        peak=window if window.score > alert.peak.score else alert.peak,
        windows=alert.windows + 1,
        clear_run=clear_run,
        last_hot_ts_ms=last_hot_ts_ms,
    )
    if clear_run >= policy.confirm_k and alert.windows >= policy.min_duration_windows:
        alert = replace(alert, sequence=alert.sequence + 1)
        event = _event(state.sensor_id, alert, "resolved", threshold, window.ts_ms)
        new_state = replace(
            state, open_alert=None, cooldown_until_ms=window.ts_ms + policy.cooldown_ms
        )
        return new_state, [event]
    severity = severity_for(_ratio(alert.peak.score, threshold), policy)
    rose = _band_rank(severity, policy) > _band_rank(alert.severity, policy)
    grew = alert.peak.score >= alert.reported_peak * (1 + policy.update_peak_increase)
    if not (rose or grew):
        return replace(state, open_alert=alert), []
    alert = replace(
        alert,
        sequence=alert.sequence + 1,
        reported_peak=alert.peak.score,
        severity=severity if rose else alert.severity,
    )
    event = _event(state.sensor_id, alert, "update", threshold, window.ts_ms)
    return replace(state, open_alert=alert), [event]


def _opens_at_once(window: Peak, threshold: float, policy: AlertPolicy) -> bool:
    """Whether the window is severe enough to need no confirmation (``open_at_once_ratio``)."""
    ratio = policy.open_at_once_ratio
    return ratio is not None and window.score > threshold and window.score >= ratio * threshold


def _ratio(score: float, threshold: float) -> float:
    return score / threshold if threshold > 0 else math.inf


def _band_rank(severity: str, policy: AlertPolicy) -> int:
    for rank, (name, _) in enumerate(policy.bands_ascending):
        if name == severity:
            return rank
    return -1


def _event(
    sensor_id: str, alert: OpenAlert, state: AlertState, threshold: float, event_ts_ms: int
) -> AlertEvent:
    return AlertEvent(
        alert_id=alert.alert_id,
        sequence=alert.sequence,
        sensor_id=sensor_id,
        state=state,
        severity=alert.severity,
        start_ts_ms=alert.start_ts_ms,
        end_ts_ms=alert.last_hot_ts_ms if state == "resolved" else None,
        event_ts_ms=event_ts_ms,
        peak_score=alert.peak.score,
        threshold=threshold,
        model_version=alert.model_version,
        nearest_prototype=alert.peak.nearest_prototype,
        channel_attribution=alert.peak.channel_attribution,
    )
