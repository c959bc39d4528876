"""All worker settings: one frozen pydantic-settings class read from ``DETECTOR_*`` variables.

Nested groups use ``__`` (``DETECTOR_KAFKA__BOOTSTRAP_SERVERS=broker:9092``); mappings are
JSON (``DETECTOR_KAFKA__EXTRA='{"security.protocol": "SASL_SSL"}'``). This is the only module
that reads the environment. ``Settings()`` with an empty environment gives a worker for a
broker and a Redis on localhost.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from fnmatch import fnmatchcase
from functools import cached_property
from typing import Any, Literal
from urllib.parse import parse_qsl, unquote_plus, urlsplit, urlunsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PositiveInt,
    SecretStr,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

MASK = "***"
# A kafka.extra key containing any of these is a credential (sasl.password,
# ssl.key.password, sasl.oauthbearer.client.secret, sasl.jaas.config, ...).
_SECRET_KEY_MARKERS = ("password", "secret", "key", "token", "jaas")

# librdkafka properties whose value the worker's delivery guarantees depend on: they have
# dedicated settings (or none at all) and cannot be overridden through kafka.extra.
_RESERVED_KAFKA_KEYS = frozenset(
    {
        "bootstrap.servers",
        "group.id",
        "enable.auto.offset.store",
        "enable.auto.commit",
        "enable.idempotence",
        "acks",
        "transactional.id",
        "isolation.level",
        "session.timeout.ms",
    }
)

KafkaConfig = dict[str, str | int | bool]
FailPoint = Literal["before_score", "after_produce", "before_commit"]
# The terms a fused score can have (``stream_detector.model.SCORE_TERMS``, which needs torch).
ScoreTerm = Literal[
    "discrepancy",
    "memory",
    "level",
    "scale",
    "tail",
    "point",
    "steps",
    "short_steps",
    "noise",
    "quiet",
]


def is_secret_key(key: str) -> bool:
    """True when a librdkafka property name (or URL query parameter) names a credential."""
    lowered = key.lower()
    return any(marker in lowered for marker in _SECRET_KEY_MARKERS)


def mask_url(url: str) -> str:
    """Return ``url`` with its password (and any credential query parameter) replaced by ***."""
    parts = urlsplit(url)
    pairs = parse_qsl(parts.query, keep_blank_values=True)
    if parts.password is None and not any(is_secret_key(k) for k, _ in pairs):
        return url
    netloc = parts.netloc
    if parts.password is not None:
        userinfo, _, hostinfo = netloc.rpartition("@")
        user = userinfo.split(":", 1)[0]
        netloc = f"{user}:{MASK}@{hostinfo}"
    query = "&".join(_masked_query_pair(pair) for pair in parts.query.split("&"))
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def _masked_query_pair(pair: str) -> str:
    # Pairs are kept as written (a CA path stays readable); only credential values change.
    key = pair.partition("=")[0]
    return f"{key}={MASK}" if is_secret_key(unquote_plus(key)) else pair


def mask_kafka_extra(extra: Mapping[str, str]) -> dict[str, str]:
    """Return ``extra`` with the value of every credential-like key replaced by ***."""
    return {k: MASK if is_secret_key(k) else v for k, v in extra.items()}


class _Group(BaseModel):
    """A frozen settings group that rejects unknown keys, so typos in variable names fail."""

    # Validation errors name the field and the rule but never echo the input: a rejected
    # kafka.extra or redis.url holds credentials, and the error is printed at startup.
    model_config = ConfigDict(frozen=True, extra="forbid", hide_input_in_errors=True)


class KafkaTopics(_Group):
    """Topic names."""

    readings: str = "sensor-readings"
    scores: str = "sensor-scores"
    alerts: str = "sensor-alerts"
    dead_letters: str = "sensor-readings-dlq"


class KafkaSettings(_Group):
    """Broker connection, consumer group and delivery guarantees."""

    bootstrap_servers: str = "localhost:9092"
    group_id: str = "stream-detector"
    topics: KafkaTopics = Field(default_factory=KafkaTopics)
    # Passed to librdkafka as-is, for both consumer and producer: security.protocol,
    # sasl.*, ssl.*, and tuning such as fetch.min.bytes or linger.ms.
    extra: dict[str, str] = Field(default_factory=dict)
    session_timeout_ms: int = Field(45_000, ge=1_000)
    max_poll_interval_ms: int = Field(300_000, ge=1_000)
    auto_offset_reset: Literal["earliest", "latest"] = "earliest"
    # Records per poll, at most. A poll returns as soon as one record is there, with what
    # has been fetched behind it; a poll short of this size means the worker has caught
    # up, and it scores what it has queued without waiting for a batch to fill. Under a
    # backlog a larger poll spreads each Redis call over more readings per sensor: 2,000
    # ran the e2e benchmark 1.35x faster than 500 (stop 33), and 5,000 no faster.
    poll_batch_size: int = Field(2000, ge=1, le=100_000)
    poll_timeout_ms: int = Field(100, ge=0)
    # How often the consumer lag gauge is measured; a query that gets no answer turns
    # the broker readiness check off.
    lag_interval_s: float = Field(10.0, gt=0)
    # True: consume-transform-produce in Kafka transactions (needs broker support).
    exactly_once: bool = False
    transactional_id_prefix: str = "stream-detector"
    # Unique per worker and stable across its restarts (e.g. the pod name): the client.id,
    # and the suffix of the transactional.id, which fences a zombie of the same worker.
    instance_id: str = Field(default_factory=socket.gethostname, min_length=1)

    @field_validator("extra")
    @classmethod
    def _no_reserved_keys(cls, extra: dict[str, str]) -> dict[str, str]:
        reserved = sorted(_RESERVED_KAFKA_KEYS.intersection(extra))
        if reserved:
            raise ValueError(
                f"kafka.extra may not set {', '.join(reserved)}: the worker's delivery "
                "guarantees depend on them; use the dedicated kafka.* settings instead"
            )
        return extra

    def __repr_args__(self) -> Iterator[tuple[str | None, Any]]:
        for name, value in super().__repr_args__():
            yield name, mask_kafka_extra(value) if name == "extra" else value


class RedisSettings(_Group):
    """Where per-sensor windows and alert state live."""

    # redis://[user:password@]host:port/db, rediss:// for TLS, or unix:///path.
    url: SecretStr = SecretStr("redis://localhost:6379/0")
    # A Redis Cluster: ``url`` names any one node (redis:// or rediss://). Every key of
    # one Kafka partition's sensors shares a hash tag, so partitions spread over the shards.
    cluster: bool = False
    key_prefix: str = "sd"
    # A sensor silent this long loses its window and alert state.
    sensor_ttl_s: int = Field(7 * 24 * 3600, ge=60)
    # When Redis loses its state (restart without persistence, failover, flush), the
    # worker rewinds its partitions this far back in time and rebuilds the windows from
    # Kafka. Cover window_length readings of the slowest sensor; longer costs replay time.
    rebuild_lookback_s: float = Field(3600.0, gt=0)

    @field_validator("url")
    @classmethod
    def _known_scheme(cls, url: SecretStr) -> SecretStr:
        scheme = urlsplit(url.get_secret_value()).scheme
        if scheme not in {"redis", "rediss", "unix"}:
            raise ValueError(
                f"redis.url must start with redis://, rediss:// or unix://, got {scheme!r}://"
            )
        return url

    @model_validator(mode="after")
    def _cluster_over_tcp(self) -> RedisSettings:
        if self.cluster and self.url.get_secret_value().startswith("unix:"):
            raise ValueError("redis.cluster needs a redis:// or rediss:// url naming one node")
        if "{" in self.key_prefix or "}" in self.key_prefix:
            raise ValueError("redis.key_prefix must not hold braces: the worker adds hash tags")
        return self


class ModelSettings(_Group):
    """Which models score which sensors, and where to find them."""

    # A local directory holding <name>/versions/<version>/ and <name>/CURRENT (see store).
    store: str = "./models"
    default_model: str = Field("default", min_length=1)
    # Sensor-id glob (fnmatch, case-sensitive) -> model name; the first match in
    # insertion order wins, sensors matching none use default_model.
    routes: dict[str, str] = Field(default_factory=dict)
    current_poll_interval_s: float = Field(30.0, gt=0)

    def model_for(self, sensor_id: str) -> str:
        """Return the name of the model that scores ``sensor_id``."""
        for pattern, model_name in self.routes.items():
            if fnmatchcase(sensor_id, pattern):
                return model_name
        return self.default_model

    def __repr_args__(self) -> Iterator[tuple[str | None, Any]]:
        for name, value in super().__repr_args__():
            yield name, mask_url(value) if name == "store" else value


class AlertPolicy(_Group):
    """How window scores become alerts (see ``stream_detector.alerts``).

    Threshold per sensor: the model's ``thresholds.json`` entry for the sensor, else its
    ``default`` entry. When the model has neither (no ``thresholds.json`` at all), the
    fallback applies: ``"quantile"`` uses a running estimate of the ``fallback_quantile``
    of the sensor's own scores, kept in its alert state (no alert until
    ``fallback_warmup_windows`` scores were seen; scores that belong to an alert are kept
    out of the estimate); ``"fixed"`` uses ``fallback_threshold`` for every sensor.

    ``adapt_fitted_threshold``: a fitted threshold is a floor, and the same running
    quantile raises it once it has warmed up (the threshold is the larger of the two), so
    a sensor whose ordinary behaviour has moved past its training data stops paging.

    ``adapt_term_units``: each term of a fused score (``ModelConfig.score_terms``) has its
    own edge of normal on each sensor. A term's scale puts the most extreme normal
    training window at 1; once ``fallback_warmup_windows`` windows have warmed it up, the
    edge is the larger of 1 and the running ``term_quantile`` of the sensor's own values
    of that term, and each term is shifted down by its edge's rise (a term at its edge
    scores 1, as the most extreme normal window does). So a term that drifted past its
    training range stops paging, and the others stay as sensitive as trained. The
    ``bounded_terms`` (the window's level and spread against the training data's) are
    where a failing sensor shows: a value of theirs above ``term_learn_limit`` (in units
    of the most extreme normal training window) never moves their edge, so an excursion
    does not teach its own terms and their edges stay within [1, ``term_learn_limit``].
    The other terms measure shape and learn every value, so a sensor whose shapes change
    for good (a new daily pattern, new noise) moves their edges as far as it goes; an
    anomaly teaches them only if more than 1 - ``term_quantile`` of the sensor's windows
    show it. A new fitted threshold (a new model version or a refresh) starts new edges.
    """

    threshold_fallback: Literal["quantile", "fixed"] = "quantile"
    adapt_fitted_threshold: bool = True
    fallback_quantile: float = Field(0.995, gt=0.5, lt=1.0)
    fallback_warmup_windows: int = Field(200, ge=5)
    fallback_threshold: float | None = Field(None, gt=0)
    adapt_term_units: bool = True
    term_quantile: float = Field(0.99, gt=0.5, lt=1.0)
    term_learn_limit: float = Field(2.0, gt=1.0)
    bounded_terms: tuple[ScoreTerm, ...] = ("level", "scale")
    # Open when at least confirm_k of the last confirm_n windows are above the threshold.
    confirm_k: int = Field(3, ge=1, le=64)
    confirm_n: int = Field(5, ge=1, le=64)
    # A window scoring at least this multiple of the threshold (the "major" band's) opens
    # an alert at once, unconfirmed; a spike seen by one window cannot be confirmed by the
    # next ones (None: every alert waits for the confirmation).
    open_at_once_ratio: float | None = Field(2.0, ge=1.0)
    # Resolve after confirm_k consecutive windows below threshold * hysteresis_ratio ...
    hysteresis_ratio: float = Field(0.8, gt=0, le=1.0)
    # ... and never before the alert has been open for this many windows.
    min_duration_windows: int = Field(5, ge=1)
    # No new alert opens for this long after one resolves.
    cooldown_ms: int = Field(300_000, ge=0)
    # While open, an update is emitted when the peak grows by this fraction since the
    # last event, or when the severity band rises.
    update_peak_increase: float = Field(0.25, gt=0)
    # Severity name -> lowest peak/threshold ratio that earns it.
    severity_bands: dict[str, float] = Field(
        default_factory=lambda: {"warning": 1.0, "major": 2.0, "critical": 4.0}
    )

    @field_validator("severity_bands")
    @classmethod
    def _valid_bands(cls, bands: dict[str, float]) -> dict[str, float]:
        if not bands:
            raise ValueError("alerts.severity_bands needs at least one band")
        if any(not ratio > 0 for ratio in bands.values()):
            raise ValueError("alerts.severity_bands ratios must be positive")
        if len(set(bands.values())) != len(bands):
            raise ValueError("alerts.severity_bands ratios must be distinct")
        return bands

    @model_validator(mode="after")
    def _consistent(self) -> AlertPolicy:
        if self.confirm_k > self.confirm_n:
            raise ValueError(
                f"alerts.confirm_k ({self.confirm_k}) must not exceed confirm_n ({self.confirm_n})"
            )
        if self.threshold_fallback == "fixed" and self.fallback_threshold is None:
            raise ValueError("alerts.threshold_fallback='fixed' needs alerts.fallback_threshold")
        return self

    @cached_property
    def bands_ascending(self) -> tuple[tuple[str, float], ...]:
        """Severity bands as (name, lowest ratio), lowest ratio first."""
        return tuple(sorted(self.severity_bands.items(), key=lambda band: band[1]))


class Limits(_Group):
    """Bounds on input, so that a bad producer cannot exhaust the worker."""

    max_message_bytes: int = Field(65_536, ge=64)
    max_channels: int = Field(256, ge=1)
    max_sensor_id_length: int = Field(256, ge=1)
    max_sensors_per_worker: int = Field(100_000, ge=1)
    # Readings stamped further ahead of the worker's clock than this are rejected.
    max_future_skew_ms: int = Field(300_000, ge=0)
    # Readings stamped before 1 January of this year (UTC) are rejected; this also
    # catches epoch seconds sent where epoch milliseconds are expected.
    min_year: int = Field(2000, ge=1971, le=9999)

    @cached_property
    def min_ts_ms(self) -> int:
        """Epoch milliseconds of the earliest accepted timestamp."""
        return int(datetime(self.min_year, 1, 1, tzinfo=UTC).timestamp()) * 1000


class AlertmanagerSettings(_Group):
    """The bridge that forwards anomaly alerts to Alertmanager (``... alertmanager``)."""

    # Alertmanager's address, e.g. http://alertmanager-operated.monitoring:9093.
    url: str | None = None
    # The bridge's own consumer group on the alerts topic: it commits only what
    # Alertmanager accepted.
    group_id: str = "stream-detector-alertmanager"
    # Firing alerts are posted again this often. Each post says the alert ends after four
    # intervals, so Alertmanager resolves an alert whose bridge stopped for that long.
    resend_interval_s: float = Field(60.0, gt=0)
    timeout_s: float = Field(10.0, gt=0)
    # Added to every alert's labels, for routing (e.g. {"team": "plant-ops"}).
    labels: dict[str, str] = Field(default_factory=dict)


class Settings(BaseSettings):
    """Everything the worker can be told, from ``DETECTOR_*`` environment variables."""

    model_config = SettingsConfigDict(
        env_prefix="DETECTOR_",
        env_nested_delimiter="__",
        # Lets an environment (a ConfigMap) set an optional field back to None.
        env_parse_none_str="null",
        frozen=True,
        extra="forbid",
        hide_input_in_errors=True,
    )

    kafka: KafkaSettings = Field(default_factory=KafkaSettings)
    redis: RedisSettings = Field(default_factory=RedisSettings)
    model: ModelSettings = Field(default_factory=ModelSettings)
    alerts: AlertPolicy = Field(default_factory=AlertPolicy)
    limits: Limits = Field(default_factory=Limits)
    alertmanager: AlertmanagerSettings = Field(default_factory=AlertmanagerSettings)
    # Readings per window, and readings between two scorings of the same sensor.
    window_length: int = Field(128, ge=2, le=65_536)
    stride: int = Field(16, ge=1)
    # "spread": each sensor scores at a phase of the stride of its own (from its id), so a
    # fleet sampled in lockstep makes a steady share of its windows due at every reading
    # instead of all of them at once every `stride` readings, a burst the worker would
    # queue. "aligned": every sensor at the same reading counts.
    stride_phase: Literal["spread", "aligned"] = "spread"
    # Windows per GPU batch, and the longest a window waits for a batch to fill (only
    # while the worker is behind: once it has caught up it scores at once).
    batch_size: int = Field(256, ge=1)
    batch_deadline_ms: int = Field(50, ge=0)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # Autocast on CUDA; ignored on CPU.
    mixed_precision: bool = True
    # On a CPU, score with each model's trace (`scorer.trace_scoring`): it runs on the
    # scoring thread beside the worker's loop instead of taking turns with it for the GIL.
    trace_model: bool = True
    metrics_port: int = Field(8000, ge=1, le=65_535)
    # Testing only (the reliability suite): failpoint name -> the hit on which the worker
    # kills itself with SIGKILL. See stream_detector.failpoints.
    failpoints: dict[FailPoint, PositiveInt] = Field(default_factory=dict)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper_log_level(cls, level: object) -> object:
        return level.upper() if isinstance(level, str) else level

    @model_validator(mode="after")
    def _stride_within_window(self) -> Settings:
        if self.stride > self.window_length:
            raise ValueError(
                f"stride ({self.stride}) must not exceed window_length ({self.window_length}): "
                "readings between windows would never be scored"
            )
        return self

    def masked_dump(self) -> dict[str, Any]:
        """The effective configuration as JSON-ready data, with every credential masked."""
        data = self.model_dump(mode="json")
        data["redis"]["url"] = mask_url(self.redis.url.get_secret_value())
        data["model"]["store"] = mask_url(self.model.store)
        data["kafka"]["extra"] = mask_kafka_extra(self.kafka.extra)
        return data

    def environment(self) -> dict[str, str]:
        """DETECTOR_* variables that reproduce these settings in a child process.

        Credentials are included in clear (the child needs them): never log the result.
        """
        data = self.model_dump(mode="json")
        data["redis"]["url"] = self.redis.url.get_secret_value()
        return {
            f"DETECTOR_{name.upper()}": json.dumps(value) if isinstance(value, dict) else str(value)
            for name, value in data.items()
        }


def kafka_consumer_config(settings: Settings) -> KafkaConfig:
    """librdkafka configuration of the readings consumer.

    Offsets are not managed here: ``consumer.ReadingConsumer`` turns both
    ``enable.auto.offset.store`` and ``enable.auto.commit`` off, and the worker stores a
    message's offset only once its outputs are acknowledged, then commits the stored
    offsets itself (at most every few seconds, and on revoke and close). With
    ``kafka.exactly_once`` the offsets travel in the producer's transaction instead
    (``send_offsets_to_transaction``).
    """
    kafka = settings.kafka
    config: KafkaConfig = {
        "client.id": kafka.instance_id,
        "auto.offset.reset": kafka.auto_offset_reset,
        "max.poll.interval.ms": kafka.max_poll_interval_ms,
        "enable.partition.eof": False,
    }
    config.update(kafka.extra)
    config.update(
        {
            "bootstrap.servers": kafka.bootstrap_servers,
            "group.id": kafka.group_id,
            "session.timeout.ms": kafka.session_timeout_ms,
            # Never read outputs of aborted transactions (the librdkafka default, made explicit).
            "isolation.level": "read_committed",
        }
    )
    return config


def kafka_producer_config(settings: Settings) -> KafkaConfig:
    """librdkafka configuration of the scores/alerts/dead-letter producer.

    Idempotent with ``acks=all`` always; with ``kafka.exactly_once`` also transactional,
    with ``transactional.id`` = ``<transactional_id_prefix>-<instance_id>``.
    """
    kafka = settings.kafka
    config: KafkaConfig = {
        "client.id": kafka.instance_id,
        "linger.ms": 5,
        "compression.type": "lz4",
    }
    config.update(kafka.extra)
    config.update(
        {
            "bootstrap.servers": kafka.bootstrap_servers,
            "enable.idempotence": True,
            "acks": "all",
        }
    )
    if kafka.exactly_once:
        config["transactional.id"] = f"{kafka.transactional_id_prefix}-{kafka.instance_id}"
    return config
