"""Settings from the environment, validation, secret masking and librdkafka configs."""

from __future__ import annotations

import json
import os
from typing import get_args

import pytest
from pydantic import ValidationError

from stream_detector.config import (
    ScoreTerm,
    Settings,
    kafka_consumer_config,
    kafka_producer_config,
    mask_url,
)
from stream_detector.model import SCORE_TERMS

pytestmark = pytest.mark.unit


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep the developer's or CI's own DETECTOR_* variables out of these tests."""
    for name in list(os.environ):
        if name.upper().startswith("DETECTOR_"):
            monkeypatch.delenv(name)


def test_defaults_need_no_environment() -> None:
    settings = Settings()
    assert settings.kafka.bootstrap_servers == "localhost:9092"
    assert settings.redis.url.get_secret_value() == "redis://localhost:6379/0"
    assert settings.alerts.confirm_k <= settings.alerts.confirm_n
    assert settings.stride <= settings.window_length


def test_nested_variables_reach_nested_groups(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DETECTOR_KAFKA__BOOTSTRAP_SERVERS", "broker-1:9093,broker-2:9093")
    monkeypatch.setenv("DETECTOR_KAFKA__EXTRA", '{"security.protocol":"SASL_SSL"}')
    monkeypatch.setenv("DETECTOR_KAFKA__TOPICS__SCORES", "plant-a-scores")
    monkeypatch.setenv("DETECTOR_MODEL__ROUTES", '{"pump-*": "pumps", "*": "generic"}')
    monkeypatch.setenv("DETECTOR_ALERTS__SEVERITY_BANDS", '{"low": 1.0, "high": 3.0}')
    monkeypatch.setenv("DETECTOR_WINDOW_LENGTH", "64")
    monkeypatch.setenv("DETECTOR_LOG_LEVEL", "debug")

    settings = Settings()

    assert settings.kafka.bootstrap_servers == "broker-1:9093,broker-2:9093"
    assert settings.kafka.extra == {"security.protocol": "SASL_SSL"}
    assert settings.kafka.topics.scores == "plant-a-scores"
    assert settings.kafka.topics.readings == "sensor-readings"
    assert settings.model.model_for("pump-7") == "pumps"
    assert settings.model.model_for("valve-1") == "generic"
    assert settings.alerts.bands_ascending == (("low", 1.0), ("high", 3.0))
    assert settings.window_length == 64
    assert settings.log_level == "DEBUG"


def test_routes_fall_back_to_default_model() -> None:
    settings = Settings(model={"routes": {"pump-*": "pumps"}, "default_model": "base"})
    assert settings.model.model_for("pump-1") == "pumps"
    assert settings.model.model_for("Pump-1") == "base"


def test_settings_are_frozen() -> None:
    settings = Settings()
    with pytest.raises(ValidationError):
        settings.batch_size = 1  # type: ignore[misc]
    with pytest.raises(ValidationError):
        settings.kafka.group_id = "other"  # type: ignore[misc]


def test_the_score_terms_settings_can_name_are_the_models() -> None:
    assert get_args(ScoreTerm) == SCORE_TERMS


def test_misspelt_nested_variable_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DETECTOR_KAFKA__BOOTSTRAP_SERVER", "broker:9092")
    with pytest.raises(ValidationError, match="bootstrap_server"):
        Settings()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"kafka": {"extra": {"enable.auto.commit": "true"}}}, "kafka.extra may not set"),
        ({"redis": {"url": "http://cache:6379"}}, "redis.url must start with"),
        ({"alerts": {"confirm_k": 4, "confirm_n": 3}}, "must not exceed confirm_n"),
        ({"alerts": {"threshold_fallback": "fixed"}}, "needs alerts.fallback_threshold"),
        ({"alerts": {"severity_bands": {}}}, "at least one band"),
        ({"window_length": 16, "stride": 32}, "must not exceed window_length"),
        ({"device": "tpu"}, "device"),
        ({"alerts": {"bounded_terms": ["levle"]}}, "bounded_terms"),
    ],
)
def test_invalid_settings_say_what_to_fix(overrides: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        Settings(**overrides)


SECRET_EXTRA = {
    "security.protocol": "SASL_SSL",
    "sasl.mechanism": "PLAIN",
    "sasl.username": "detector",
    "sasl.password": "hunter2",
    "ssl.key.password": "keypass",
    "sasl.jaas.config": "org.apache.kafka...password=jaaspass",
    "sasl.oauthbearer.client.secret": "oauthsecret",
}


def secret_settings() -> Settings:
    return Settings(
        kafka={"extra": SECRET_EXTRA},
        redis={"url": "rediss://detector:redispass@cache:6380/0"},
        model={"store": "https://reader:storepass@models.example/detector"},
    )


def test_masked_dump_hides_every_secret_and_keeps_the_rest() -> None:
    dumped = secret_settings().masked_dump()
    text = json.dumps(dumped)

    for secret in ("hunter2", "keypass", "jaaspass", "oauthsecret", "redispass", "storepass"):
        assert secret not in text
    assert dumped["redis"]["url"] == "rediss://detector:***@cache:6380/0"
    assert dumped["model"]["store"] == "https://reader:***@models.example/detector"
    assert dumped["kafka"]["extra"]["security.protocol"] == "SASL_SSL"
    assert dumped["kafka"]["extra"]["sasl.username"] == "detector"
    assert dumped["kafka"]["extra"]["sasl.password"] == "***"


def test_repr_hides_secrets() -> None:
    text = repr(secret_settings())
    for secret in ("hunter2", "keypass", "jaaspass", "oauthsecret", "redispass", "storepass"):
        assert secret not in text


def test_mask_url_leaves_urls_without_credentials_alone() -> None:
    assert mask_url("./models") == "./models"
    assert mask_url("redis://cache:6379/0") == "redis://cache:6379/0"
    assert mask_url("redis://cache:6379/0?password=pw&db=1") == (
        "redis://cache:6379/0?password=***&db=1"
    )


def test_consumer_config_leaves_offsets_to_the_consumer_and_passes_extra_through() -> None:
    config = kafka_consumer_config(secret_settings())
    # ReadingConsumer forces both off: one place decides how offsets are committed.
    assert "enable.auto.offset.store" not in config
    assert "enable.auto.commit" not in config
    assert config["bootstrap.servers"] == "localhost:9092"
    assert config["group.id"] == "stream-detector"
    assert config["sasl.password"] == "hunter2"
    assert config["security.protocol"] == "SASL_SSL"


def test_extra_overrides_tuning_defaults() -> None:
    settings = Settings(kafka={"extra": {"linger.ms": "50", "auto.offset.reset": "latest"}})
    assert kafka_producer_config(settings)["linger.ms"] == "50"
    assert kafka_consumer_config(settings)["auto.offset.reset"] == "latest"


def test_producer_is_idempotent_and_transactional_only_when_asked() -> None:
    plain = kafka_producer_config(Settings(kafka={"instance_id": "worker-0"}))
    assert plain["enable.idempotence"] is True
    assert plain["acks"] == "all"
    assert "transactional.id" not in plain

    settings = Settings(kafka={"instance_id": "worker-0", "exactly_once": True})
    assert kafka_producer_config(settings)["transactional.id"] == "stream-detector-worker-0"


def test_the_environment_of_settings_rebuilds_them_in_a_child_process(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings = Settings(
        redis={"url": "redis://:hunter2@cache:6379/0"},
        kafka={"bootstrap_servers": "broker:9092", "extra": {"security.protocol": "SSL"}},
        stride=4,
    )
    for name in [name for name in os.environ if name.startswith("DETECTOR_")]:
        monkeypatch.delenv(name)
    for name, value in settings.environment().items():
        monkeypatch.setenv(name, value)
    assert Settings() == settings
    assert settings.environment()["DETECTOR_REDIS"].count("hunter2") == 1
