"""No configured credential ever reaches the output of ``python -m stream_detector``.

Secrets sit where an operator puts them: the Redis URL's password, SASL and TLS key
passwords in ``kafka.extra``, and a password and a token in the model store's URL. The
commands run as subprocesses, so everything counts: the JSON logs at DEBUG, librdkafka's
own lines on stderr, tracebacks, and the ``config`` command's output. The worker runs
against services that refuse it (a wrong Redis password, a broker that requires SASL, an
unreachable model store), so that it logs the errors a leak would hide in.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import quote

import pytest

from stream_detector import store
from stream_detector.config import Settings
from stream_detector.devtools import loadgen
from stream_detector.devtools.services import (
    EmbeddedKafka,
    EmbeddedRedis,
    ServiceStartError,
    free_port,
)
from stream_detector.devtools.tiny import tiny_config, tiny_model
from stream_detector.logs import JsonFormatter, secrets_of
from stream_detector.publisher import ReadingProducer
from tests.conftest import Topics
from tests.security.conftest import REDIS_USER

pytestmark = pytest.mark.integration

PROJECT_ROOT = Path(__file__).resolve().parents[2]
SASL_SECRET = "sasl-Pa55word-kafka"
SSL_KEY_SECRET = "ssl-key-Pa55word"
# Not the password of tests/security/conftest.py's Redis user: the worker is refused.
REDIS_SECRET = "redis-Pa55word-wrong"
STORE_SECRET = "store-Pa55word"
STORE_TOKEN = "store-T0ken-value"
SECRETS = (SASL_SECRET, SSL_KEY_SECRET, REDIS_SECRET, STORE_SECRET, STORE_TOKEN)
STORE_URL = f"https://reader:{STORE_SECRET}@127.0.0.1:9/models?token={STORE_TOKEN}"


def leaked(text: str) -> list[str]:
    """The secrets that appear in ``text``, as written or percent-encoded."""
    return [s for s in SECRETS if s in text or quote(s, safe="") in text]


def environment(**variables: str) -> dict[str, str]:
    """The test process's environment without DETECTOR_*, plus ``variables``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DETECTOR_")}
    env["OMP_NUM_THREADS"] = "1"
    env.update({f"DETECTOR_{name.upper()}": value for name, value in variables.items()})
    return env


def detector(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "stream_detector", *args],
        cwd=PROJECT_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def secret_variables(
    redis_url: str, bootstrap_servers: str, extra: dict[str, str]
) -> dict[str, str]:
    return {
        "kafka__bootstrap_servers": bootstrap_servers,
        "kafka__extra": json.dumps(
            {"sasl.password": SASL_SECRET, "ssl.key.password": SSL_KEY_SECRET, **extra}
        ),
        "redis__url": redis_url,
        "model__store": STORE_URL,
        "log_level": "DEBUG",
    }


def test_the_config_command_masks_every_secret() -> None:
    variables = secret_variables(
        f"rediss://{REDIS_USER}:{REDIS_SECRET}@cache:6380/0?ssl_ca_certs=/etc/ca.pem",
        "broker:9093",
        {"security.protocol": "SASL_SSL", "sasl.username": "detector"},
    )
    shown = detector("config", env=environment(**variables))

    assert shown.returncode == 0, shown.stderr
    assert leaked(shown.stdout + shown.stderr) == []
    config = json.loads(shown.stdout)
    assert config["kafka"]["extra"]["sasl.password"] == "***"
    assert config["kafka"]["extra"]["sasl.username"] == "detector"
    assert (
        config["redis"]["url"] == f"rediss://{REDIS_USER}:***@cache:6380/0?ssl_ca_certs=/etc/ca.pem"
    )
    assert config["model"]["store"] == "https://reader:***@127.0.0.1:9/models?token=***"


def test_a_rejected_configuration_is_explained_without_its_secrets() -> None:
    variables = secret_variables(
        f"http://{REDIS_USER}:{REDIS_SECRET}@cache:6379/0", "broker:9093", {"acks": "1"}
    )
    refused = detector("config", env=environment(**variables))

    assert refused.returncode != 0
    assert "kafka.extra may not set acks" in refused.stderr
    assert "redis.url must start with redis://" in refused.stderr
    assert leaked(refused.stdout + refused.stderr) == []


def test_log_lines_mask_the_model_store_and_redis_query_credentials() -> None:
    settings = Settings(
        redis={"url": f"redis://cache:6379/0?password={quote(REDIS_SECRET)}"},
        model={"store": STORE_URL},
    )
    message = f"cannot open {STORE_URL}; Redis said {REDIS_SECRET!r}"
    record = logging.LogRecord("stream_detector", logging.WARNING, __file__, 1, message, (), None)
    line = JsonFormatter(secrets_of(settings)).format(record)
    assert leaked(line) == []
    assert "cannot open https://reader:***@127.0.0.1:9/models?token=***" in line


def run_worker_until(
    env: dict[str, str], log: Path, seen: Callable[[str], bool], timeout_s: float = 45.0
) -> str:
    """Run ``python -m stream_detector run`` until its output satisfies ``seen``, then stop it.

    SIGTERM starts the drain, which retries a refusing Redis for 30 s; the SIGINT after it
    interrupts that, so the shutdown path and its traceback are in the output too.
    """
    with log.open("wb") as output:
        worker = subprocess.Popen(
            [sys.executable, "-m", "stream_detector", "run"],
            cwd=PROJECT_ROOT,
            env=env,
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + timeout_s
        while not seen(log.read_text(errors="replace")) and time.monotonic() < deadline:
            assert worker.poll() is None, f"worker exited early:\n{log.read_text()[-3000:]}"
            time.sleep(0.2)
    finally:
        for stop_signal, grace_s in ((signal.SIGTERM, 2), (signal.SIGINT, 15)):
            with contextlib.suppress(subprocess.TimeoutExpired):
                worker.send_signal(stop_signal)
                worker.wait(grace_s)
        if worker.poll() is None:
            worker.kill()
            worker.wait()
    return log.read_text(errors="replace")


def test_a_worker_refused_by_redis_logs_no_secret(
    tmp_path: Path,
    kafka_bootstrap: str,
    topics: Topics,
    secure_redis: EmbeddedRedis,
) -> None:
    window = tiny_config().window_length
    models = tmp_path / "models"
    store.publish_version(models, "default", tiny_model())
    plan = loadgen.LoadPlan(1, 1.0, window + 8, 1_700_000_000_000, (), seed=0, sensor_prefix="s")
    producer = ReadingProducer(kafka_bootstrap, topics.readings)
    for _, key, value in loadgen.messages(plan):
        producer.send(key, value)
    producer.flush()
    ca = quote(str(secure_redis.tls_ca))
    redis_url = (
        f"rediss://{REDIS_USER}:{REDIS_SECRET}@127.0.0.1:{secure_redis.port}/0?ssl_ca_certs={ca}"
    )
    variables = secret_variables(redis_url, kafka_bootstrap, {"heartbeat.interval.ms": "500"})
    variables |= {
        "model__store": str(models),
        "kafka__group_id": f"leak-{topics.readings}",
        "kafka__session_timeout_ms": "2000",
        "kafka__topics": json.dumps(
            {
                "readings": topics.readings,
                "scores": topics.scores,
                "alerts": topics.alerts,
                "dead_letters": topics.dead_letter,
            }
        ),
        "window_length": str(window),
        "stride": "4",
        "device": "cpu",
        "metrics_port": str(free_port()),
    }

    output = run_worker_until(
        environment(**variables),
        tmp_path / "worker.log",
        lambda text: "retrying in" in text and "invalid username-password pair" in text,
    )

    assert "invalid username-password pair" in output, output[-3000:]
    assert leaked(output) == []


def test_a_worker_refused_by_kafka_and_the_model_store_logs_no_secret(tmp_path: Path) -> None:
    try:
        kafka = EmbeddedKafka(authentication=True).start()
    except ServiceStartError as error:
        pytest.skip(f"tansu did not start: {error}")
    try:
        extra = {
            "security.protocol": "SASL_PLAINTEXT",
            "sasl.mechanism": "SCRAM-SHA-512",
            "sasl.username": "detector",
        }
        redis_url = f"redis://{REDIS_USER}:{REDIS_SECRET}@127.0.0.1:{free_port()}/0"
        variables = secret_variables(redis_url, kafka.bootstrap_servers, extra)
        variables |= {"device": "cpu", "metrics_port": str(free_port())}

        output = run_worker_until(
            environment(**variables),
            tmp_path / "worker.log",
            lambda text: "no model of" in text and "SASL" in text,
        )
    finally:
        kafka.stop()

    assert "SASL" in output and "no model of" in output, output[-3000:]
    assert leaked(output) == []
