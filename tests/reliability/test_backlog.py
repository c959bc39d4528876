"""A backlog of a million readings: worked off in bounded memory, lag rises then falls to 0.

The worker runs as a subprocess so that its resident memory can be sampled from
``/proc``. The whole backlog is on the topic before the worker that works it off starts,
so the lag starts at a million whatever the machine's speed; a first worker of the same
settings, started and stopped on the empty topic, gives the idle memory.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from stream_detector import store
from stream_detector.config import Settings
from stream_detector.devtools import loadgen
from stream_detector.devtools.workers import (
    metric_samples,
    rss_mib,
    serving_partitions,
    start_worker,
)
from tests.conftest import Topics
from tests.reliability.harness import (
    final_windows,
    reference,
    results_file,
    stop_worker,
    verify,
)
from tests.worker_support import (
    MODEL,
    STEP_MS,
    T0_MS,
    WINDOW,
    OutputReader,
    TrainedModel,
    make_plan,
    produce,
    wait_for,
)

pytestmark = pytest.mark.integration

SENSORS = 1000
READINGS = 1000  # per sensor: 1M in all
STRIDE = WINDOW  # one window per 32 readings keeps the scoring share small
# Long enough to span several windows, so that k-of-n confirmation opens an alert.
ANOMALIES = (
    loadgen.InjectedAnomaly("s-00001", T0_MS + 400 * STEP_MS, T0_MS + 520 * STEP_MS, 1.5),
    loadgen.InjectedAnomaly("s-00500", T0_MS + 700 * STEP_MS, T0_MS + 800 * STEP_MS, 1.5),
)
# Anonymous resident memory may grow this much above the idle worker's while it works off
# the backlog: librdkafka's pre-fetch queue (queued.max.messages.kbytes, 64 MiB by default)
# plus one poll batch of decoded readings and windows. Anonymous, because the pages of
# mapped libraries (torch's are most of VmRSS) come and go with the machine's memory
# pressure: a CI run measured an idle VmRSS of 250 MiB where this machine measures 417.
RSS_GROWTH_BOUND_MB = 256


def total_lag(port: int) -> float | None:
    """Sum of the worker's per-partition lag gauges; None when it reports none yet."""
    samples = (metric_samples(port) or {}).get("detector_consumer_lag_messages", [])
    return sum(value for _, value in samples) if samples else None


class Sampler:
    """Samples a worker's memory and lag every ``interval_s`` in a thread."""

    def __init__(self, pid: int, port: int, interval_s: float = 0.5) -> None:
        self.samples: list[dict[str, float | None]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(pid, port, interval_s))
        self._started = time.monotonic()

    def _run(self, pid: int, port: int, interval_s: float) -> None:
        while not self._stop.wait(interval_s):
            self.samples.append(
                {
                    "t_s": round(time.monotonic() - self._started, 2),
                    "rss_mb": rss_mib(pid),
                    "anon_mb": rss_mib(pid, "RssAnon"),
                    "lag": total_lag(port),
                }
            )

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def idle_rss_mib(settings: Settings, log: Path) -> float | None:
    """Anonymous resident memory of a worker that joined its group and has nothing to read.

    Stopped only once it owns partitions: a consumer that leaves while its first join is
    under way leaves tansu's group unjoinable for the worker that comes next.
    """
    process = start_worker(settings, log)
    port = settings.metrics_port
    try:
        wait_for(lambda: serving_partitions(port), 90, "the worker to be ready and join")
        return rss_mib(process.pid, "RssAnon")
    finally:
        stop_worker(process, log)


def test_a_backlog_of_a_million_readings_is_worked_off_in_bounded_memory(
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
    plan = make_plan(SENSORS, READINGS, ANOMALIES)
    version = store.current_version(model_store, MODEL)
    assert version is not None
    ref = reference(plan, trained, version, STRIDE)
    # The lag query's timeout is its interval (up to 5 s): a shorter one can miss tansu's
    # answers on a busy machine, leaving the gauge empty.
    settings = settings_for(model_store, kafka={"lag_interval_s": 3.0})
    settings = settings.model_copy(update={"stride": STRIDE})
    port = settings.metrics_port
    idle_mb = idle_rss_mib(settings, tmp_path / "idle-worker.log")
    started = time.monotonic()
    produce(kafka_bootstrap, topics.readings, plan)
    produced_s = time.monotonic() - started
    log = tmp_path / "worker.log"
    process = start_worker(settings, log)
    try:
        with Sampler(process.pid, port) as sampler:
            started = time.monotonic()
            try:
                reader.read_until(lambda o: set(ref.scores) <= o.scored(), timeout_s=900)
                worked_off_s = time.monotonic() - started
                wait_for(lambda: total_lag(port) == 0, 60, "the lag to fall back to 0")
            except AssertionError as error:
                samples = metric_samples(port) or {}
                progress = {
                    name: samples.get(name)
                    for name in ("detector_readings_total", "detector_windows_scored_total")
                }
                raise AssertionError(
                    f"{error}; worker exit code {process.poll()}; its counts {progress}; "
                    f"last samples {sampler.samples[-4:]}; worker log: {log.read_text()[-3000:]}"
                ) from None
        assert process.poll() is None, log.read_text()[-3000:]
    finally:
        stop_worker(process, log)
    outputs = reader.read_to_end()

    peak_mb = max(sample["anon_mb"] or 0.0 for sample in sampler.samples)
    peak_lag = max(sample["lag"] or 0.0 for sample in sampler.samples)
    samples = results_file("backlog_1m_samples.json")
    if samples is not None:
        samples.write_text(json.dumps({"idle_anon_mb": idle_mb, "samples": sampler.samples}) + "\n")
    record = verify(
        "backlog_1m_readings",
        ref,
        outputs,
        final_windows(redis_url, key_prefix, plan),
        recovery_s=None,
        extra={
            "produce_s": round(produced_s, 1),
            "worked_off_s": round(worked_off_s, 1),
            "readings_per_s": round(ref.readings / worked_off_s),
            "idle_anon_mb": round(idle_mb, 1),
            "peak_anon_mb": round(peak_mb, 1),
            "peak_lag": peak_lag,
        },
    )
    assert peak_mb - idle_mb < RSS_GROWTH_BOUND_MB, record
    assert peak_lag > 0.5 * ref.readings, f"the lag never showed the backlog: {record}"
