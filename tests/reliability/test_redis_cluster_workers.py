"""Two workers of one consumer group keep their state on a 3-master Redis Cluster.

Every slot of one master moves to another (``redis-cli --cluster reshard``) while the
workers score, then one worker leaves and the other takes its partitions over. Checked
against an uninterrupted run (``harness.verify``): nothing lost, nothing scored twice, and
the takeover continues from the windows in Redis without replaying any reading.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import redis

from stream_detector import store
from stream_detector.config import KafkaTopics, RedisSettings, Settings
from stream_detector.devtools import loadgen
from stream_detector.devtools.services import EmbeddedRedisCluster
from tests.conftest import Topics, needs_redis_cluster
from tests.reliability.harness import final_windows, reference, verify
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

pytestmark = [
    pytest.mark.integration,
    needs_redis_cluster,
]

PARTITIONS = 6
SENSORS = 12
READINGS = 300
ANOMALIES = (
    loadgen.InjectedAnomaly("s-00003", T0_MS + 150 * STEP_MS, T0_MS + 170 * STEP_MS, 1.5),
    loadgen.InjectedAnomaly("s-00007", T0_MS + 240 * STEP_MS, T0_MS + 260 * STEP_MS, 1.5),
)


def keys_per_master(cluster: EmbeddedRedisCluster, prefix: str) -> list[int]:
    """Keys of the prefix on each master, once every scored window is acknowledged (the
    workers acknowledge at most every ACKNOWLEDGE_INTERVAL_S; pending-window lists live
    until then, and alert states are written then)."""

    def keys() -> list[list[bytes]]:
        found = []
        for node in cluster.nodes:
            with redis.Redis(host=node.host, port=node.port) as client:
                found.append(list(client.scan_iter(match=f"{{{prefix}:*", count=1000)))
        return found

    wait_for(
        lambda: not any(b"}:p:" in key for node_keys in keys() for key in node_keys),
        30,
        "every scored window to be acknowledged",
    )
    return [len(node_keys) for node_keys in keys()]


def wait_for_partitions(workers: list[WorkerThread], counts: list[int]) -> None:
    wait_for(
        lambda: [len(worker.partitions()) for worker in workers] == counts,
        60,
        f"the workers to hold {counts} partitions",
    )


def test_two_workers_on_a_redis_cluster_survive_a_reshard_and_a_takeover(
    kafka_bootstrap: str,
    key_prefix: str,
    topic_factory: Callable[..., list[str]],
    topics: Topics,
    model_store: Path,
    trained: TrainedModel,
    settings_for: Callable[..., Settings],
    reader: OutputReader,
) -> None:
    (readings,) = topic_factory("readings6", partitions=PARTITIONS)
    kafka = {
        "topics": KafkaTopics(
            readings=readings,
            scores=topics.scores,
            alerts=topics.alerts,
            dead_letters=topics.dead_letter,
        )
    }
    plan = make_plan(SENSORS, READINGS, ANOMALIES)
    version = store.current_version(model_store, MODEL)
    assert version is not None
    ref = reference(plan, trained, version, STRIDE)

    def scored_until(step: int) -> set[tuple[str, int]]:
        return {key for key in ref.scores if key[1] <= plan.ts_ms(step)}

    with EmbeddedRedisCluster(masters=3) as cluster:
        redis_settings = RedisSettings(url=cluster.url, cluster=True, key_prefix=key_prefix)
        settings = settings_for(model_store, kafka=kafka).model_copy(
            update={"redis": redis_settings}
        )
        leaver_settings = settings_for(model_store, kafka=kafka).model_copy(
            update={"redis": redis_settings}
        )
        with running(leaver_settings) as leaver, running(settings) as stayer:
            wait_for_partitions([leaver, stayer], [3, 3])
            produce(kafka_bootstrap, readings, plan, range(0, 120))
            reader.read_until(lambda o: scored_until(119) <= o.scored())
            spread = keys_per_master(cluster, key_prefix)
            assert all(spread), f"a master holds no key: {spread}"

            # Steps 120..199 arrive one by one while every slot of a master moves.
            source, target = cluster.nodes[0], cluster.nodes[1]

            def trickle() -> None:
                for step in range(120, 200):
                    produce(kafka_bootstrap, readings, plan, range(step, step + 1))
                    time.sleep(0.05)

            producer = threading.Thread(target=trickle)
            producer.start()
            moved = cluster.reshard(source, target)
            producer.join(60)
            reader.read_until(lambda o: scored_until(199) <= o.scored(), timeout_s=90)
            resharded = keys_per_master(cluster, key_prefix)
            assert resharded[0] == 0 and sum(resharded) == sum(spread), (spread, resharded)
            replayed_before = leaver.metric("detector_replayed_readings_total")

            leaver.close()
            wait_for_partitions([stayer], [PARTITIONS])
            produce(kafka_bootstrap, readings, plan, range(200, READINGS))
            reader.read_until(lambda o: set(ref.scores) <= o.scored(), timeout_s=90)
            replayed_after = stayer.metric("detector_replayed_readings_total")
            windows = final_windows(cluster.url, key_prefix, plan, cluster=True)
    outputs = reader.read_to_end()
    result = verify(
        "redis_cluster_reshard_and_takeover",
        ref,
        outputs,
        windows,
        recovery_s=None,
        extra={
            "keys_per_master_before_reshard": spread,
            "keys_per_master_after_reshard": resharded,
            "slots_moved": moved,
        },
    )
    assert replayed_before == replayed_after == 0, "the takeover replayed readings"
    assert result["duplicates_before_dedup"] == 0, "a window was scored twice"
