"""Embedded tansu and redis-server: start, serve, stop, and fail loudly."""

from __future__ import annotations

import socket

import pytest
from confluent_kafka.admin import AdminClient

from stream_detector.devtools.services import (
    EmbeddedKafka,
    EmbeddedRedis,
    ServiceStartError,
    create_topics,
    delete_topics,
)
from stream_detector.windows import WindowStore

pytestmark = pytest.mark.integration


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def _start_or_skip(service: EmbeddedKafka | EmbeddedRedis) -> None:
    try:
        service.start()
    except ServiceStartError as error:
        if "not found" in str(error):
            pytest.skip(str(error))
        raise


def test_embedded_kafka_serves_topics_and_stops() -> None:
    kafka = EmbeddedKafka()
    _start_or_skip(kafka)
    with kafka:
        assert kafka.running
        create_topics(kafka.bootstrap_servers, ["readings", "scores"], partitions=3)
        create_topics(kafka.bootstrap_servers, ["readings"], partitions=3)  # exists: fine
        listed = AdminClient({"bootstrap.servers": kafka.bootstrap_servers}).list_topics(timeout=5)
        assert len(listed.topics["readings"].partitions) == 3
        delete_topics(kafka.bootstrap_servers, ["scores", "never-created"])
        listed = AdminClient({"bootstrap.servers": kafka.bootstrap_servers}).list_topics(timeout=5)
        assert "scores" not in listed.topics
        log_path = kafka.log_path
        assert log_path is not None and log_path.exists()
    assert not kafka.running
    assert not _accepts(kafka.port)
    assert not log_path.exists()


def test_embedded_redis_serves_and_stops() -> None:
    server = EmbeddedRedis()
    _start_or_skip(server)
    with server:
        assert WindowStore(server.url, window_length=4).ping()
    assert not _accepts(server.port)
    assert not WindowStore(server.url, window_length=4).ping()


def test_start_failure_raises_with_the_log_tail() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        server = EmbeddedRedis(port=taken.getsockname()[1], startup_timeout_s=10)
        with pytest.raises(ServiceStartError) as raised:
            _start_or_skip(server)
    message = str(raised.value)
    assert "exited with code" in message
    assert "Address already in use" in message
    assert not server.running
