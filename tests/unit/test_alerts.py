"""Alert lifecycles: confirmation, updates, hysteresis, minimum duration, cooldown, replays."""

from __future__ import annotations

import json
import random
from collections.abc import Sequence

import pytest

from stream_detector.alerts import (
    AlertPolicy,
    InvalidAlertState,
    InvalidThresholds,
    QuantileSketch,
    SensorAlertState,
    Thresholds,
    adapt_terms,
    make_alert_id,
    update,
)
from stream_detector.schemas import AlertEvent

pytestmark = pytest.mark.unit

STEP_MS = 1000
QUIET = 0.1


def policy(**changes: object) -> AlertPolicy:
    base: dict[str, object] = {
        "confirm_k": 3,
        "confirm_n": 5,
        "hysteresis_ratio": 0.8,
        "min_duration_windows": 1,
        "cooldown_ms": 0,
        "update_peak_increase": 0.25,
        "severity_bands": {"warning": 1.0, "major": 2.0, "critical": 4.0},
        "open_at_once_ratio": None,
    }
    base.update(changes)
    return AlertPolicy(**base)


def feed(
    scores: Sequence[float],
    alert_policy: AlertPolicy,
    *,
    state: SensorAlertState | None = None,
    first_ts_ms: int = STEP_MS,
    threshold: float | None = 1.0,
    model_version: str = "v1",
    evidence_lag_ms: Sequence[int] | None = None,
) -> tuple[SensorAlertState, list[AlertEvent]]:
    """Score windows one STEP_MS apart, each window's cause ``evidence_lag_ms`` before its
    end (at its end when None); return the final state and all events."""
    state = state or SensorAlertState(sensor_id="pump-1")
    events: list[AlertEvent] = []
    for index, score in enumerate(scores):
        state, new_events = update(
            state,
            score=score,
            ts_ms=first_ts_ms + index * STEP_MS,
            threshold=threshold,
            policy=alert_policy,
            model_version=model_version,
            nearest_prototype=index,
            attribution=[score, 0.0],
            evidence_ts_ms=(
                None
                if evidence_lag_ms is None
                else first_ts_ms + index * STEP_MS - evidence_lag_ms[index]
            ),
        )
        events.extend(new_events)
    return state, events


def states(events: Sequence[AlertEvent]) -> list[str]:
    return [event.state for event in events]


def test_k_of_n_opens_only_when_k_of_the_last_n_windows_breach() -> None:
    _, events = feed([2, QUIET, 2, QUIET, QUIET, QUIET, 2, QUIET, QUIET, QUIET], policy())
    assert events == []

    state, events = feed([QUIET, 2, QUIET, 2.5, QUIET, 2], policy())
    assert states(events) == ["open"]
    opened = events[0]
    assert opened.start_ts_ms == 2 * STEP_MS  # the first breach, not the confirming window
    assert opened.event_ts_ms == 6 * STEP_MS
    assert opened.peak_score == 2.5
    assert opened.nearest_prototype == 3  # of the peak window
    assert opened.severity == "major"
    assert opened.sequence == 0 and opened.end_ts_ms is None
    assert state.open_alert is not None


def test_a_window_at_the_open_at_once_ratio_needs_no_confirmation() -> None:
    at_once = policy(open_at_once_ratio=4.0)
    _, events = feed([QUIET, 3.9, QUIET, QUIET, QUIET, QUIET], at_once)
    assert events == []  # under 4x the threshold: still waits for 3 of 5
    _, events = feed([QUIET, 4.5, QUIET, QUIET], at_once)
    assert states(events) == ["open"]
    assert events[0].event_ts_ms == events[0].start_ts_ms == 2 * STEP_MS
    assert events[0].severity == "critical"
    _, events = feed([QUIET, 4.5, QUIET, QUIET], policy(open_at_once_ratio=None))
    assert events == []


def test_sustained_breach_is_one_alert_not_one_event_per_window() -> None:
    _, events = feed([3.0] * 50, policy())
    assert states(events) == ["open"]


def test_updates_only_when_the_peak_grows_by_the_margin_or_the_band_rises() -> None:
    # 1.5 opens (warning); 1.7 grows < 25%; 1.9 grows 26.7%: update; 2.0 enters "major".
    _, events = feed([1.5, 1.5, 1.5, 1.7, 1.9, 2.0, 2.05], policy())
    assert states(events) == ["open", "update", "update"]
    assert [event.peak_score for event in events] == [1.5, 1.9, 2.0]
    assert [event.severity for event in events] == ["warning", "warning", "major"]
    assert [event.sequence for event in events] == [0, 1, 2]


def test_hysteresis_keeps_an_alert_open_between_resolve_level_and_threshold() -> None:
    # Threshold 1.0, resolve level 0.8: 0.9 is below threshold but not clear.
    _, events = feed([2, 2, 2] + [0.9] * 20, policy())
    assert states(events) == ["open"]

    _, events = feed([2, 2, 2, 0.5, 0.5, 0.9, 0.5, 0.5, 0.5, 0.5], policy())
    assert states(events) == ["open", "resolved"]
    resolved = events[-1]
    assert resolved.event_ts_ms == 9 * STEP_MS  # third consecutive clear window after 0.9
    assert resolved.end_ts_ms == 6 * STEP_MS  # the last window at or above 0.8
    assert resolved.alert_id == events[0].alert_id
    assert resolved.sequence == 1


def test_minimum_duration_holds_a_short_alert_open() -> None:
    _, events = feed([2, 2, 2] + [QUIET] * 10, policy(min_duration_windows=8))
    assert states(events) == ["open", "resolved"]
    # Opened at window 3; the 8th window of the alert is window 10.
    assert events[-1].event_ts_ms == 10 * STEP_MS

    _, events = feed([2, 2, 2] + [QUIET] * 10, policy(min_duration_windows=1))
    assert events[-1].event_ts_ms == 6 * STEP_MS


def test_cooldown_suppresses_reopening_and_is_not_extended_by_breaches() -> None:
    alert_policy = policy(cooldown_ms=10 * STEP_MS)
    # Resolves at window 6, so the cooldown lasts until window 16.
    state, events = feed([2, 2, 2, QUIET, QUIET, QUIET], alert_policy)
    assert states(events) == ["open", "resolved"]
    assert state.cooldown_until_ms == 16 * STEP_MS

    # Windows 7..15 breach throughout the cooldown: nothing opens, the cooldown stays put.
    state, events = feed([3.0] * 9, alert_policy, state=state, first_ts_ms=7 * STEP_MS)
    assert events == []
    assert state.cooldown_until_ms == 16 * STEP_MS

    # The breach persists past the cooldown: a new alert with a new id opens at once.
    state, events = feed([3.0], alert_policy, state=state, first_ts_ms=16 * STEP_MS)
    assert states(events) == ["open"]
    assert events[0].start_ts_ms == 7 * STEP_MS


def test_a_fresh_breach_after_the_cooldown_needs_full_confirmation() -> None:
    alert_policy = policy(cooldown_ms=5 * STEP_MS)
    state, first = feed([2, 2, 2, QUIET, QUIET, QUIET] + [QUIET] * 10, alert_policy)
    state, second = feed([2, 2, 2], alert_policy, state=state, first_ts_ms=20 * STEP_MS)
    assert states(first) == ["open", "resolved"]
    assert [event.event_ts_ms for event in second] == [22 * STEP_MS]
    assert second[0].alert_id != first[0].alert_id


def test_alert_ids_are_deterministic() -> None:
    scores = [QUIET, 2, 2, 5, 2, QUIET, QUIET, QUIET]
    _, first = feed(scores, policy())
    _, second = feed(scores, policy())
    assert first == second
    opened_ts_ms = 4 * STEP_MS  # the third breach confirms it
    assert first[0].event_ts_ms == opened_ts_ms
    assert first[0].alert_id == make_alert_id("pump-1", opened_ts_ms, "v1")
    assert make_alert_id("pump-1", opened_ts_ms, "v2") != first[0].alert_id
    assert make_alert_id("pump-2", opened_ts_ms, "v1") != first[0].alert_id
    assert len({event.event_id for event in first}) == len(first)


def test_an_alert_spans_the_readings_that_caused_it_not_the_windows_ends() -> None:
    # A short anomaly at steps 2 and 3 keeps every window that holds it hot, the last
    # one ending five steps after it.
    scores = [QUIET, 2, 2, 3, 2, 2, 2, 2, QUIET, QUIET, QUIET]
    lags = [0, 0, 0, 1, 2, 3, 4, 5, 0, 0, 0]
    _, by_end = feed(scores, policy())
    _, by_cause = feed(scores, policy(), evidence_lag_ms=[lag * STEP_MS for lag in lags])
    assert states(by_end) == states(by_cause) == ["open", "resolved"]
    assert (by_end[1].start_ts_ms, by_end[1].end_ts_ms) == (2 * STEP_MS, 8 * STEP_MS)
    assert (by_cause[1].start_ts_ms, by_cause[1].end_ts_ms) == (2 * STEP_MS, 3 * STEP_MS)
    # Decisions stay at the windows' ends, and so does the alert's id.
    assert [event.event_ts_ms for event in by_cause] == [e.event_ts_ms for e in by_end]
    assert by_cause[0].alert_id == by_end[0].alert_id


def test_an_alert_never_ends_before_it_starts() -> None:
    # The first breach points at its newest reading, later ones at older readings.
    _, events = feed(
        [2, 2, 2, QUIET, QUIET, QUIET],
        policy(),
        evidence_lag_ms=[lag * STEP_MS for lag in (0, 5, 5, 0, 0, 0)],
    )
    assert states(events) == ["open", "resolved"]
    assert events[1].start_ts_ms == events[1].end_ts_ms == STEP_MS


def test_evidence_after_the_window_counts_at_its_end() -> None:
    _, events = feed([2, 2, 2, QUIET, QUIET, QUIET], policy(), evidence_lag_ms=[-5 * STEP_MS] * 6)
    assert (events[1].start_ts_ms, events[1].end_ts_ms) == (STEP_MS, 3 * STEP_MS)


def test_replayed_scores_produce_no_duplicate_events() -> None:
    alert_policy = policy()
    state, events = feed([2, 2, 2], alert_policy)
    assert states(events) == ["open"]

    replayed, replay_events = feed([2, 2, 2], alert_policy, state=state)
    assert replay_events == []
    assert replayed == state


def stored_and_read_back(state: SensorAlertState) -> SensorAlertState:
    """The state as the window store writes it to Redis (JSON) and the worker reads it."""
    stored = json.dumps(state.to_dict(), allow_nan=False)
    return SensorAlertState.from_dict(state.sensor_id, json.loads(stored))


def test_replay_from_an_older_state_reproduces_the_same_events() -> None:
    alert_policy = policy()
    before, _ = feed([QUIET, 2], alert_policy)
    continued = [2, 2, 5, QUIET, QUIET, QUIET]
    _, events = feed(continued, alert_policy, state=before, first_ts_ms=3 * STEP_MS)
    # A crash lost the saved state after window 2: the state read back is older.
    restored = stored_and_read_back(before)
    _, replay_events = feed(continued, alert_policy, state=restored, first_ts_ms=3 * STEP_MS)
    assert replay_events == events
    assert states(events) == ["open", "update", "resolved"]


def test_state_round_trips_through_json_at_every_step() -> None:
    alert_policy = policy(threshold_fallback="quantile", fallback_warmup_windows=5)
    state = SensorAlertState(sensor_id="pump-1")
    scores = [QUIET, 0.2, 0.15, 0.3, 0.1, 0.2, 5, 6, 7, 8, QUIET, QUIET, QUIET, QUIET]
    for index, score in enumerate(scores):
        state, _ = update(
            state,
            score=score,
            ts_ms=index * STEP_MS,
            threshold=None,
            policy=alert_policy,
            model_version="v1",
            nearest_prototype=1,
            attribution=[0.25, 0.75],
        )
        assert stored_and_read_back(state) == state


@pytest.mark.parametrize(
    "stored",
    [
        {"history": "lots"},
        {"last_ts_ms": "soon"},
        ["history"],
        {"term_edges": 5},
        {"term_edges": "not base64!"},
        {"term_edges": "AAAA"},  # three bytes: not even the quantile
        {"term_edges": "16NwPQrX7z8AAAAAAAD4fwEAAAA="},  # a sketch that claims a height it lacks
    ],
)
def test_unreadable_state_is_a_specific_error(stored: dict) -> None:
    with pytest.raises(InvalidAlertState):
        SensorAlertState.from_dict("s", stored)


def test_a_quiet_sensors_stored_state_holds_only_what_differs_from_a_fresh_one() -> None:
    state, _ = feed([0.5] * 3, policy(adapt_fitted_threshold=False))
    assert state.to_dict() == {"last_ts_ms": 3 * STEP_MS, "threshold": 1.0}
    adaptive, _ = feed([0.5] * 3, policy())  # the running quantile beside the fitted one
    assert set(adaptive.to_dict()) == {"last_ts_ms", "threshold", "sketch"}
    assert SensorAlertState.from_dict("s", {}) == SensorAlertState("s")


def test_non_finite_scores_decide_nothing() -> None:
    state, events = feed([2, 2, float("nan"), float("inf")], policy())
    assert events == []
    assert state.last_ts_ms == 4 * STEP_MS
    assert state.history.bit_count() == 2


def test_thresholds_file_format_and_fallbacks() -> None:
    thresholds = Thresholds.from_dict(
        {
            "default": {"threshold": 3.0, "method": "pot"},
            "sensors": {"pump-1": {"threshold": 2, "method": "quantile", "q": 0.999}},
        }
    )
    assert thresholds.for_sensor("pump-1", policy()) == 2.0
    assert thresholds.for_sensor("pump-2", policy()) == 3.0
    assert thresholds.method == "pot"

    no_file = Thresholds()
    assert no_file.for_sensor("pump-1", policy()) is None  # running quantile
    fixed = policy(threshold_fallback="fixed", fallback_threshold=7.5)
    assert no_file.for_sensor("pump-1", fixed) == 7.5
    only_sensors = Thresholds.from_dict({"sensors": {"pump-1": {"threshold": 1.0}}})
    assert only_sensors.for_sensor("pump-2", fixed) == 7.5


@pytest.mark.parametrize(
    "data",
    [
        [],
        {"defaults": {"threshold": 1.0}},
        {"default": {"method": "pot"}},
        {"default": {"threshold": -1.0}},
        {"default": {"threshold": "high"}},
        {"default": {"threshold": True}},
        {"sensors": {"pump-1": {"threshold": float("inf")}}},
        {"sensors": ["pump-1"]},
    ],
)
def test_malformed_thresholds_are_rejected(data: object) -> None:
    with pytest.raises(InvalidThresholds):
        Thresholds.from_dict(data)  # type: ignore[arg-type]


def test_quantile_sketch_tracks_the_quantile() -> None:
    rng = random.Random(7)
    sketch = QuantileSketch(quantile=0.99)
    for _ in range(20_000):
        sketch = sketch.add(rng.random())
    estimate = sketch.estimate()
    assert estimate is not None
    assert abs(estimate - 0.99) < 0.005


def test_quantile_fallback_warms_up_then_alerts_on_outliers() -> None:
    rng = random.Random(3)
    alert_policy = policy(fallback_quantile=0.99, fallback_warmup_windows=200)
    normal = [rng.gauss(1.0, 0.1) for _ in range(400)]
    state, events = feed(normal[:150] + [50.0] * 3, alert_policy, threshold=None)
    assert events == []  # still warming up: no threshold yet
    assert state.threshold is None

    state, events = feed(
        normal + [50.0] * 3, alert_policy, threshold=None, state=SensorAlertState("pump-1")
    )
    assert states(events) == ["open"]
    assert state.threshold is not None and 1.1 < state.threshold < 1.5


def test_adaptive_fitted_threshold_is_a_floor_the_running_quantile_raises() -> None:
    rng = random.Random(5)
    noisier = [abs(rng.gauss(1.5, 0.5)) for _ in range(600)]  # now often above the fitted 2.0
    fixed, fixed_events = feed(noisier, policy(adapt_fitted_threshold=False), threshold=2.0)
    assert fixed.threshold == 2.0

    adaptive_policy = policy(adapt_fitted_threshold=True, fallback_warmup_windows=50)
    adaptive, events = feed(noisier, adaptive_policy, threshold=2.0)
    assert adaptive.threshold is not None and adaptive.threshold > 2.5
    assert states(fixed_events).count("open") >= 3
    assert events == []  # the sensor's ordinary noise no longer pages

    _, events = feed(
        [50.0] * 3,
        adaptive_policy,
        threshold=2.0,
        state=adaptive,
        first_ts_ms=(len(noisier) + 1) * STEP_MS,
    )
    assert states(events) == ["open"]

    refitted, _ = feed(  # another model's threshold: its scores have another scale
        [1.0], adaptive_policy, threshold=4.0, state=adaptive, first_ts_ms=700 * STEP_MS
    )
    assert refitted.sketch is not None and refitted.sketch.count == 1
    assert refitted.threshold == 4.0

    quiet = [rng.gauss(1.0, 0.1) for _ in range(300)]  # below the floor: the floor holds
    floored, _ = feed(quiet, adaptive_policy, threshold=2.0)
    assert floored.threshold == 2.0


def test_unconfirmed_breaches_enter_the_quantile_only_after_leaving_the_window() -> None:
    alert_policy = policy(fallback_quantile=0.9, fallback_warmup_windows=20)
    descending = [2.0 - 0.1 * i for i in range(10)]
    warm, events = feed(descending * 3, alert_policy, threshold=None)
    assert events == []
    assert warm.sketch is not None and warm.sketch.count == 30

    spiked, events = feed([9.0], alert_policy, threshold=None, state=warm, first_ts_ms=31_000)
    assert events == []
    assert spiked.sketch is not None and spiked.sketch.count == 30
    assert spiked.recent_breaches == (9.0,)

    later, _ = feed([1.0] * 5, alert_policy, threshold=None, state=spiked, first_ts_ms=32_000)
    assert later.sketch is not None and later.sketch.count == 36
    assert later.recent_breaches == ()


# The terms of the windows below: a shape term, then a bounded one (the window's level).
NAMES = ("memory", "level", "scale")


def edges_after(
    terms: Sequence[Sequence[float]],
    alert_policy: AlertPolicy,
    state: SensorAlertState | None = None,
) -> tuple[SensorAlertState, list[float], list[int]]:
    """Feed windows' terms (called ``NAMES``) to ``adapt_terms``; return the state, scores
    and chosen terms."""
    state = state or SensorAlertState(sensor_id="pump-1")
    scores, chosen = [], []
    for index, window in enumerate(terms):
        state, score, term = adapt_terms(
            state,
            window,
            names=NAMES[: len(window)],
            ts_ms=index,
            threshold=None,
            policy=alert_policy,
        )
        scores.append(score)
        chosen.append(term)
    return state, scores, chosen


def test_a_drifted_term_stops_paging_and_the_others_keep_their_sensitivity() -> None:
    rng = random.Random(11)
    # The level term (index 1) has drifted to about 1.5, past its training range (1).
    drifted = [(rng.uniform(0, 0.8), rng.gauss(1.5, 0.05)) for _ in range(400)]
    alert_policy = policy(fallback_warmup_windows=50)
    fixed, fixed_scores, _ = edges_after(drifted, policy(adapt_term_units=False))
    assert fixed.term_sketches == ()
    assert min(fixed_scores[50:]) > 1.3  # every window beyond normal

    adapted, scores, _ = edges_after(drifted, alert_policy)
    assert scores[:50] == fixed_scores[:50]  # warming up: the trained edges hold
    assert max(scores[100:]) < 1.1  # the drift is the sensor's new normal
    _, [shape_anomaly], [term] = edges_after([(1.4, 1.5)], alert_policy, state=adapted)
    assert term == 0 and shape_anomaly == pytest.approx(1.4)  # the other term's edge held
    _, [level_anomaly], [term] = edges_after([(0.2, 2.2)], alert_policy, state=adapted)
    assert term == 1 and 1.5 < level_anomaly < 1.8  # 2.2 against an edge near 1.6


def test_edges_never_fall_below_training_and_excursions_do_not_teach_bounded_terms() -> None:
    alert_policy = policy(fallback_warmup_windows=20, term_learn_limit=2.0)
    assert alert_policy.bounded_terms == ("level", "scale")
    quiet, _, _ = edges_after([(0.1, 0.2)] * 100, alert_policy)
    _, [score], _ = edges_after([(0.1, 1.2)], alert_policy, state=quiet)
    assert score == pytest.approx(1.2)  # the edge stays at 1, however quiet the sensor

    hot, scores, _ = edges_after([(0.1, 0.2)] * 30 + [(0.1, 5.0)] * 50, alert_policy)
    assert scores[-1] == pytest.approx(5.0)  # a long excursion is not learnt as normal
    assert [sketch.count for sketch in hot.term_sketches] == [80, 30]  # the quiet term is

    growing = [(0.1, 0.2)] * 30 + [(0.1, 1.0 + 0.01 * step) for step in range(301)]
    grown, scores, _ = edges_after(growing, alert_policy)  # a failure that develops slowly
    estimate = grown.term_sketches[1].estimate()
    assert estimate is not None and estimate <= 2.0  # the edge did not chase it past 2
    assert scores[-1] >= 3.0  # 4.0 against an edge of at most 2


def test_a_shape_term_learns_a_lasting_change_however_far() -> None:
    alert_policy = policy(fallback_warmup_windows=20, term_learn_limit=2.0)
    changed, scores, _ = edges_after([(0.2, 0.1)] * 30 + [(5.0, 0.1)] * 300, alert_policy)
    assert scores[30] == pytest.approx(5.0)  # the change pages when it comes
    assert scores[-1] < 1.5  # and the new shape becomes the sensor's normal
    assert [sketch.count for sketch in changed.term_sketches] == [330, 330]

    every_term = alert_policy.model_copy(update={"bounded_terms": NAMES})
    _, scores, _ = edges_after([(0.2, 0.1)] * 30 + [(5.0, 0.1)] * 300, every_term)
    assert scores[-1] == pytest.approx(5.0)  # bounded, it would page on


def test_term_edges_skip_replays_restart_for_other_terms_and_round_trip() -> None:
    alert_policy = policy(fallback_warmup_windows=5)
    state, _, _ = edges_after([(0.5, 1.5, 0.0)] * 10, alert_policy)
    assert len(state.term_sketches) == 3 and state.term_sketches[0].count == 10
    beside_a_threshold, _, _ = adapt_terms(
        state, (0.5, 1.5, 0.0), names=NAMES, ts_ms=10, threshold=1.3, policy=alert_policy
    )
    warming = edges_after([(0.5, 1.5, 0.0)] * 3, alert_policy)[0]
    for packed in (warming, state, beside_a_threshold):
        stored = SensorAlertState.from_dict("pump-1", json.loads(json.dumps(packed.to_dict())))
        assert stored == packed  # exactly, before and after a sketch has five values
    reloaded = SensorAlertState.from_dict("pump-1", beside_a_threshold.to_dict())
    kept, _, _ = adapt_terms(
        reloaded, (0.5, 1.5, 0.0), names=NAMES, ts_ms=11, threshold=1.3, policy=alert_policy
    )
    assert [sketch.count for sketch in kept.term_sketches] == [2, 2, 2]  # not started again

    decided, _ = update(
        state,
        score=0.5,
        ts_ms=9,
        threshold=1.0,
        policy=alert_policy,
        model_version="v1",
        nearest_prototype=0,
        attribution=(1.0,),
    )
    replayed, _, _ = adapt_terms(
        decided, (0.5, 1.5, 0.0), names=NAMES, ts_ms=9, threshold=None, policy=alert_policy
    )
    assert replayed.term_sketches == decided.term_sketches
    other_model, _, _ = adapt_terms(
        decided, (0.5, 1.5), names=NAMES[:2], ts_ms=10, threshold=None, policy=alert_policy
    )
    assert [sketch.count for sketch in other_model.term_sketches] == [1, 1]
    refitted, _, _ = adapt_terms(  # a new fitted threshold: terms on another scale
        decided, (0.5, 1.5, 0.0), names=NAMES, ts_ms=10, threshold=1.3, policy=alert_policy
    )
    assert [sketch.count for sketch in refitted.term_sketches] == [1, 1, 1]
