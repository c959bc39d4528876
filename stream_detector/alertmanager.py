"""Forward anomaly alerts from the alerts topic to Alertmanager, through its v2 API.

The one module that talks to Alertmanager. Each sensor alert becomes one Alertmanager alert
named ``SensorAnomaly``, labelled with the sensor, severity, model version and alert id, so
it reaches the same routes, silences and receivers as every other alert:

- ``open`` and ``update`` events fire it; ``resolved`` resolves it (``endsAt`` now). A
  severity or model version that changes mid-alert changes the labels, so the old label
  set is resolved and the new one fired.
- Alertmanager resolves by itself an alert whose ``endsAt`` passes, so firing alerts are
  posted again every ``resend_interval_s`` with ``endsAt`` four intervals ahead. On start,
  the bridge takes over the ``SensorAnomaly`` alerts that Alertmanager holds, so a restart
  does not let them lapse.
- Delivery is at least once: offsets are committed only after Alertmanager accepted the
  post of every event before them. While it is unreachable the bridge retries the same
  events with a back-off and reads nothing new. Duplicates are harmless: events are
  de-duplicated by event id, and Alertmanager merges alerts with equal labels.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from typing import Any

from stream_detector.config import AlertmanagerSettings, Settings
from stream_detector.consumer import ConsumedMessage, ConsumerError, ReadingConsumer
from stream_detector.metrics import BridgeMetrics, Health, MetricsServer
from stream_detector.schemas import AlertEvent
from stream_detector.subscriber import Deduplicator, parse_event

logger = logging.getLogger(__name__)

ALERTNAME = "SensorAnomaly"
_LEASE_INTERVALS = 4
_MAX_BACKOFF_S = 30.0

Alert = dict[str, Any]  # one alert as Alertmanager's API takes it (postableAlert)


class AlertmanagerError(RuntimeError):
    """Alertmanager did not accept a request: unreachable, or an error status."""


class AlertmanagerRejected(AlertmanagerError):
    """Alertmanager found the alerts themselves invalid (400): posting them again is futile."""


def _iso(ts_ms: int) -> str:
    moment = datetime.fromtimestamp(ts_ms / 1000, UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def to_alert(event: AlertEvent, *, now_ms: int, lease_ms: int, labels: dict[str, str]) -> Alert:
    """The Alertmanager alert for ``event``: firing until ``now + lease``, or resolved now."""
    annotations = {
        "summary": f"Anomaly on sensor {event.sensor_id} (score {event.peak_score:.3g} "
        f"against a threshold of {event.threshold:.3g})",
        "peak_score": f"{event.peak_score:.6g}",
        "threshold": f"{event.threshold:.6g}",
        "nearest_prototype": str(event.nearest_prototype),
        "channel_attribution": json.dumps([round(a, 4) for a in event.channel_attribution]),
        "started_at": _iso(event.start_ts_ms),
        "event_id": event.event_id,
    }
    if event.end_ts_ms is not None:
        annotations["ended_at"] = _iso(event.end_ts_ms)
    resolved = event.state == "resolved"
    return {
        "labels": {
            **labels,
            "alertname": ALERTNAME,
            "sensor_id": event.sensor_id,
            "severity": event.severity,
            "model_version": event.model_version,
            "alert_id": event.alert_id,
        },
        "annotations": annotations,
        # Readings may be stamped in the past (a replay) or slightly ahead of this clock;
        # Alertmanager wants startsAt <= endsAt.
        "startsAt": _iso(min(event.start_ts_ms, now_ms)),
        "endsAt": _iso(now_ms if resolved else now_ms + lease_ms),
    }


def _ending(alert: Alert, ends_ms: int) -> Alert:
    return {**alert, "endsAt": _iso(ends_ms)}


class AlertmanagerClient:
    """Alertmanager's v2 API: post alerts, list the active ones."""

    def __init__(self, url: str, timeout_s: float) -> None:
        self.url = url.rstrip("/")
        self.timeout_s = timeout_s

    def post(self, alerts: list[Alert]) -> None:
        """Post alerts (firing or resolved); raises AlertmanagerError unless accepted."""
        request = urllib.request.Request(
            f"{self.url}/api/v2/alerts",
            data=json.dumps(alerts).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        self._send(request)

    def active(self, alertname: str) -> list[Alert]:
        """The active alerts of that name, silenced and inhibited ones included."""
        query = urllib.parse.urlencode({"filter": f'alertname="{alertname}"', "active": "true"})
        return json.loads(self._send(urllib.request.Request(f"{self.url}/api/v2/alerts?{query}")))

    def _send(self, request: urllib.request.Request) -> bytes:
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                return response.read()
        except urllib.error.HTTPError as error:
            detail = error.read()[:300].decode(errors="replace")
            kind = AlertmanagerRejected if error.code == 400 else AlertmanagerError
            raise kind(f"Alertmanager answered {error.code}: {detail}") from None
        except (OSError, ValueError) as error:  # URLError, refused, timeouts, a bad URL
            raise AlertmanagerError(f"Alertmanager unreachable at {self.url}: {error}") from None


@dataclasses.dataclass(frozen=True)
class Plan:
    """What one batch of events posts, and the firing set once Alertmanager accepted it."""

    posts: list[Alert]
    firing: dict[str, Alert]  # alert id -> the alert as last posted
    event_ids: list[str]


class Forwarder:
    """Which sensor alerts fire in Alertmanager, and what each batch of events must post."""

    def __init__(
        self,
        *,
        labels: dict[str, str],
        resend_interval_s: float,
        clock_ms: Callable[[], int] = lambda: time.time_ns() // 1_000_000,
    ) -> None:
        self.labels = dict(labels)
        self.lease_ms = int(_LEASE_INTERVALS * resend_interval_s * 1000)
        self.clock_ms = clock_ms
        self.firing: dict[str, Alert] = {}
        self._seen = Deduplicator()

    def adopt(self, alerts: Iterable[Alert]) -> None:
        """Take over firing alerts that Alertmanager already holds (after a restart)."""
        for alert in alerts:
            alert_id = alert.get("labels", {}).get("alert_id")
            if alert_id and alert_id not in self.firing:
                self.firing[alert_id] = {
                    key: alert[key] for key in ("labels", "annotations", "startsAt")
                }
        logger.info("took over %d firing alerts from Alertmanager", len(self.firing))

    def plan(self, events: Iterable[AlertEvent]) -> Plan:
        """The posts for these events; nothing changes until ``accepted``."""
        now_ms = self.clock_ms()
        firing = dict(self.firing)
        posts, event_ids = [], []
        for event in events:
            if event.event_id in self._seen or event.event_id in event_ids:
                continue
            event_ids.append(event.event_id)
            alert = to_alert(event, now_ms=now_ms, lease_ms=self.lease_ms, labels=self.labels)
            previous = firing.pop(event.alert_id, None)
            if previous is not None and previous["labels"] != alert["labels"]:
                posts.append(_ending(previous, now_ms))
            posts.append(alert)
            if event.state != "resolved":
                firing[event.alert_id] = alert
        return Plan(posts, firing, event_ids)

    def accepted(self, plan: Plan) -> None:
        """Alertmanager took ``plan``'s posts: its events are done."""
        self.firing = plan.firing
        for event_id in plan.event_ids:
            self._seen.first_time(event_id)

    def resends(self) -> list[Alert]:
        """Every firing alert with its lease renewed."""
        ends_ms = self.clock_ms() + self.lease_ms
        return [_ending(alert, ends_ms) for alert in self.firing.values()]


def _events(values: Iterable[bytes | None]) -> list[AlertEvent]:
    events = []
    for value in values:
        try:
            events.append(parse_event(value))
        except ValueError as error:
            logger.warning(
                "skipping a record of the alerts topic that is no alert event: %s", error
            )
    return events


def run(settings: Settings, stop: threading.Event, url: str) -> int:
    """Forward alert events to the Alertmanager at ``url`` until ``stop`` is set."""
    config: AlertmanagerSettings = settings.alertmanager
    client = AlertmanagerClient(url, config.timeout_s)
    forwarder = Forwarder(labels=config.labels, resend_interval_s=config.resend_interval_s)
    metrics, health = BridgeMetrics(), Health(heartbeat_timeout_s=60.0)
    reachable = False
    health.add_check("alertmanager", lambda: reachable)
    server = MetricsServer(metrics.registry, health, settings.metrics_port).start()
    consumer = ReadingConsumer(
        settings.kafka.bootstrap_servers,
        config.group_id,
        [settings.kafka.topics.alerts],
        config={**settings.kafka.extra, "session.timeout.ms": settings.kafka.session_timeout_ms},
    )
    logger.info("forwarding %s to %s", settings.kafka.topics.alerts, url)
    adopted, backoff_s, next_resend_s = False, 0.0, 0.0
    pending: list[ConsumedMessage] = []  # polled, not yet accepted by Alertmanager
    try:
        while not stop.is_set():
            health.beat()
            try:
                if not adopted:
                    forwarder.adopt(client.active(ALERTNAME))
                    adopted = True
                if not pending:
                    pending = consumer.poll_batch(500, 0.5)
                plan = forwarder.plan(_events(message.value for message in pending))
                resend = time.monotonic() >= next_resend_s
                posts = forwarder.resends() + plan.posts if resend else plan.posts
                if posts:
                    client.post(posts)
                reachable = True
                if resend:
                    next_resend_s = time.monotonic() + config.resend_interval_s
                forwarder.accepted(plan)
                metrics.events.inc(len(plan.event_ids))
                metrics.firing.set(len(forwarder.firing))
                consumer.store(pending)
                pending, backoff_s = [], 0.0
                consumer.commit()
            except AlertmanagerRejected as error:
                metrics.failures.inc()
                logger.error("Alertmanager refused %d records for good: %s", len(pending), error)
                consumer.store(pending)
                pending = []
            except (AlertmanagerError, ConsumerError) as error:
                if isinstance(error, AlertmanagerError):
                    metrics.failures.inc()
                    reachable = False
                backoff_s = min(2 * backoff_s or 0.5, _MAX_BACKOFF_S)
                logger.warning("retrying in %.1f s: %s", backoff_s, error)
                stop.wait(backoff_s)
    finally:
        consumer.close()
        server.stop()
    return 0
