"""Fuzzing the worker: hostile messages mixed into a valid stream, real broker and Redis.

The worker must survive every message, route each invalid one to the dead-letter topic
with a stable reason code, and still score every window of the valid stream. What it saw
goes to ``benchmarks/results/fuzz.json`` (section ``worker``).
"""

from __future__ import annotations

import random
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import Phase, given, settings

from stream_detector import loadgen
from stream_detector.config import Limits, Settings
from stream_detector.pipeline import DEAD_LETTER_CODES
from stream_detector.publisher import ReadingProducer
from stream_detector.schemas import InvalidReading, decode_reading
from tests.conftest import Topics
from tests.fuzz.hostile import FUZZ, HOSTILE, LIMITS, Message, record
from tests.integration.test_worker import (  # noqa: F401 (fixtures)
    SEED,
    OutputReader,
    expected_windows,
    make_plan,
    model_store,
    one_torch_thread,
    reader,
    running,
    settings_for,
    trained,
)

pytestmark = pytest.mark.integration

HOSTILE_MESSAGES = 1500


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


def test_hostile_messages_go_to_the_dead_letter_topic_and_valid_ones_are_scored(
    kafka_bootstrap: str,
    topics: Topics,
    model_store: Path,  # noqa: F811
    settings_for: Callable[..., Settings],  # noqa: F811
    reader: OutputReader,  # noqa: F811
) -> None:
    started = time.perf_counter()
    hostile = hostile_batch(HOSTILE_MESSAGES)
    codes = [expected_code(message, LIMITS) for message in hostile]
    invalid = Counter(message for message, code in zip(hostile, codes, strict=True) if code)
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
    producer = ReadingProducer(kafka_bootstrap, topics.readings)
    for pick_valid in is_valid:
        producer.send(*next(next_valid if pick_valid else next_hostile))
    producer.flush()

    expected = expected_windows(plan)
    with running(settings_for(model_store, limits=LIMITS)) as handle:
        reader.read_until(
            lambda o: (
                not handle.thread.is_alive()
                or (len(o.dead_letters) >= invalid.total() and expected <= o.scored())
            ),
            timeout_s=180,
        )
        outputs = reader.read_quietly()
        crashes = int(not handle.thread.is_alive() or handle.error is not None)
        healthz = handle.http("/healthz")[0]

    received = Counter((message.key, message.value) for message in outputs.dead_letters)
    reasons = Counter(
        dict(message.headers)["reason"].decode().split(":", 1)[0]
        for message in outputs.dead_letters
    )
    record(
        "worker",
        {
            "inputs": len(is_valid),
            "hostile": len(hostile),
            "valid_stream": len(valid),
            "hostile_accepted": len(hostile) - invalid.total(),
            "crashes": crashes,
            "healthz": healthz,
            "dead_letter_share": round(invalid.total() / len(is_valid), 4),
            "dead_letters_expected": invalid.total(),
            "dead_letters_received": received.total(),
            "dead_letters_repeated": (received - invalid).total(),
            "reasons": dict(sorted(reasons.items())),
            "windows_expected": len(expected),
            "windows_scored": len(expected & outputs.scored()),
            "seconds": round(time.perf_counter() - started, 1),
        },
    )

    assert crashes == 0 and healthz == 200
    assert expected <= outputs.scored()
    missing = invalid - received
    assert not missing, f"{missing.total()} invalid messages not dead-lettered: {list(missing)[:3]}"
    assert set(received) <= set(invalid), "a valid reading went to the dead-letter topic"
    code_of = dict(zip(hostile, codes, strict=True))
    for message in outputs.dead_letters:
        headers = dict(message.headers)
        reason = headers["reason"].decode()
        assert reason.split(":", 1)[0] in DEAD_LETTER_CODES, reason
        assert reason.startswith(f"{code_of[(message.key, message.value)]}: "), reason
        assert headers["source_topic"] == topics.readings.encode()
