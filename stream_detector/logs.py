"""Structured logs: one JSON object per line, with every known secret redacted."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterable
from datetime import UTC, datetime
from urllib.parse import unquote, unquote_plus, urlsplit

from stream_detector.config import MASK, Settings, is_secret_key

# Attributes every LogRecord has; anything else was passed with extra={...} and is logged.
_STANDARD_ATTRIBUTES = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}


def _url_secrets(url: str) -> list[str]:
    """The password and credential query values of a URL, as written and decoded."""
    parts = urlsplit(url)
    secrets = []
    if parts.password:
        secrets += [parts.password, unquote(parts.password)]
    for pair in parts.query.split("&"):
        key, _, value = pair.partition("=")
        if value and is_secret_key(unquote_plus(key)):
            secrets += [value, unquote_plus(value)]
    return secrets


def secrets_of(settings: Settings) -> list[str]:
    """Credential values in the settings that must never appear in a log line."""
    secrets = [value for key, value in settings.kafka.extra.items() if is_secret_key(key)]
    secrets += _url_secrets(settings.redis.url.get_secret_value())
    secrets += _url_secrets(settings.model.store)
    return [secret for secret in secrets if len(secret) >= 4]


class JsonFormatter(logging.Formatter):
    """``{"ts", "level", "logger", "message", ...extra, "exception"}`` with secrets masked."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        super().__init__()
        # Masked as they appear inside JSON strings; longest first, so that a secret which
        # contains another is masked whole.
        escaped = {json.dumps(secret)[1:-1] for secret in secrets}
        self._secrets = sorted(escaped, key=len, reverse=True)

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD_ATTRIBUTES and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        line = json.dumps(entry, default=str)
        for secret in self._secrets:
            line = line.replace(secret, MASK)
        return line


def configure(settings: Settings) -> None:
    """Send all logs to stderr as JSON lines at the configured level."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(secrets_of(settings)))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.log_level)
