"""What the worker does with polled readings, in three steps the run loop calls in turn.

1. ``ingest``: decode each message (module ``ingest``; invalid ones go to the dead-letter
   topic with their reason), append the valid readings to their windows in Redis (one
   round trip per channel count, so one for a fleet of single-channel sensors), queue
   the due windows.
2. ``score_due``: take the batches the batcher releases, score them (in a thread of their
   own, so under a backlog the next poll is decoded and appended meanwhile), fold each
   score into its sensor's alert state (read from Redis once per step), publish scores
   and alerts.
3. ``commit_if_idle``: once no window is queued or in flight, wait for the broker to
   acknowledge every output (or commit the transaction), then store the alert states and
   acknowledge the windows in one atomic Redis call, and commit the input offsets.

Every step keeps its unfinished work when Redis or the broker fails, so the loop retries
by calling it again without new messages. Outputs since the last commit are kept in the
``Outbox``, which produces again only those the broker did not acknowledge: outputs are
at-least-once, de-duplicated by their ids downstream. A record the broker can never take
goes to the dead-letter topic, cut, so it never blocks its partition. A crash between
steps replays the uncommitted input; ``WindowStore`` skips readings already applied and
re-reports every window not yet acknowledged.

When Redis loses its state (``RedisStateLost``), the pipeline drops its unfinished work
and rewinds its partitions ``redis.rebuild_lookback_s`` back (``recovery``), so the
windows (and alert states) are rebuilt from Kafka; the outputs of the replayed readings
are produced again, with the same ids. Readings older than the lookback are not
recovered: the gap is logged and kept in ``last_rebuild``.
"""

from __future__ import annotations

import functools
import json
import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, NamedTuple

from stream_detector import alerts
from stream_detector.batcher import Batch, Batcher, RejectedWindow
from stream_detector.config import (
    Settings,
    kafka_consumer_config,
    kafka_producer_config,
    mask_url,
)
from stream_detector.consumer import (
    KAFKA_ERRORS,
    ConsumedMessage,
    Partition,
    ReadingConsumer,
    next_offsets,
)
from stream_detector.failpoints import FailPoints
from stream_detector.ingest import PositionedReading, SensorRoster, dead_letter, decode
from stream_detector.metrics import Metrics
from stream_detector.model import Scores
from stream_detector.outbox import DeadLetter, Outbox
from stream_detector.publisher import Delivery, Publisher, PublishError
from stream_detector.recovery import Recovery
from stream_detector.schemas import REASON_CODES, AlertEvent, InvalidReading, ScoreRecord
from stream_detector.scorer import (
    ModelEvent,
    ModelRegistry,
    Scorer,
    WindowScore,
    resolve_device,
)
from stream_detector.windows import RedisStateLost, Window, WindowStore, WindowStoreError

logger = logging.getLogger(__name__)

COMMIT_INTERVAL_S = 1.0
# Outputs are made durable (a producer flush) and Redis acknowledged at most this often
# when the worker keeps up: scores leave as soon as they are decided; only the
# bookkeeping behind them waits, so a light load does not pay a flush per poll.
ACKNOWLEDGE_INTERVAL_S = 0.1
# Every reason code a dead letter can carry: the decoder's, and the worker's own (no model
# for the sensor, too many sensors held, a window the model cannot take, an output that
# its topic refused).
DEAD_LETTER_CODES = REASON_CODES | {
    "no_model",
    "too_many_sensors",
    "wrong_length",
    "undeliverable",
}
# Failures of Redis or the broker: the pipeline keeps its work, and calling again retries it.
RETRYABLE = (WindowStoreError, PublishError, *KAFKA_ERRORS)


class InFlight(NamedTuple):
    """A batch taken from the batcher: when, and its scoring on the scoring thread."""

    batch: Batch
    taken_s: float
    scoring: Future[Scores]


class Pipeline:
    """One worker's readings-to-outputs processing; the run loop drives it."""

    def __init__(
        self,
        settings: Settings,
        *,
        consumer: ReadingConsumer,
        publisher: Publisher,
        registry: ModelRegistry,
        scorer: Scorer,
        metrics: Metrics,
        store_factory: Callable[[int], WindowStore],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.consumer = consumer
        self.publisher = publisher
        self.registry = registry
        self.scorer = scorer
        self.metrics = metrics
        self._outbox = Outbox(publisher, metrics, settings.kafka.topics.readings)
        # Looked up for every reading: the routes are fixed, so the answers are kept.
        self._model_for = functools.lru_cache(maxsize=1 << 16)(settings.model.model_for)
        self.batcher = Batcher(settings.batch_size, settings.batch_deadline_ms, self._model_for)
        self._store_factory = store_factory
        self._stores: dict[int, WindowStore] = {}
        self._clock = clock
        self.broker_ok = True  # the last attempt to deliver outputs succeeded
        self.broker_reachable = True  # the last lag query got an answer
        self.partitions: set[Partition] = set()
        self._lag_stop = threading.Event()
        self._lag_thread: threading.Thread | None = None
        self._offsets_stored = False  # stored with the consumer, not yet committed
        self._next_commit_s = 0.0
        self._next_acknowledge_s = 0.0
        self.failpoints = FailPoints(settings.failpoints)
        self._sensors = SensorRoster(
            settings.limits.max_sensors_per_worker, settings.redis.sensor_ttl_s
        )
        self._recovery = Recovery(consumer, settings.redis.rebuild_lookback_s)
        self._scorer_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="scoring")
        self._in_flight: list[InFlight] = []
        self._reset()

    def _reset(self) -> None:
        """Forget all work since the last commit (the next owner of the input replays it)."""
        self.batcher.clear()
        self._new: list[ConsumedMessage] = []  # polled, not yet decoded
        self._to_append: dict[int, list[PositionedReading]] = {}  # channel count -> readings
        self._ingest_ts: dict[tuple[str, int], int] = {}  # (sensor, ts) -> Kafka timestamp
        # Batches taken from the batcher, not yet published, each handed to the scoring
        # thread when taken. Dropped ones still queued there are not scored: the next
        # batches would wait behind them.
        for flight in self._in_flight:
            flight.scoring.cancel()
        self._in_flight = []
        self._uncommitted: list[ConsumedMessage] = []
        self._uncommitted_since_s: float | None = None  # when the oldest of them was polled
        self._outbox.clear()
        self._acknowledged = False  # outputs are safe; Redis and offsets still to do
        self._states: dict[str, alerts.SensorAlertState] = {}  # not yet stored in Redis
        self._emitted: dict[str, int] = {}  # sensor -> newest published window end
        self._taken_until: dict[str, int] = {}  # sensor -> newest window end taken to score
        # Kafka timestamp of each published window's newest reading, and its score's delivery.
        self._latencies: list[tuple[int, Delivery]] = []

    # -- 1. ingest -------------------------------------------------------------------------

    def ingest(self, messages: Sequence[ConsumedMessage]) -> None:
        """Decode and window newly polled messages, then retry any earlier unfinished append."""
        self._new += messages
        if messages and not self._uncommitted:
            self._uncommitted_since_s = self._clock()
        self._uncommitted += messages
        self.metrics.readings.inc(len(messages))
        if self._recovery.unchecked and self._new:
            lost = self._partitions_without_windows()
            if lost:
                self._rebuild(lost)
                return
        now_ms, now_s = time.time_ns() // 1_000_000, self._clock()
        for message in self._new:
            if self._recovery.skip(message):
                continue
            try:
                reading = decode(message, self.settings.limits, self._channels_of, now_ms)
                self._sensors.admit(reading.sensor_id, (message.topic, message.partition), now_s)
            except InvalidReading as invalid:
                self.metrics.invalid_readings.labels(invalid.code).inc()
                self._outbox.send(dead_letter(message, invalid.reason))
                continue
            positioned = PositionedReading.of(reading, message)
            self._to_append.setdefault(len(reading.values), []).append(positioned)
            if message.timestamp_ms is not None:
                self._ingest_ts[(reading.sensor_id, reading.ts_ms)] = message.timestamp_ms
        self._new = []
        self.metrics.sensors.set(len(self._sensors))
        try:
            for channels in list(self._to_append):
                self._append(channels, self._to_append[channels])
                del self._to_append[channels]
        except RedisStateLost:
            self._rebuild()
        self._ingest_ts = {}

    def _channels_of(self, sensor_id: str) -> tuple[str, int | None]:
        """The model that scores the sensor, and its channel count (None: not loaded)."""
        model_name = self._model_for(sensor_id)
        shape = self.registry.shape_of(model_name)
        return model_name, None if shape is None else shape[0]

    def _store(self, channels: int) -> WindowStore:
        if channels not in self._stores:
            self._stores[channels] = self._store_factory(channels)
        return self._stores[channels]

    def _append(self, channels: int, readings: list[PositionedReading]) -> None:
        result = self._store(channels).append_batch(readings)
        due = [window for window in result.due if self._first_report(window)]
        self.metrics.replayed_readings.inc(result.replayed)
        self.metrics.late_readings.labels("late").inc(result.late)
        self.metrics.late_readings.labels("duplicate_ts").inc(result.duplicate_ts)
        if result.reset:
            logger.warning(
                "%d sensors changed their channel count: windows restarted", result.reset
            )
        rejected = self.batcher.add(due, self.registry.shape_of, self._clock(), self._ingest_ts)
        for window in rejected:
            self._reject(window)
        now_ms, fetch = time.time_ns() // 1_000_000, self.metrics.stage_seconds.labels("fetch")
        for window in due:
            ingest_ts_ms = self._ingest_ts.get((window.sensor_id, window.end_ts_ms))
            if ingest_ts_ms is not None:
                fetch.observe(max(0, now_ms - ingest_ts_ms) / 1000)

    def _first_report(self, window: Window) -> bool:
        """Whether the window is new to the work since the last commit.

        After a crash the store hands a sensor's unacknowledged windows back (``recovered``)
        with every append that replays readings of that sensor, as long as they stay
        unacknowledged; the replay of a backlog takes many polls before the next commit.
        A sensor's windows come oldest first, so one no newer than the last taken is
        already queued or published.
        """
        taken = self._taken_until.get(window.sensor_id)
        if window.recovered and taken is not None and window.end_ts_ms <= taken:
            return False
        self._taken_until[window.sensor_id] = window.end_ts_ms
        return True

    def _reject(self, rejected: RejectedWindow) -> None:
        window = rejected.window
        self.metrics.invalid_readings.labels(rejected.code).inc()
        value = {
            "sensor_id": window.sensor_id,
            "start_ts_ms": window.start_ts_ms,
            "end_ts_ms": window.end_ts_ms,
            "values": window.values.tolist(),
        }
        # A window has no single source offset: -1 says "the sensor's recent readings".
        topic = self.settings.kafka.topics.readings
        self._outbox.send(
            DeadLetter(
                window.sensor_id.encode(),
                json.dumps(value).encode(),
                rejected.reason,
                topic,
                -1,
                -1,
            )
        )

    # -- 2. score --------------------------------------------------------------------------

    def score_due(self, flush_all: bool = False) -> None:
        """Score the batches that are due, decide alerts, publish scores and alert events.

        Batch by batch, in the order they were taken: a failure leaves only the batches
        not yet published for the retry. The model runs in a thread of its own (a traced
        model gives up the GIL for the whole batch), which takes each batch as soon as the
        batcher gives it up, so under a backlog the run loop polls and appends the next
        readings while batches are scored: unless ``flush_all``, this returns with the
        oldest batch still being scored, and waits for it only once another batch is ready
        behind it, which bounds the windows queued when the model is the slower part.
        """
        now_s = self._clock()
        # Under a steady backlog the batcher is never empty by itself: flushing it once
        # input has waited COMMIT_INTERVAL_S lets the commit step find the worker idle.
        since_s = self._uncommitted_since_s
        flush_all = flush_all or (since_s is not None and now_s - since_s >= COMMIT_INTERVAL_S)
        taken = self.batcher.ready(now_s, flush_all)
        waited = self.metrics.stage_seconds.labels("batch")
        for item in (item for batch in taken for item in batch.items):
            waited.observe(max(0.0, now_s - item.enqueued_s))
        self._in_flight += [InFlight(batch, now_s, self._submit(batch)) for batch in taken]
        blocked = False
        while self._in_flight:
            batch, taken_s, scoring = self._in_flight[0]
            if not (flush_all or scoring.done()):
                if blocked or len(self._in_flight) == 1:
                    return
                blocked = True
            try:
                scores = scoring.result()
            except Exception:
                # Scored again for the retry.
                self._in_flight[0] = InFlight(batch, taken_s, self._submit(batch))
                raise
            self._publish_batch(batch, self.scorer.window_scores(scores), taken_s)
            self._in_flight.pop(0)

    def _submit(self, batch: Batch) -> Future[Scores]:
        self.failpoints.hit("before_score")
        return self._scorer_thread.submit(self._score, batch)

    def _score(self, batch: Batch) -> Scores:
        """The model's scores of one batch (in the scoring thread)."""
        started = time.perf_counter()
        results = self.scorer.infer(batch.model_name, batch.values)
        self.metrics.inference_seconds.observe(time.perf_counter() - started)
        return results

    def _publish_batch(self, batch: Batch, results: list[WindowScore], taken_s: float) -> None:
        """Fold each of a batch's scores into its sensor's alert state, publish."""
        self.metrics.batch_size.observe(len(batch))
        self.metrics.windows_scored.labels(batch.model_name).inc(len(batch))
        loaded = self.registry.get(batch.model_name)
        states = self._alert_states({item.window.sensor_id for item in batch.items})
        policy, scored = self.settings.alerts, self.metrics.stage_seconds.labels("score")
        for item, result in zip(batch.items, results, strict=True):
            window = item.window
            state, score, peak_offset = states[window.sensor_id], result.score, result.peak_offset
            threshold = loaded.thresholds.for_sensor(window.sensor_id, policy)
            if result.terms:
                state, score, term = alerts.adapt_terms(
                    state,
                    result.terms,
                    names=loaded.model.config.score_terms,
                    ts_ms=window.end_ts_ms,
                    threshold=threshold,
                    policy=policy,
                )
                peak_offset = result.term_offsets[term]
            state, events = alerts.update(
                state,
                score=score,
                ts_ms=window.end_ts_ms,
                threshold=threshold,
                policy=policy,
                model_version=loaded.version,
                nearest_prototype=result.nearest_prototype,
                attribution=result.attribution,
                evidence_ts_ms=window.ts_at(peak_offset),
            )
            states[window.sensor_id] = state
            delivery = self._outbox.send(
                ScoreRecord(
                    sensor_id=window.sensor_id,
                    ts_ms=window.end_ts_ms,
                    window_start_ts_ms=window.start_ts_ms,
                    score=score,
                    threshold=state.threshold,
                    model_name=loaded.name,
                    model_version=loaded.version,
                    nearest_prototype=result.nearest_prototype,
                    channel_attribution=result.attribution,
                )
            )
            for event in events:
                self._outbox.send(event)
            self._emitted[window.sensor_id] = max(
                window.end_ts_ms, self._emitted.get(window.sensor_id, 0)
            )
            if item.ingest_ts_ms is not None:
                self._latencies.append((item.ingest_ts_ms, delivery))
            scored.observe(self._clock() - taken_s)
        self._states.update(states)

    def _alert_states(self, sensor_ids: Iterable[str]) -> dict[str, alerts.SensorAlertState]:
        """Alert state per sensor: not yet stored ones from memory, the others from Redis."""
        states = {s: self._states[s] for s in sensor_ids if s in self._states}
        missing = [s for s in sensor_ids if s not in states]
        for channels, group in self._by_store(missing).items():
            stored = self._store(channels).get_alert_state(group)
            for sensor_id in group:
                states[sensor_id] = _state_from(sensor_id, stored.get(sensor_id))
        return states

    def _by_store(self, sensor_ids: Iterable[str]) -> dict[int, list[str]]:
        """Sensors grouped by the channel count (hence the store) of their model."""
        groups: dict[int, list[str]] = {}
        for sensor_id in sensor_ids:
            channels = self._channels_of(sensor_id)[1] or 1
            groups.setdefault(channels, []).append(sensor_id)
        return groups

    # -- 3. commit -------------------------------------------------------------------------

    @property
    def idle(self) -> bool:
        """No window is queued or being scored, and no input awaits decoding or appending."""
        return not (self.batcher or self._in_flight or self._new or self._to_append)

    def commit_if_idle(self, force: bool = False) -> None:
        """When idle, make the outputs durable, then store alert state and input offsets
        (at most every ``ACKNOWLEDGE_INTERVAL_S`` unless ``force``).

        Stored offsets are committed at most every ``COMMIT_INTERVAL_S`` (and always with
        ``force``, on revoke and on close): a crash replays at most that much input, which
        the windows' offset guard skips.
        """
        due = force or self._clock() >= self._next_acknowledge_s
        if self.idle and self._uncommitted and due:
            self._next_acknowledge_s = self._clock() + ACKNOWLEDGE_INTERVAL_S
            if not self._acknowledged:
                self._acknowledge_outputs()
                self.failpoints.hit("after_produce")
            # Alert states and window acknowledgements go together, so that a crash never
            # leaves a state that has seen windows which a replay would score again.
            sensor_ids = self._states.keys() | self._emitted.keys()
            try:
                for channels, group in self._by_store(sensor_ids).items():
                    self._store(channels).acknowledge(
                        {s: self._states[s].to_dict() for s in group if s in self._states},
                        {s: self._emitted[s] for s in group if s in self._emitted},
                    )
            except RedisStateLost:
                self._rebuild()
                return
            self._states, self._emitted, self._taken_until = {}, {}, {}
            if not self.publisher.transactional:
                self.consumer.store(self._uncommitted)
                self._offsets_stored = True
            self._uncommitted, self._acknowledged = [], False
            self._uncommitted_since_s = None
            self._outbox.clear()
        if self._offsets_stored and (force or self._clock() >= self._next_commit_s):
            self.failpoints.hit("before_commit")
            self.consumer.commit()
            self._offsets_stored = False
            self._next_commit_s = self._clock() + COMMIT_INTERVAL_S

    def _acknowledge_outputs(self) -> None:
        offsets = None
        if self.publisher.transactional:
            offsets = (next_offsets(self._uncommitted), self.consumer.group_metadata())
        try:
            self._outbox.acknowledge(offsets)
        except Exception:
            self.broker_ok = False
            raise
        self._acknowledged, self.broker_ok = True, True
        for ingest_ts_ms, delivery in self._latencies:
            # A score produced again after a failure has a newer report: not observed.
            if delivery.acknowledged_ms is not None:
                latency_ms = max(0, delivery.acknowledged_ms - ingest_ts_ms)
                self.metrics.end_to_end_seconds.observe(latency_ms / 1000)
                deliver_ms = max(0, delivery.acknowledged_ms - delivery.produced_ms)
                self.metrics.stage_seconds.labels("deliver").observe(deliver_ms / 1000)
        self._latencies = []
        for output in self._outbox.outputs:
            if isinstance(output, AlertEvent):
                self.metrics.alerts.labels(output.state, output.severity).inc()

    @property
    def unavailable_topics(self) -> dict[str, str]:
        """Output topics that refuse every record, with the broker's reason."""
        return self._outbox.unavailable_topics

    # -- models and lifecycle --------------------------------------------------------------

    def refresh_models(self, force: bool = False) -> list[ModelEvent]:
        """Follow the CURRENT pointers; only between batches, so a batch uses one version."""
        if not self.idle and not force:
            return []
        events = self.registry.refresh(force=force)
        for name, version in self.registry.pointed.items():
            self.metrics.store_points(name, version)
        for event in events:
            if event.error is None:
                self.metrics.serving(event.model_name, event.version)
            else:
                self.metrics.model_load_failures.labels(event.model_name).inc()
        return events

    def wait_for_a_model(self, stop: threading.Event) -> None:
        """Block until at least one configured model is loaded (or ``stop`` is set)."""
        while not stop.is_set():
            self.refresh_models(force=True)
            if self.registry.loaded:
                return
            logger.warning(
                "no model of %s has a loadable CURRENT version in %s yet; waiting",
                list(self.registry.model_names),
                mask_url(str(self.registry.store_root)),
            )
            stop.wait(self.registry.poll_interval_s)

    def _rebuild(self, lost: set[Partition] | None = None) -> None:
        """Rewind the partitions whose windows Redis lost (all owned ones by default).

        Unfinished work is dropped (the replay redoes it) before the stores accept the new
        state, so no reading is applied out of order (``recovery``: how far back). A
        failure part-way raises, and the next attempt meets the loss again and rewinds
        again.
        """
        lost = self.partitions & (self.partitions if lost is None else lost)
        self.metrics.state_losses.inc()
        rewind = self._recovery.rewind(self.partitions, lost, self._uncommitted)
        if self.publisher.transactional:
            self._outbox.abort()
        self._reset()
        for store in self._stores.values():
            store.detect_state_loss()
        self._recovery.rebuilt(lost, rewind)
        self.metrics.rebuild_messages.inc(rewind.replayed_records())

    @property
    def last_rebuild(self) -> dict[str, Any] | None:
        """When the last rebuild happened, its lookback, and where each partition replayed
        from (None: none yet)."""
        return self._recovery.last_rebuild

    def _partitions_without_windows(self) -> set[Partition]:
        """Newly assigned partitions the group has read from but Redis holds nothing for."""
        partitions = sorted(self._recovery.unchecked)
        channel_counts = {shape[0] for shape in map(self.registry.shape_of, self.registry.loaded)}
        applied: set[Partition] = set()
        for channels in channel_counts | set(self._stores):
            offsets = self._store(channels).applied_offsets(partitions)
            applied |= {partition for partition, offset in offsets.items() if offset is not None}
        return self._recovery.lost_before_arrival(applied)

    def start_lag_reports(self, interval_s: float) -> None:
        """Measure the consumer lag every ``interval_s`` in a daemon thread.

        Off the loop: the query takes a round trip per partition (seconds on tansu), and
        librdkafka allows it while another thread polls. Whether it gets an answer is the
        ``broker_reachable`` readiness signal, which an idle worker has no other way to see.
        """

        def report() -> None:
            while not self._lag_stop.wait(interval_s):
                try:
                    self.metrics.set_lag(self.consumer.lag(timeout_s=min(interval_s, 5.0)))
                    self.broker_reachable = True
                except (*KAFKA_ERRORS, RuntimeError) as error:
                    self.broker_reachable = False
                    self.metrics.set_lag({})  # unknown: no gauge rather than a stale one
                    logger.warning("could not measure consumer lag: %s", error)

        self._lag_thread = threading.Thread(target=report, name="consumer-lag", daemon=True)
        self._lag_thread.start()

    def poll(self) -> list[ConsumedMessage]:
        """The next records, ``kafka.poll_batch_size`` at most, waiting no longer than until
        the oldest queued window is due (``kafka.poll_timeout_ms`` at most)."""
        timeout_s = self.settings.kafka.poll_timeout_ms / 1000
        until_deadline = self.batcher.seconds_to_deadline(self._clock())
        if until_deadline is not None:
            timeout_s = min(timeout_s, until_deadline)
        if self._in_flight:
            timeout_s = 0.0  # nothing fetched: publish the batch being scored at once
        return self.consumer.poll_batch(self.settings.kafka.poll_batch_size, timeout_s)

    @property
    def serving(self) -> bool:
        """Whether at least one model is loaded."""
        return bool(self.registry.loaded)

    def finish(self) -> None:
        """Score everything queued and commit (before partitions go or the worker stops)."""
        self.ingest([])
        self.score_due(flush_all=True)
        self.commit_if_idle(force=True)

    def drain(self, timeout_s: float = 30.0) -> None:
        """``finish``, retrying Redis and broker failures for up to ``timeout_s``."""
        deadline = self._clock() + timeout_s
        while True:
            try:
                self.finish()
                return
            except RETRYABLE as error:
                # A topic that refuses every record will not take them within the timeout.
                if self._clock() > deadline or self.unavailable_topics:
                    logger.error("gave up draining (%s); the next owner replays the rest", error)
                    return
                time.sleep(0.5)

    def redis_ok(self) -> bool:
        """Whether Redis answers a ping."""
        stores = list(self._stores.values()) or [self._store(1)]
        return all(store.ping() for store in stores)

    def close(self, timeout_s: float = 10.0) -> None:
        """Leave the group (committing stored offsets) and deliver what is queued."""
        self._lag_stop.set()
        if self._lag_thread is not None:
            self._lag_thread.join(timeout_s)
        self._scorer_thread.shutdown(cancel_futures=True)
        try:
            self.consumer.close()
        finally:
            self.publisher.close(timeout_s)

    def on_assign(self, partitions: list[Partition]) -> None:
        """Track the partitions this worker owns; check Redis still has their windows."""
        self.partitions |= set(partitions)
        self._recovery.assigned(partitions)
        self.metrics.assigned_partitions.set(len(self.partitions))

    def on_revoke(self, partitions: list[Partition]) -> None:
        """Finish the in-flight work before the partitions go, or drop it for the next owner."""
        self.partitions -= set(partitions)
        self.metrics.assigned_partitions.set(len(self.partitions))
        self._sensors.forget(partitions)
        self.metrics.sensors.set(len(self._sensors))
        self._recovery.revoked(partitions)
        try:
            self.finish()
        except Exception as error:  # the next owner replays whatever we could not commit
            logger.warning("could not finish in-flight work on revoke (%s); dropping it", error)
            if self.publisher.transactional:
                self._outbox.abort()
            self._reset()


def _state_from(sensor_id: str, stored: dict[str, Any] | None) -> alerts.SensorAlertState:
    if stored is not None:
        try:
            return alerts.SensorAlertState.from_dict(sensor_id, stored)
        except alerts.InvalidAlertState as error:
            logger.warning("starting sensor %r from a fresh alert state: %s", sensor_id, error)
    return alerts.SensorAlertState(sensor_id)


def open_pipeline(settings: Settings, metrics: Metrics) -> Pipeline:
    """Connect everything a worker needs, as the settings describe."""
    device = resolve_device(settings.device)
    model_names = [settings.model.default_model, *settings.model.routes.values()]
    registry = ModelRegistry(
        settings.model.store,
        model_names,
        device=device,
        window_length=settings.window_length,
        poll_interval_s=settings.model.current_poll_interval_s,
        trace=settings.trace_model,
    )
    producer_config = kafka_producer_config(settings)
    transactional_id = producer_config.pop("transactional.id", None)
    topics = settings.kafka.topics
    publisher = Publisher(
        settings.kafka.bootstrap_servers,
        scores_topic=topics.scores,
        alerts_topic=topics.alerts,
        dead_letter_topic=topics.dead_letters,
        config=producer_config,
        transactional_id=None if transactional_id is None else str(transactional_id),
    )
    hooks: dict[str, Callable[[list[Partition]], None]] = {}
    consumer = ReadingConsumer(
        settings.kafka.bootstrap_servers,
        settings.kafka.group_id,
        [topics.readings],
        config=kafka_consumer_config(settings),
        on_assign=lambda partitions: hooks["assign"](partitions),
        on_revoke=lambda partitions: hooks["revoke"](partitions),
    )
    metrics.start_at_zero(
        reasons=DEAD_LETTER_CODES,
        severities=settings.alerts.severity_bands,
        output_topics=(topics.scores, topics.alerts, topics.dead_letters),
        model_names=model_names,
        retried_systems=[error.__name__ for error in RETRYABLE],
    )
    pipeline = Pipeline(
        settings,
        consumer=consumer,
        publisher=publisher,
        registry=registry,
        scorer=Scorer(registry, device=device, mixed_precision=settings.mixed_precision),
        metrics=metrics,
        store_factory=lambda channels: WindowStore.from_settings(settings, channels),
    )
    hooks.update(assign=pipeline.on_assign, revoke=pipeline.on_revoke)
    return pipeline
