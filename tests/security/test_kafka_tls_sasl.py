"""Kafka over TLS and SASL, configured the way an operator does it: through ``kafka.extra``.

The clients are the worker's own (``ReadingConsumer``, ``Publisher``, ``ReadingProducer``)
with the configuration ``kafka_consumer_config`` and ``kafka_producer_config`` built from
``Settings``. What the embedded broker, tansu 0.6.0, can show:

- TLS: tansu cannot serve it (``--cert`` and ``--key`` exclude each other), so a TLS
  terminator (tests/security/conftest.py) stands in front of it and tansu advertises the
  terminator's port. The clients' TLS is real: protocol, CA and host name verification.
- SASL: ``tansu broker --authentication`` runs SCRAM-SHA-256/512 and refuses everything
  before it, but users are created through the broker (``tansu user create``), which the
  in-memory store refuses unauthenticated, so no login can succeed. The tests show the
  refusals: no credentials, the wrong credentials, the wrong mechanism.

Reserved keys and masking of ``kafka.extra`` are covered by tests/unit/test_config.py.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from confluent_kafka import KafkaError

from stream_detector.config import (
    KafkaSettings,
    KafkaTopics,
    Settings,
    kafka_consumer_config,
    kafka_producer_config,
)
from stream_detector.consumer import ConsumedMessage, ReadingConsumer
from stream_detector.devtools.services import EmbeddedKafka, ServiceStartError, create_topics
from stream_detector.publisher import Publisher, PublishError, ReadingProducer
from tests.security.conftest import TlsFiles, TlsTerminator

pytestmark = pytest.mark.integration

SCRAM_USER = "detector"
WRONG_PASSWORD = "not-the-password"
# Quick group joins on tansu (see tests/conftest.py), quick give-up for refused clients.
FAST = {"heartbeat.interval.ms": "500", "message.timeout.ms": "2000", "log_level": "0"}


@contextmanager
def broker_behind_tls(files: TlsFiles, *, authentication: bool = False) -> Iterator[TlsTerminator]:
    """tansu behind a TLS terminator that it advertises; clients bootstrap from the terminator."""
    terminator = TlsTerminator(files)
    try:
        with EmbeddedKafka(authentication=authentication, advertised_port=terminator.port) as kafka:
            terminator.upstream_port = kafka.port
            yield terminator
    except ServiceStartError as error:
        pytest.skip(f"tansu did not start: {error}")
    finally:
        terminator.close()


@pytest.fixture(scope="module")
def tls_broker(tls_files: TlsFiles) -> Iterator[TlsTerminator]:
    """A broker whose certificate (signed by the test CA) names 127.0.0.1."""
    with broker_behind_tls(tls_files) as terminator:
        yield terminator


@pytest.fixture(scope="module")
def sasl_tls_broker(tls_files: TlsFiles) -> Iterator[TlsTerminator]:
    """A broker that requires SASL (SCRAM), behind TLS."""
    with broker_behind_tls(tls_files, authentication=True) as terminator:
        yield terminator


def settings_for(bootstrap_servers: str, extra: dict[str, str], topic: str) -> Settings:
    return Settings(
        kafka=KafkaSettings(
            bootstrap_servers=bootstrap_servers,
            group_id=f"secure-{uuid.uuid4().hex[:8]}",
            topics=KafkaTopics(readings=topic, scores=topic, alerts=topic, dead_letters=topic),
            session_timeout_ms=2000,
            extra={**FAST, **extra},
        )
    )


def tls_extra(files: TlsFiles) -> dict[str, str]:
    return {"security.protocol": "SSL", "ssl.ca.location": str(files.ca)}


def publish_one(settings: Settings) -> tuple[PublishError | None, list[KafkaError]]:
    """Publish one score with the worker's producer: its failure and the client's errors."""
    errors: list[KafkaError] = []
    topics = settings.kafka.topics
    publisher = Publisher(
        settings.kafka.bootstrap_servers,
        scores_topic=topics.scores,
        alerts_topic=topics.alerts,
        dead_letter_topic=topics.dead_letters,
        config={**kafka_producer_config(settings), "error_cb": errors.append},
        describe_timeout_s=1,  # a refused client's limits are never read: the defaults
    )
    try:
        publisher.publish_scores([{"sensor_id": "pump-1", "score": 0.5}])
        publisher.flush_and_check(timeout_s=15)
    except PublishError as failure:
        return failure, errors
    finally:
        publisher.close(timeout_s=1)
    return None, errors


def consume(settings: Settings, topics: list[str], count: int) -> list[ConsumedMessage]:
    consumer = ReadingConsumer(
        settings.kafka.bootstrap_servers,
        settings.kafka.group_id,
        topics,
        config=kafka_consumer_config(settings),
    )
    received: list[ConsumedMessage] = []
    deadline = time.monotonic() + 20
    try:
        while len(received) < count and time.monotonic() < deadline:
            received += consumer.poll_batch(100, 0.2)
    finally:
        consumer.close()
    return received


def codes(errors: list[KafkaError]) -> set[int]:
    return {error.code() for error in errors}


def test_readings_and_outputs_travel_over_tls_with_the_worker_settings(
    tls_broker: TlsTerminator, tls_files: TlsFiles
) -> None:
    readings, scores = f"readings-{uuid.uuid4().hex[:8]}", f"scores-{uuid.uuid4().hex[:8]}"
    settings = settings_for(tls_broker.bootstrap_servers, tls_extra(tls_files), scores)
    config: dict[str, Any] = kafka_producer_config(settings)
    assert config["security.protocol"] == "SSL"
    create_topics(settings.kafka.bootstrap_servers, [readings, scores], config=config)
    reading = json.dumps({"sensor_id": "pump-1", "ts": 1_700_000_000_000, "value": 1.5})
    producer = ReadingProducer(settings.kafka.bootstrap_servers, readings, config=config)
    producer.send(b"pump-1", reading.encode())
    producer.flush(timeout_s=15)

    assert publish_one(settings) == (None, [])
    received = consume(settings, [readings, scores], count=2)

    by_topic = {message.topic: message for message in received}
    assert by_topic[readings].value == reading.encode()
    assert json.loads(by_topic[scores].value or b"{}") == {"sensor_id": "pump-1", "score": 0.5}


def test_a_client_without_the_ca_is_refused(tls_broker: TlsTerminator) -> None:
    settings = settings_for(tls_broker.bootstrap_servers, {"security.protocol": "SSL"}, "scores")
    failure, errors = publish_one(settings)
    assert failure is not None, "published to a broker whose certificate nobody checked"
    assert KafkaError._SSL in codes(errors)
    assert any("certificate verify failed" in error.str() for error in errors)


def test_a_certificate_for_another_host_is_refused(
    tls_files: TlsFiles, foreign_tls_files: TlsFiles
) -> None:
    with broker_behind_tls(foreign_tls_files) as impostor:
        settings = settings_for(impostor.bootstrap_servers, tls_extra(tls_files), "scores")
        failure, errors = publish_one(settings)
    assert failure is not None, "a certificate for another host name was accepted"
    assert any("certificate verify failed" in error.str() for error in errors)


def test_a_plaintext_client_is_refused_by_the_tls_listener(tls_broker: TlsTerminator) -> None:
    failure, errors = publish_one(settings_for(tls_broker.bootstrap_servers, {}, "scores"))
    assert failure is not None, "a plaintext client got through a TLS-only listener"
    assert codes(errors) & {KafkaError._TRANSPORT, KafkaError._ALL_BROKERS_DOWN}


@pytest.mark.parametrize("mechanism", ["SCRAM-SHA-512", "SCRAM-SHA-256", "PLAIN"])
def test_wrong_credentials_are_refused_after_a_verified_tls_handshake(
    sasl_tls_broker: TlsTerminator, tls_files: TlsFiles, mechanism: str
) -> None:
    extra = {
        **tls_extra(tls_files),
        "security.protocol": "SASL_SSL",
        "sasl.mechanism": mechanism,
        "sasl.username": SCRAM_USER,
        "sasl.password": WRONG_PASSWORD,
    }
    failure, errors = publish_one(settings_for(sasl_tls_broker.bootstrap_servers, extra, "s"))
    assert failure is not None, f"{mechanism} with a wrong password was let in"
    assert KafkaError._AUTHENTICATION in codes(errors)
    assert KafkaError._SSL not in codes(errors), "TLS should have succeeded before SASL"
    assert not any(WRONG_PASSWORD in error.str() for error in errors)


def test_a_client_without_credentials_is_refused_where_sasl_is_required(
    sasl_tls_broker: TlsTerminator, tls_files: TlsFiles
) -> None:
    settings = settings_for(sasl_tls_broker.bootstrap_servers, tls_extra(tls_files), "scores")
    failure, _ = publish_one(settings)
    assert failure is not None, "a client without SASL credentials was let in"
