"""Fault injection against a real broker and Redis: nothing read is lost, nothing is doubled.

Each scenario streams known readings with injected anomalies through a worker while a
fault strikes, then checks the outputs against an uninterrupted run (``harness.verify``)
and records the result in ``benchmarks/results/reliability.json``. Every scenario is
bounded in traffic and time, and talks to loopback only.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import random
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from kafka import KafkaProducer

from stream_detector import store
from stream_detector.config import KafkaTopics, RedisSettings, Settings
from stream_detector.devtools import loadgen
from stream_detector.devtools.proxy import TcpProxy
from stream_detector.devtools.services import EmbeddedKafka, EmbeddedRedis, create_topics, free_port
from stream_detector.devtools.workers import metric_value, readiness, start_worker
from stream_detector.publisher import ReadingProducer
from tests.conftest import Topics
from tests.reliability.harness import (
    Reference,
    final_windows,
    reference,
    stop_worker,
    verify,
)
from tests.worker_support import (
    MODEL,
    STEP_MS,
    STRIDE,
    T0_MS,
    OutputReader,
    TrainedModel,
    WorkerThread,
    make_plan,
    produce,
    running,
    wait_for,
)

pytestmark = pytest.mark.integration

SENSORS = 4
READINGS = 300
ANOMALIES = (
    loadgen.InjectedAnomaly("s-00001", T0_MS + 230 * STEP_MS, T0_MS + 250 * STEP_MS, 1.5),
    loadgen.InjectedAnomaly("s-00002", T0_MS + 100 * STEP_MS, T0_MS + 120 * STEP_MS, 1.5),
)


FAULT_STEP = 120  # scenarios stream steps 0..119 before the fault strikes


def the_plan(readings: int = READINGS) -> loadgen.LoadPlan:
    return make_plan(SENSORS, readings, ANOMALIES)


def reference_for(plan: loadgen.LoadPlan, trained: TrainedModel, model_store: Path) -> Reference:
    version = store.current_version(model_store, MODEL)
    assert version is not None
    return reference(plan, trained, version, STRIDE)


def stream_first_stretch(bootstrap: str, topic: str, ref: Reference, reader: OutputReader) -> None:
    """Produce the readings before any fault (steps 0..119) and wait for all their scores."""
    plan = ref.plan
    produce(bootstrap, topic, plan, range(0, FAULT_STEP))
    early = {key for key in ref.scores if key[1] <= plan.ts_ms(FAULT_STEP - 1)}
    reader.read_until(lambda o: early <= o.scored())


# -- worker killed with SIGKILL at failpoints ------------------------------------------------

# after_produce: outputs are acknowledged when the worker is idle, at most every 100 ms
# (ACKNOWLEDGE_INTERVAL_S). Through a backlog the batch being scored keeps it busy, so that
# is once a second (COMMIT_INTERVAL_S), and the whole input here takes less: the first
# acknowledgement, at the end of the input each worker reads, is the one sure to come.
FAILPOINT_HITS = {"before_score": (2, 12), "after_produce": (1, 1), "before_commit": (1, 2)}
KILLS = 3


@pytest.mark.parametrize("failpoint", list(FAILPOINT_HITS))
def test_a_worker_killed_repeatedly_at_a_failpoint_loses_nothing(
    failpoint: str,
    tmp_path: Path,
    kafka_bootstrap: str,
    redis_url: str,
    key_prefix: str,
    topics: Topics,
    model_store: Path,
    trained: TrainedModel,
    settings_for: Callable[..., Settings],
    reader: OutputReader,
) -> None:
    plan = the_plan(600)
    ref = reference_for(plan, trained, model_store)
    produce(kafka_bootstrap, topics.readings, plan)
    # Polls of 64 readings hold several windows of a sensor: all of them are in flight
    # together when the worker dies.
    settings = settings_for(model_store, kafka={"poll_batch_size": 64})
    log = tmp_path / "worker.log"
    rng = random.Random(failpoint)
    kills, killed_last = 0, False
    for _ in range(KILLS):
        hit = rng.randint(*FAILPOINT_HITS[failpoint])
        process = start_worker(settings.model_copy(update={"failpoints": {failpoint: hit}}), log)
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:  # the input ran out before the chosen hit
            stop_worker(process, log)
            killed_last = False
            break
        assert process.returncode == -signal.SIGKILL, log.read_text()[-3000:]
        kills, killed_last = kills + 1, True
    assert kills, f"the worker never reached {failpoint}"

    restarted = time.monotonic()
    process = start_worker(settings, log)
    try:
        reader.read_until(lambda o: set(ref.scores) <= o.scored(), timeout_s=120)
        wait_for(
            lambda: readiness(settings.metrics_port) is True, 60, "the restarted worker to be ready"
        )
        recovery_s = time.monotonic() - restarted
        if killed_last:  # it re-reads what the killed one had applied but not committed
            # The killed worker may have published every score already, so wait for the
            # replay itself rather than reading the counter once.
            wait_for(
                lambda: metric_value(settings.metrics_port, "detector_replayed_readings_total") > 0,
                60,
                "the restarted worker to skip the readings the killed one applied",
            )
    finally:
        stop_worker(process, log)
    outputs = reader.read_to_end()
    windows = final_windows(redis_url, key_prefix, plan)
    scenario = f"sigkill_{failpoint}"
    result = verify(scenario, ref, outputs, windows, recovery_s, extra={"kills": kills})
    # Each worker publishes every output at most once: a window the store hands back again
    # while a replay goes on is not published again (31,197 duplicates here, stop 33). A
    # kill at after_produce lands once everything is published, so each replays it all.
    outputs_once = len(ref.scores) + len(ref.event_ids)
    assert result["duplicates_before_dedup"] <= (kills + 1) * outputs_once, result


# -- Redis restarts --------------------------------------------------------------------------


@contextlib.contextmanager
def worker_on_own_redis(
    settings: Settings, own_redis: EmbeddedRedis, key_prefix: str
) -> Iterator[WorkerThread]:
    redis = RedisSettings(url=own_redis.url, key_prefix=key_prefix, rebuild_lookback_s=3600)
    with running(settings.model_copy(update={"redis": redis})) as handle:
        yield handle


@pytest.mark.parametrize("state", ["lost", "kept"])
def test_a_redis_restart_loses_nothing(
    state: str,
    tmp_path: Path,
    kafka_bootstrap: str,
    key_prefix: str,
    topics: Topics,
    model_store: Path,
    trained: TrainedModel,
    settings_for: Callable[..., Settings],
    reader: OutputReader,
) -> None:
    plan = the_plan()
    ref = reference_for(plan, trained, model_store)
    persistence = tmp_path / "redis-data" if state == "kept" else None
    own_redis = EmbeddedRedis(port=free_port(), data_dir=persistence)
    with own_redis, worker_on_own_redis(settings_for(model_store), own_redis, key_prefix) as handle:
        stream_first_stretch(kafka_bootstrap, topics.readings, ref, reader)

        own_redis.stop()
        produce(kafka_bootstrap, topics.readings, plan, range(FAULT_STEP, 200))
        wait_for(
            lambda: handle.metric("detector_retries_total", system="WindowStoreError") >= 2,
            30,
            "the worker to retry without Redis",
        )
        status, body = handle.http("/readyz")
        assert status == 503 and json.loads(body)["checks"]["redis"] is False
        assert handle.http("/healthz")[0] == 200 and handle.thread.is_alive()

        own_redis.start()  # same port; empty unless the state was persisted
        cleared = time.monotonic()
        produce(kafka_bootstrap, topics.readings, plan, range(200, READINGS))
        reader.read_until(lambda o: set(ref.scores) <= o.scored(), timeout_s=90)
        wait_for(
            lambda: readiness(handle.settings.metrics_port) is True, 30, "the worker to be ready"
        )
        recovery_s = time.monotonic() - cleared
        losses = handle.metric("detector_redis_state_losses_total")
        _, body = handle.http("/readyz")
        windows = final_windows(own_redis.url, key_prefix, plan)
    outputs = reader.read_to_end()
    verify(f"redis_restart_state_{state}", ref, outputs, windows, recovery_s)
    if state == "lost":
        assert losses == 1
        assert json.loads(body)["last_state_rebuild"]["replay_from"]
    else:
        assert losses == 0


def test_redis_state_lost_while_no_worker_ran_is_rebuilt_when_one_starts(
    kafka_bootstrap: str,
    key_prefix: str,
    topics: Topics,
    model_store: Path,
    trained: TrainedModel,
    settings_for: Callable[..., Settings],
    reader: OutputReader,
) -> None:
    plan = the_plan()
    ref = reference_for(plan, trained, model_store)
    settings = settings_for(model_store)
    with EmbeddedRedis(port=free_port()) as own_redis:
        with worker_on_own_redis(settings, own_redis, key_prefix):
            stream_first_stretch(kafka_bootstrap, topics.readings, ref, reader)
        own_redis.stop()
        own_redis.start()  # empty, and no worker saw it go
        produce(kafka_bootstrap, topics.readings, plan, range(FAULT_STEP, 200))

        cleared = time.monotonic()
        with worker_on_own_redis(settings, own_redis, key_prefix) as handle:
            produce(kafka_bootstrap, topics.readings, plan, range(200, READINGS))
            reader.read_until(lambda o: set(ref.scores) <= o.scored(), timeout_s=90)
            wait_for(
                lambda: readiness(handle.settings.metrics_port) is True,
                30,
                "the worker to be ready",
            )
            recovery_s = time.monotonic() - cleared
            assert handle.metric("detector_redis_state_losses_total") == 1
            windows = final_windows(own_redis.url, key_prefix, plan)
    verify("redis_state_lost_while_workers_down", ref, reader.read_to_end(), windows, recovery_s)


# -- broker restart and broker unreachable ---------------------------------------------------

OUTAGE_S = 30.0


class OutageRig:
    """A worker whose broker traffic goes through a proxy, and the phases of an outage."""

    def __init__(
        self, handle: WorkerThread, reader: OutputReader, proxy: TcpProxy, ref: Reference
    ) -> None:
        self.handle, self.reader, self.proxy, self.ref = handle, reader, proxy, ref
        self.topic = handle.settings.kafka.topics.readings

    def before_fault(self) -> None:
        """Stream the first readings and wait for their scores; queue more for the fault."""
        plan = self.ref.plan
        stream_first_stretch(self.proxy.address, self.topic, self.ref, self.reader)
        produce(self.proxy.address, self.topic, plan, range(FAULT_STEP, 200))

    def expect_unready(self, outage_s: float = 0.0) -> None:
        """Wait for not-ready (broker check failing); stay alive for ``outage_s`` in all."""
        outage_end = time.monotonic() + outage_s
        wait_for(lambda: self.handle.http("/readyz")[0] == 503, 30, "the worker to turn unready")
        assert json.loads(self.handle.http("/readyz")[1])["checks"]["broker"] is False
        while True:
            assert self.handle.thread.is_alive() and self.handle.http("/healthz")[0] == 200
            if time.monotonic() >= outage_end:
                return
            time.sleep(1.0)

    def after_fault(self) -> float:
        """Stream the rest and wait for every output; return the recovery time."""
        cleared = time.monotonic()
        produce(self.proxy.address, self.topic, self.ref.plan, range(200, READINGS))
        try:
            self.reader.read_until(lambda o: set(self.ref.scores) <= o.scored(), timeout_s=90)
        except AssertionError as timed_out:  # what the worker says of itself, to diagnose
            raise AssertionError(f"{timed_out}; /readyz: {self.handle.http('/readyz')}") from None
        port = self.handle.settings.metrics_port
        wait_for(lambda: readiness(port) is True, 30, "the worker to be ready")
        return time.monotonic() - cleared


@contextlib.contextmanager
def outage_rig(
    proxy: TcpProxy,
    consumer_config: dict[str, object],
    model_store: Path,
    trained: TrainedModel,
    settings_for: Callable[..., Settings],
) -> Iterator[OutageRig]:
    """A worker on a broker of its own, reached through ``proxy``."""
    names = Topics("readings", "scores", "alerts", "dead-letter")
    create_topics(proxy.address, [names.readings], 3)
    create_topics(proxy.address, [names.scores, names.alerts, names.dead_letter], 1)
    kafka = {
        "bootstrap_servers": proxy.address,
        "topics": KafkaTopics(
            readings=names.readings,
            scores=names.scores,
            alerts=names.alerts,
            dead_letters=names.dead_letter,
        ),
        "lag_interval_s": 1.0,
    }
    reader = OutputReader(proxy.address, names, dict(consumer_config))
    try:
        with running(settings_for(model_store, kafka=kafka)) as handle:
            yield OutageRig(handle, reader, proxy, reference_for(the_plan(), trained, model_store))
    finally:
        reader.close()


@pytest.fixture
def broker_behind_proxy() -> Iterator[tuple[EmbeddedKafka, TcpProxy]]:
    """A broker of its own whose clients all go through a proxy the test can cut."""
    broker_port = free_port()
    with (
        TcpProxy("127.0.0.1", broker_port) as proxy,
        EmbeddedKafka(port=broker_port, advertised_port=proxy.port) as broker,
    ):
        yield broker, proxy


@pytest.fixture
def durable_broker_behind_proxy(tmp_path: Path) -> Iterator[tuple[EmbeddedKafka, TcpProxy]]:
    """A broker on S3 storage (moto's S3 server) that keeps its data across restarts."""
    pytest.importorskip(
        "moto", reason="the broker restart needs an S3 server: pip install moto[server]"
    )
    s3_port = free_port()
    with (tmp_path / "moto.log").open("wb") as log:
        s3 = subprocess.Popen(
            [Path(sys.executable).parent / "moto_server", "-H", "127.0.0.1", "-p", str(s3_port)],
            stdout=log,
            stderr=log,
        )
    try:
        endpoint = f"http://127.0.0.1:{s3_port}"
        wait_for(lambda: _answers(endpoint), 60, "the S3 server to start")
        request = urllib.request.Request(f"{endpoint}/tansu", method="PUT")
        urllib.request.urlopen(request, timeout=10).close()  # create the bucket
        environment = {
            "AWS_ENDPOINT": endpoint,
            "AWS_ALLOW_HTTP": "true",
            "AWS_ACCESS_KEY_ID": "test",
            "AWS_SECRET_ACCESS_KEY": "test",
            "AWS_DEFAULT_REGION": "us-east-1",
        }
        broker_port = free_port()
        with (
            TcpProxy("127.0.0.1", broker_port) as proxy,
            EmbeddedKafka(
                port=broker_port,
                advertised_port=proxy.port,
                storage_engine="s3://tansu/",
                environment=environment,
            ) as broker,
        ):
            yield broker, proxy
    finally:
        s3.terminate()
        s3.wait(10)


def _answers(url: str) -> bool:
    try:
        urllib.request.urlopen(url, timeout=2).close()
        return True
    except OSError:
        return False


@pytest.mark.parametrize("fault", ["restart", "unreachable_30s"])
def test_a_broker_fault_loses_nothing(
    fault: str,
    request: pytest.FixtureRequest,
    redis_url: str,
    key_prefix: str,
    kafka_consumer_config: dict[str, object],
    model_store: Path,
    trained: TrainedModel,
    settings_for: Callable[..., Settings],
) -> None:
    durable = fault == "restart"  # a restart keeps the data only on durable storage
    broker, proxy = request.getfixturevalue(
        "durable_broker_behind_proxy" if durable else "broker_behind_proxy"
    )
    with outage_rig(proxy, kafka_consumer_config, model_store, trained, settings_for) as rig:
        rig.before_fault()
        if fault == "restart":
            # A rolling restart: tansu finishes its clients' requests (for up to 5 s) before
            # it exits. Stopped at once (SIGINT), two of stop 33's clean-clone CI runs failed
            # here: an alert event the broker had acknowledged was never read back (nothing
            # was produced twice: the worker saw no failure), and the scores stopped for
            # over 90 s after the restart. An abrupt loss of the broker is the unreachable
            # case.
            broker.stop(timeout_s=30, stop_signal=signal.SIGTERM)
            rig.expect_unready()
            broker.start()  # same port, same S3 bucket
        else:
            proxy.cut()
            rig.expect_unready(OUTAGE_S)
            proxy.restore()
        recovery_s = rig.after_fault()
        rig.handle.close()  # a stopped worker has every output acknowledged: none comes later
        outputs = rig.reader.read_to_end()
    windows = final_windows(redis_url, key_prefix, rig.ref.plan)
    verify(f"broker_{fault}", rig.ref, outputs, windows, recovery_s)


# -- model store -----------------------------------------------------------------------------


@pytest.mark.parametrize("fault", ["unavailable", "corrupt_version"])
def test_a_model_store_fault_keeps_the_current_version_scoring(
    fault: str,
    tmp_path: Path,
    kafka_bootstrap: str,
    redis_url: str,
    key_prefix: str,
    topics: Topics,
    model_store: Path,
    trained: TrainedModel,
    settings_for: Callable[..., Settings],
    reader: OutputReader,
) -> None:
    plan = the_plan()
    ref = reference_for(plan, trained, model_store)
    served = store.current_version(model_store, MODEL)
    current = model_store / MODEL / "CURRENT"
    with running(settings_for(model_store)) as handle:
        stream_first_stretch(kafka_bootstrap, topics.readings, ref, reader)

        if fault == "unavailable":
            # The volume goes away, then comes back broken: CURRENT cannot be read.
            moved = model_store.rename(tmp_path / "unmounted")
            produce(kafka_bootstrap, topics.readings, plan, range(120, 160))
            time.sleep(1.0)  # the worker looks at CURRENT every 0.2 s
            moved.rename(model_store)
            current.rename(tmp_path / "CURRENT")
            current.mkdir()
            produce(kafka_bootstrap, topics.readings, plan, range(160, 200))
            time.sleep(1.0)
            current.rmdir()
            (tmp_path / "CURRENT").rename(current)
        else:
            version = store.publish_version(model_store, MODEL, trained.model, promote=False)
            weights = store.version_dir(model_store, MODEL, version) / "model.safetensors"
            weights.write_bytes(weights.read_bytes()[:-8] + b"tampered")
            store.promote(model_store, MODEL, version)
            produce(kafka_bootstrap, topics.readings, plan, range(FAULT_STEP, 200))
            time.sleep(1.0)
            assert handle.metric("detector_model_load_failures_total", model=MODEL) == 1

        cleared = time.monotonic()
        produce(kafka_bootstrap, topics.readings, plan, range(200, READINGS))
        outputs = reader.read_until(lambda o: set(ref.scores) <= o.scored(), timeout_s=90)
        assert readiness(handle.settings.metrics_port) is True
        recovery_s = time.monotonic() - cleared
        assert {record["model_version"] for record in outputs.scores} == {served}
    verify(
        f"model_store_{fault}",
        ref,
        reader.read_to_end(),
        final_windows(redis_url, key_prefix, plan),
        recovery_s,
    )


# -- poison messages and output topics that refuse records -----------------------------------

OVERSIZED_BYTES = 5_000_000
BIG_TOPIC = {"max.message.bytes": "8388608"}  # so that a real Kafka accepts the 5 MB reading


def worker_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        record.getMessage()
        for record in caplog.records
        if record.levelno >= logging.WARNING and record.name.startswith("stream_detector")
    ]


def test_an_oversized_reading_is_dead_lettered_once_cut_and_the_stream_goes_on(
    kafka_bootstrap: str,
    redis_url: str,
    key_prefix: str,
    topics: Topics,
    topic_factory: Callable[..., list[str]],
    model_store: Path,
    trained: TrainedModel,
    settings_for: Callable[..., Settings],
    reader: OutputReader,
    caplog: pytest.LogCaptureFixture,
) -> None:
    plan = the_plan()
    ref = reference_for(plan, trained, model_store)
    (readings,) = topic_factory("readings-big", partitions=3, config=BIG_TOPIC)
    kafka = {
        "topics": KafkaTopics(
            readings=readings,
            scores=topics.scores,
            alerts=topics.alerts,
            dead_letters=topics.dead_letter,
        )
    }
    # A client the project did not write, as a user's producer would be.
    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap, max_request_size=8_388_608)
    messages = list(loadgen.messages(plan))
    middle = len(messages) // 2
    for _, key, value in messages[:middle]:
        producer.send(readings, key=key, value=value)
    poison = b'{"sensor_id": "s-00002", "ts": %d, "value": "' % plan.ts_ms(150)
    poison += b"a" * (OVERSIZED_BYTES - len(poison) - 2) + b'"}'
    sent = producer.send(readings, key=b"s-00002", value=poison).get(timeout=30)
    for _, key, value in messages[middle:]:
        producer.send(readings, key=key, value=value)
    producer.flush(30)
    producer.close()

    caplog.set_level(logging.WARNING)
    with running(settings_for(model_store, kafka=kafka)) as handle:
        reader.read_until(
            lambda o: set(ref.scores) <= o.scored() and len(o.dead_letters) >= 1, timeout_s=120
        )
        assert handle.http("/readyz")[0] == 200
        assert handle.metric("detector_cut_outputs_total", topic=topics.dead_letter) == 1
        assert handle.metric("detector_retries_total", system="PublishError") == 0
    outputs = reader.read_to_end()  # the worker has stopped: nothing can arrive later

    (dead,) = outputs.dead_letters
    headers = dict(dead.headers)
    assert headers["reason"].startswith(b"too_large: ")
    assert headers["truncated"] == b"true"
    assert headers["original_size"] == str(len(poison)).encode()
    assert headers["original_sha256"] == hashlib.sha256(poison).hexdigest().encode()
    assert (headers["source_partition"], headers["source_offset"]) == (
        str(sent.partition).encode(),
        str(sent.offset).encode(),
    )
    assert poison.startswith(dead.value) and len(dead.value) < 1_000_000
    warnings = worker_warnings(caplog)
    assert not [w for w in warnings if "retrying" in w or "again" in w], warnings
    assert len([w for w in warnings if "dead letter" in w]) <= 1, warnings
    verify(
        "oversized_reading",
        ref,
        outputs,
        final_windows(redis_url, key_prefix, plan),
        None,
        extra={"oversized_bytes": len(poison), "dead_letter_bytes": len(dead.value)},
    )


def test_an_output_topic_refusing_every_record_makes_the_worker_unready_and_loses_nothing(
    kafka_bootstrap: str,
    redis_url: str,
    key_prefix: str,
    topics: Topics,
    model_store: Path,
    trained: TrainedModel,
    settings_for: Callable[..., Settings],
    reader: OutputReader,
) -> None:
    plan = the_plan()
    ref = reference_for(plan, trained, model_store)
    bad_json = [b'{"sensor_id": "s-00000", "ts": %d' % step for step in range(3)]
    producer = ReadingProducer(kafka_bootstrap, topics.readings)
    for value in bad_json:
        producer.send(None, value)
    producer.flush()
    refused = "bad topic!"  # not a legal topic name: the broker refuses every record
    kafka = {
        "topics": KafkaTopics(
            readings=topics.readings,
            scores=refused,
            alerts=topics.alerts,
            dead_letters=topics.dead_letter,
        )
    }

    with running(settings_for(model_store, kafka=kafka)) as handle:
        # The dead letters leave before any score is refused; then the readings come.
        reader.read_until(lambda o: len(o.dead_letters) >= len(bad_json), timeout_s=60)
        produce(kafka_bootstrap, topics.readings, plan, range(0, FAULT_STEP))

        def retried_thrice() -> bool:
            try:
                return handle.metric("detector_retries_total", system="PublishError") >= 3
            except OSError:  # still starting: no metrics endpoint yet
                return False

        wait_for(retried_thrice, 60, "the worker to retry the refused scores")
        status, body = handle.http("/readyz")
        assert status == 503, body
        checks = json.loads(body)
        assert checks["checks"]["output_topics"] is False
        # The broker's "Invalid topic" first, then librdkafka's own "Unknown topic".
        assert "topic" in checks["unavailable_topics"][refused].lower()
        assert handle.metric("detector_output_topic_unavailable", topic=refused) == 1
        assert handle.http("/healthz")[0] == 200
    # Every retry produced again only the refused scores: each dead letter arrived once.
    early = reader.read_to_end()
    assert sorted(message.value for message in early.dead_letters) == sorted(bad_json)

    # Nothing was committed, so a worker that can publish scores every window.
    cleared = time.monotonic()
    with running(settings_for(model_store)):
        produce(kafka_bootstrap, topics.readings, plan, range(FAULT_STEP, READINGS))
        reader.read_until(lambda o: set(ref.scores) <= o.scored(), timeout_s=90)
        recovery_s = time.monotonic() - cleared
    outputs = reader.read_to_end()
    # At least once: the second worker replays input the first stored no offset for.
    assert {message.value for message in outputs.dead_letters} == set(bad_json)
    verify(
        "output_topic_refusing_records",
        ref,
        outputs,
        final_windows(redis_url, key_prefix, plan),
        recovery_s,
        extra={"dead_letters_received": len(outputs.dead_letters)},
    )
