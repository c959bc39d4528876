"""Soak test: the worker under steady paced load for a long run, with a fault every few minutes.

1. An embedded tansu broker behind a cuttable ``devtools.proxy.TcpProxy`` (the broker advertises the
   proxy's port, so every client, the load generator included, goes through it) and an
   embedded redis-server; topics; the tiny model of ``e2e_throughput.build_model`` trained on
   the load's normal signal and published into a temporary model store.
2. The worker as ``python -m stream_detector run`` (``e2e_throughput.start_worker``: DETECTOR_*
   variables from a ``Settings``), one torch thread, ``kafka.lag_interval_s=1``.
3. ``loadgen.produce``, paced, for the whole run (timestamps start now), with injected
   anomalies.
4. Every ``--fault-every-s`` the next fault of the cycle ``sigkill`` (kill -9 the worker,
   start a new one), ``broker_cut`` (the proxy refuses and drops connections for 30 s),
   ``redis_loss`` (redis-server stopped for 10 s and started empty on the same port: the
   worker must rebuild its windows from Kafka), ``sigterm`` (graceful stop, start a new
   one). A worker that exits on its own is recorded as a crash and started again, as
   Kubernetes would.
5. Every second: the worker's RSS (VmRSS of /proc/<pid>/status), the total consumer lag (sum
   of ``detector_consumer_lag_messages``), readings/s (``detector_readings_total`` delta),
   /readyz, and the reading-to-score latency over the last interval from the
   ``detector_end_to_end_seconds`` histogram: the mean (``_sum``/``_count`` deltas) and p50/p99
   interpolated within the bucket deltas as Prometheus' ``histogram_quantile`` does (so no
   finer than the buckets). ``None`` where the worker is down or does not answer.

At the end the load stops, the worker drains its lag and gets SIGTERM; every topic is read
back to count readings, scores (against every window the produced readings make due) and
alerts. Results: JSON (config, faults, worker incarnations, samples, summary, a digest of
the worker logs) and a plot (RSS, lag, latency, with the faults marked).

    python benchmarks/soak.py --duration-s 1800 --sensors 200 --rate 2 --fault-every-s 120 \\
        --out benchmarks/results/soak.json --plot docs/images/soak.png

Brokers are embedded unless ``--bootstrap``/``--redis`` name existing ones; then the faults
that need the embedded service (``broker_cut``, ``redis_loss``) are recorded as skipped.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import re
import signal
import statistics
import subprocess
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaException, TopicPartition
from e2e_throughput import build_model

from stream_detector import store
from stream_detector.config import (
    KafkaSettings,
    KafkaTopics,
    ModelSettings,
    RedisSettings,
    Settings,
)
from stream_detector.devtools import loadgen
from stream_detector.devtools.proxy import TcpProxy
from stream_detector.devtools.services import EmbeddedKafka, EmbeddedRedis, create_topics, free_port
from stream_detector.devtools.workers import metric_samples, readiness, rss_mib, start_worker
from stream_detector.model import AnomalyLLM
from stream_detector.publisher import PublishError
from stream_detector.windows import due_ends
from trainer.train import fit, profile, sliding_windows

RESULTS = Path(__file__).parent / "results" / "soak.json"
PLOT = Path(__file__).resolve().parents[1] / "docs" / "images" / "soak.png"
PARTITIONS = 4
FAULT_CYCLE = ("sigkill", "broker_cut", "redis_loss", "sigterm")
BROKER_CUT_S = 30.0
REDIS_DOWN_S = 10.0
STOP_TIMEOUT_S = 60.0
READY_TIMEOUT_S = 180.0
SAMPLE_INTERVAL_S = 1.0
HTTP_TIMEOUT_S = 0.8
# A fault counts as recovered from the first of RECOVERED_SAMPLES consecutive samples in
# which the worker is ready and its lag is under RECOVERED_LAG_S seconds of load.
RECOVERED_LAG_S = 2.0
RECOVERED_SAMPLES = 5
THRESHOLD_MARGIN = 1.5  # alert threshold = margin x the highest score on normal windows
FAULT_COLOURS = {
    "sigkill": "tab:red",
    "broker_cut": "tab:purple",
    "redis_loss": "tab:orange",
    "sigterm": "tab:green",
}


class RunClock:
    """Seconds since the run began (the first worker's start)."""

    def __init__(self) -> None:
        self.origin = time.monotonic()

    def __call__(self) -> float:
        return time.monotonic() - self.origin


@dataclass
class Incarnation:
    """One worker process: when it ran and how it ended."""

    number: int
    pid: int
    log: str
    started_s: float
    ended_s: float | None = None
    ended_by: str | None = None  # "sigkill", "sigterm", "crash" or "end"
    exit_code: int | None = None
    stop_s: float | None = None  # from the signal to the exit
    killed_after_timeout: bool = False  # did not exit within STOP_TIMEOUT_S of the signal


class Supervisor:
    """Starts the worker, stops it with a signal, and starts it again when it dies on its own."""

    def __init__(self, settings: Settings, log_dir: Path, clock: RunClock) -> None:
        self.settings = settings
        self.log_dir = log_dir
        self.clock = clock
        self.incarnations: list[Incarnation] = []
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def current(self) -> Incarnation | None:
        """The incarnation running now, if any."""
        if not self.incarnations or self.incarnations[-1].ended_s is not None:
            return None
        return self.incarnations[-1]

    def running(self) -> bool:
        """Whether the current incarnation's process is alive."""
        return self._process is not None and self._process.poll() is None

    def start(self) -> None:
        """Start a new incarnation, logging to worker-NN.log."""
        log = self.log_dir / f"worker-{len(self.incarnations) + 1:02d}.log"
        self._process = start_worker(self.settings, log)
        self.incarnations.append(
            Incarnation(len(self.incarnations) + 1, self._process.pid, str(log), self.clock())
        )

    def stop(self, signal_number: signal.Signals, ended_by: str) -> None:
        """Signal the running incarnation and wait for it to exit (SIGKILL after a timeout)."""
        incarnation = self.current
        if incarnation is None or self._process is None:
            return
        signalled_s = self.clock()
        self._process.send_signal(signal_number)
        try:
            exit_code = self._process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            incarnation.killed_after_timeout = True
            self._process.kill()
            exit_code = self._process.wait()
        incarnation.stop_s = round(self.clock() - signalled_s, 2)
        self._ended(incarnation, ended_by, exit_code)

    def restart_if_dead(self) -> None:
        """Record an incarnation that exited on its own as a crash and start a new one."""
        incarnation = self.current
        if incarnation is None or self._process is None or self.running():
            return
        self._ended(incarnation, "crash", self._process.returncode)
        print(f"[soak] worker {incarnation.number} crashed (exit {incarnation.exit_code})")
        self.start()

    def _ended(self, incarnation: Incarnation, ended_by: str, exit_code: int) -> None:
        incarnation.ended_by, incarnation.exit_code = ended_by, exit_code
        incarnation.ended_s = round(self.clock(), 2)

    def wait(self, seconds: float) -> None:
        """Sleep, restarting a crashed worker meanwhile."""
        deadline = self.clock() + seconds
        while (left_s := deadline - self.clock()) > 0:
            self.restart_if_dead()
            time.sleep(min(0.2, left_s))


@dataclass
class Scrape:
    """The worker's counters at one moment."""

    incarnation: int
    t_s: float
    readings_total: float = 0.0
    latency_buckets: dict[float, float] = field(default_factory=dict)  # le -> cumulative count
    latency_sum_s: float = 0.0
    latency_count: float = 0.0


def histogram_quantile(quantile: float, buckets: dict[float, float]) -> float | None:
    """Prometheus' estimate: linear interpolation inside the bucket holding the rank."""
    ordered = sorted(buckets.items())
    if not ordered or ordered[-1][1] <= 0:
        return None
    rank = quantile * ordered[-1][1]
    lower_bound_s, lower_count = 0.0, 0.0
    for upper_bound_s, count in ordered:
        if count >= rank:
            if math.isinf(upper_bound_s):
                return lower_bound_s  # above the highest finite bucket: its bound, at least
            share = (rank - lower_count) / (count - lower_count)
            return lower_bound_s + (upper_bound_s - lower_bound_s) * share
        lower_bound_s, lower_count = upper_bound_s, count
    return None


def _rounded(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(value, digits)


class Sampler(threading.Thread):
    """Samples the running worker every SAMPLE_INTERVAL_S until ``finish``."""

    def __init__(self, supervisor: Supervisor, metrics_port: int, clock: RunClock) -> None:
        super().__init__(name="soak-sampler", daemon=True)
        self.supervisor = supervisor
        self.metrics_port = metrics_port
        self.clock = clock
        self.samples: list[dict[str, Any]] = []
        # Over the whole run: latency bucket deltas, and the last readings counter per
        # incarnation (each restart resets it).
        self.latency_buckets: Counter[float] = Counter()
        self.latency_sum_s = 0.0
        self.latency_count = 0.0
        self.readings_by_incarnation: dict[int, float] = {}
        self._previous: Scrape | None = None
        self._done = threading.Event()

    def run(self) -> None:
        next_s = self.clock()
        while not self._done.wait(max(0.0, next_s - self.clock())):
            self.samples.append(self.sample())
            next_s = max(next_s + SAMPLE_INTERVAL_S, self.clock())

    def finish(self) -> None:
        """Stop sampling and wait for the thread."""
        self._done.set()
        self.join()

    def latest(self) -> dict[str, Any] | None:
        """The newest sample."""
        return self.samples[-1] if self.samples else None

    def sample(self) -> dict[str, Any]:
        """One row: RSS, lag, readings/s, latency over the interval, readiness."""
        incarnation = self.supervisor.current
        row: dict[str, Any] = {
            "t_s": round(self.clock(), 2),
            "incarnation": None,
            "restarts": max(0, len(self.supervisor.incarnations) - 1),
            "rss_mib": None,
            "ready": None,
            "lag_messages": None,
            "readings_per_s": None,
            "latency_mean_s": None,
            "latency_p50_s": None,
            "latency_p99_s": None,
            "latency_windows": None,
        }
        if incarnation is None:
            return row
        row["incarnation"] = incarnation.number
        row["rss_mib"] = rss_mib(incarnation.pid)
        row["ready"] = readiness(self.metrics_port, HTTP_TIMEOUT_S)
        samples = metric_samples(self.metrics_port, HTTP_TIMEOUT_S)
        if samples is None:
            return row
        lag = samples.get("detector_consumer_lag_messages")
        # No gauge at all means no partition is owned yet: unknown, not zero.
        row["lag_messages"] = int(sum(value for _, value in lag)) if lag else None
        now = Scrape(
            incarnation.number,
            row["t_s"],
            samples["detector_readings_total"][0][1],
            {
                float(labels["le"]): value
                for labels, value in samples["detector_end_to_end_seconds_bucket"]
            },
            samples["detector_end_to_end_seconds_sum"][0][1],
            samples["detector_end_to_end_seconds_count"][0][1],
        )
        previous = self._previous
        if previous is None or previous.incarnation != incarnation.number:
            # A new process counts from zero since it started.
            previous = Scrape(incarnation.number, incarnation.started_s)
        interval_s = max(now.t_s - previous.t_s, 1e-3)
        row["readings_per_s"] = round(
            (now.readings_total - previous.readings_total) / interval_s, 1
        )
        buckets = {
            bound: count - previous.latency_buckets.get(bound, 0.0)
            for bound, count in now.latency_buckets.items()
        }
        count = now.latency_count - previous.latency_count
        sum_s = now.latency_sum_s - previous.latency_sum_s
        row["latency_windows"] = int(count)
        if count > 0:
            row["latency_mean_s"] = round(sum_s / count, 3)
            row["latency_p50_s"] = _rounded(histogram_quantile(0.5, buckets))
            row["latency_p99_s"] = _rounded(histogram_quantile(0.99, buckets))
        self.latency_buckets.update(buckets)
        self.latency_sum_s += sum_s
        self.latency_count += count
        self.readings_by_incarnation[incarnation.number] = now.readings_total
        self._previous = now
        return row


@dataclass
class Services:
    """What the faults act on; None where the service is external and cannot be faulted."""

    supervisor: Supervisor
    broker_proxy: TcpProxy | None
    redis: EmbeddedRedis | None


def inject(kind: str, services: Services, clock: RunClock) -> dict[str, Any]:
    """Inject one fault, wait until it is cleared, and return its record."""
    fault: dict[str, Any] = {"kind": kind, "t_s": round(clock(), 2)}
    supervisor = services.supervisor
    if kind in {"sigkill", "sigterm"}:
        stopped = supervisor.current
        supervisor.stop(signal.SIGKILL if kind == "sigkill" else signal.SIGTERM, kind)
        if stopped is not None:
            fault["incarnation"] = stopped.number
            fault["exit_code"] = stopped.exit_code
            fault["stop_s"] = stopped.stop_s
            fault["killed_after_timeout"] = stopped.killed_after_timeout
        supervisor.start()
    elif kind == "broker_cut" and services.broker_proxy is not None:
        services.broker_proxy.cut()
        supervisor.wait(BROKER_CUT_S)
        services.broker_proxy.restore()
    elif kind == "redis_loss" and services.redis is not None:
        services.redis.stop()
        supervisor.wait(REDIS_DOWN_S)
        services.redis.start()
    else:
        fault["skipped"] = "the service is external: only an embedded one can be faulted"
    fault["cleared_t_s"] = round(clock(), 2)
    print(f"[soak] t={fault['t_s']:.0f}s {kind} (cleared at {fault['cleared_t_s']:.0f}s)")
    return fault


def make_load(args: argparse.Namespace) -> loadgen.LoadPlan:
    """The load of the run, timestamped from now."""
    return loadgen.plan(
        args.sensors,
        args.rate,
        args.duration_s,
        anomalies=args.anomalies,
        anomaly_readings=args.window_length,
        seed=args.seed,
    )


def train_model(
    load: loadgen.LoadPlan, window_length: int, stride: int
) -> tuple[AnomalyLLM, float, float]:
    """The tiny model trained on the load's normal signal; (model, threshold, seconds)."""
    started = time.perf_counter()
    steps = np.arange(4 * window_length)
    series = [
        loadgen.normal_series(index, steps, load.seed, load.noise)[:, None].astype(np.float32)
        for index in range(load.sensors)
    ]
    windows = np.concatenate([sliding_windows(s, window_length, stride) for s in series])
    config = profile("quick", epochs=20, max_train_windows=512, patience=100)
    model = build_model("tiny", window_length)
    model = fit(windows, model.config, config, model=model, progress=False).model
    with torch.inference_mode():
        scores = model.score(torch.from_numpy(windows), attribution=False).score.numpy()
    return model, float(scores.max()) * THRESHOLD_MARGIN, time.perf_counter() - started


class LoadThread(threading.Thread):
    """``loadgen.produce``, paced, until the plan is done or ``stop`` is set."""

    def __init__(self, load: loadgen.LoadPlan, bootstrap: str, topic: str) -> None:
        super().__init__(name="soak-load", daemon=True)
        self.load, self.bootstrap, self.topic = load, bootstrap, topic
        self.stop = threading.Event()
        self.sent = 0
        self.error: str | None = None

    def run(self) -> None:
        try:
            # librdkafka's own log lines (connection refused while the broker is cut) off:
            # what was lost shows as readings_in_topic < readings_produced.
            self.sent = loadgen.produce(
                self.load,
                self.bootstrap,
                self.topic,
                pace=True,
                stop=self.stop,
                config={"log_level": "2"},
            )
        except PublishError as error:
            self.error = str(error)


def wait_until_ready(supervisor: Supervisor, port: int) -> None:
    """Block until the worker answers /readyz with 200."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    while readiness(port, HTTP_TIMEOUT_S) is not True:
        if not supervisor.running() or time.monotonic() > deadline:
            log = supervisor.incarnations[-1].log
            raise RuntimeError(
                f"the worker exited or was not ready within {READY_TIMEOUT_S:.0f}s; "
                f"its log ({log}) ends:\n{Path(log).read_text()[-3000:]}"
            )
        time.sleep(0.5)


def topic_values(bootstrap: str, topic: str, quiet_s: float = 3.0) -> Iterator[bytes]:
    """Every record value of a topic, from the beginning until nothing arrives for ``quiet_s``.

    Read until quiet rather than to the high watermark: tansu can answer watermark queries
    with a stale value. The topic must no longer be written to.
    """
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"soak-reader-{uuid.uuid4().hex[:8]}",
            "enable.auto.commit": False,
        }
    )
    try:
        partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
        last_s = time.monotonic()
        while time.monotonic() - last_s < quiet_s:
            messages = consumer.consume(10_000, 0.5)
            yield from (m.value() for m in messages if m.error() is None)
            if messages:
                last_s = time.monotonic()
    finally:
        consumer.close()


def committed_readings(bootstrap: str, group_id: str, topic: str) -> int:
    """Sum over partitions of the offsets the worker's group committed (topics start at 0)."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group_id})
    try:
        offsets = consumer.committed(
            [TopicPartition(topic, p) for p in range(PARTITIONS)], timeout=10
        )
        return sum(max(tp.offset, 0) for tp in offsets)
    finally:
        consumer.close()


def committed_all(settings: Settings, readings: int) -> bool:
    """Whether the worker's group committed ``readings`` readings (False when unreachable)."""
    try:
        committed = committed_readings(
            settings.kafka.bootstrap_servers,
            settings.kafka.group_id,
            settings.kafka.topics.readings,
        )
    except KafkaException:
        return False
    return committed >= readings


def count_outputs(
    bootstrap: str, settings: Settings, load: loadgen.LoadPlan, produced: int
) -> dict[str, Any]:
    """Readings, score records and alert events as read back from the topics."""
    topics = settings.kafka.topics
    per_sensor, extra = divmod(produced, load.sensors)  # produce goes step by step
    spread = settings.stride_phase == "spread"
    expected = {
        (sensor_id, load.ts_ms(end))
        for index, sensor_id in enumerate(map(load.sensor_id, range(load.sensors)))
        for end in due_ends(
            sensor_id, per_sensor + (index < extra), settings.window_length, settings.stride, spread
        )
    }
    scores = [json.loads(value) for value in topic_values(bootstrap, topics.scores)]
    scored = [(record["sensor_id"], record["ts_ms"]) for record in scores]
    # A Redis loss restarts each window's stride count at the rebuild's lookback, so window
    # ends move off the uninterrupted grid; what must hold is that every reading is inside
    # some scored window (all but each sensor's last stride - 1, whose window is not due).
    covered = {
        load.sensor_id(index): np.zeros(per_sensor + (index < extra), bool)
        for index in range(load.sensors)
    }
    for record in scores:
        first = round((record["window_start_ts_ms"] - load.start_ts_ms) / load.step_ms)
        last = round((record["ts_ms"] - load.start_ts_ms) / load.step_ms)
        covered[record["sensor_id"]][first : last + 1] = True
    unscored = sum(
        int((~flags[: len(flags) - settings.stride + 1]).sum()) for flags in covered.values()
    )
    events = [json.loads(value) for value in topic_values(bootstrap, topics.alerts)]
    alerted = {event["sensor_id"] for event in events}
    injected = {anomaly.sensor_id for anomaly in load.anomalies}
    return {
        "readings_produced": produced,
        "readings_in_topic": sum(1 for _ in topic_values(bootstrap, topics.readings)),
        "readings_committed_by_worker": committed_readings(
            bootstrap, settings.kafka.group_id, topics.readings
        ),
        "readings_outside_scored_windows": unscored,
        "windows_on_the_uninterrupted_grid": len(expected),
        "windows_of_that_grid_scored": len(expected & set(scored)),
        "score_records": len(scored),
        "windows_scored_unique": len(set(scored)),
        "score_duplicates": len(scored) - len(set(scored)),
        "dead_letters": sum(1 for _ in topic_values(bootstrap, topics.dead_letters)),
        "alert_events": len(events),
        "alert_events_unique": len({event["event_id"] for event in events}),
        "alerts_unique": len({event["alert_id"] for event in events}),
        "injected_anomaly_sensors": sorted(injected),
        "injected_sensors_alerted": sorted(alerted & injected),
        "other_sensors_alerted": sorted(alerted - injected),
    }


def rss_span(samples: list[dict[str, Any]]) -> dict[str, Any] | None:
    """RSS at the end of the first 10% of a span of samples, over its last 10%, and max."""
    points = [(s["t_s"], s["rss_mib"]) for s in samples if s["rss_mib"] is not None]
    if not points:
        return None
    start_s, end_s = points[0][0], points[-1][0]
    span_s = end_s - start_s
    return {
        "span_s": round(span_s, 1),
        "samples": len(points),
        "rss_mib_at_10pct": [rss for t, rss in points if t <= start_s + 0.1 * span_s][-1],
        "rss_mib_last_10pct_median": statistics.median(
            rss for t, rss in points if t >= end_s - 0.1 * span_s
        ),
        "rss_mib_max": max(rss for _, rss in points),
    }


def rss_growth(samples: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Least-squares RSS slope (MiB/h) of the longest-lived incarnation, after its first 10%."""
    spans: dict[int, list[tuple[float, float]]] = {}
    for s in samples:
        if s["incarnation"] is not None and s["rss_mib"] is not None:
            spans.setdefault(s["incarnation"], []).append((s["t_s"], s["rss_mib"]))
    if not spans:
        return None
    number, points = max(spans.items(), key=lambda item: item[1][-1][0] - item[1][0][0])
    start_s, end_s = points[0][0], points[-1][0]
    # The first 10% is start-up (imports, model load), not growth.
    steady = [(t, rss) for t, rss in points if t >= start_s + 0.1 * (end_s - start_s)]
    if len(steady) < 10:
        return None
    times_h = np.array([t for t, _ in steady]) / 3600
    slope, _ = np.polyfit(times_h, np.array([rss for _, rss in steady]), 1)
    return {
        "incarnation": number,
        "lifetime_s": round(end_s - start_s, 1),
        "fitted_samples": len(steady),
        "rss_mib_per_hour": round(float(slope), 2),
    }


def recovery_s(fault: dict[str, Any], samples: list[dict[str, Any]], lag_ok: float) -> float | None:
    """Seconds from the fault being cleared until the worker is ready with a small lag, stably."""
    after = [s for s in samples if s["t_s"] >= fault["cleared_t_s"]]
    healthy = [
        s["ready"] is True and s["lag_messages"] is not None and s["lag_messages"] <= lag_ok
        for s in after
    ]
    for index in range(len(after) - RECOVERED_SAMPLES + 1):
        if all(healthy[index : index + RECOVERED_SAMPLES]):
            return round(after[index]["t_s"] - fault["cleared_t_s"], 1)
    return None


def stalls(samples: list[dict[str, Any]], lag_ok: float) -> list[dict[str, float]]:
    """Spans in which the worker said it was ready but consumed nothing while lagging."""
    spans: list[dict[str, float]] = []
    for sample in samples:
        stalled = (
            sample["ready"] is True
            and sample["readings_per_s"] == 0
            and (sample["lag_messages"] or 0) > lag_ok
        )
        if stalled and spans and spans[-1]["end_s"] >= sample["t_s"] - 1.5 * SAMPLE_INTERVAL_S:
            spans[-1]["end_s"] = sample["t_s"]
        elif stalled:
            spans.append({"start_s": sample["t_s"], "end_s": sample["t_s"]})
    return spans


def latency_outside_faults(
    samples: list[dict[str, Any]], faults: list[dict[str, Any]], recoveries: list[float | None]
) -> dict[str, Any]:
    """Latency of the intervals outside every fault (from its start until it is recovered)."""
    spans = [
        (fault["t_s"], fault["cleared_t_s"] + (math.inf if recovered is None else recovered))
        for fault, recovered in zip(faults, recoveries, strict=True)
    ]
    steady = [
        s
        for s in samples
        if s["latency_windows"] and not any(start <= s["t_s"] <= end for start, end in spans)
    ]
    windows = sum(s["latency_windows"] for s in steady)
    return {
        "windows": windows,
        "mean": round(sum(s["latency_mean_s"] * s["latency_windows"] for s in steady) / windows, 3)
        if windows
        else None,
        "max_interval_p99": max((s["latency_p99_s"] for s in steady), default=None),
        # Windows replayed by a rebuild keep their readings' original Kafka timestamps and
        # can land after the recovery: the median interval shows the usual state.
        "median_interval_p99": statistics.median(s["latency_p99_s"] for s in steady)
        if steady
        else None,
    }


def log_digest(path: Path, top: int = 8) -> dict[str, Any]:
    """Lines per level of a worker log, its most frequent warnings and errors (digits as N)."""
    levels: Counter[str] = Counter()
    messages: dict[str, Counter[str]] = {"WARNING": Counter(), "ERROR": Counter()}
    other: Counter[str] = Counter()
    for line in path.read_text(errors="replace").splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            entry = None
        if not isinstance(entry, dict) or "level" not in entry:
            other[re.sub(r"\d+", "N", line)[:200]] += 1  # a traceback, librdkafka's own lines
            continue
        levels[entry["level"]] += 1
        if entry["level"] in messages:
            messages[entry["level"]][re.sub(r"\d+", "N", entry["message"])[:200]] += 1
        elif entry["level"] == "CRITICAL":
            messages["ERROR"][entry["message"][:200]] += 1
    return {
        "log": str(path),
        "lines_by_level": dict(levels),
        "other_lines": sum(other.values()),
        "top_warnings": messages["WARNING"].most_common(top),
        "top_errors": messages["ERROR"].most_common(top),
        "top_other_lines": other.most_common(top),
    }


def summarise(
    samples: list[dict[str, Any]],
    sampler: Sampler,
    supervisor: Supervisor,
    faults: list[dict[str, Any]],
    load_per_s: float,
) -> dict[str, Any]:
    """The headline numbers of the run; ``load_per_s`` is the readings/s produced."""
    lag_ok = RECOVERED_LAG_S * load_per_s
    lags = [s["lag_messages"] for s in samples if s["lag_messages"] is not None]
    incarnations = supervisor.incarnations
    count = sampler.latency_count
    faulted = [f for f in faults if "skipped" not in f]
    recoveries = [recovery_s(f, samples, lag_ok) for f in faulted]
    return {
        "rss": {
            "overall": rss_span(samples),
            "by_incarnation": [
                {"incarnation": i.number}
                | (rss_span([s for s in samples if s["incarnation"] == i.number]) or {})
                for i in incarnations
            ],
            "growth": rss_growth(samples),
        },
        "lag_messages": {"max": max(lags, default=None)},
        "latency_s_whole_run": {
            "mean": round(sampler.latency_sum_s / count, 3) if count else None,
            "p50": _rounded(histogram_quantile(0.5, dict(sampler.latency_buckets))),
            "p99": _rounded(histogram_quantile(0.99, dict(sampler.latency_buckets))),
            "windows": int(count),
        },
        "latency_s_outside_faults": latency_outside_faults(samples, faulted, recoveries),
        "readings_counted_by_worker": {
            "total": int(sum(sampler.readings_by_incarnation.values())),
            "note": "detector_readings_total at each incarnation's last sample, summed: "
            "replays after a crash or a Redis loss count again; readings consumed after "
            "a killed incarnation's last sample are missing",
        },
        "worker": {
            "incarnations": len(incarnations),
            "restarts": len(incarnations) - 1,
            "crashes": sum(1 for i in incarnations if i.ended_by == "crash"),
            "hung_on_stop": sum(1 for i in incarnations if i.killed_after_timeout),
        },
        "recovery_s_by_fault": [
            {"kind": f["kind"], "t_s": f["t_s"], "recovery_s": recovered}
            for f, recovered in zip(faulted, recoveries, strict=True)
        ],
        "stalled_while_ready": stalls(samples, lag_ok),
        "recovered_means": (
            f"ready, and lag <= {lag_ok:.0f} messages ({RECOVERED_LAG_S:.0f} s of load) for "
            f"{RECOVERED_SAMPLES} consecutive samples, counted from the fault being cleared"
        ),
    }


def plot(result: dict[str, Any], path: Path) -> None:
    """RSS, lag and latency over time in three stacked panels, the faults marked."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    samples = result["samples"]
    t_s = np.array([s["t_s"] for s in samples])

    def series(key: str) -> np.ndarray:
        return np.array([np.nan if s[key] is None else s[key] for s in samples], dtype=float)

    figure, (rss_axis, lag_axis, latency_axis) = plt.subplots(
        3, 1, sharex=True, figsize=(11, 8), constrained_layout=True
    )
    rss_axis.plot(t_s, series("rss_mib"), color="tab:blue", linewidth=1)
    rss_axis.set_ylabel("worker RSS (MiB)")
    lag_axis.plot(t_s, series("lag_messages"), color="tab:brown", linewidth=1)
    lag_axis.set_ylabel("consumer lag (messages)", color="tab:brown")
    # Readings consumed beside the lag: a worker that stopped consuming shows here.
    rate_axis = lag_axis.twinx()
    rate_axis.plot(t_s, series("readings_per_s"), color="grey", linewidth=0.8, alpha=0.7)
    rate_axis.set_ylabel("readings consumed/s", color="grey")
    # Dots, not lines: intervals without a scored window have no latency.
    latency_axis.plot(t_s, series("latency_mean_s"), ".", markersize=4, label="mean")
    latency_axis.plot(t_s, series("latency_p99_s"), ".", markersize=4, label="p99 (within buckets)")
    latency_axis.set_yscale("log")
    latency_axis.set_ylabel("reading-to-score latency (s)")
    latency_axis.set_xlabel("time since the worker first started (s)")
    latency_axis.legend(loc="upper left", fontsize=8)
    for fault in result["faults"]:
        colour = FAULT_COLOURS[fault["kind"]]
        for axis in (rss_axis, lag_axis, latency_axis):
            axis.axvline(fault["t_s"], color=colour, linestyle="--", linewidth=1)
            if fault["cleared_t_s"] - fault["t_s"] > 1:
                axis.axvspan(fault["t_s"], fault["cleared_t_s"], color=colour, alpha=0.12)
        rss_axis.annotate(
            fault["kind"] + (" (skipped)" if "skipped" in fault else ""),
            (fault["t_s"], 1.0),
            xycoords=("data", "axes fraction"),
            xytext=(2, -2),
            textcoords="offset points",
            rotation=90,
            va="top",
            fontsize=8,
            color=colour,
        )
    for axis in (rss_axis, lag_axis, latency_axis):
        axis.axvline(result["config"]["load_ended_s"], color="black", linestyle=":", linewidth=1)
    rss_axis.annotate(
        "load ends",
        (result["config"]["load_ended_s"], 0.0),
        xycoords=("data", "axes fraction"),
        xytext=(2, 2),
        textcoords="offset points",
        rotation=90,
        fontsize=8,
    )
    load = result["config"]["load"]
    counts = result["outputs"]
    rss_axis.set_title(
        f"soak: {load['sensors']} sensors x {load['rate_per_sensor']} readings/s, "
        f"{len(result['faults'])} faults; {counts['readings_produced']} readings, "
        f"{counts['readings_outside_scored_windows']} readings outside every scored window"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def parse_args() -> argparse.Namespace:
    """The command line (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration-s", type=float, default=1800.0, help="load duration")
    parser.add_argument("--sensors", type=int, default=200)
    parser.add_argument("--rate", type=float, default=2.0, help="readings/s per sensor")
    parser.add_argument("--fault-every-s", type=float, default=120.0)
    parser.add_argument(
        "--faults",
        type=lambda text: tuple(text.split(",")),
        default=FAULT_CYCLE,
        help=f"comma-separated fault kinds injected in turn (default: {','.join(FAULT_CYCLE)})",
    )
    parser.add_argument("--anomalies", type=int, default=3, help="injected noise bursts")
    parser.add_argument("--window-length", type=int, default=128, help="a multiple of 16")
    parser.add_argument("--stride", type=int, default=16)
    parser.add_argument(
        "--rebuild-lookback-s",
        type=float,
        default=RedisSettings().rebuild_lookback_s,
        help="redis.rebuild_lookback_s: how far back the worker replays after Redis lost "
        "its state (default: the setting's default)",
    )
    parser.add_argument("--drain-timeout-s", type=float, default=120.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bootstrap", help="an existing broker (default: embedded tansu)")
    parser.add_argument("--redis", help="an existing Redis URL (default: embedded)")
    parser.add_argument("--log-dir", type=Path, help="worker logs (default: a new temp dir)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--plot", type=Path, default=PLOT)
    args = parser.parse_args()
    unknown = set(args.faults) - set(FAULT_CYCLE)
    if unknown:
        parser.error(f"unknown fault kinds {sorted(unknown)}; choose from {', '.join(FAULT_CYCLE)}")
    return args


def worker_settings(
    args: argparse.Namespace, broker: str, redis_url: str, prefix: str, model_dir: Path
) -> Settings:
    """The worker's configuration: a group and key prefix of its own, lag measured each second."""
    return Settings(
        kafka=KafkaSettings(
            bootstrap_servers=broker,
            group_id=f"{prefix}-worker",
            topics=KafkaTopics(
                readings=f"{prefix}-readings",
                scores=f"{prefix}-scores",
                alerts=f"{prefix}-alerts",
                dead_letters=f"{prefix}-dlq",
            ),
            session_timeout_ms=6000,
            lag_interval_s=1.0,
            # tansu holds an empty fetch for ~200 ms (see e2e_throughput --fetch-wait-ms).
            extra={"fetch.wait.max.ms": "10"},
        ),
        redis=RedisSettings(
            url=redis_url, key_prefix=prefix, rebuild_lookback_s=args.rebuild_lookback_s
        ),
        model=ModelSettings(store=str(model_dir)),
        window_length=args.window_length,
        stride=args.stride,
        device="cpu",
        metrics_port=free_port(),
        log_level="INFO",
    )


def drive(
    args: argparse.Namespace, settings: Settings, services: Services, clock: RunClock
) -> dict[str, Any]:
    """Start the worker, run the load with its faults, drain, stop; what happened when."""
    supervisor = services.supervisor
    sampler = Sampler(supervisor, settings.metrics_port, clock)
    supervisor.start()
    sampler.start()
    try:
        wait_until_ready(supervisor, settings.metrics_port)
        load = LoadThread(
            make_load(args), settings.kafka.bootstrap_servers, settings.kafka.topics.readings
        )
        load_started_s = clock()
        print(f"load: {load.load.sensors * load.load.readings_per_sensor} readings", flush=True)
        load.start()
        faults = []
        for number in range(math.ceil(args.duration_s / args.fault_every_s) - 1):
            supervisor.wait(load_started_s + (number + 1) * args.fault_every_s - clock())
            faults.append(inject(args.faults[number % len(args.faults)], services, clock))
        supervisor.wait(load_started_s + args.duration_s - clock())
        load.stop.set()
        load.join()
        load_ended_s = clock()
        lag_at_load_end = (sampler.latest() or {}).get("lag_messages")
        print("draining ...", flush=True)
        # Drained once the worker committed every reading sent: its lag gauge cannot tell,
        # since it keeps its last value while the broker is unreachable.
        drain_deadline_s = clock() + args.drain_timeout_s
        while not (drained := committed_all(settings, load.sent)):
            if clock() >= drain_deadline_s:
                break
            supervisor.wait(SAMPLE_INTERVAL_S)
        drained_s = clock()
    finally:
        sampler.finish()
        alive_at_end = supervisor.running()
        supervisor.stop(signal.SIGTERM, "end")
    return {
        "load": load.load,
        "load_started_s": round(load_started_s, 2),
        "load_ended_s": round(load_ended_s, 2),
        "readings_sent": load.sent,
        "load_error": load.error,
        "faults": faults,
        "sampler": sampler,
        "lag_at_load_end": lag_at_load_end,
        "drain_s": round(drained_s - load_ended_s, 1),
        "drained": drained,
        "alive_at_end": alive_at_end,
    }


def main() -> None:
    """Set up the services and the model, run the soak, write the JSON and the plot."""
    args = parse_args()
    torch.set_num_threads(1)
    log_dir = args.log_dir or Path(tempfile.mkdtemp(prefix="soak-logs-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()
    with contextlib.ExitStack() as stack, tempfile.TemporaryDirectory() as tmp:
        proxy, broker, redis_url, embedded_redis = None, args.bootstrap, args.redis, None
        if broker is None:
            broker_port = free_port()
            proxy = stack.enter_context(TcpProxy("127.0.0.1", broker_port))
            stack.enter_context(EmbeddedKafka(port=broker_port, advertised_port=proxy.port))
            broker = proxy.address
        if redis_url is None:
            embedded_redis = stack.enter_context(EmbeddedRedis(port=free_port()))
            redis_url = embedded_redis.url
        model_dir = Path(tmp) / "models"
        settings = worker_settings(
            args, broker, redis_url, f"soak-{uuid.uuid4().hex[:8]}", model_dir
        )
        topics = settings.kafka.topics
        create_topics(broker, [topics.readings], PARTITIONS)
        create_topics(broker, [topics.scores, topics.alerts, topics.dead_letters], 1)
        print("training the tiny model ...", flush=True)
        model, threshold, train_s = train_model(make_load(args), args.window_length, args.stride)
        store.publish_version(
            model_dir, "default", model, thresholds={"default": {"threshold": threshold}}
        )
        clock = RunClock()
        supervisor = Supervisor(settings, log_dir, clock)
        run = drive(args, settings, Services(supervisor, proxy, embedded_redis), clock)
        print("reading the topics back ...", flush=True)
        outputs = count_outputs(broker, settings, run["load"], run["readings_sent"])

    samples, faults = run["sampler"].samples, run["faults"]
    summary = summarise(samples, run["sampler"], supervisor, faults, args.sensors * args.rate)
    summary["lag_messages"] |= {
        "at_load_end": run["lag_at_load_end"],
        "final": next(
            (s["lag_messages"] for s in reversed(samples) if s["lag_messages"] is not None), None
        ),
        "drain_s": run["drain_s"],
        "drained": run["drained"],
    }
    last = supervisor.incarnations[-1]
    summary["worker"] |= {
        "alive_at_end": run["alive_at_end"],
        "ready_at_end": samples[-1]["ready"] if samples else None,
        "final_exit_code": last.exit_code,
        "final_stop_s": last.stop_s,
    }
    result: dict[str, Any] = {
        "benchmark": "soak",
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "load_average_before": [round(x, 2) for x in load_before],
            "load_average_after": [round(x, 2) for x in os.getloadavg()],
        },
        "config": {
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "broker": "embedded tansu behind a TcpProxy" if proxy else "external",
            "redis": "embedded" if embedded_redis else "external",
            "partitions": PARTITIONS,
            "model": {
                "kind": "tiny (e2e_throughput.build_model), trained on the normal signal",
                "threshold": round(threshold, 4),
                "train_s": round(train_s, 1),
            },
            "load": loadgen.describe(run["load"]),
            "load_started_s": run["load_started_s"],
            "load_ended_s": run["load_ended_s"],
            "load_error": run["load_error"],
            "settings": settings.masked_dump(),
            "latency": "per interval: mean from _sum/_count deltas; p50/p99 interpolated "
            "within the bucket deltas of detector_end_to_end_seconds",
        },
        "summary": summary,
        "outputs": outputs,
        "faults": faults,
        "incarnations": [asdict(i) for i in supervisor.incarnations],
        "worker_logs": [log_digest(Path(i.log)) for i in supervisor.incarnations],
        "samples": samples,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    if args.plot:
        plot(result, args.plot)
    print(json.dumps({"summary": summary, "outputs": outputs}, indent=2))
    print(f"results: {args.out}; plot: {args.plot}; worker logs: {log_dir}")


if __name__ == "__main__":
    main()
