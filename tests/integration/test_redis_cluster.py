"""WindowStore on a real 3-master Redis Cluster: keys sharded by Kafka partition.

The cluster runs on loopback ports (``redis-server --cluster-enabled yes`` and
``redis-cli --cluster create``, `EmbeddedRedisCluster`).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

import numpy as np
import pytest
import redis

from stream_detector.devtools.services import EmbeddedRedisCluster
from stream_detector.pipeline import PositionedReading
from stream_detector.windows import WindowStore
from tests.conftest import needs_redis_cluster

pytestmark = [
    pytest.mark.integration,
    needs_redis_cluster,
]

T0_MS = 1_700_000_000_000
PARTITIONS = 12
SENSORS_PER_PARTITION = 4


@pytest.fixture(scope="module")
def cluster() -> Iterator[EmbeddedRedisCluster]:
    with EmbeddedRedisCluster(masters=3) as started:
        yield started


def keys_per_master(cluster: EmbeddedRedisCluster, prefix: str) -> list[list[bytes]]:
    found = []
    for node in cluster.nodes:
        with redis.Redis(host=node.host, port=node.port) as client:
            found.append(sorted(client.scan_iter(match=f"{{{prefix}:*", count=1000)))
    return found


def readings(steps: range, topic: str = "readings") -> list[PositionedReading]:
    """Readings of SENSORS_PER_PARTITION sensors on each partition; value = step."""
    return [
        PositionedReading(f"p{p}-s{s}", T0_MS + step * 1000, (float(step),), topic, p, step)
        for step in steps
        for p in range(PARTITIONS)
        for s in range(SENSORS_PER_PARTITION)
    ]


def test_each_partition_keeps_one_slot_and_the_partitions_spread_over_every_master(
    cluster: EmbeddedRedisCluster, key_prefix: str
) -> None:
    store = WindowStore(cluster.url, window_length=4, key_prefix=key_prefix, cluster=True)
    result = store.append_batch(readings(range(6)))  # no CROSSSLOT: it would raise
    assert result.applied == 6 * PARTITIONS * SENSORS_PER_PARTITION
    store.acknowledge(
        {window.sensor_id: {"phase": "idle"} for window in result.due},
        {window.sensor_id: window.end_ts_ms for window in result.due},
    )

    per_master = keys_per_master(cluster, key_prefix)
    assert all(per_master), f"a master holds no key: {[len(keys) for keys in per_master]}"
    client = redis.RedisCluster.from_url(cluster.url)
    slots: dict[str, set[int]] = {}
    for key in [key for keys in per_master for key in keys]:
        tag = key.decode().partition("}")[0]
        slots.setdefault(tag, set()).add(client.keyslot(key))
    client.close()
    assert len(slots) == PARTITIONS and all(len(used) == 1 for used in slots.values())

    # Another process (a fresh store) reads the same state back.
    reader = WindowStore(cluster.url, window_length=4, key_prefix=key_prefix, cluster=True)
    sensors = [f"p{p}-s{s}" for p in range(PARTITIONS) for s in range(SENSORS_PER_PARTITION)]
    windows = reader.fetch_windows(sensors)
    assert windows.keys() == set(sensors)
    assert all(window.values[0].tolist() == [2.0, 3.0, 4.0, 5.0] for window in windows.values())
    assert reader.get_alert_state(sensors) == {sensor: {"phase": "idle"} for sensor in sensors}
    assert store.applied_offsets([("readings", 0)]) == {("readings", 0): 5}


def test_appends_during_a_reshard_lose_nothing(
    cluster: EmbeddedRedisCluster, key_prefix: str
) -> None:
    """Every slot of one master moves to another while a thread appends and acknowledges."""
    store = WindowStore(cluster.url, window_length=8, key_prefix=key_prefix, cluster=True)
    source, target = cluster.nodes[0], cluster.nodes[1]
    errors: list[BaseException] = []
    done = threading.Event()
    steps_written = [0]
    store.append_batch(readings(range(0, 10)))

    def write() -> None:
        try:
            step = 10
            while not done.is_set() or step < 30:
                result = store.append_batch(readings(range(step, step + 1)))
                store.acknowledge({}, {w.sensor_id: w.end_ts_ms for w in result.due})
                step += 1
                steps_written[0] = step
        except BaseException as error:  # reported by the main thread
            errors.append(error)

    writer = threading.Thread(target=write)
    before = [len(keys) for keys in keys_per_master(cluster, key_prefix)]
    writer.start()
    try:
        slots = cluster.reshard(source, target)
    finally:
        done.set()
        during = steps_written[0] - 10
        writer.join(120)
    assert not errors, errors[0]
    assert during >= 10, f"only {during} steps were appended while the slots moved"
    after = [len(keys) for keys in keys_per_master(cluster, key_prefix)]
    assert before[0] > 0 and after[0] == 0, (before, after)  # the source's keys all moved

    steps = steps_written[0]
    sensors = [f"p{p}-s{s}" for p in range(PARTITIONS) for s in range(SENSORS_PER_PARTITION)]
    windows = WindowStore(
        cluster.url, window_length=8, key_prefix=key_prefix, cluster=True
    ).fetch_windows(sensors)
    expected = np.arange(steps - 8, steps, dtype=np.float32)
    assert windows.keys() == set(sensors)
    assert all(np.array_equal(window.values[0], expected) for window in windows.values())
    cluster.reshard(target, source, slots)  # back, so every master serves slots again
