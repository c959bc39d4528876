"""A worker as a process of its own, for tests and benchmarks: start it as
``python -m stream_detector run`` with its settings as ``DETECTOR_*`` variables, read its
``/metrics`` and ``/readyz``, and sample its memory.
"""

from __future__ import annotations

import os
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from stream_detector.config import Settings

HTTP_TIMEOUT_S = 5.0
Samples = dict[str, list[tuple[dict[str, str], float]]]


def worker_environment(settings: Settings, torch_threads: int = 1) -> dict[str, str]:
    """This process's environment without its DETECTOR_* variables, plus ``settings``'."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith("DETECTOR_")}
    return {**environment, "OMP_NUM_THREADS": str(torch_threads), **settings.environment()}


def start_worker(settings: Settings, log: Path, torch_threads: int = 1) -> subprocess.Popen[bytes]:
    """``python -m stream_detector run`` with ``settings``, its output appended to ``log``.

    A process of its own: a benchmark's producer and reader then do not share its GIL, and
    a test can kill it.
    """
    with log.open("ab") as output:
        return subprocess.Popen(
            [sys.executable, "-m", "stream_detector", "run"],
            env=worker_environment(settings, torch_threads),
            stdout=output,
            stderr=output,
        )


def metric_samples(port: int, timeout_s: float = HTTP_TIMEOUT_S) -> Samples | None:
    """Every sample on a worker's /metrics by sample name (None when it does not answer)."""
    try:
        url = f"http://127.0.0.1:{port}/metrics"
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            text = response.read().decode()
    except OSError:
        return None
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((sample.labels, sample.value))
    return samples


def metric_value(port: int, name: str, **labels: str) -> float:
    """The sum of the samples ``name`` carrying ``labels`` (0 when there are none)."""
    samples = metric_samples(port) or {}
    return sum(
        value
        for sample_labels, value in samples.get(name, [])
        if labels.items() <= sample_labels.items()
    )


def readiness(port: int, timeout_s: float = HTTP_TIMEOUT_S) -> bool | None:
    """Whether /readyz answers 200 (None when the worker does not answer at all)."""
    try:
        url = f"http://127.0.0.1:{port}/readyz"
        with urllib.request.urlopen(url, timeout=timeout_s):
            return True
    except urllib.error.HTTPError:
        return False
    except OSError:
        return None


def serving_partitions(port: int, timeout_s: float = HTTP_TIMEOUT_S) -> bool:
    """Whether the worker is ready and owns partitions: it has loaded its model and
    finished joining its consumer group."""
    ready = readiness(port, timeout_s) is True
    return ready and metric_value(port, "detector_assigned_partitions") > 0


def rss_mib(pid: int, field: str = "VmRSS") -> float | None:
    """Resident memory of a process in MiB (None when it is gone or a zombie).

    ``field`` picks the line of ``/proc/PID/status``: ``VmRSS`` is all resident pages,
    ``RssAnon`` only the anonymous ones (heap, queues, tensors), without the pages of
    mapped libraries that the kernel may drop and fault in again under memory pressure.
    """
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in status.splitlines():
        if line.startswith(f"{field}:"):
            return round(int(line.split()[1]) / 1024, 1)  # the kernel reports KiB
    return None
