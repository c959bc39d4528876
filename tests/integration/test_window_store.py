"""WindowStore against a real Redis: round trips, replay safety, policies, memory."""

from __future__ import annotations

import json
import random
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import pytest
import redis
from redis.connection import Connection

from stream_detector.__main__ import main
from stream_detector.config import Settings
from stream_detector.devtools.services import free_port
from stream_detector.windows import (
    RedisStateLost,
    WindowStore,
    WindowStoreError,
    due_ends,
    stride_phase,
)

pytestmark = pytest.mark.integration

T0_MS = 1_700_000_000_000


@dataclass(frozen=True)
class Reading:
    sensor_id: str
    ts_ms: int
    values: tuple[float, ...]
    topic: str = "readings"
    partition: int = 0
    offset: int = 0


class CountingConnection(Connection):
    """Counts client->server writes: one per command, one per pipeline."""

    sends = 0

    def send_packed_command(self, command: object, check_health: bool = True) -> None:
        CountingConnection.sends += 1
        super().send_packed_command(command, check_health)


@pytest.fixture
def redis_client(redis_url: str, key_prefix: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url, connection_class=CountingConnection)
    yield client
    keys = list(client.scan_iter(match=f"{{{key_prefix}:*", count=1000))
    if keys:
        client.delete(*keys)
    client.close()


@pytest.fixture
def make_store(redis_client: redis.Redis, key_prefix: str) -> Callable[..., WindowStore]:
    def make(**options: int | bool) -> WindowStore:
        settings = {"window_length": 4, "channels": 1, "stride": 1, "ttl_s": 600, **options}
        return WindowStore(redis_client, key_prefix=key_prefix, **settings)

    return make


def series(
    sensor_id: str, count: int, *, start_offset: int = 0, period_ms: int = 1000, channels: int = 1
) -> list[Reading]:
    """count readings 1 s apart whose first value is the reading's index."""
    return [
        Reading(
            sensor_id,
            T0_MS + i * period_ms,
            tuple(float(i + 100 * c) for c in range(channels)),
            offset=start_offset + i,
        )
        for i in range(count)
    ]


def test_append_is_one_round_trip_and_returns_the_due_windows(
    make_store: Callable[..., WindowStore],
) -> None:
    store = make_store(window_length=4, channels=2)
    warm_up = Reading("warm-up", T0_MS, (0.0, 0.0), partition=9)
    store.append_batch([warm_up])  # connects and loads the script
    batch = [
        Reading(r.sensor_id, r.ts_ms, r.values, offset=r.offset + 10 * k)
        for k, sensor in enumerate(["a", "b", "c"])
        for r in series(sensor, 6, channels=2)
    ]
    before = CountingConnection.sends
    result = store.append_batch(batch)
    assert CountingConnection.sends - before == 1
    assert result.applied == 18
    # Full from the 4th reading on, stride 1: readings 4, 5 and 6 of each sensor.
    assert [(w.sensor_id, w.end_ts_ms) for w in result.due] == [
        (sensor, T0_MS + i * 1000) for sensor in "abc" for i in (3, 4, 5)
    ]
    last_a = result.due[2]
    assert last_a.values.dtype == np.float32 and last_a.values.shape == (2, 4)
    np.testing.assert_array_equal(last_a.values, [[2, 3, 4, 5], [102, 103, 104, 105]])
    assert last_a.start_ts_ms == T0_MS + 2000
    assert last_a.values.flags.c_contiguous

    store.append_batch([Reading("short", T0_MS, (0.0, 0.0), partition=0, offset=99)])
    before = CountingConnection.sends
    fetched = store.fetch_windows(["a", "b", "short"])
    assert CountingConnection.sends - before == 1
    assert set(fetched) == {"a", "b"}
    assert store.fetch_windows(["never-seen"]) == {}
    # A store that appended nothing finds the sensors' partitions in Redis (tools, tests).
    assert make_store(window_length=4, channels=2).fetch_windows(["a"]).keys() == {"a"}
    with pytest.raises(WindowStoreError, match="no reading appended"):
        make_store().acknowledge({}, {"a": T0_MS})
    np.testing.assert_array_equal(fetched["a"].values, last_a.values)
    assert (fetched["a"].start_ts_ms, fetched["a"].end_ts_ms) == (T0_MS + 2000, T0_MS + 5000)


def test_replaying_applied_offsets_changes_nothing(
    make_store: Callable[..., WindowStore], redis_client: redis.Redis
) -> None:
    store = make_store(window_length=4)
    batch = series("s1", 6)
    first = store.append_batch(batch)
    store.acknowledge({}, {w.sensor_id: w.end_ts_ms for w in first.due})
    stored = redis_client.get(store.window_key("s1"))

    replay = store.append_batch(batch)
    assert (replay.applied, replay.replayed, replay.due) == (0, 6, [])
    assert redis_client.get(store.window_key("s1")) == stored

    # A replay whose batch boundary differs: only the unseen offsets are applied.
    overlapping = store.append_batch(series("s1", 8)[3:])
    assert (overlapping.applied, overlapping.replayed) == (2, 3)
    assert [w.end_ts_ms for w in overlapping.due] == [T0_MS + 6000, T0_MS + 7000]
    np.testing.assert_array_equal(store.fetch_windows(["s1"])["s1"].values, [[4, 5, 6, 7]])


def test_offsets_are_guarded_per_partition(make_store: Callable[..., WindowStore]) -> None:
    store = make_store(window_length=2)
    store.append_batch([Reading("s1", T0_MS, (1.0,), partition=0, offset=5)])
    result = store.append_batch(
        [
            Reading("s1", T0_MS + 1, (2.0,), partition=0, offset=5),  # replay
            Reading("s2", T0_MS + 1, (3.0,), partition=1, offset=5),  # new partition
        ]
    )
    assert (result.applied, result.replayed) == (1, 1)


def test_a_window_not_marked_emitted_is_recovered_on_replay(
    make_store: Callable[..., WindowStore],
) -> None:
    store = make_store(window_length=3, stride=2)
    batch = series("s1", 5)
    first = store.append_batch(batch)
    assert [w.end_ts_ms for w in first.due] == [T0_MS + 2000, T0_MS + 4000]

    # Crash before publishing: the replay returns every pending window again, oldest first.
    replay = store.append_batch(batch)
    assert [(w.end_ts_ms, w.recovered) for w in replay.due] == [
        (T0_MS + 2000, True),
        (T0_MS + 4000, True),
    ]
    for recovered, original in zip(replay.due, first.due, strict=True):
        np.testing.assert_array_equal(recovered.values, original.values)
        assert recovered.start_ts_ms == original.start_ts_ms

    store.acknowledge({}, {"s1": T0_MS + 4000})
    store.acknowledge({}, {"s1": T0_MS + 4000})  # idempotent
    assert store.append_batch(batch).due == []

    # Marking an older window does not acknowledge a newer pending one.
    newer = store.append_batch(series("s1", 7)[5:])
    assert [w.end_ts_ms for w in newer.due] == [T0_MS + 6000]
    store.acknowledge({}, {"s1": T0_MS + 4000})
    assert [w.recovered for w in store.append_batch(series("s1", 7)).due] == [True]
    store.acknowledge({}, {"s1": T0_MS + 6000})
    assert store.append_batch(series("s1", 7)).due == []


def test_pending_windows_leave_redis_once_marked_emitted(
    make_store: Callable[..., WindowStore], redis_client: redis.Redis
) -> None:
    store = make_store(window_length=3, stride=1)
    first = store.append_batch(series("s1", 6))
    assert redis_client.llen(store.pending_key("s1")) == len(first.due) == 4
    store.acknowledge({}, {"s1": first.due[1].end_ts_ms})
    assert redis_client.llen(store.pending_key("s1")) == 2
    store.acknowledge({}, {"s1": first.due[-1].end_ts_ms})
    assert not redis_client.exists(store.pending_key("s1"))


@pytest.mark.parametrize("batch_size", [1, 4, 9])
def test_stride_counts_readings_whatever_the_batching(
    make_store: Callable[..., WindowStore], batch_size: int
) -> None:
    store = make_store(window_length=3, stride=2)
    readings = series("s1", 9)
    ends = []
    for start in range(0, len(readings), batch_size):
        result = store.append_batch(readings[start : start + batch_size])
        ends += [w.end_ts_ms for w in result.due]
        store.acknowledge({}, {w.sensor_id: w.end_ts_ms for w in result.due})
    assert ends == [T0_MS + i * 1000 for i in (2, 4, 6, 8)]


def test_late_and_duplicate_timestamps_are_dropped_and_counted(
    make_store: Callable[..., WindowStore],
) -> None:
    store = make_store(window_length=3)
    result = store.append_batch(
        [
            Reading("s1", T0_MS + 1000, (1.0,), offset=0),
            Reading("s1", T0_MS + 1000, (9.0,), offset=1),  # same ts
            Reading("s1", T0_MS + 500, (9.0,), offset=2),  # older
            Reading("s1", T0_MS + 2000, (2.0,), offset=3),
        ]
    )
    assert (result.applied, result.duplicate_ts, result.late) == (2, 1, 1)
    result = store.append_batch(
        [
            Reading("s1", T0_MS + 1500, (9.0,), offset=4),
            Reading("s1", T0_MS + 3000, (3.0,), offset=5),
        ]
    )
    assert (result.applied, result.late) == (1, 1)
    window = store.fetch_windows(["s1"])["s1"]
    np.testing.assert_array_equal(window.values, [[1, 2, 3]])


def test_unusable_values_are_rejected_and_wrong_channel_counts_raise(
    make_store: Callable[..., WindowStore],
) -> None:
    store = make_store(window_length=2, channels=2)
    result = store.append_batch(
        [
            Reading("s1", T0_MS, (1.0, float("nan")), offset=0),
            Reading("s1", T0_MS + 1, (1e39, 0.0), offset=1),  # overflows float32
            Reading("s1", 0, (1.0, 1.0), offset=2),
            Reading("s1", T0_MS + 2, (1.0, 2.0), offset=3),
        ]
    )
    assert (result.rejected, result.applied) == (3, 1)
    with pytest.raises(ValueError, match="expects 2"):
        store.append_batch([Reading("s1", T0_MS + 3, (1.0,), offset=4)])


def test_window_and_alert_state_expire_and_writes_refresh_the_ttl(
    make_store: Callable[..., WindowStore], redis_client: redis.Redis
) -> None:
    store = make_store(window_length=2, ttl_s=100)
    store.append_batch(series("s1", 1))
    redis_client.expire(store.window_key("s1"), 5)
    store.append_batch(series("s1", 2)[1:])
    assert 95 <= redis_client.ttl(store.window_key("s1")) <= 100
    store.acknowledge({"s1": {"phase": "open"}}, {})
    assert 95 <= redis_client.ttl(store.alert_key("s1")) <= 100


def test_alert_state_round_trip(
    make_store: Callable[..., WindowStore], redis_client: redis.Redis
) -> None:
    store = make_store()
    store.append_batch(
        [Reading(s, T0_MS, (0.0,), offset=i) for i, s in enumerate(["s1", "s2", "s3", "missing"])]
    )
    before = CountingConnection.sends
    store.acknowledge({"s1": {"phase": "open", "hits": [1, 0, 1]}, "s2": {"phase": "idle"}}, {})
    assert CountingConnection.sends - before == 1
    redis_client.set(store.alert_key("s3"), b"{not json")
    before = CountingConnection.sends
    states = store.get_alert_state(["s1", "s2", "s3", "missing"])
    assert CountingConnection.sends - before == 1
    assert states == {"s1": {"phase": "open", "hits": [1, 0, 1]}, "s2": {"phase": "idle"}}


def test_after_state_loss_writes_are_refused_until_the_loss_is_acknowledged(
    make_store: Callable[..., WindowStore], redis_client: redis.Redis, key_prefix: str
) -> None:
    store = make_store(window_length=2)
    store.append_batch(series("s1", 2))
    assert not store.detect_state_loss()
    redis_client.delete(*redis_client.scan_iter(match=f"{{{key_prefix}:*"))  # like a restart

    with pytest.raises(RedisStateLost):
        store.append_batch(series("s1", 3, start_offset=10)[2:])
    with pytest.raises(RedisStateLost):
        store.acknowledge({"s1": {"phase": "idle"}}, {})
    assert redis_client.keys(f"{{{key_prefix}:*}}:w:*") == []
    assert redis_client.keys(f"{{{key_prefix}:*}}:a:*") == []

    assert store.detect_state_loss()
    after = store.append_batch(series("s1", 3, start_offset=10)[2:])
    assert after.applied == 1 and after.due == []  # the window starts over
    store.acknowledge({"s1": {"phase": "idle"}}, {})

    other = make_store(window_length=2)
    other.append_batch(series("s2", 1, start_offset=20))
    assert not other.detect_state_loss()
    redis_client.delete(f"{store.group('readings', 0)}:epoch")
    assert store.detect_state_loss()
    assert other.detect_state_loss()
    assert not other.detect_state_loss()


def test_changing_the_channel_count_restarts_a_sensor(
    make_store: Callable[..., WindowStore],
) -> None:
    make_store(window_length=2, channels=1).append_batch(series("s1", 2))
    result = make_store(window_length=2, channels=3).append_batch(
        series("s1", 2, start_offset=2, channels=3)
    )
    assert result.reset == 1
    assert result.due[0].values.shape == (3, 2)


def test_unreachable_redis_is_reported() -> None:
    store = WindowStore(f"redis://127.0.0.1:{free_port()}/0", window_length=2)
    assert not store.ping()
    with pytest.raises(WindowStoreError, match="failed to append"):
        store.append_batch(series("s1", 1))


def test_spread_strides_make_a_share_of_a_lockstep_fleet_due_at_every_reading(
    make_store: Callable[..., WindowStore],
) -> None:
    length, stride, steps = 8, 4, 24
    sensors = [f"s{i}" for i in range(40)]  # ten of each phase
    for partition, spread in enumerate((False, True)):  # a partition each: keys of their own
        store = make_store(window_length=length, stride=stride, spread=spread)
        ends: dict[str, list[int]] = {s: [] for s in sensors}
        due_per_step = []
        for step in range(steps):
            batch = [
                Reading(
                    s,
                    T0_MS + step * 1000,
                    (float(step),),
                    partition=partition,
                    offset=step * len(sensors) + i,
                )
                for i, s in enumerate(sensors)
            ]
            result = store.append_batch(batch)
            store.acknowledge({}, {w.sensor_id: w.end_ts_ms for w in result.due})
            for window in result.due:
                ends[window.sensor_id].append((window.end_ts_ms - T0_MS) // 1000)
            due_per_step.append(len(result.due))
        assert ends == {s: due_ends(s, steps, length, stride, spread) for s in sensors}
        # Every sensor's first full window is due at once; then, aligned, all of them on
        # every 4th reading, spread, ten at each reading.
        later = due_per_step[length:]
        assert due_per_step[length - 1] == len(sensors)
        assert later == ([10] * len(later) if spread else [0, 0, 0, 40] * (len(later) // 4))


@pytest.mark.parametrize("spread", [False, True])
def test_irregular_timestamps_and_values_match_a_reference_model(
    make_store: Callable[..., WindowStore], spread: bool
) -> None:
    rng = random.Random(7)
    length, stride, channels = 16, 3, 2
    store = make_store(window_length=length, stride=stride, channels=channels, spread=spread)
    sensors = ["s1", "s2", "s3"]
    phases = {s: stride_phase(s, stride) if spread else 0 for s in sensors}
    assert len(set(phases.values())) > 1 or not spread, "pick sensors of different phases"
    reference = {s: deque(maxlen=length) for s in sensors}
    accepted = dict.fromkeys(sensors, 0)
    since = dict.fromkeys(sensors, 0)
    last_ts = dict.fromkeys(sensors, T0_MS)
    offset = 0
    for _ in range(30):
        batch = []
        for _ in range(rng.randint(0, 25)):
            sensor = rng.choice(sensors)
            gap = rng.choice([1000, 1000, 1000 + rng.randint(-60, 60), rng.randint(1, 10**10)])
            last_ts[sensor] += gap
            values = tuple(rng.uniform(-1e3, 1e3) for _ in range(channels))
            batch.append(Reading(sensor, last_ts[sensor], values, offset=offset))
            offset += 1
        expected = []
        for reading in batch:
            reference[reading.sensor_id].append(reading)
            since[reading.sensor_id] += 1
            accepted[reading.sensor_id] += 1
            window = reference[reading.sensor_id]
            if len(window) == length and since[reading.sensor_id] >= stride:
                first = accepted[reading.sensor_id] == length
                since[reading.sensor_id] = phases[reading.sensor_id] if first else 0
                expected.append((reading.sensor_id, window[0].ts_ms, window[-1].ts_ms))
                expected_values = np.array([r.values for r in window], dtype=np.float32).T
        result = store.append_batch(batch)
        got = [(w.sensor_id, w.start_ts_ms, w.end_ts_ms) for w in result.due]
        assert sorted(got) == sorted(expected)
        if expected:
            last = next(w for w in result.due if w.end_ts_ms == expected[-1][2])
            np.testing.assert_array_equal(last.values, expected_values)
        store.acknowledge({}, {w.sensor_id: w.end_ts_ms for w in result.due})
        for sensor, window in store.fetch_windows(sensors).items():
            assert (window.start_ts_ms, window.end_ts_ms) == (
                reference[sensor][0].ts_ms,
                reference[sensor][-1].ts_ms,
            )


@pytest.mark.parametrize(("jitter_ms", "budget"), [(0, 1.5), (10, 1.75)])
def test_memory_per_sensor(
    make_store: Callable[..., WindowStore],
    redis_client: redis.Redis,
    record_property: Callable[[str, object], None],
    jitter_ms: int,
    budget: float,
) -> None:
    length = 128
    store = make_store(window_length=length, channels=1)
    rng = random.Random(3)
    readings = [
        Reading(
            "sensor-000123",
            T0_MS + i * 1000 + rng.randint(-jitter_ms, jitter_ms),
            (rng.random(),),
            offset=i,
        )
        for i in range(3 * length)
    ]
    store.append_batch(readings)
    used = redis_client.memory_usage(store.window_key("sensor-000123"), samples=0)
    payload = length * 4
    record_property(f"redis_bytes_per_sensor_jitter_{jitter_ms}ms", used)
    print(f"window_length={length} jitter={jitter_ms} ms: {used} B ({used / payload:.2f}x)")
    assert used <= budget * payload


def test_a_batch_over_several_partitions_is_one_round_trip_even_after_a_script_flush(
    make_store: Callable[..., WindowStore], redis_client: redis.Redis
) -> None:
    store = make_store(window_length=2)
    warm_up = [Reading(f"warm-up-{p}", T0_MS, (0.0,), partition=p) for p in (8, 9)]
    store.append_batch(warm_up)  # connects and loads the script
    batch = [
        Reading(f"s{p}", T0_MS + i * 1000, (float(i),), partition=p, offset=i)
        for p in range(3)
        for i in range(3)
    ]
    before = CountingConnection.sends
    result = store.append_batch(batch[:6])
    assert CountingConnection.sends - before == 1
    assert {w.sensor_id for w in result.due} == {"s0", "s1"}
    redis_client.script_flush()  # as after a Redis restart that kept the data
    result = store.append_batch(batch[6:])
    assert [(w.sensor_id, w.end_ts_ms) for w in result.due] == [
        ("s2", T0_MS + 1000),
        ("s2", T0_MS + 2000),
    ]
    ends = {f"s{p}": T0_MS + 2000 for p in range(3)}
    store.acknowledge({}, ends)  # loads the acknowledging script
    before = CountingConnection.sends
    store.acknowledge({}, ends)
    assert CountingConnection.sends - before == 1


def test_a_batch_that_fails_on_its_second_partition_loses_no_window_when_retried(
    make_store: Callable[..., WindowStore], redis_client: redis.Redis
) -> None:
    store = make_store(window_length=2)
    store.append_batch([Reading("b", T0_MS, (0.0,), partition=1, offset=0)])
    batch = [*series("a", 3), Reading("b", T0_MS + 1000, (1.0,), partition=1, offset=1)]
    offsets = f"{store.group('readings', 1)}:offsets"
    redis_client.delete(offsets)
    redis_client.set(offsets, b"not a hash")  # partition 1's call fails; partition 0's ran
    with pytest.raises(WindowStoreError):
        store.append_batch(batch)
    redis_client.delete(offsets)

    retried = store.append_batch(batch)  # what the worker does after a Redis error
    assert [(w.sensor_id, w.end_ts_ms, w.recovered) for w in retried.due] == [
        ("a", T0_MS + 1000, True),
        ("a", T0_MS + 2000, True),
        ("b", T0_MS + 1000, False),
    ]


def test_the_state_command_shows_what_the_workers_hold(
    redis_url: str,
    key_prefix: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    for name, value in {
        "REDIS__URL": redis_url,
        "REDIS__KEY_PREFIX": key_prefix,
        "WINDOW_LENGTH": "4",
        "STRIDE": "2",
    }.items():
        monkeypatch.setenv(f"DETECTOR_{name}", value)
    for channels in (1, 2):  # each channel count has a store of its own
        worker = WindowStore.from_settings(Settings(), channels)
        short = series("short", 2, start_offset=10, channels=channels)
        worker.append_batch(series("full", 6, channels=channels) + short)
        worker.acknowledge({"full": {"phase": "open"}}, {})

    assert main(["state", "full", "short", "never-seen", "--channels", "2"]) == 0

    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["sensor_id"] for line in lines] == ["full", "short", "never-seen"]
    full, short, unknown = lines
    assert full["window"] == {
        "start_ts_ms": T0_MS + 2000,
        "end_ts_ms": T0_MS + 5000,
        "values": [[2.0, 3.0, 4.0, 5.0], [102.0, 103.0, 104.0, 105.0]],
    }
    assert full["alert_state"] == {"phase": "open"}
    assert short == {"sensor_id": "short", "window": None, "alert_state": None}
    assert unknown == {"sensor_id": "never-seen", "window": None, "alert_state": None}
