"""End-to-end throughput and latency of the worker, against the limits of its parts.

One run, one broker, one machine:

1. ``bare_consume``: a plain confluent-kafka consume loop over the pre-produced readings
   (what the broker and client alone can deliver).
2. ``model_only``: the scorer on random windows at the worker's batch size, expressed as
   readings/s (each window is due after ``stride`` readings of its sensor).
3. ``end_to_end``: the worker (its own process) on the same readings: decode, Redis windows,
   batching, scoring, alert decisions, publishing, offset commits; windows/s in steady
   state (from the first scored window), expressed as readings/s as ``model_only`` is.
4. ``latency``: readings produced at 50% (and 25%) of the measured end-to-end capacity,
   stamped with the wall clock; reading-to-score latency is the time until its score
   record is read back from the scores topic. The load generator runs on the same CPUs.
   ``relay_latency`` is the floor of that path: a plain pass-through process with the
   worker's consumer and producer settings reads paced readings from topics of its own
   and publishes one record per ``stride`` readings of a sensor at once (no Redis, no
   model), measured the same way right after the worker at each rate (the worker idles
   meanwhile), so both see the broker in the same state.
5. ``redis_bytes_per_sensor``: MEMORY USAGE of a sensor's window and alert state.

Usage: ``python benchmarks/e2e_throughput.py [--sensors 1000] [--model tiny|smollm2]``;
brokers are embedded unless ``--bootstrap``/``--redis`` name existing ones. Results go to
``benchmarks/results/e2e_throughput.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import redis
import torch
from confluent_kafka import Consumer, Producer

from stream_detector import store
from stream_detector.config import (
    KafkaSettings,
    KafkaTopics,
    ModelSettings,
    RedisSettings,
    Settings,
    kafka_consumer_config,
    kafka_producer_config,
)
from stream_detector.consumer import ReadingConsumer
from stream_detector.devtools.services import EmbeddedKafka, EmbeddedRedis, create_topics, free_port
from stream_detector.devtools.tiny import tiny_config
from stream_detector.devtools.workers import metric_samples, metric_value, start_worker
from stream_detector.model import (
    DEFAULT_SCORE_TERMS,
    SCORE_TERMS,
    SMOLLM2,
    AnomalyLLM,
    ModelConfig,
)
from stream_detector.publisher import ReadingProducer
from stream_detector.scorer import ModelRegistry, Scorer, resolve_device
from stream_detector.windows import WindowStore, stride_phase

RESULTS = Path(__file__).parent / "results" / "e2e_throughput.json"
PARTITIONS = 4
# The stages of the worker's end-to-end latency (``detector_stage_seconds``).
STAGES = ("fetch", "batch", "score", "deliver")
T0_MS = 1_700_000_000_000


def build_model(
    kind: str, window_length: int, score_terms: tuple[str, ...] = DEFAULT_SCORE_TERMS
) -> AnomalyLLM:
    """A randomly initialised model: weights do not change the cost of scoring, but the
    banks' sizes do, so its recent bank is as full as a fitted model's."""
    torch.manual_seed(0)
    if kind == "tiny":
        config = tiny_config(
            window_length=window_length, patch_length=16, patch_stride=16, score_terms=score_terms
        )
        model = AnomalyLLM.from_config(config)
    else:
        config = ModelConfig(
            window_length=window_length,
            backbone=SMOLLM2,
            backbone_layers=6,
            score_terms=score_terms,
        )
        model = AnomalyLLM.pretrained(config)
    size = model.config.recent_size
    model.fill_recent(torch.randn(size, 1, window_length), torch.arange(size) * window_length)
    return model


def produce_backlog(bootstrap: str, topic: str, sensors: int, readings: int) -> int:
    """Readings 0..readings-1 of every sensor, one second apart, as fast as possible."""
    producer = ReadingProducer(bootstrap, topic, config={"linger.ms": 20, "batch.size": 1 << 20})
    rng = np.random.default_rng(0)
    for step in range(readings):
        ts_ms = T0_MS + step * 1000
        values = np.sin(step / 8 + np.arange(sensors)) + rng.normal(0, 0.05, sensors)
        for index in range(sensors):
            sensor_id = f"sensor-{index:05d}"
            value = f'{{"sensor_id":"{sensor_id}","ts":{ts_ms},"value":{values[index]:.5f}}}'
            producer.send(sensor_id.encode(), value.encode())
    producer.flush(120)
    return sensors * readings


def bare_consume(bootstrap: str, topic: str, count: int, fetch_wait_ms: int) -> float:
    """Messages/s of a plain confluent-kafka consume loop over ``count`` messages."""
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"bench-bare-{uuid.uuid4().hex[:8]}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
            "session.timeout.ms": 6000,
            "fetch.wait.max.ms": fetch_wait_ms,
        }
    )
    assigned_at: list[float] = []
    # Timed from the assignment: fetching starts then, so prefetching is counted too.
    consumer.subscribe([topic], on_assign=lambda c, p: assigned_at.append(time.perf_counter()))
    received = 0
    try:
        while received < count:
            received += sum(1 for m in consumer.consume(500, 1.0) if m.error() is None)
        return received / (time.perf_counter() - assigned_at[0])
    finally:
        consumer.close()


def model_only(model_dir: Path, settings: Settings, seconds: float = 10.0) -> float:
    """Windows/s of the scorer alone at the worker's batch size."""
    device = resolve_device(settings.device)
    registry = ModelRegistry(
        model_dir,
        ["default"],
        device=device,
        window_length=settings.window_length,
        poll_interval_s=60,
        trace=settings.trace_model,
    )
    registry.refresh()
    scorer = Scorer(registry, device=device, mixed_precision=settings.mixed_precision)
    windows = (
        np.random.default_rng(0)
        .normal(size=(settings.batch_size, 1, settings.window_length))
        .astype(np.float32)
    )
    scorer.score("default", windows)  # warm-up
    scored, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        scored += len(scorer.score("default", windows))
    return scored / (time.perf_counter() - started)


def end_to_end(settings: Settings, windows: int, profile: tuple[int, Path] | None = None) -> float:
    """Windows/s of the worker over the backlog in steady state: from its first scored
    window to its last.

    The backlog is produced round-robin, so every sensor's window fills before the first
    is due; from then on each window costs ``stride`` readings of decoding and appending
    besides its scoring, as in a stream. (Timing from the first reading instead would
    count the filling readings too, 1.8x as many readings per window with the defaults.)
    ``profile`` = (worker pid, output file): sample the worker with py-spy over that span.

    A scrape of ``/metrics`` costs the worker CPU time (its readiness checks ping Redis),
    so within the span the counter is read every 0.25 s until 90% of the windows are
    scored, then every 10 ms to catch the end.
    """
    port = settings.metrics_port
    deadline = time.monotonic() + 600
    started, first, scored = None, 0.0, 0.0
    with contextlib.ExitStack() as stack:
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                scored = metric_value(port, "detector_windows_scored_total")
                if started is None and scored > 0:
                    started, first = time.perf_counter(), scored
                    if profile is not None:
                        stack.enter_context(sampled(*profile))
                if scored >= windows:
                    return (scored - first) / (time.perf_counter() - started)
            time.sleep(0.25 if started is not None and scored < 0.9 * windows else 0.01)
    raise TimeoutError("the worker did not score the backlog within 10 minutes")


@contextlib.contextmanager
def sampled(pid: int, out: Path) -> Iterator[None]:
    """Sample ``pid``'s Python stacks with py-spy (raw, collapsed) while the block runs."""
    binary = shutil.which(
        "py-spy", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    )
    if binary is None:
        raise SystemExit("--profile needs py-spy (pip install py-spy)")
    spy = subprocess.Popen(
        [binary, "record", "--pid", str(pid), "--format", "raw", "--rate", "200", "--output",
         str(out), "--nonblocking"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        yield
    finally:
        spy.send_signal(signal.SIGINT)  # py-spy writes what it sampled and exits
        spy.wait(60)


def profile_summary(collapsed: Path, top: int = 15) -> dict[str, Any]:
    """The functions where the worker's busy threads spend their samples: ``self`` (the
    frame on top) and ``total`` (anywhere in the stack), as shares of all samples."""
    own: dict[str, int] = {}
    total: dict[str, int] = {}
    samples = 0
    for line in collapsed.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = [frame.rsplit(":", 1)[0] for frame in stack.split(";")]  # drop line numbers
        samples += int(count)
        own[frames[-1]] = own.get(frames[-1], 0) + int(count)
        for frame in set(frames):
            total[frame] = total.get(frame, 0) + int(count)

    def shares(counts: dict[str, int]) -> dict[str, float]:
        ranked = sorted(counts.items(), key=lambda item: -item[1])[:top]
        return {frame: round(count / samples, 3) for frame, count in ranked}

    return {"samples": samples, "self": shares(own), "total": shares(total)}


def worker_batches(port: int) -> dict[str, float]:
    """The worker's batches so far: their mean size, and the windows per second of the
    wall time its scoring took (beside the loop and the services on the same CPU)."""
    samples = metric_samples(port) or {}

    def total(name: str) -> float:
        return sum(value for _, value in samples.get(name, []))

    windows, batches = total("detector_batch_size_sum"), total("detector_batch_size_count")
    seconds = total("detector_inference_seconds_sum")
    return {
        "mean_windows": round(windows / max(batches, 1), 1),
        "scoring_windows_per_s": round(windows / seconds, 1) if seconds else 0.0,
    }


def paced_readings(bootstrap: str, topic: str, sensors: int, rate: float, seconds: float) -> int:
    """Produce readings stamped with the wall clock at ``rate`` per second; return the count."""
    producer = ReadingProducer(bootstrap, topic)
    started, sent = time.monotonic(), 0
    rng = np.random.default_rng(1)
    while time.monotonic() - started < seconds:
        due = int((time.monotonic() - started) * rate)
        while sent < due:
            sensor_id = f"sensor-{sent % sensors:05d}"
            ts_ms = time.time_ns() // 1_000_000
            value = f'{{"sensor_id":"{sensor_id}","ts":{ts_ms},"value":{rng.normal():.5f}}}'
            producer.send(sensor_id.encode(), value.encode())
            sent += 1
        time.sleep(0.005)
    producer.flush()
    return sent


def latency_at(
    settings: Settings,
    sensors: int,
    rate: float,
    seconds: float,
    topics: tuple[str, str] | None = None,
) -> dict[str, float | int]:
    """Reading-to-score latency (ms) with readings produced at ``rate`` per second into
    the readings topic and read back from the scores topic (or ``topics``: both)."""
    source, target = topics or (settings.kafka.topics.readings, settings.kafka.topics.scores)
    reader = ReadingConsumer(
        settings.kafka.bootstrap_servers,
        f"bench-latency-{uuid.uuid4().hex[:8]}",
        [target],
        config={
            **settings.kafka.extra,
            "auto.offset.reset": "latest",
            "session.timeout.ms": 6000,
        },
    )
    latencies: list[float] = []
    phase_start_ms = time.time_ns() // 1_000_000
    done = threading.Event()

    def read() -> None:
        while not done.is_set():
            for message in reader.poll_batch(1000, 0.1):
                record = json.loads(message.value)
                if record["ts_ms"] >= phase_start_ms:
                    latencies.append(time.time_ns() / 1e6 - record["ts_ms"])

    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    time.sleep(3.0)  # let the reader join and reach the end of the topic
    # The load generator gets a process of its own, so that it does not share the reader's GIL.
    context = multiprocessing.get_context("spawn")
    with context.Pool(1) as pool:
        sent = pool.apply(
            paced_readings, (settings.kafka.bootstrap_servers, source, sensors, rate, seconds)
        )
    time.sleep(3.0)  # the last windows' scores
    done.set()
    thread.join(5)
    reader.close()
    values = np.array(latencies)
    return {
        "rate_readings_per_s": round(rate, 1),
        "seconds": round(seconds, 1),
        "readings": sent,
        # Every sensor's window is full already: one score per `stride` of its readings,
        # which fall at its own phase of the stride, so its count is within one of its
        # share and the fleet's is about `sent / stride`.
        "scores_expected": round(sent / settings.stride),
        "scores": len(values),
        "p50_ms": round(float(np.percentile(values, 50)), 1) if len(values) else None,
        "p99_ms": round(float(np.percentile(values, 99)), 1) if len(values) else None,
    }


def relay(
    consumer_config: dict[str, Any],
    producer_config: dict[str, Any],
    source: str,
    target: str,
    poll_batch_size: int,
    stride: int,
    spread: bool,
) -> None:
    """Pass readings through until terminated: one record per ``stride`` readings of a
    sensor (at its phase when ``spread``, as the worker's windows), stamped with that
    reading's ts, produced as soon as it is polled."""
    consumer = ReadingConsumer(
        consumer_config["bootstrap.servers"],
        consumer_config["group.id"],
        [source],
        config=consumer_config,
    )
    producer = Producer(producer_config)
    counts: dict[str, int] = {}
    while True:
        for message in consumer.poll_batch(poll_batch_size, 0.1):
            reading = json.loads(message.value)
            sensor_id = reading["sensor_id"]
            counts[sensor_id] = counts.get(sensor_id, 0) + 1
            phase = stride_phase(sensor_id, stride) if spread else 0
            if (counts[sensor_id] + phase) % stride == 0:
                record = {"sensor_id": sensor_id, "ts_ms": reading["ts"]}
                producer.produce(target, json.dumps(record).encode(), sensor_id.encode())
        producer.poll(0)


@contextlib.contextmanager
def relaying(settings: Settings, source: str, target: str) -> Iterator[None]:
    """A `relay` process from ``source`` to ``target`` while the context lasts."""
    relay_settings = settings.model_copy(
        update={"kafka": settings.kafka.model_copy(update={"group_id": f"{target}-relay"})}
    )
    context = multiprocessing.get_context("spawn")
    process = context.Process(
        target=relay,
        args=(
            kafka_consumer_config(relay_settings),
            kafka_producer_config(relay_settings),
            source,
            target,
            settings.kafka.poll_batch_size,
            settings.stride,
            settings.stride_phase == "spread",
        ),
        daemon=True,
    )
    process.start()
    try:
        time.sleep(5.0)  # let the relay join its group
        yield
    finally:
        process.terminate()
        process.join(10)


def wait_until_idle(port: int, quiet_s: float = 2.0, timeout_s: float = 120.0) -> None:
    """Until the worker has scored nothing new for ``quiet_s``: no backlog from a phase before."""
    deadline = time.monotonic() + timeout_s
    last, since = -1.0, time.monotonic()
    while time.monotonic() < deadline:
        scored = metric_value(port, "detector_windows_scored_total")
        if scored != last:
            last, since = scored, time.monotonic()
        elif time.monotonic() - since >= quiet_s:
            return
        time.sleep(0.2)


def latency_totals(port: int) -> dict[str, tuple[float, float]]:
    """(sum, count) of the worker's end-to-end latency histogram and of each stage's."""
    samples = metric_samples(port) or {}

    def total(name: str, stage: str | None = None) -> float:
        return sum(v for labels, v in samples.get(name, []) if labels.get("stage") == stage)

    totals = {
        "end_to_end": tuple(total(f"detector_end_to_end_seconds_{s}") for s in ("sum", "count"))
    }
    for stage in STAGES:
        totals[stage] = tuple(total(f"detector_stage_seconds_{s}", stage) for s in ("sum", "count"))
    return totals


def latency_phase(settings: Settings, sensors: int, rate: float, seconds: float) -> dict[str, Any]:
    """``latency_at``, plus the worker's own mean end-to-end latency over the same phase
    (a window's newest reading entering Kafka to its score's acknowledgement) and the
    mean of each stage of it (``detector_stage_seconds``)."""
    port = settings.metrics_port
    wait_until_idle(port)
    before = latency_totals(port)
    result = latency_at(settings, sensors, rate, seconds)
    after = latency_totals(port)
    means = {}
    for name in after:
        seconds_spent, count = (a - b for a, b in zip(after[name], before[name], strict=True))
        means[name] = round(1000 * seconds_spent / count, 1) if count else None
    result["worker_mean_ms"] = means.pop("end_to_end")
    result["worker_stage_mean_ms"] = means
    return result


def redis_bytes(redis_url: str, prefix: str, sensors: int, sample: int = 100) -> dict[str, float]:
    """Mean MEMORY USAGE of a sensor's window and alert state (a sample of sensors)."""
    # A measurement, not part of the product: windows.py stays the only Redis user there.
    client = redis.Redis.from_url(redis_url)
    store = WindowStore(client, window_length=1, key_prefix=prefix)  # only for key names
    ids = [f"sensor-{i:05d}" for i in np.linspace(0, sensors - 1, sample).astype(int)]
    store.locate(ids)
    window = [client.memory_usage(store.window_key(s), samples=0) or 0 for s in ids]
    state = [client.memory_usage(store.alert_key(s), samples=0) or 0 for s in ids]
    client.close()
    return {
        "window": round(float(np.mean(window)), 1),
        "alert_state": round(float(np.mean(state)), 1),
        "total": round(float(np.mean(window) + np.mean(state)), 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sensors", type=int, default=1000)
    parser.add_argument("--model", choices=["tiny", "smollm2"], default="tiny")
    parser.add_argument("--window-length", type=int, default=128)
    parser.add_argument("--stride", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument(
        "--latency-seconds",
        type=float,
        default=20.0,
        help="length of each latency phase, at least long enough for every sensor to make "
        "two windows due at that rate (default 20)",
    )
    parser.add_argument(
        "--latency-fractions",
        type=lambda text: [float(x) for x in text.split(",") if x],
        default=[0.5, 0.25],
        help="shares of the measured capacity to measure latency at (default 0.5,0.25; "
        "empty: none)",
    )
    parser.add_argument(
        "--latency-rates",
        type=lambda text: [float(x) for x in text.split(",") if x],
        default=[],
        help="also measure latency at these rates (readings/s), whatever the capacity: "
        "runs of two versions compared at one load",
    )
    parser.add_argument("--bootstrap", help="an existing broker (default: embedded tansu)")
    parser.add_argument("--redis", help="an existing Redis URL (default: embedded)")
    parser.add_argument(
        "--torch-threads",
        type=int,
        default=1,
        help="intra-op threads (default 1: on a shared CPU, more threads than free cores "
        "make small batches an order of magnitude slower)",
    )
    parser.add_argument(
        "--fetch-wait-ms",
        type=int,
        default=10,
        help="librdkafka fetch.wait.max.ms for every consumer (tansu holds a fetch for about "
        "200 ms when no new data is there instead of answering when data arrives)",
    )
    parser.add_argument(
        "--poll-batch-size",
        type=int,
        default=KafkaSettings.model_fields["poll_batch_size"].default,
        help="DETECTOR_KAFKA__POLL_BATCH_SIZE (default: the worker's)",
    )
    parser.add_argument(
        "--batch-deadline-ms", type=int, default=50, help="DETECTOR_BATCH_DEADLINE_MS"
    )
    parser.add_argument(
        "--stride-phase",
        choices=["spread", "aligned"],
        default=Settings.model_fields["stride_phase"].default,
        help="DETECTOR_STRIDE_PHASE (default: the worker's, spread); the load generator "
        "samples every sensor in lockstep, so aligned strides make all windows due at once",
    )
    parser.add_argument(
        "--trace-model",
        action=argparse.BooleanOptionalAction,
        default=Settings.model_fields["trace_model"].default,
        help="DETECTOR_TRACE_MODEL (default: the worker's, on)",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="sample the worker with py-spy during the end-to-end phase (needs py-spy and "
        "ptrace rights) and record where its time goes",
    )
    parser.add_argument(
        "--profile-stacks",
        type=Path,
        help="with --profile, also keep the sampled stacks (py-spy's collapsed format, for "
        "a flame graph) in this file",
    )
    parser.add_argument(
        "--score-terms",
        nargs="+",
        choices=SCORE_TERMS,
        default=list(DEFAULT_SCORE_TERMS),
        help="the model's fused terms (default: the product's): versions of the score "
        "compared in one checkout",
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(args.torch_threads)

    readings_per_sensor = args.window_length * 2
    windows = args.sensors * ((readings_per_sensor - args.window_length) // args.stride + 1)
    run_id = uuid.uuid4().hex[:8]
    load_before = os.getloadavg()
    with contextlib.ExitStack() as stack, tempfile.TemporaryDirectory() as tmp:
        bootstrap = args.bootstrap or stack.enter_context(EmbeddedKafka()).bootstrap_servers
        redis_url = args.redis or stack.enter_context(EmbeddedRedis()).url
        topics = KafkaTopics(
            readings=f"bench-{run_id}-readings",
            scores=f"bench-{run_id}-scores",
            alerts=f"bench-{run_id}-alerts",
            dead_letters=f"bench-{run_id}-dlq",
        )
        relayed = (f"bench-{run_id}-relay-in", f"bench-{run_id}-relay-out")
        create_topics(bootstrap, [topics.readings, relayed[0]], PARTITIONS)
        create_topics(bootstrap, [topics.scores, topics.alerts, topics.dead_letters, relayed[1]], 1)
        model_dir = Path(tmp) / "models"
        model = build_model(args.model, args.window_length, tuple(args.score_terms))
        # A threshold no score reaches: the benchmark measures scoring, not alert storms.
        store.publish_version(
            model_dir, "default", model, thresholds={"default": {"threshold": 1e9}}
        )
        prefix = f"bench-{run_id}"
        settings = Settings(
            kafka={
                "bootstrap_servers": bootstrap,
                "group_id": f"bench-{run_id}-worker",
                "topics": topics,
                "session_timeout_ms": 6000,
                "extra": {"fetch.wait.max.ms": str(args.fetch_wait_ms)},
                "poll_batch_size": args.poll_batch_size,
            },
            redis=RedisSettings(url=redis_url, key_prefix=prefix),
            model=ModelSettings(store=str(model_dir)),
            window_length=args.window_length,
            stride=args.stride,
            stride_phase=args.stride_phase,
            batch_size=args.batch_size,
            batch_deadline_ms=args.batch_deadline_ms,
            trace_model=args.trace_model,
            metrics_port=free_port(),
            log_level="WARNING",
        )
        print(f"producing {args.sensors} sensors x {readings_per_sensor} readings ...", flush=True)
        readings = produce_backlog(bootstrap, topics.readings, args.sensors, readings_per_sensor)
        print("bare consume loop ...", flush=True)
        bare = bare_consume(bootstrap, topics.readings, readings, args.fetch_wait_ms)
        print("model only ...", flush=True)
        model_windows = model_only(model_dir, settings)
        print("end to end ...", flush=True)
        worker = start_worker(settings, Path(tmp) / "worker.log", args.torch_threads)
        try:
            collapsed = Path(tmp) / "worker.collapsed"
            sampling = (worker.pid, collapsed) if args.profile else None
            e2e_windows = end_to_end(settings, windows, sampling)
            e2e = e2e_windows * args.stride  # readings/s, as model_only's
            batches = worker_batches(settings.metrics_port)
            latency, relay_latency = {}, {}
            with relaying(settings, *relayed):
                phases = [
                    (f"{fraction:.0%}", e2e * fraction) for fraction in args.latency_fractions
                ]
                phases += [(f"{rate:.0f}/s", rate) for rate in args.latency_rates]
                for name, rate in phases:
                    print(f"latency at {name} ({rate:.0f} readings/s) ...", flush=True)
                    seconds = max(args.latency_seconds, 2 * args.stride * args.sensors / rate)
                    latency[name] = latency_phase(settings, args.sensors, rate, seconds)
                    relay_latency[name] = latency_at(settings, args.sensors, rate, seconds, relayed)
        finally:
            worker.send_signal(signal.SIGTERM)
            worker.wait(60)
        memory = redis_bytes(redis_url, prefix, args.sensors)
        profile = profile_summary(collapsed) if args.profile else None
        if args.profile and args.profile_stacks:
            shutil.copyfile(collapsed, args.profile_stacks)

    model_readings = model_windows * args.stride
    result: dict[str, Any] = {
        "benchmark": "e2e_throughput",
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "load_average_before": [round(x, 2) for x in load_before],
            "device": str(resolve_device(settings.device)),
            "torch_threads": torch.get_num_threads(),
        },
        "setup": {
            "model": args.model,
            "score_terms": list(model.config.score_terms),
            "sensors": args.sensors,
            "readings": readings,
            "windows": windows,
            "window_length": args.window_length,
            "stride": args.stride,
            "batch_size": args.batch_size,
            "partitions": PARTITIONS,
            "broker": "embedded tansu" if not args.bootstrap else "external",
            "fetch_wait_max_ms": args.fetch_wait_ms,
            "poll_batch_size": args.poll_batch_size,
            "batch_deadline_ms": args.batch_deadline_ms,
            "stride_phase": args.stride_phase,
            "trace_model": args.trace_model,
        },
        "readings_per_s": {
            "end_to_end": round(e2e, 1),
            "bare_consume": round(bare, 1),
            "model_only": round(model_readings, 1),
        },
        "windows_per_s": {
            "end_to_end": round(e2e_windows, 1),
            "model_only": round(model_windows, 1),
        },
        "ratios": {
            "end_to_end_vs_bare_consume": round(e2e / bare, 3),
            "end_to_end_vs_model_only": round(e2e / model_readings, 3),
        },
        "reading_to_score_latency_at_fraction_of_capacity": latency,
        # The same rates through a pass-through relay (no Redis, no model): the path's floor.
        "relay_latency_at_fraction_of_capacity": relay_latency,
        "redis_bytes_per_sensor": memory,
        # During the end-to-end phase: windows per batch, and the scoring's own rate.
        "worker_batches": batches,
        "worker_profile": profile,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
