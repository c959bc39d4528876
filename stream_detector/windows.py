"""Per-sensor sliding windows, replay guards and alert state in Redis (the only Redis user).

Data model. Every key of the sensors whose readings come from one Kafka partition starts
with that partition's hash tag, ``{prefix:topic:partition}`` (written ``G`` below): on a
Redis Cluster a partition's keys share a slot, so one Lua call touches one slot, and
different partitions spread over the shards. A sensor's readings all come from one
partition (the reading's key is its sensor id); if a topic is repartitioned, a moved
sensor starts a new window under its new partition.

- ``G:w:{sensor_id}``: one binary string per sensor, refreshed to ``ttl_s`` on
  every accepted reading so silent sensors vanish::

      header  '<BHIIIddddd' (55 bytes): layout version, channels, n (readings held),
              since (readings since the last due window), tail_zeros, last_ts,
              start_ts, first_delta, last_delta, pending_end_ts
      values  n * channels little-endian float32, oldest reading first, time-major
      ts      timestamps of readings 3..n as LEB128 varint tokens of the
              delta-of-delta (ts_i - ts_(i-1)) - (ts_(i-1) - ts_(i-2)); even token 2*z
              is one non-zero value (z = zigzag), odd token 2*(r-1)+1 is a run of r
              zeros. tail_zeros is a run of zeros at the end not yet written.

  Timestamps are exact (``start_ts`` of every window, not an estimate) and cost
  ~0 bytes per reading for regularly sampled sensors, ~1 byte per reading for
  jitter under 32 ms. With window_length=128 and one channel a regular sensor
  takes 728 bytes in Redis 7 under a short prefix (MEMORY USAGE, 1.42x its 512-byte
  float32 payload; the key name counts).
- ``G:offsets``: hash ``topic:partition`` -> last applied Kafka offset. Readings
  at or below it are replays and are skipped, so a crash-and-replay never appends twice.
- ``G:epoch``: a token written once; if it disappears or changes, Redis lost the
  partition's state (restart without persistence, flush, failover of its shard). Writes
  are guarded by it: once a store has seen the token, ``append_batch`` and
  ``acknowledge`` raise ``RedisStateLost`` instead of writing into a state they did not
  build, until the caller has rebuilt (replayed the input) and called
  ``detect_state_loss``.
- ``G:a:{sensor_id}``: alert state as a JSON object, with the same TTL.

Policies:

- Late data: a reading whose ts is not after the sensor's last accepted ts is dropped
  and counted (``late`` when older, ``duplicate_ts`` when equal). Windows are never
  rewritten out of order, and their timestamps strictly increase.
- Due windows: once a window holds ``window_length`` readings, every ``stride``-th
  accepted reading makes it due. With ``spread`` strides each sensor has a phase in
  ``[0, stride)`` (``stride_phase``, from the CRC-32 of its id): its first full window is
  due at once, the next after ``stride - phase`` readings, then every ``stride``. A fleet
  sampled in lockstep then makes an even share of its windows due at every reading
  instead of all of them on every ``stride``-th (``due_ends`` lists them).
  ``append_batch`` returns every due window of the batch with its values (intermediate
  ones too, so a burst loses no scores), and resets the stride counter inside the same
  offset-guarded script, so a replay does not make a window due twice.
- At-least-once scoring: every due window stays *pending* until ``acknowledge`` (call
  it after its outputs are published): its timestamps and values wait in
  ``G:p:{sensor_id}``, a list that the acknowledgement empties, so it exists only
  between a poll and its commit. If a replay after a crash skips a sensor's readings
  while windows are pending, ``append_batch`` returns all of them again, oldest first
  and with ``recovered=True``, before any window the replay makes due.

Each call runs one Lua script (``stream_detector/lua``) per partition it touches, over
that partition's keys only (so a batch over several partitions is atomic per partition).
Redis Cluster: pass ``cluster=True`` (redis-py's ``RedisCluster``, which follows MOVED
and ASK redirections and retries TRYAGAIN while a slot migrates). Use a ``noeviction``
or ``volatile-*`` maxmemory policy so the epoch markers (no TTL) are never evicted.
"""

from __future__ import annotations

import functools
import json
import logging
import struct
import uuid
import zlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import resources
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import urlsplit

import numpy as np
import redis
from redis.commands.core import Script

if TYPE_CHECKING:
    from stream_detector.config import Settings

logger = logging.getLogger(__name__)

_LAYOUT_VERSION = 1
_HEADER = struct.Struct("<BHIIIddddd")
_READING_META = struct.Struct("<ddI")  # ts_ms, offset, partition index


@functools.cache
def _lua(name: str) -> str:
    """The source of one of the package's Lua scripts (``stream_detector/lua``), read once
    per process however many stores register it."""
    return resources.files("stream_detector").joinpath("lua", f"{name}.lua").read_text()


def stride_phase(sensor_id: str, stride: int) -> int:
    """A sensor's phase within the stride, the same in every worker and every run."""
    return zlib.crc32(sensor_id.encode()) % stride


def due_ends(
    sensor_id: str, readings: int, window_length: int, stride: int, spread: bool
) -> list[int]:
    """Which of a sensor's first ``readings`` (0-based, none late or lost) end a due window."""
    if readings < window_length:
        return []
    first = window_length - 1
    phase = stride_phase(sensor_id, stride) if spread else 0
    return [first, *range(first + stride - phase, readings, stride)]


class WindowStoreError(RuntimeError):
    """Redis could not be reached or refused a command."""


class RedisStateLost(WindowStoreError):
    """Redis lost the state this store built (its epoch marker changed); nothing was written.

    Rebuild the windows by replaying the input, then call ``detect_state_loss`` to accept
    the new state.
    """


class WindowReading(Protocol):
    """What append_batch needs from a validated reading."""

    @property
    def sensor_id(self) -> str: ...
    @property
    def ts_ms(self) -> int: ...
    @property
    def values(self) -> Sequence[float]: ...
    @property
    def topic(self) -> str: ...
    @property
    def partition(self) -> int: ...
    @property
    def offset(self) -> int: ...


@dataclass(frozen=True, slots=True)
class Window:
    """A full window of one sensor."""

    sensor_id: str
    values: np.ndarray  # (C, L) float32, oldest reading first
    start_ts_ms: int
    end_ts_ms: int
    recovered: bool = False  # re-reported after a replay because it was never acknowledged

    def ts_at(self, offset: int) -> int:
        """The time of the reading at ``offset`` (0 = oldest), interpolated between the
        window's first and last readings: exact for a regularly sampled sensor."""
        last = self.values.shape[-1] - 1
        if last <= 0:
            return self.end_ts_ms
        span = self.end_ts_ms - self.start_ts_ms
        return self.start_ts_ms + round(span * min(max(offset, 0), last) / last)


@dataclass(frozen=True, slots=True)
class AppendResult:
    """What one append_batch call did."""

    due: list[Window]
    applied: int  # readings appended
    replayed: int  # skipped: offset already applied
    late: int  # dropped: ts older than the sensor's last ts
    duplicate_ts: int  # dropped: ts equal to the sensor's last ts
    rejected: int  # dropped: not finite as float32, or ts_ms <= 0
    reset: int  # sensors whose stored layout did not match (channels changed) and restarted


def _window_from_bytes(
    sensor_id: str, payload: bytes, channels: int, start_ts_ms: float, end_ts_ms: float
) -> Window:
    values = np.ascontiguousarray(
        np.frombuffer(payload, dtype="<f4").reshape(-1, channels).T, dtype=np.float32
    )
    return Window(sensor_id, values, int(start_ts_ms), int(end_ts_ms))


class WindowStore:
    """Sliding windows per sensor in Redis, or in a Redis Cluster (``cluster=True``).

    Keys are grouped by the Kafka partition their readings come from (see the module
    docstring). A call runs a script (or a read) per partition it touches: all in one
    round trip on a single Redis, one after another on a cluster (the first use of each
    Lua script also loads it). The store remembers each sensor's
    partition from the readings it appended: acknowledging a sensor it has not seen a
    reading of is an error, and reading one's state finds its keys with a SCAN (for tools
    and tests; the worker reads only sensors it appended).
    """

    def __init__(
        self,
        client: redis.Redis | redis.RedisCluster | str,
        *,
        window_length: int,
        channels: int = 1,
        stride: int = 1,
        spread: bool = False,
        key_prefix: str = "det",
        ttl_s: int = 86_400,
        cluster: bool = False,
    ) -> None:
        if window_length < 1 or channels < 1 or stride < 1 or ttl_s < 1:
            raise ValueError(
                "window_length, channels, stride and ttl_s must all be >= 1, got "
                f"{window_length}, {channels}, {stride}, {ttl_s}"
            )
        if channels > 0xFFFF:
            raise ValueError(f"at most 65535 channels are supported, got {channels}")
        if "{" in key_prefix or "}" in key_prefix:
            raise ValueError(f"key_prefix {key_prefix!r} must not hold braces: keys get hash tags")
        if isinstance(client, str):
            self._where = _where(client)
            # A hung Redis should fail the batch, not block the worker forever.
            timeouts = {"socket_timeout": 10, "socket_connect_timeout": 5}
            if cluster:
                client = redis.RedisCluster.from_url(client, **timeouts)
            else:
                client = redis.Redis.from_url(client, **timeouts)
        else:
            kwargs = client.get_connection_kwargs()
            self._where = f"{kwargs.get('host', 'cluster')}:{kwargs.get('port', '')}"
        if client.get_encoder().decode_responses:
            raise ValueError("WindowStore needs a Redis client with decode_responses=False")
        self._redis = client
        self._cluster = isinstance(client, redis.RedisCluster)
        self.window_length = window_length
        self.channels = channels
        self.stride = stride
        self.spread = spread
        self.key_prefix = key_prefix
        self.ttl_s = ttl_s
        self._append = client.register_script(_lua("append"))
        self._acknowledge = client.register_script(_lua("acknowledge"))
        self._read_epoch = client.register_script(_lua("epoch"))
        self._epochs: dict[str, bytes] = {}  # group -> the epoch marker this store has seen
        self._group_of: dict[str, str] = {}  # sensor -> group of its newest appended reading

    @classmethod
    def from_settings(cls, settings: Settings, channels: int = 1) -> WindowStore:
        """The store of sensors with ``channels`` channels, as the worker configures it.

        The worker keeps one store per channel count; each has its own keys and offset
        guard (the prefix gains ``c<channels>`` beyond one channel).
        """
        prefix = settings.redis.key_prefix + ("" if channels == 1 else f"c{channels}")
        return cls(
            settings.redis.url.get_secret_value(),
            window_length=settings.window_length,
            channels=channels,
            stride=settings.stride,
            spread=settings.stride_phase == "spread",
            key_prefix=prefix,
            ttl_s=settings.redis.sensor_ttl_s,
            cluster=settings.redis.cluster,
        )

    def group(self, topic: str, partition: int) -> str:
        """The hash tag shared by every key of one Kafka partition's sensors."""
        return f"{{{self.key_prefix}:{topic}:{partition}}}"

    def _sensor_group(self, sensor_id: str) -> str:
        try:
            return self._group_of[sensor_id]
        except KeyError:
            raise WindowStoreError(
                f"sensor {sensor_id!r} has no reading appended by this store, so the "
                "partition its keys belong to is unknown"
            ) from None

    def window_key(self, sensor_id: str) -> str:
        """The Redis key of a sensor's window."""
        return f"{self._sensor_group(sensor_id)}:w:{sensor_id}"

    def pending_key(self, sensor_id: str) -> str:
        """The Redis key of a sensor's windows that are due but not yet marked emitted."""
        return f"{self._sensor_group(sensor_id)}:p:{sensor_id}"

    def alert_key(self, sensor_id: str) -> str:
        """The Redis key of a sensor's alert state."""
        return f"{self._sensor_group(sensor_id)}:a:{sensor_id}"

    @staticmethod
    def _offsets_key(group: str) -> str:
        return f"{group}:offsets"

    @staticmethod
    def _epoch_key(group: str) -> str:
        return f"{group}:epoch"

    def _by_group(self, sensor_ids: Iterable[str]) -> dict[str, list[str]]:
        groups: dict[str, list[str]] = {}
        for sensor_id in dict.fromkeys(sensor_ids):
            groups.setdefault(self._sensor_group(sensor_id), []).append(sensor_id)
        return groups

    @contextmanager
    def _redis_errors(self, action: str) -> Iterator[None]:
        try:
            yield
        except redis.RedisError as error:
            raise WindowStoreError(
                f"Redis at {self._where} failed to {action}: {error}{self._tls_hint(error)}"
            ) from error

    def _tls_hint(self, error: redis.RedisError) -> str:
        # A TLS-only port drops a plaintext client without saying why.
        pool = getattr(self._redis, "connection_pool", None)
        dropped = isinstance(error, redis.ConnectionError) and not isinstance(
            error, redis.AuthenticationError
        )
        if (
            dropped
            and pool is not None
            and not issubclass(pool.connection_class, redis.SSLConnection)
        ):
            return " (if this Redis accepts only TLS, the URL must start with rediss://)"
        return ""

    def _state_lost(self, group: str) -> RedisStateLost:
        return RedisStateLost(
            f"Redis lost the state under {group!r} (epoch marker {self._epoch_key(group)} "
            "changed): replay the input to rebuild, then call detect_state_loss()"
        )

    def _observe_epoch(self, group: str, epoch: bytes) -> bool:
        lost = group in self._epochs and epoch != self._epochs[group]
        if lost:
            logger.warning("Redis state lost: epoch marker %s was replaced", self._epoch_key(group))
        self._epochs[group] = epoch
        return lost

    def append_batch(self, readings: Iterable[WindowReading]) -> AppendResult:
        """Append a polled batch (in partition order) and return the windows that became due.

        Raises ``RedisStateLost`` when Redis lost the state of one of the batch's
        partitions; nothing of that partition was applied (others may have been: the
        offset guard skips them when the input is replayed).
        """
        batch = list(readings)
        for reading in batch:
            if len(reading.values) != self.channels:
                raise ValueError(
                    f"sensor {reading.sensor_id!r} at {reading.topic}[{reading.partition}]@"
                    f"{reading.offset} has {len(reading.values)} values, the store expects "
                    f"{self.channels}; validate channel counts before appending"
                )
        with np.errstate(over="ignore"):  # values beyond float32 range become inf: rejected
            values = np.asarray([reading.values for reading in batch], dtype="<f4")
        finite = np.isfinite(values).all(axis=1).tolist() if batch else []
        packed_values = values.tobytes()
        reading_size = self.channels * 4
        # partition -> sensor -> (packed metadata, packed values)
        by_partition: dict[tuple[str, int], dict[str, tuple[bytearray, list[bytes]]]] = {}
        rejected = 0
        for position, reading in enumerate(batch):
            if not finite[position] or reading.ts_ms <= 0:
                rejected += 1
                continue
            sensors = by_partition.setdefault((reading.topic, reading.partition), {})
            meta, chunks = sensors.setdefault(reading.sensor_id, (bytearray(), []))
            meta.extend(_READING_META.pack(reading.ts_ms, reading.offset, 1))
            chunks.append(packed_values[position * reading_size : (position + 1) * reading_size])
        groups, calls = [], []
        for (topic, partition), sensors in by_partition.items():
            group = self.group(topic, partition)
            for sensor_id in sensors:
                self._group_of[sensor_id] = group
            groups.append((group, list(sensors)))
            calls.append(self._append_call(group, f"{topic}:{partition}", sensors))
        replies = self._run(self._append, calls, "append a batch of readings")
        result = AppendResult([], 0, 0, 0, 0, rejected, 0)
        for (group, sensor_ids), reply in zip(groups, replies, strict=True):
            if len(reply) == 1:
                raise self._state_lost(group)
            epoch, applied, replayed, late, duplicate_ts, reset, flat_due = reply
            self._observe_epoch(group, epoch)
            result = AppendResult(
                due=result.due + self._due_windows(sensor_ids, flat_due),
                applied=result.applied + applied,
                replayed=result.replayed + replayed,
                late=result.late + late,
                duplicate_ts=result.duplicate_ts + duplicate_ts,
                rejected=rejected,
                reset=result.reset + reset,
            )
        return result

    def _append_call(
        self, group: str, field: str, sensors: dict[str, tuple[bytearray, list[bytes]]]
    ) -> tuple[list[str], list[Any]]:
        """The keys and arguments that append one partition's readings under its group."""
        args: list[Any] = [
            self.window_length,
            self.channels,
            self.stride,
            self.ttl_s,
            uuid.uuid4().hex,  # a fresh token, so a re-created marker always differs
            self._epochs.get(group, b""),
            1,
            field,
        ]
        for sensor_id, (meta, chunks) in sensors.items():
            phase = stride_phase(sensor_id, self.stride) if self.spread else 0
            args += [bytes(meta), b"".join(chunks), phase]
        keys = [
            self._epoch_key(group),
            self._offsets_key(group),
            *(f"{group}:w:{sensor_id}" for sensor_id in sensors),
            *(f"{group}:p:{sensor_id}" for sensor_id in sensors),
        ]
        return keys, args

    def _run(
        self, script: Script, calls: list[tuple[list[str], list[Any]]], action: str
    ) -> list[Any]:
        """Run ``script`` once per (keys, args) call: on one Redis in a single round trip (a
        pipeline), on a cluster one call after another (each on its partition's shard)."""
        with self._redis_errors(action):
            if self._cluster or len(calls) < 2:
                return [script(keys=keys, args=args) for keys, args in calls]
            pipe = self._redis.pipeline(transaction=False)
            for keys, args in calls:
                pipe.evalsha(script.sha, len(keys), *keys, *args)
            replies = pipe.execute(raise_on_error=False)
            for index, reply in enumerate(replies):
                if isinstance(reply, redis.exceptions.NoScriptError):
                    # Redis lost its script cache (a restart): loads it, then runs the call.
                    keys, args = calls[index]
                    replies[index] = script(keys=keys, args=args)
            for reply in replies:
                if isinstance(reply, Exception):
                    raise reply
            return replies

    def _due_windows(self, sensor_ids: list[str], flat_due: list[Any]) -> list[Window]:
        # flat_due: [sensor index (1-based), start_ts, end_ts, payload, recovered] per window.
        count = len(flat_due) // 5
        if count == 0:
            return []
        # One (k, C, L) array; each Window holds a contiguous view of it.
        stacked = np.ascontiguousarray(
            np.frombuffer(b"".join(flat_due[3::5]), dtype="<f4")
            .reshape(count, self.window_length, self.channels)
            .transpose(0, 2, 1),
            dtype=np.float32,
        )
        return [
            Window(
                sensor_id=sensor_ids[flat_due[5 * k] - 1],
                values=stacked[k],
                start_ts_ms=int(flat_due[5 * k + 1]),
                end_ts_ms=int(flat_due[5 * k + 2]),
                recovered=bool(flat_due[5 * k + 4]),
            )
            for k in range(count)
        ]

    def acknowledge(
        self,
        states: Mapping[str, Mapping[str, Any]],
        end_ts_by_sensor: Mapping[str, int],
    ) -> None:
        """Store alert states and mark windows emitted, atomically per partition.

        Call it once the outputs of those windows are published. Marking a window emitted
        also acknowledges every older pending window of its sensor; it is idempotent.
        Raises ``RedisStateLost`` when Redis lost the state of one of their partitions
        (nothing of that partition was written).
        """
        groups, calls = [], []
        for group, sensor_ids in self._by_group([*states, *end_ts_by_sensor]).items():
            with_state = [s for s in sensor_ids if s in states]
            emitted = [s for s in sensor_ids if s in end_ts_by_sensor]
            keys = [
                self._epoch_key(group),
                *(f"{group}:a:{sensor_id}" for sensor_id in with_state),
                *(f"{group}:w:{sensor_id}" for sensor_id in emitted),
                *(f"{group}:p:{sensor_id}" for sensor_id in emitted),
            ]
            args: list[Any] = [self._epochs.get(group, b""), self.ttl_s, len(with_state)]
            args += [
                json.dumps(states[sensor_id], separators=(",", ":"), allow_nan=False)
                for sensor_id in with_state
            ]
            args += [end_ts_by_sensor[sensor_id] for sensor_id in emitted]
            groups.append(group)
            calls.append((keys, args))
        action = "store alert states and acknowledge windows"
        for group, written in zip(groups, self._run(self._acknowledge, calls, action), strict=True):
            if not written:
                raise self._state_lost(group)

    def applied_offsets(
        self, partitions: Iterable[tuple[str, int]]
    ) -> dict[tuple[str, int], int | None]:
        """The newest applied Kafka offset per partition; None where nothing was applied."""
        offsets = {}
        with self._redis_errors("read applied offsets"):
            for topic, partition in dict.fromkeys(partitions):
                key = self._offsets_key(self.group(topic, partition))
                found = self._redis.hget(key, f"{topic}:{partition}")
                offsets[(topic, partition)] = None if found is None else int(found)
        return offsets

    def _read(self, kind: str, sensor_ids: Iterable[str], action: str) -> dict[str, bytes]:
        """The raw values of one kind of key (``w``, ``a``) of these sensors, where present."""
        wanted_ids = list(dict.fromkeys(sensor_ids))
        found = {}
        with self._redis_errors(action):
            self.locate(wanted_ids)
            known = [sensor_id for sensor_id in wanted_ids if sensor_id in self._group_of]
            for group, wanted in self._by_group(known).items():
                raws = self._redis.mget([f"{group}:{kind}:{sensor_id}" for sensor_id in wanted])
                found |= {s: raw for s, raw in zip(wanted, raws, strict=True) if raw is not None}
        return found

    def locate(self, sensor_ids: Iterable[str]) -> None:
        """Learn the partition of sensors this store appended no reading of from the keys
        Redis holds: one SCAN over the prefix, for tools and tests that read another
        process's state (the worker reads only sensors it appended)."""
        wanted = set(sensor_ids) - self._group_of.keys()
        if not wanted:
            return
        for key in self._redis.scan_iter(match=f"{{{self.key_prefix}:*", count=1000):
            group, _, rest = key.decode().partition("}:")
            sensor_id = rest[2:]
            if rest[:2] in ("w:", "a:", "p:") and sensor_id in wanted:
                self._group_of[sensor_id] = group + "}"

    def fetch_windows(self, sensor_ids: Iterable[str]) -> dict[str, Window]:
        """Current full windows of these sensors; sensors without a full window are absent."""
        windows = {}
        for sensor_id, raw in self._read("w", sensor_ids, "fetch windows").items():
            if len(raw) < _HEADER.size:
                continue
            version, channels, count, _, _, last_ts, start_ts, *_ = _HEADER.unpack_from(raw)
            if version != _LAYOUT_VERSION or channels != self.channels:
                continue
            if count != self.window_length:
                continue
            payload = raw[_HEADER.size : _HEADER.size + count * channels * 4]
            windows[sensor_id] = _window_from_bytes(sensor_id, payload, channels, start_ts, last_ts)
        return windows

    def get_alert_state(self, sensor_ids: Iterable[str]) -> dict[str, dict[str, Any]]:
        """Alert state per sensor; sensors without (readable) state are absent."""
        states = {}
        for sensor_id, raw in self._read("a", sensor_ids, "read alert state").items():
            try:
                state = json.loads(raw)
            except ValueError:
                logger.warning("ignoring unreadable alert state of sensor %r", sensor_id)
                continue
            if isinstance(state, dict):
                states[sensor_id] = state
        return states

    def ping(self) -> bool:
        """Whether Redis answers (every primary, on a cluster)."""
        try:
            return bool(self._redis.ping())
        except redis.RedisError:
            return False

    def detect_state_loss(self) -> bool:
        """True once after Redis lost the state of a partition this store wrote; from then
        on writes are accepted."""
        lost = False
        with self._redis_errors("read the epoch markers"):
            for group in list(self._epochs):
                epoch = self._read_epoch(keys=[self._epoch_key(group)], args=[uuid.uuid4().hex])
                lost |= self._observe_epoch(group, epoch)
        return lost


def _where(url: str) -> str:
    """host:port of a Redis URL, for error messages (never its password)."""
    parts = urlsplit(url)
    return parts.path if parts.scheme == "unix" else f"{parts.hostname}:{parts.port or 6379}"
