"""Structured logs are one JSON object per line and never contain a configured secret."""

from __future__ import annotations

import json
import logging

import pytest

from stream_detector.config import Settings
from stream_detector.logs import JsonFormatter, secrets_of

pytestmark = pytest.mark.unit


def record(message: str, *args: object, **extra: object) -> logging.LogRecord:
    entry = logging.LogRecord(
        "stream_detector.worker", logging.WARNING, __file__, 1, message, args, None
    )
    entry.__dict__.update(extra)
    return entry


def test_a_line_is_json_with_level_logger_message_and_extras() -> None:
    line = JsonFormatter().format(record("retrying in %.1f s", 0.4, partition=3))
    entry = json.loads(line)
    assert entry["level"] == "WARNING"
    assert entry["logger"] == "stream_detector.worker"
    assert entry["message"] == "retrying in 0.4 s"
    assert entry["partition"] == 3


def test_secrets_from_the_settings_are_masked_wherever_they_appear() -> None:
    settings = Settings(
        redis={"url": "redis://worker:s3cr%22et@redis:6379/0"},
        kafka={"extra": {"sasl.password": "kafka-pass", "security.protocol": "SASL_SSL"}},
    )
    formatter = JsonFormatter(secrets_of(settings))
    line = formatter.format(
        record("failed: %s %s", 'redis://worker:s3cr"et@redis:6379/0', "auth kafka-pass rejected")
    )
    assert "kafka-pass" not in line and "s3cr" not in line
    assert "***" in json.loads(line)["message"]
    assert "SASL_SSL" not in secrets_of(settings)
