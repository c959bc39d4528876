"""How alert events become Alertmanager alerts (the bridge's decisions, without a network)."""

from __future__ import annotations

import pytest

from stream_detector.alertmanager import ALERTNAME, Forwarder
from stream_detector.schemas import AlertEvent

pytestmark = pytest.mark.unit

NOW_MS = 1_800_000_000_000
RESEND_S = 60.0


def _event(sequence: int, state: str, severity: str = "major", **changes: object) -> AlertEvent:
    fields: dict[str, object] = {
        "alert_id": "a-1",
        "sequence": sequence,
        "sensor_id": "pump-17",
        "state": state,
        "severity": severity,
        "start_ts_ms": NOW_MS - 120_000,
        "end_ts_ms": NOW_MS - 10_000 if state == "resolved" else None,
        "event_ts_ms": NOW_MS - 60_000,
        "peak_score": 3.25,
        "threshold": 1.5,
        "model_version": "v7",
        "nearest_prototype": 4,
        "channel_attribution": (0.8, 0.2),
        **changes,
    }
    return AlertEvent(**fields)  # type: ignore[arg-type]


@pytest.fixture
def forwarder() -> Forwarder:
    return Forwarder(labels={"team": "plant"}, resend_interval_s=RESEND_S, clock_ms=lambda: NOW_MS)


def _forward(forwarder: Forwarder, *events: AlertEvent) -> list[dict]:
    plan = forwarder.plan(events)
    forwarder.accepted(plan)
    return plan.posts


def test_an_open_event_fires_an_alert_with_its_labels_and_annotations(
    forwarder: Forwarder,
) -> None:
    (alert,) = _forward(forwarder, _event(0, "open"))
    assert alert["labels"] == {
        "team": "plant",
        "alertname": ALERTNAME,
        "sensor_id": "pump-17",
        "severity": "major",
        "model_version": "v7",
        "alert_id": "a-1",
    }
    annotations = alert["annotations"]
    assert (annotations["peak_score"], annotations["threshold"]) == ("3.25", "1.5")
    assert annotations["nearest_prototype"] == "4"
    assert annotations["channel_attribution"] == "[0.8, 0.2]"
    assert annotations["event_id"] == "a-1:0"
    assert alert["startsAt"] == "2027-01-15T07:58:00.000Z"
    # Firing for four resend intervals unless posted again.
    assert alert["endsAt"] == "2027-01-15T08:04:00.000Z"


def test_a_resolved_event_ends_the_alert_now_and_stops_its_resends(forwarder: Forwarder) -> None:
    _forward(forwarder, _event(0, "open"))
    assert len(forwarder.resends()) == 1
    (alert,) = _forward(forwarder, _event(1, "resolved"))
    assert alert["endsAt"] == "2027-01-15T08:00:00.000Z"
    assert alert["annotations"]["ended_at"] == "2027-01-15T07:59:50.000Z"
    assert forwarder.resends() == []


def test_a_severity_change_resolves_the_old_label_set_and_fires_the_new(
    forwarder: Forwarder,
) -> None:
    _forward(forwarder, _event(0, "open", "major"))
    old, new = _forward(forwarder, _event(1, "update", "critical"))
    assert old["labels"]["severity"] == "major"
    assert old["endsAt"] == "2027-01-15T08:00:00.000Z"
    assert new["labels"]["severity"] == "critical"
    assert [a["labels"]["severity"] for a in forwarder.resends()] == ["critical"]


def test_a_duplicate_event_posts_nothing(forwarder: Forwarder) -> None:
    assert len(_forward(forwarder, _event(0, "open"), _event(0, "open"))) == 1
    assert _forward(forwarder, _event(0, "open")) == []


def test_a_plan_that_alertmanager_did_not_take_changes_nothing(forwarder: Forwarder) -> None:
    first = forwarder.plan([_event(0, "open")])
    again = forwarder.plan([_event(0, "open")])
    assert again.posts == first.posts
    assert forwarder.resends() == []


def test_readings_stamped_ahead_of_the_clock_still_start_before_they_end(
    forwarder: Forwarder,
) -> None:
    (alert,) = _forward(forwarder, _event(0, "resolved", start_ts_ms=NOW_MS + 5_000))
    assert alert["startsAt"] == alert["endsAt"] == "2027-01-15T08:00:00.000Z"


def test_adopted_alerts_are_resent_until_their_resolved_event(forwarder: Forwarder) -> None:
    held = _forward(Forwarder(labels={}, resend_interval_s=RESEND_S), _event(0, "open"))
    forwarder.adopt([{**held[0], "status": {"state": "active"}, "fingerprint": "f"}])
    (resent,) = forwarder.resends()
    assert resent["labels"] == held[0]["labels"]
    assert resent["endsAt"] == "2027-01-15T08:04:00.000Z"
    _forward(forwarder, _event(1, "resolved"))
    assert forwarder.resends() == []
