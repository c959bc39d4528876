"""Fuzzing ``decode_reading``: hostile input is rejected with a stable reason, never crashes it.

Every property feeds messages through ``decodes_or_rejects``, which also counts them; the
counts go to ``fuzz.json`` (section ``decoder``) in ``DETECTOR_RESULTS_DIR`` when the module
ends. Most inputs come from hypothesis; a seeded mutator adds 100,000 more, cheaply.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import Phase, example, given, settings
from hypothesis import strategies as st

from stream_detector.config import Limits
from stream_detector.schemas import (
    REASON_CODES,
    InvalidReading,
    Reading,
    checked_reading,
    decode_reading,
)
from tests.fuzz.hostile import (
    BIG_LIMITS,
    FUZZ,
    HOSTILE,
    LIMITS,
    NOW_MS,
    NUMBERS,
    RANDOM_BYTES,
    Message,
    deep_nesting,
    encoded_reading,
    long_digits,
    mutated,
    reading_shaped,
    record,
    valid_messages,
    valid_reading,
)

pytestmark = pytest.mark.unit

INPUTS: Counter[str] = Counter()  # "inputs", "accepted", "crashes"
REASONS: Counter[str] = Counter()  # rejections by reason code


@pytest.fixture(scope="module", autouse=True)
def fuzz_statistics(request: pytest.FixtureRequest) -> Iterator[None]:
    """Write what the properties fed the decoder, and how it answered, when the module ends."""
    started = time.perf_counter()
    yield
    inputs = INPUTS["inputs"]
    record(
        "decoder",
        {
            "inputs": inputs,
            "accepted": INPUTS["accepted"],
            "rejected": sum(REASONS.values()),
            "crashes": INPUTS["crashes"],
            "dead_letter_share": round(sum(REASONS.values()) / inputs, 4) if inputs else None,
            "reasons": dict(sorted(REASONS.items())),
            "tests": sum(item.path == request.path for item in request.session.items),
            "seconds": round(time.perf_counter() - started, 1),
        },
    )


def decodes_or_rejects(
    key: bytes | None,
    value: bytes | None,
    *,
    limits: Limits = LIMITS,
    expected_channels: int | None = None,
) -> Reading | InvalidReading:
    """Decode; a rejection must carry a stable code, an acceptance must respect every limit,
    and the fast path must agree with the field-by-field checks."""
    INPUTS["inputs"] += 1
    arguments = {"expected_channels": expected_channels, "limits": limits, "now_ms": NOW_MS}
    try:
        reference: Reading | str = checked_reading(key, value, **arguments)
    except InvalidReading as invalid:
        reference = invalid.reason
    try:
        reading = decode_reading(key, value, **arguments)
    except InvalidReading as invalid:
        assert invalid.reason == reference
        REASONS[invalid.code] += 1
        assert invalid.code in REASON_CODES, invalid.reason
        assert invalid.reason.startswith(f"{invalid.code}: ")
        # A Kafka header and a metrics label: one short line that encodes as UTF-8.
        assert invalid.reason.isprintable() and len(invalid.reason) <= 160, invalid.reason
        return invalid
    except Exception:
        INPUTS["crashes"] += 1
        raise
    INPUTS["accepted"] += 1
    assert reading == reference
    assert type(reading.sensor_id) is str and reading.sensor_id.isprintable()
    assert 1 <= len(reading.sensor_id) <= limits.max_sensor_id_length
    assert key is None or key == reading.sensor_id.encode()
    assert type(reading.ts_ms) is int
    assert limits.min_ts_ms <= reading.ts_ms <= NOW_MS + limits.max_future_skew_ms
    assert type(reading.values) is tuple
    assert 1 <= len(reading.values) <= limits.max_channels
    assert expected_channels is None or len(reading.values) == expected_channels
    assert all(type(number) is float and math.isfinite(number) for number in reading.values)
    return reading


# Regression examples: what fuzzing found (reasons that echoed numbers of up to 4,300
# digits into the dead-letter header, unclear reasons) and the suspected crashes checked.
FIXED: list[tuple[Message, str]] = [
    # A lone surrogate cannot be UTF-8 encoded for the key comparison: rejected before it.
    (
        (b"\xed\xa0\x80", b'{"sensor_id": "\\ud800", "ts": 1700000000000, "value": 1}'),
        "bad_sensor_id: character 0 (U+D800)",
    ),
    # An integer too long for Python's parser in a field nobody reads: msgspec skipped it,
    # so the fast path accepted what the field-by-field checks reject (stop 26's fuzz).
    (
        (None, b'{"sensor_id": "s", "ts": 1700000000000, "value": 1, "pad": ' + b"9" * 5000 + b"}"),
        "bad_json: integer with too many digits",
    ),
    # Epoch numbers with thousands of digits were echoed whole into the reason header.
    (
        (None, b'{"sensor_id": "s", "ts": ' + b"9" * 4000 + b', "value": 1}'),
        "ts_out_of_range: over 10^15 ms in the future",
    ),
    (
        (None, b'{"sensor_id": "s", "ts": 1e308, "value": 1}'),
        "ts_out_of_range: over 10^15 ms in the future",
    ),
    (
        (None, b'{"sensor_id": "s", "ts": 1700000000000000000, "value": 1}'),
        "ts_out_of_range: over 10^15 ms in the future (micro- or nanoseconds",
    ),
    # ISO timestamps that leave datetime's range when moved to UTC, or are not text at all.
    (
        (None, b'{"sensor_id": "s", "ts": "0001-01-01T00:00:00+23:59", "value": 1}'),
        "ts_out_of_range: before 2000-01-01",
    ),
    (
        (None, b'{"sensor_id": "s", "ts": "9999-12-31T23:59:59.999999-23:59", "value": 1}'),
        "ts_out_of_range: 251702387139999 ms in the future",
    ),
    (
        (None, b'{"sensor_id": "s", "ts": "\\ud800", "value": 1}'),
        "bad_ts: not an ISO-8601 timestamp",
    ),
    # "number too long or nesting too deep" said neither which nor what to fix.
    ((None, b"[" * 5000), "bad_json: nested too deeply"),
    (
        (None, b'{"sensor_id": "s", "ts": 1700000000000, "value": ' + b"9" * 4400 + b"}"),
        "bad_json: integer with too many digits",
    ),
    (
        (None, b'{"sensor_id": "s", "ts": 1700000000000, "value": ' + b"9" * 400 + b"}"),
        "non_finite: channel 0 overflows",
    ),
]


@pytest.mark.parametrize(("message", "reason"), FIXED)
def test_fixed_findings_are_rejected_with_a_clear_reason(message: Message, reason: str) -> None:
    with pytest.raises(InvalidReading) as caught:
        decode_reading(*message, expected_channels=None, limits=LIMITS, now_ms=NOW_MS)
    assert caught.value.reason.startswith(reason), caught.value.reason


def with_fixed_examples(test: Any) -> Any:
    """Run ``test`` on every FIXED message first, as hypothesis explicit examples."""
    for message, _ in FIXED:
        test = example(message)(test)
    return test


@with_fixed_examples
@settings(FUZZ, max_examples=1200)
@given(HOSTILE)
def test_hostile_messages_are_decoded_within_limits_or_rejected(message: Message) -> None:
    decodes_or_rejects(*message)


@settings(FUZZ, max_examples=1500)
@given(reading_shaped(), st.none() | st.integers(1, LIMITS.max_channels + 1))
def test_reading_shaped_json_is_decoded_within_limits_or_rejected(
    message: Message, expected_channels: int | None
) -> None:
    decodes_or_rejects(*message, expected_channels=expected_channels)


@settings(FUZZ, max_examples=800)
@given(RANDOM_BYTES)
def test_random_bytes_are_rejected(message: Message) -> None:
    assert isinstance(decodes_or_rejects(*message), InvalidReading)


@settings(FUZZ, max_examples=800)
@given(mutated())
def test_corrupted_valid_messages_are_decoded_within_limits_or_rejected(
    message: Message,
) -> None:
    decodes_or_rejects(*message)


# Numbers of up to 20,000 digits (the int digit limit is 4,300) where ts and value go.
LONG_NUMBER_DOCUMENTS = st.builds(
    lambda ts, value: f'{{"sensor_id": "s", "ts": {ts}, "value": {value}}}',
    long_digits(1, 20_000) | NUMBERS | st.just(str(NOW_MS)),
    long_digits(1, 20_000) | NUMBERS,
)


@settings(FUZZ, max_examples=300)
@given(deep_nesting(200_000) | LONG_NUMBER_DOCUMENTS)
def test_deep_nesting_and_long_numbers_reach_the_parser_and_are_rejected_or_decoded(
    document: str,
) -> None:
    decodes_or_rejects(None, document.encode(), limits=BIG_LIMITS)


@settings(FUZZ, max_examples=1500)
@given(valid_reading().flatmap(lambda r: st.tuples(st.just(r), encoded_reading(r))), st.booleans())
def test_valid_readings_round_trip(message: tuple[dict[str, Any], bytes], keyed: bool) -> None:
    reading, value = message
    key = reading["sensor_id"].encode() if keyed else None
    assert decodes_or_rejects(key, value) == Reading(
        reading["sensor_id"], reading["ts_ms"], tuple(float(v) for v in reading["values"])
    )


JSON_OBJECTS = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=5),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3)
    ),
    max_leaves=6,
)
ARRAYS = st.lists(JSON_OBJECTS, max_size=3)
OBJECTS = st.dictionaries(st.text(max_size=5), JSON_OBJECTS, max_size=3)
FINITE = st.floats(allow_nan=False, allow_infinity=False)
# Field -> values of the wrong JSON type for it, and the code that rejects them.
WRONG_TYPES: dict[str, tuple[st.SearchStrategy[Any], str]] = {
    "sensor_id": (
        st.none() | st.booleans() | st.integers() | FINITE | ARRAYS | OBJECTS,
        "bad_sensor_id",
    ),
    "ts": (st.none() | st.booleans() | ARRAYS | OBJECTS, "bad_ts"),
    "values": (
        st.none() | st.booleans() | st.integers() | FINITE | st.text() | OBJECTS,
        "bad_values",
    ),
    "value": (st.none() | st.booleans() | st.text() | ARRAYS | OBJECTS, "non_numeric"),
}


@settings(FUZZ, max_examples=1000)
@given(
    valid_reading(),
    st.sampled_from(sorted(WRONG_TYPES)).flatmap(
        lambda field: st.tuples(st.just(field), WRONG_TYPES[field][0])
    ),
)
def test_a_field_of_the_wrong_type_is_rejected_with_its_code(
    reading: dict[str, Any], wrong: tuple[str, Any]
) -> None:
    field, wrong_value = wrong
    document = {"sensor_id": reading["sensor_id"], "ts": reading["ts_ms"]}
    if field == "value":
        document["value"] = wrong_value
    else:
        document["values"] = reading["values"]
        document[field] = wrong_value
    rejected = decodes_or_rejects(None, json.dumps(document).encode())
    assert isinstance(rejected, InvalidReading)
    assert rejected.code == WRONG_TYPES[field][1], rejected.reason


MUTATION_SEEDS = 300
MUTATIONS = 100_000
# Bytes that matter to a JSON parser, and values that matter to the decoder's checks.
SPLICES = [
    *(bytes([byte]) for byte in b'"{}[],:-+.eE0123456789\\ \x00\xff'),
    b"NaN",
    b"-Infinity",
    b"1e999",
    b"null",
    b"true",
    b'"\\ud800"',
    b"9" * 5000,
    b"[" * 3000,
    b'"value": [1.0, 2.0]',
    b'"sensor_id": ""',
    b'"ts": "2023-11-14T22:13:20Z"',
]


def mutate(rng: random.Random, value: bytes, others: list[bytes]) -> bytes:
    """A few random edits of ``value``: flips, splices, cuts, repeats, crossovers, padding."""
    for _ in range(rng.randint(1, 4)):
        position = rng.randint(0, len(value))
        edit = rng.randrange(7)
        if edit == 0 and value:
            index = min(position, len(value) - 1)
            value = (
                value[:index] + bytes([value[index] ^ (1 << rng.randrange(8))]) + value[index + 1 :]
            )
        elif edit == 1:
            value = value[:position] + rng.choice(SPLICES) + value[position:]
        elif edit == 2:
            value = value[:position] + value[position + rng.randint(1, 16) :]
        elif edit == 3:
            value = value[:position]
        elif edit == 4:
            end = min(len(value), position + rng.randint(1, 32))
            value = value[:end] + value[position:end] * rng.randint(1, 64) + value[end:]
        elif edit == 5:
            other = rng.choice(others)
            value = value[:position] + other[rng.randint(0, len(other)) :]
        else:  # around the size limit, where off-by-one errors live
            target = LIMITS.max_message_bytes + rng.randint(-2, 2)
            value = value[:-1] + b" " * max(0, target - len(value)) + value[-1:]
    return value


def test_a_hundred_thousand_seeded_mutations_are_decoded_within_limits_or_rejected() -> None:
    seeds: list[Message] = []

    @settings(FUZZ, max_examples=MUTATION_SEEDS, phases=[Phase.generate])
    @given(valid_messages())
    def collect(message: Message) -> None:
        seeds.append(message)

    collect()
    values = [value for _, value in seeds if value is not None]
    rng = random.Random(20261201)
    for _ in range(MUTATIONS):
        key, value = rng.choice(seeds)
        assert value is not None
        decodes_or_rejects(key if rng.random() < 0.8 else None, mutate(rng, value, values))
