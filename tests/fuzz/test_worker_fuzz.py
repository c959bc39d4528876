"""Fuzzing the worker: hostile messages mixed into a valid stream, real broker and Redis.

The worker must survive every message, route each invalid one to the dead-letter topic
once, with a stable reason code, and still score every window of the valid stream. The
messages range up to the broker's maximum size, and the dead-letter topic takes smaller
records than the readings topic, so the largest dead letters arrive cut. What it saw goes
to ``fuzz.json`` (section ``worker``) in ``DETECTOR_RESULTS_DIR``.
"""

from __future__ import annotations

import hashlib
import random
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import Phase, given, settings

from stream_detector.config import KafkaTopics, Limits, Settings
from stream_detector.consumer import ConsumedMessage
from stream_detector.devtools import loadgen
from stream_detector.pipeline import DEAD_LETTER_CODES
from stream_detector.publisher import ReadingProducer
from stream_detector.schemas import InvalidReading, decode_reading
from tests.conftest import Topics
from tests.fuzz.hostile import (
    BROKER_MAX_MESSAGE_BYTES,
    FUZZ,
    HOSTILE,
    LIMITS,
    Message,
    huge_messages,
    record,
)
from tests.worker_support import (  # noqa: F401 (fixtures)
    SEED,
    OutputReader,
    expected_windows,
    make_plan,
    model_store,
    one_torch_thread,
    running,
    settings_for,
    trained,
)

pytestmark = pytest.mark.integration

HOSTILE_MESSAGES = 1500
HUGE_MESSAGES = 12
DEAD_LETTER_MAX_BYTES = 16_384


def hostile_batch(count: int) -> list[Message]:
    """Up to ``count`` messages drawn from HOSTILE; the same ones on every run."""
    batch: list[Message] = []

    @settings(FUZZ, max_examples=count, phases=[Phase.generate])
    @given(HOSTILE)
    def collect(message: Message) -> None:
        batch.append(message)

    collect()
    return batch


def expected_code(message: Message, limits: Limits) -> str | None:
    """The reason code the worker must dead-letter ``message`` with; None if it is valid."""
    try:
        reading = decode_reading(*message, expected_channels=None, limits=limits)
    except InvalidReading as invalid:
        return invalid.code
    # Every sensor routes to the tiny model, which has one channel.
    return None if len(reading.values) == 1 else "wrong_channels"


def original_of(message: ConsumedMessage) -> tuple[bytes | None, str]:
    """(key, sha256 of the original value) of a dead letter, cut or whole."""
    headers = dict(message.headers)
    if headers.get("truncated") == b"true":
        return message.key, headers["original_sha256"].decode()
    return message.key, hashlib.sha256(message.value or b"").hexdigest()


def test_hostile_messages_go_to_the_dead_letter_topic_and_valid_ones_are_scored(
    kafka_bootstrap: str,
    topics: Topics,
    topic_factory: Callable[..., list[str]],
    model_store: Path,  # noqa: F811
    settings_for: Callable[..., Settings],  # noqa: F811
    kafka_consumer_config: dict[str, Any],
) -> None:
    started = time.perf_counter()
    hostile = hostile_batch(HOSTILE_MESSAGES) + huge_messages(HUGE_MESSAGES, SEED)
    codes = [expected_code(message, LIMITS) for message in hostile]
    invalid = Counter(
        (key, hashlib.sha256(value or b"").hexdigest())
        for (key, value), code in zip(hostile, codes, strict=True)
        if code
    )
    plan = make_plan(4, 80)
    valid = [(key, value) for _, key, value in loadgen.messages(plan)]
    valid_sensors = {plan.sensor_id(index) for index in range(plan.sensors)}
    for message, code in zip(hostile, codes, strict=True):
        if code is None:
            reading = decode_reading(*message, expected_channels=None, limits=LIMITS)
            assert reading.sensor_id not in valid_sensors, "a hostile reading joins the stream"

    # Interleaved at random, the valid stream in order (its windows need every reading).
    is_valid = [True] * len(valid) + [False] * len(hostile)
    random.Random(SEED).shuffle(is_valid)
    next_valid, next_hostile = iter(valid), iter(hostile)
    producer = ReadingProducer(
        kafka_bootstrap, topics.readings, config={"message.max.bytes": 2 * BROKER_MAX_MESSAGE_BYTES}
    )
    for pick_valid in is_valid:
        producer.send(*next(next_valid if pick_valid else next_hostile))
    producer.flush()

    # The dead-letter topic takes smaller records than the readings topic.
    (dead_letters,) = topic_factory(
        "dead-letter-small", config={"max.message.bytes": str(DEAD_LETTER_MAX_BYTES)}
    )
    kafka = {
        "topics": KafkaTopics(
            readings=topics.readings,
            scores=topics.scores,
            alerts=topics.alerts,
            dead_letters=dead_letters,
        )
    }
    reader = OutputReader(
        kafka_bootstrap,
        Topics(topics.readings, topics.scores, topics.alerts, dead_letters),
        kafka_consumer_config,
    )
    expected = expected_windows(plan)
    with running(settings_for(model_store, limits=LIMITS, kafka=kafka)) as handle:
        reader.read_until(
            lambda o: (
                not handle.thread.is_alive()
                or (len(o.dead_letters) >= invalid.total() and expected <= o.scored())
            ),
            timeout_s=180,
        )
        crashes = int(not handle.thread.is_alive() or handle.error is not None)
        healthz = handle.http("/healthz")[0]
        readyz = handle.http("/readyz")[0]
    outputs = reader.read_to_end()
    reader.close()

    received = Counter(original_of(message) for message in outputs.dead_letters)
    reasons = Counter(
        dict(message.headers)["reason"].decode().split(":", 1)[0]
        for message in outputs.dead_letters
    )
    cut = [m for m in outputs.dead_letters if dict(m.headers).get("truncated") == b"true"]
    record(
        "worker",
        {
            "inputs": len(is_valid),
            "hostile": len(hostile),
            "valid_stream": len(valid),
            "hostile_accepted": len(hostile) - invalid.total(),
            "largest_message_bytes": max(len(value or b"") for _, value in hostile),
            "dead_letter_topic_max_bytes": DEAD_LETTER_MAX_BYTES,
            "crashes": crashes,
            "healthz": healthz,
            "readyz": readyz,
            "dead_letter_share": round(invalid.total() / len(is_valid), 4),
            "dead_letters_expected": invalid.total(),
            "dead_letters_received": received.total(),
            "dead_letters_cut": len(cut),
            "dead_letters_repeated": (received - invalid).total(),
            "reasons": dict(sorted(reasons.items())),
            "windows_expected": len(expected),
            "windows_scored": len(expected & outputs.scored()),
            "seconds": round(time.perf_counter() - started, 1),
        },
    )

    assert crashes == 0 and healthz == 200 and readyz == 200
    assert expected <= outputs.scored()
    missing = invalid - received
    assert not missing, f"{missing.total()} invalid messages not dead-lettered: {list(missing)[:3]}"
    assert set(received) <= set(invalid), "a valid reading went to the dead-letter topic"
    assert received == invalid, "a dead letter arrived more than once"
    code_of = {
        (key, hashlib.sha256(value or b"").hexdigest()): code
        for (key, value), code in zip(hostile, codes, strict=True)
    }
    for message in outputs.dead_letters:
        headers = dict(message.headers)
        reason = headers["reason"].decode()
        assert reason.split(":", 1)[0] in DEAD_LETTER_CODES, reason
        assert reason.startswith(f"{code_of[original_of(message)]}: "), reason
        assert headers["source_topic"] == topics.readings.encode()
        size = len(message.key or b"") + len(message.value or b"")
        assert size + sum(len(k) + len(v) for k, v in message.headers) <= DEAD_LETTER_MAX_BYTES
    assert len(cut) >= HUGE_MESSAGES, "the huge messages were not cut"
