"""The whole pipeline on one machine: ``python -m stream_detector demo``.

1. Brokers: the configured Kafka and Redis (DETECTOR_KAFKA__BOOTSTRAP_SERVERS,
   DETECTOR_REDIS__URL), or an embedded tansu broker and redis-server on free ports when
   none is configured. Topics and Redis keys are named per run, so nothing else is touched.
2. Model: a real NAB series that ships with the package (or ``--series``); the part before
   its first labelled anomaly goes to ``python -m trainer fit`` (the SmolLM2 backbone,
   thresholds as the trainer fits them), as the retraining CronJob would run it. The
   result is cached under ``<out>/cache`` (keyed by data, settings and package version)
   and published to the model store ``<out>/models``.
3. Replay: a worker runs in a thread; once it serves the model and owns the readings'
   partitions, the rest of the series goes through the readings topic at ``--speed``
   readings/s, with a few invalid messages mixed in, and the alerts it publishes are
   printed as they arrive.
4. Report: ``<out>/plot.png`` (series, score, threshold, alerts, labels) and
   ``<out>/summary.json``; everything started is stopped.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import logging
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console

from stream_detector import store, worker
from stream_detector.checkpoint import read_metadata
from stream_detector.config import (
    AlertPolicy,
    KafkaTopics,
    ModelSettings,
    RedisSettings,
    Settings,
)
from stream_detector.consumer import ReadingConsumer
from stream_detector.devtools.services import EmbeddedKafka, EmbeddedRedis, create_topics, free_port
from stream_detector.devtools.workers import serving_partitions
from stream_detector.model import SMOLLM2
from stream_detector.publisher import ReadingProducer
from stream_detector.series_files import DataFormatError, nab_windows_for, read_csv
from stream_detector.subscriber import Deduplicator, format_line, parse_event
from stream_detector.windows import due_ends

logger = logging.getLogger(__name__)

DATA_DIR = Path(__file__).parent / "data"
DEFAULT_SERIES = DATA_DIR / "ec2_request_latency_system_failure.csv"
LABELS_FILE = DATA_DIR / "nab_combined_windows.json"
MODEL_NAME = "demo"
WINDOW_LENGTH = 64
STRIDE = 4
SENSOR_ID = "nab"  # the replayed series' sensor (the invalid messages name it too)
# The demo's model: windows of 64 readings in 8 patches (``trainer fit --model-config``).
MODEL_OVERRIDES = {"patch_length": 8, "patch_stride": 8}
# Invalid messages mixed into the replay, at these fractions of it, to show the dead letters.
INVALID_MESSAGES = {
    0.25: b'{"sensor_id": "nab", "ts": "yesterday", "value": 1.0}',
    0.5: b'{"sensor_id": "nab", "ts": 1395000000000, "value": NaN}',
    0.75: b"not json at all",
}
FINISH_TIMEOUT_S = 120.0
# Empty polls in a row (0.2 s each) after which the stopped worker's outputs are all read.
QUIET_POLLS = 5
READY_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class Series:
    """A univariate NAB-style series and its labelled anomaly windows."""

    name: str
    ts_ms: np.ndarray  # (T,) int64, epoch milliseconds
    values: np.ndarray  # (T,) float32
    labelled: list[tuple[int, int]]  # [start_ms, end_ms] per anomaly window
    source_sha256: str

    @property
    def train_end(self) -> int:
        """Rows before this index train the model: all before the first labelled anomaly."""
        if not self.labelled:
            return len(self.values) * 3 // 10
        return int(np.searchsorted(self.ts_ms, self.labelled[0][0]))


def load_series(path: Path) -> Series:
    """Read a one-sensor CSV (``timestamp,value``); labels come from NAB's windows file
    when it names the file (or when the file lies in a NAB folder)."""
    found = read_csv(path, ["value"])
    if len(found) != 1:
        raise DataFormatError(f"{path} holds {len(found)} sensors; the demo replays one")
    (rows,) = found.values()
    labelled = nab_windows_for(path, LABELS_FILE)
    return Series(
        name=path.name,
        ts_ms=rows.ts_ms,
        values=rows.values[:, 0].astype(np.float32),
        labelled=labelled[1] if labelled else [],
        source_sha256=hashlib.sha256(path.read_bytes()).hexdigest(),
    )


def _cache_key(series: Series, backbone: str, profile_name: str) -> str:
    parts = {
        "series": series.source_sha256,
        "train_end": series.train_end,
        "backbone": backbone,
        "profile": profile_name,
        "model": MODEL_OVERRIDES,
        "window_length": WINDOW_LENGTH,
        "stride": STRIDE,
        # A new release of the package may train differently.
        "version": metadata.version("stream-detector"),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def train_model(
    series: Series, out: Path, backbone: str, profile_name: str, console: Console
) -> tuple[str, float, bool]:
    """Train with ``python -m trainer fit`` (or reuse the cached result) and publish it to
    ``<out>/models`` as CURRENT; (version, threshold, cached).

    The trainer runs as a command, as the CronJob runs it: the detector package never
    imports the trainer. It trains on the readings before the first labelled anomaly.
    """
    cache = out / "cache" / _cache_key(series, backbone, profile_name)
    trained = store.current_version(cache / "models", MODEL_NAME)
    cached = trained is not None
    if cached:
        console.print(f"\\[demo] reusing the model trained in {cache}")
    else:
        cache.mkdir(parents=True, exist_ok=True)
        train_csv = cache / "train.csv"
        with train_csv.open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["timestamp", "value"])
            end = series.train_end
            writer.writerows(
                zip(series.ts_ms[:end].tolist(), series.values[:end].tolist(), strict=True)
            )
        (cache / "model.json").write_text(json.dumps(MODEL_OVERRIDES))
        console.print(
            f"\\[demo] python -m trainer fit on the first {series.train_end} readings of "
            f"{series.name} ({backbone}, profile {profile_name!r}); this takes a minute or two"
        )
        started = time.perf_counter()
        command = [
            sys.executable, "-m", "trainer", "fit",
            "--from-files", str(train_csv),
            "--store", str(cache / "models"),
            "--model", MODEL_NAME,
            "--profile", profile_name,
            "--backbone", SMOLLM2 if backbone == "smollm2" else backbone,
            "--window-length", str(WINDOW_LENGTH),
            "--model-config", str(cache / "model.json"),
            "--report", str(cache / "report.json"),
            "--quiet",
        ]  # fmt: skip
        environment = {
            **os.environ,
            "DETECTOR_WINDOW_LENGTH": str(WINDOW_LENGTH),
            "DETECTOR_STRIDE": str(STRIDE),
        }
        result = subprocess.run(command, env=environment, capture_output=True, text=True)
        trained = store.current_version(cache / "models", MODEL_NAME)
        if result.returncode != 0 or trained is None:
            raise RuntimeError(
                f"python -m trainer fit failed (exit {result.returncode}):\n{result.stderr[-3000:]}"
            )
        console.print(f"\\[demo] trained in {time.perf_counter() - started:.0f} s")
    checkpoint = store.version_dir(cache / "models", MODEL_NAME, trained)
    threshold = json.loads((checkpoint / "thresholds.json").read_text())["default"]["threshold"]
    # A version's name ends with its weights' sha256: already published when CURRENT matches.
    sha = read_metadata(checkpoint)["weights_sha256"]
    current = store.current_version(out / "models", MODEL_NAME)
    if current is not None and current.endswith(sha[:8]):
        return current, threshold, cached
    return store.publish_version(out / "models", MODEL_NAME, checkpoint), threshold, cached


@contextlib.contextmanager
def _services(base: Settings, console: Console) -> Iterator[tuple[str, str]]:
    """(bootstrap servers, Redis URL): the configured ones, or embedded ones for the run."""
    with contextlib.ExitStack() as stack:
        if "bootstrap_servers" in base.kafka.model_fields_set:
            bootstrap = base.kafka.bootstrap_servers
        else:
            bootstrap = stack.enter_context(EmbeddedKafka()).bootstrap_servers
            console.print(f"\\[demo] started an embedded Kafka-compatible broker at {bootstrap}")
        if "url" in base.redis.model_fields_set:
            redis_url = base.redis.url.get_secret_value()
        else:
            redis_url = stack.enter_context(EmbeddedRedis()).url
            console.print(f"\\[demo] started redis-server at {redis_url}")
        yield bootstrap, redis_url


@dataclass
class Observed:
    """What came out of the pipeline, collected by the watcher thread."""

    scores: dict[int, tuple[float, float | None]] = field(default_factory=dict)  # ts -> s, thr
    first_window_start_ms: int | None = None
    score_arrival_s: dict[int, float] = field(default_factory=dict)
    alerts: list[dict[str, Any]] = field(default_factory=list)
    dead_letters: list[str] = field(default_factory=list)


def _watch(settings: Settings, observed: Observed, console: Console, stop: threading.Event) -> None:
    topics = settings.kafka.topics
    consumer = ReadingConsumer(
        settings.kafka.bootstrap_servers,
        f"{settings.kafka.group_id}-watch",
        [topics.scores, topics.alerts, topics.dead_letters],
        config={**settings.kafka.extra, "session.timeout.ms": settings.kafka.session_timeout_ms},
    )
    seen = Deduplicator()
    quiet_polls = 0  # empty polls in a row since ``stop``
    try:
        # ``stop`` comes once the worker has stopped, every output of its published: read
        # on until nothing more arrives, so the last alert events are shown too.
        while not stop.is_set() or quiet_polls < QUIET_POLLS:
            batch = consumer.poll_batch(1000, 0.2)
            quiet_polls = quiet_polls + 1 if stop.is_set() and not batch else 0
            for message in batch:
                if message.topic == topics.scores:
                    record = json.loads(message.value)
                    observed.scores[record["ts_ms"]] = (record["score"], record["threshold"])
                    observed.score_arrival_s.setdefault(record["ts_ms"], time.time())
                    start = record["window_start_ts_ms"]
                    if (
                        observed.first_window_start_ms is None
                        or start < observed.first_window_start_ms
                    ):
                        observed.first_window_start_ms = start
                elif message.topic == topics.alerts:
                    event = parse_event(message.value)
                    if seen.first_time(event.event_id):
                        observed.alerts.append(json.loads(message.value))
                        console.print(format_line(event))
                else:
                    reason = dict(message.headers).get("reason", b"").decode()
                    observed.dead_letters.append(reason)
                    console.print(f"[dim]dead letter: {reason}[/]")
    finally:
        consumer.close()


def _replay(
    series: Series,
    first: int,
    settings: Settings,
    speed: float,
    stop: threading.Event,
) -> dict[int, float]:
    """Send readings first.. at ``speed`` per second; return the wall time each ts left."""
    producer = ReadingProducer(settings.kafka.bootstrap_servers, settings.kafka.topics.readings)
    sent_at: dict[int, float] = {}
    count = len(series.values) - first
    invalid = {first + int(fraction * count): value for fraction, value in INVALID_MESSAGES.items()}
    started = time.monotonic()
    for offset, row in enumerate(range(first, len(series.values))):
        if stop.is_set():
            break
        delay = started + offset / speed - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        if row in invalid:
            producer.send(SENSOR_ID.encode(), invalid[row])
        ts_ms = int(series.ts_ms[row])
        value = {"sensor_id": SENSOR_ID, "ts": ts_ms, "value": float(series.values[row])}
        producer.send(SENSOR_ID.encode(), json.dumps(value).encode())
        sent_at[ts_ms] = time.time()
    producer.flush()
    return sent_at


def _demo_settings(base: Settings, bootstrap: str, redis_url: str, out: Path) -> Settings:
    run_id = uuid.uuid4().hex[:8]
    prefix = f"demo-{run_id}"
    kafka = base.kafka.model_copy(
        update={
            "bootstrap_servers": bootstrap,
            "group_id": f"{prefix}-worker",
            "topics": KafkaTopics(
                readings=f"{prefix}-readings",
                scores=f"{prefix}-scores",
                alerts=f"{prefix}-alerts",
                dead_letters=f"{prefix}-dead-letters",
            ),
            # Quick group joins: the broker is ours, or at least the topics are.
            "session_timeout_ms": 6000,
        }
    )
    return Settings(
        kafka=kafka,
        redis=RedisSettings(url=redis_url, key_prefix=f"{prefix}:"),
        model=ModelSettings(
            store=str(out / "models"), default_model=MODEL_NAME, current_poll_interval_s=2.0
        ),
        alerts=AlertPolicy(),
        window_length=WINDOW_LENGTH,
        stride=STRIDE,
        batch_size=64,
        batch_deadline_ms=50,
        device=base.device,
        mixed_precision=base.mixed_precision,
        metrics_port=free_port(),
        log_level="WARNING",
    )


def _expected_last_ts(series: Series, first: int, settings: Settings) -> int:
    """End of the last window the worker will score (``windows.due_ends`` of the sensor's
    accepted readings).

    A reading whose timestamp repeats the previous one is dropped by the window store (NAB
    files have a few), so it does not count.
    """
    ts = series.ts_ms[first:]
    accepted = ts[np.concatenate([[True], ts[1:] > np.maximum.accumulate(ts)[:-1]])]
    spread = settings.stride_phase == "spread"
    ends = due_ends(SENSOR_ID, len(accepted), WINDOW_LENGTH, STRIDE, spread)
    return int(accepted[ends[-1]])


def run(
    *,
    out: Path,
    speed: float,
    series: Path | None,
    backbone: str,
    profile: str,
    stop: threading.Event,
) -> int:
    """Run the demo; 0 when every reading made it through the pipeline."""
    console = Console(highlight=False)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    out.mkdir(parents=True, exist_ok=True)
    data = load_series(series or DEFAULT_SERIES)
    version, threshold, cached = train_model(data, out, backbone, profile, console)
    first = max(0, data.train_end - (WINDOW_LENGTH - 1))  # the first window ends at train_end
    observed = Observed()
    with _services(Settings(), console) as (bootstrap, redis_url):
        settings = _demo_settings(Settings(), bootstrap, redis_url, out)
        topics = settings.kafka.topics
        create_topics(
            bootstrap, [topics.readings, topics.scores, topics.alerts, topics.dead_letters]
        )
        worker_stop, watch_stop = threading.Event(), threading.Event()
        threads = [
            threading.Thread(target=worker.run, args=(settings, worker_stop), name="worker"),
            threading.Thread(
                target=_watch, args=(settings, observed, console, watch_stop), name="watch"
            ),
        ]
        for thread in threads:
            thread.start()
        # The replay starts on a running worker, as a stream would: readings sent while it
        # loads its model and joins its group would time its start-up as their latency.
        ready_s = _wait_for_worker(settings.metrics_port, stop)
        if ready_s is not None:
            console.print(f"\\[demo] the worker was ready, with its partitions, in {ready_s:.1f} s")
        elif not stop.is_set():
            console.print(
                f"[yellow]\\[demo] the worker owns no partition after {READY_TIMEOUT_S:.0f} s; "
                "replaying anyway[/]"
            )
        console.print(
            f"\\[demo] model {MODEL_NAME} {version} (threshold {threshold:.3f}); replaying "
            f"{len(data.values) - first} readings at {speed:.0f}/s; metrics on "
            f"http://127.0.0.1:{settings.metrics_port}/metrics"
        )
        sent_at: dict[int, float] = {}
        finished = False
        try:
            sent_at = _replay(data, first, settings, speed, stop)
            last_ts = _expected_last_ts(data, first, settings)
            deadline = time.monotonic() + FINISH_TIMEOUT_S
            while last_ts not in observed.scores and time.monotonic() < deadline:
                if stop.wait(0.2):
                    break
            finished = last_ts in observed.scores
        finally:
            worker_stop.set()
            threads[0].join(60)
            watch_stop.set()
            threads[1].join(30)
    summary = _summary(data, first, observed, sent_at, version, threshold, cached, finished)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    _plot(data, first, observed, threshold, out / "plot.png")
    console.print(
        f"\\[demo] {summary['readings_in']} readings in, {summary['readings_scored']} scored "
        f"in {summary['windows_scored']} windows, {summary['dead_letters']} dead letters, "
        f"{len(observed.alerts)} alert events; "
        f"latency p50 {summary['latency_ms']['p50']} ms, p99 {summary['latency_ms']['p99']} ms"
    )
    console.print(f"\\[demo] wrote {out / 'summary.json'} and {out / 'plot.png'}")
    if not finished:
        console.print("[red]\\[demo] the pipeline did not score the last window in time[/]")
    return 0 if finished else 1


def _wait_for_worker(port: int, stop: threading.Event) -> float | None:
    """Seconds until the worker on ``port`` is ready and owns partitions (None: not within
    ``READY_TIMEOUT_S``, or stopped)."""
    started = time.monotonic()
    while time.monotonic() - started < READY_TIMEOUT_S:
        if serving_partitions(port, timeout_s=1.0):
            return time.monotonic() - started
        if stop.wait(0.2):
            return None
    return None


def _summary(
    data: Series,
    first: int,
    observed: Observed,
    sent_at: dict[int, float],
    version: str,
    threshold: float,
    cached: bool,
    finished: bool,
) -> dict[str, Any]:
    latencies = [
        (observed.score_arrival_s[ts] - sent_at[ts]) * 1000
        for ts in observed.score_arrival_s
        if ts in sent_at
    ]
    scored_span = (observed.first_window_start_ms, max(observed.scores, default=None))
    readings_scored = (
        sum(scored_span[0] <= ts <= scored_span[1] for ts in sent_at)
        if None not in scored_span
        else 0
    )
    return {
        "series": data.name,
        "finished": finished,
        "readings_in": len(sent_at) + len(INVALID_MESSAGES),
        "readings_valid": len(sent_at),
        "readings_scored": readings_scored,  # valid readings inside a scored window
        "windows_scored": len(observed.scores),
        "dead_letters": len(observed.dead_letters),
        "dead_letter_reasons": observed.dead_letters,
        "alerts": observed.alerts,
        "labelled_anomalies": [[s, e] for s, e in data.labelled if e >= data.ts_ms[first]],
        "latency_ms": {
            "p50": round(float(np.percentile(latencies, 50)), 1) if latencies else None,
            "p99": round(float(np.percentile(latencies, 99)), 1) if latencies else None,
        },
        "model_version": version,
        "model_cached": cached,
        "threshold": threshold,
        "train_rows": data.train_end,
    }


def _plot(data: Series, first: int, observed: Observed, threshold: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.dates as mdates
    import matplotlib.pyplot as plt

    def when(ts_ms: Any) -> Any:
        return np.asarray(ts_ms, dtype="datetime64[ms]")

    figure, (top, bottom) = plt.subplots(2, 1, figsize=(13, 6), sharex=True)
    top.plot(when(data.ts_ms[first:]), data.values[first:], lw=0.6, color="tab:blue")
    top.set_ylabel("value")
    top.set_title(f"{data.name}: replayed readings, labelled anomalies (grey), alerts (red)")
    score_ts = sorted(observed.scores)
    bottom.plot(when(score_ts), [observed.scores[t][0] for t in score_ts], lw=0.8, color="k")
    bottom.axhline(threshold, color="tab:red", ls="--", lw=1, label=f"threshold {threshold:.2f}")
    bottom.set_ylabel("anomaly score")
    bottom.legend(loc="upper left")
    for start, end in data.labelled:
        for axis in (top, bottom):
            axis.axvspan(when(start), when(end), color="0.85", zorder=0)
    resolved = {a["alert_id"]: a for a in observed.alerts if a["state"] == "resolved"}
    for alert in observed.alerts:
        if alert["state"] != "open":
            continue
        end = resolved.get(alert["alert_id"], {}).get("end_ts_ms") or score_ts[-1]
        for axis in (top, bottom):
            axis.axvspan(when(alert["start_ts_ms"]), when(end), color="tab:red", alpha=0.25)
    bottom.xaxis.set_major_formatter(mdates.DateFormatter("%m-%d"))
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
