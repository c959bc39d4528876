"""Synthetic sensor load with injected anomalies at known times, into any Kafka broker.

Each sensor follows a sine wave with its own period and phase plus Gaussian noise; an
injected anomaly turns a stretch of readings into erratic noise (a failing sensor).
Timestamps advance by ``1000 / rate`` ms per reading from the start time, and the
producer is paced so that readings leave at that rate (``pace=False``: as fast as it can).
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import numpy as np

from stream_detector.publisher import ReadingProducer


@dataclass(frozen=True)
class InjectedAnomaly:
    """Readings ``start_ts_ms`` .. ``end_ts_ms`` (inclusive) of a sensor are replaced by noise."""

    sensor_id: str
    start_ts_ms: int
    end_ts_ms: int
    magnitude: float  # standard deviation of the noise; the normal signal's amplitude is 1


@dataclass(frozen=True)
class LoadPlan:
    """What to generate: sensors, rate, length and where the anomalies go."""

    sensors: int
    rate_per_sensor: float  # readings per second per sensor
    readings_per_sensor: int
    start_ts_ms: int
    anomalies: tuple[InjectedAnomaly, ...] = ()
    seed: int = 0
    noise: float = 0.05
    sensor_prefix: str = "sensor"

    @property
    def step_ms(self) -> float:
        return 1000.0 / self.rate_per_sensor

    def sensor_id(self, index: int) -> str:
        return f"{self.sensor_prefix}-{index:05d}"

    def ts_ms(self, step: int) -> int:
        return self.start_ts_ms + round(step * self.step_ms)


def plan(
    sensors: int,
    rate_per_sensor: float,
    duration_s: float,
    *,
    anomalies: int = 1,
    anomaly_readings: int = 24,
    start_ts_ms: int | None = None,
    seed: int = 0,
    sensor_prefix: str = "sensor",
) -> LoadPlan:
    """A plan with ``anomalies`` noise bursts on distinct random sensors, in the second half."""
    readings = max(1, round(duration_s * rate_per_sensor))
    start = time.time_ns() // 1_000_000 if start_ts_ms is None else start_ts_ms
    base = LoadPlan(
        sensors, rate_per_sensor, readings, start, seed=seed, sensor_prefix=sensor_prefix
    )
    rng = np.random.default_rng(seed)
    injected = []
    for sensor in rng.choice(sensors, size=min(anomalies, sensors), replace=False):
        first = int(
            rng.integers(readings // 2, max(readings // 2 + 1, readings - anomaly_readings))
        )
        last = min(readings - 1, first + anomaly_readings - 1)
        injected.append(
            InjectedAnomaly(base.sensor_id(int(sensor)), base.ts_ms(first), base.ts_ms(last), 1.5)
        )
    return LoadPlan(
        sensors,
        rate_per_sensor,
        readings,
        start,
        tuple(sorted(injected, key=lambda a: a.start_ts_ms)),
        seed,
        sensor_prefix=sensor_prefix,
    )


def normal_series(index: int, steps: np.ndarray, seed: int, noise: float) -> np.ndarray:
    """The anomaly-free signal of sensor ``index`` at the given steps."""
    rng = np.random.default_rng([seed, index])
    period = 16 + (index * 7) % 48
    phase = rng.uniform(0, 2 * math.pi)
    noise_values = rng.normal(0.0, noise, size=int(steps.max()) + 1 if len(steps) else 0)
    return np.sin(2 * math.pi * steps / period + phase) + noise_values[steps]


def series(load: LoadPlan, index: int) -> np.ndarray:
    """All readings of sensor ``index``, anomalies included."""
    steps = np.arange(load.readings_per_sensor)
    values = normal_series(index, steps, load.seed, load.noise)
    ts = np.array([load.ts_ms(int(step)) for step in steps])
    rng = np.random.default_rng([load.seed, index, 1])
    for anomaly in load.anomalies:
        if anomaly.sensor_id == load.sensor_id(index):
            inside = (ts >= anomaly.start_ts_ms) & (ts <= anomaly.end_ts_ms)
            values[inside] = rng.normal(0.0, anomaly.magnitude, size=int(inside.sum()))
    return values


def messages(load: LoadPlan) -> Iterator[tuple[int, bytes, bytes]]:
    """(step, key, value) of every reading, step by step across sensors."""
    all_values = [series(load, index) for index in range(load.sensors)]
    keys = [load.sensor_id(index).encode() for index in range(load.sensors)]
    for step in range(load.readings_per_sensor):
        ts_ms = load.ts_ms(step)
        for index in range(load.sensors):
            value = json.dumps(
                {
                    "sensor_id": keys[index].decode(),
                    "ts": ts_ms,
                    "value": float(all_values[index][step]),
                }
            ).encode()
            yield step, keys[index], value


def produce(
    load: LoadPlan,
    bootstrap_servers: str,
    topic: str,
    *,
    pace: bool = True,
    stop: threading.Event | None = None,
    config: dict[str, str] | None = None,
) -> int:
    """Produce the plan's readings; return how many were sent."""
    producer = ReadingProducer(bootstrap_servers, topic, config=config)
    started = time.monotonic()
    sent = 0
    for step, key, value in messages(load):
        if stop is not None and stop.is_set():
            break
        if pace:
            delay = started + step * load.step_ms / 1000 - time.monotonic()
            if delay > 0:
                time.sleep(delay)
        producer.send(key, value)
        sent += 1
    producer.flush()
    return sent


def describe(load: LoadPlan) -> dict[str, object]:
    """JSON-ready description: the plan and the injected anomalies."""
    return {
        "sensors": load.sensors,
        "rate_per_sensor": load.rate_per_sensor,
        "readings_per_sensor": load.readings_per_sensor,
        "start_ts_ms": load.start_ts_ms,
        "seed": load.seed,
        "anomalies": [asdict(anomaly) for anomaly in load.anomalies],
    }
