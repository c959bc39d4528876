"""Hostile messages for the readings topic, as hypothesis strategies, and the fuzz statistics.

A message is a ``(key, value)`` pair of bytes (either may be ``None``). The strategies build
JSON as text rather than with ``json.dumps``, so that they can write what a bad producer
writes: NaN and Infinity literals, 1e999, integers beyond Python's digit limit, duplicate
keys, lone surrogates, nesting deeper than the recursion limit and invalid UTF-8.
"""

from __future__ import annotations

import json
import math
import os
import random
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from stream_detector.config import Limits

Message = tuple[bytes | None, bytes | None]

NOW_MS = 1_700_000_000_000  # 2023-11-14T22:13:20Z
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
LIMITS = Limits(max_message_bytes=8192, max_channels=16, max_sensor_id_length=64)
# Large enough that the parser, not the size limit, meets deep nesting and long numbers.
BIG_LIMITS = Limits(max_message_bytes=1_000_000, max_channels=4096)
# Apache Kafka's default message.max.bytes: the largest reading a default topic takes.
BROKER_MAX_MESSAGE_BYTES = 1_000_000

# Deterministic (derandomize: the examples depend only on the test's code), no example
# database, no deadline (the machine is shared); huge inputs are the point, not a problem.
FUZZ = settings(
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.large_base_example,
        HealthCheck.filter_too_much,
    ],
)

# Every code point, lone surrogates, controls, unassigned and non-BMP characters included.
ANY_CHARACTER = st.characters(exclude_categories=[])
NASTY_TEXT = [
    "\ud800",
    "a\udfff",
    "\udbff\udfff",
    "\x00",
    "\x1b[31m",
    "tab\there",
    "line\nbreak",
    "\u2028",
    "\u200b",
    "\ufeff",
    "\U0001f600",
    "\U0010ffff",
    "e\u0301",
    "s" * LIMITS.max_sensor_id_length,
    "s" * (LIMITS.max_sensor_id_length + 1),
]


def encode_text(text: str) -> bytes:
    """UTF-8, but lone surrogates pass through as the invalid bytes a broken producer sends."""
    return text.encode("utf-8", "surrogatepass")


def json_string(text: str, ascii_only: bool = True) -> str:
    """A JSON string literal; lone surrogates become escapes such as \\ud800 when ascii_only."""
    return json.dumps(text, ensure_ascii=ascii_only)


def json_float(number: float) -> str:
    """A float as JSON text, NaN and infinities as the literals Python's json writes."""
    if math.isnan(number):
        return "NaN"
    if math.isinf(number):
        return "Infinity" if number > 0 else "-Infinity"
    return repr(number)


def long_digits(low: int, high: int) -> st.SearchStrategy[str]:
    """Integers of ``low`` to ``high`` digits, as JSON text, either sign."""
    return st.builds(
        lambda sign, digits: sign + "9" * digits,
        st.sampled_from(["", "-"]),
        st.integers(low, high),
    )


NUMBER_LITERALS = st.sampled_from(
    [
        "NaN",
        "Infinity",
        "-Infinity",
        "1e999",
        "-1e999",
        "1.8e308",
        "1e-999",
        "-0",
        "-0.0",
        "0e0",
        "1E+2",
        # Not JSON: bad_json.
        "nan",
        "inf",
        "0x10",
        "01",
        "1.",
        ".5",
        "+1",
        "1e",
        "--1",
    ]
)
NUMBERS = st.one_of(
    st.integers().map(str),
    st.integers(min_value=-(2**70), max_value=2**70).map(str),
    st.floats().map(json_float),
    NUMBER_LITERALS,
    long_digits(300, 400),  # floats overflow to inf
    long_digits(4290, 4310),  # around Python's int_max_str_digits (4300)
)
STRINGS = st.one_of(
    st.text(ANY_CHARACTER, max_size=30).map(json_string),
    st.text(max_size=30).map(lambda text: json_string(text, ascii_only=False)),
    st.sampled_from(NASTY_TEXT).map(json_string),
)
SCALARS = st.one_of(st.sampled_from(["null", "true", "false"]), NUMBERS, STRINGS)


def _array(items: list[str]) -> str:
    return "[" + ",".join(items) + "]"


def _object(pairs: list[tuple[str, str]]) -> str:
    return "{" + ",".join(f"{name}:{value}" for name, value in pairs) + "}"


# Any JSON value, as text: the wrong type for every field.
ANY_JSON = st.recursive(
    SCALARS,
    lambda children: st.one_of(
        st.lists(children, max_size=5).map(_array),
        st.lists(st.tuples(STRINGS, children), max_size=5).map(_object),
    ),
    max_leaves=12,
)


def deep_nesting(max_depth: int) -> st.SearchStrategy[str]:
    """Arrays or objects nested up to ``max_depth`` deep, closed or not."""
    return st.builds(
        lambda depth, opener, closed: (
            opener * depth + "1" + ("]" if opener == "[" else "}") * depth * closed
        ),
        st.integers(1, max_depth),
        st.sampled_from(["[", '{"a":']),
        st.booleans(),
    )


def _iso(moment: datetime, style: int) -> str:
    text = moment.isoformat(timespec=("auto", "milliseconds", "seconds", "minutes")[style % 4])
    return text.replace("+00:00", "Z") if style >= 4 else text


OFFSETS = st.none() | st.integers(-1439, 1439).map(lambda m: timezone(timedelta(minutes=m)))
ISO_TIMESTAMPS = st.one_of(
    # Anywhere from year 1 to 9999, with any offset (some overflow when moved to UTC).
    st.builds(_iso, st.datetimes(timezones=OFFSETS), st.integers(0, 7)),
    # Close to NOW_MS, so that some are accepted.
    st.builds(
        lambda ms, offset, style: _iso(
            (EPOCH + timedelta(milliseconds=ms)).astimezone(offset),
            style,
        ),
        st.integers(LIMITS.min_ts_ms - 10**9, NOW_MS + 10**9),
        st.integers(-1439, 1439).map(lambda m: timezone(timedelta(minutes=m))),
        st.integers(0, 7),
    ),
    st.sampled_from(
        [
            "",
            "2023-11-14",
            "2023-W46-2",
            "2023-11-14T22:13:20.123456789Z",
            "2023-11-14T24:00:00",
            "2023-02-30T00:00:00Z",
            "2023-11-14T22:13:20+24:00",
            "0001-01-01T00:00:00+23:59",
            "9999-12-31T23:59:59.999999-23:59",
            "yesterday",
            "1700000000000",
        ]
    ),
    st.text(ANY_CHARACTER, max_size=40),
)
TIMESTAMPS = st.one_of(
    st.integers(LIMITS.min_ts_ms - 10**6, NOW_MS + 10**7).map(str),
    st.sampled_from(
        [
            LIMITS.min_ts_ms - 1,
            LIMITS.min_ts_ms,
            NOW_MS + LIMITS.max_future_skew_ms,
            NOW_MS + LIMITS.max_future_skew_ms + 1,
            NOW_MS // 1000,  # epoch seconds
            NOW_MS * 1000,  # microseconds
            NOW_MS * 1_000_000,  # nanoseconds
            0,
            -1,
            -(2**63),
            2**63,
        ]
    ).map(str),
    st.integers().map(str),
    st.floats(min_value=LIMITS.min_ts_ms, max_value=NOW_MS + 10**7).map(json_float),
    st.floats().map(json_float),
    NUMBER_LITERALS,
    long_digits(20, 4310),
    ISO_TIMESTAMPS.map(json_string),
    ANY_JSON,
)
# What most producers send, so that most hostile readings fail late, not early.
PLAUSIBLE_IDS = st.text("abcxyz-_.:/0123456789", min_size=1, max_size=LIMITS.max_sensor_id_length)
PLAUSIBLE_TIMESTAMPS = st.integers(NOW_MS - 10**10, NOW_MS + LIMITS.max_future_skew_ms).map(str)
PLAUSIBLE_NUMBERS = st.floats(allow_nan=False, allow_infinity=False).map(repr) | st.integers(
    -(10**6), 10**6
).map(str)
PLAUSIBLE_CHANNELS = st.lists(PLAUSIBLE_NUMBERS, min_size=1, max_size=LIMITS.max_channels).map(
    _array
)
SENSOR_IDS = st.one_of(
    PLAUSIBLE_IDS,
    st.text(ANY_CHARACTER, max_size=LIMITS.max_sensor_id_length + 2),
    st.sampled_from(NASTY_TEXT),
    st.integers(LIMITS.max_sensor_id_length, 4000).map(lambda length: "x" * length),
)
CHANNELS = st.one_of(
    st.lists(NUMBERS, max_size=LIMITS.max_channels + 3).map(_array),
    st.lists(st.floats(allow_nan=False, allow_infinity=False).map(repr), max_size=20).map(_array),
    # Many channels, and arrays past the size limit.
    st.integers(0, 3000).map(lambda count: _array(["0.5"] * count)),
    ANY_JSON,
)


def mostly(common: st.SearchStrategy[Any], rare: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """``rare`` about one time in four, else ``common``.

    Keeps most fields of a hostile reading plausible, so that it gets past the first check
    and exercises the later ones. (Hypothesis favours the simplest choice, 0, so 0 is common.)
    """
    return st.integers(0, 3).flatmap(lambda pick: rare if pick == 3 else common)


@st.composite
def reading_shaped(draw: st.DrawFn) -> Message:
    """A JSON object with some of the reading's fields, each right or wrong, plus extras."""
    sensor_id = draw(mostly(PLAUSIBLE_IDS, SENSOR_IDS))
    pairs = []
    # Each present nine times in ten.
    if draw(st.integers(0, 9)) < 9:
        pairs.append(('"sensor_id"', draw(mostly(st.just(json_string(sensor_id)), ANY_JSON))))
    if draw(st.integers(0, 9)) < 9:
        pairs.append(('"ts"', draw(mostly(PLAUSIBLE_TIMESTAMPS, TIMESTAMPS))))
    # Mostly one of "value" and "values"; sometimes both, sometimes neither.
    channels = draw(st.sampled_from(["value", "values"] * 4 + ["both", "neither"]))
    if channels in ("value", "both"):
        pairs.append(('"value"', draw(mostly(PLAUSIBLE_NUMBERS, NUMBERS | ANY_JSON))))
    if channels in ("values", "both"):
        pairs.append(('"values"', draw(mostly(PLAUSIBLE_CHANNELS, CHANNELS))))
    # Unknown keys, huge padding, and duplicates of known keys (the last one wins).
    pairs += draw(
        st.lists(
            st.tuples(
                st.sampled_from(['"sensor_id"', '"ts"', '"value"', '"pad"', '"\\ud800"']),
                st.one_of(ANY_JSON, st.integers(0, 20_000).map(lambda n: f'"{"x" * n}"')),
            ),
            max_size=2,
        )
    )
    pairs = draw(st.permutations(pairs))
    key = draw(
        mostly(
            st.sampled_from([None, encode_text(sensor_id)]),
            st.binary(max_size=12) | st.just(encode_text(sensor_id)[:-1]),
        )
    )
    return key, encode_text(_object(pairs))


def valid_reading(limits: Limits = LIMITS) -> st.SearchStrategy[dict[str, Any]]:
    """A reading the decoder must accept: sensor_id, ts_ms, values (finite floats)."""
    return st.fixed_dictionaries(
        {
            "sensor_id": st.text(
                st.characters(exclude_categories=["C", "Z"]) | st.just(" "),
                min_size=1,
                max_size=limits.max_sensor_id_length,
            ),
            "ts_ms": st.integers(limits.min_ts_ms, NOW_MS + limits.max_future_skew_ms),
            "values": st.lists(
                st.floats(allow_nan=False, allow_infinity=False),
                min_size=1,
                max_size=limits.max_channels,
            ),
        }
    )


@st.composite
def encoded_reading(draw: st.DrawFn, reading: dict[str, Any]) -> bytes:
    """``reading`` as a producer may write it: ``value`` or ``values``, ts in any form."""
    ts_ms = reading["ts_ms"]
    ts = draw(
        st.one_of(
            st.just(ts_ms),
            # Rounds to ts_ms (the float keeps 1e-3 ms of precision at today's epoch).
            st.floats(-0.49, 0.49).map(lambda fraction: ts_ms + fraction),
            st.builds(
                lambda offset, style: _iso(
                    (EPOCH + timedelta(milliseconds=ts_ms)).astimezone(offset), style
                ),
                st.integers(-1439, 1439).map(lambda m: timezone(timedelta(minutes=m))),
                st.integers(0, 1).map(lambda style: 4 * style),  # milliseconds kept
            ),
        )
    )
    values = reading["values"]
    document: dict[str, Any] = {"sensor_id": reading["sensor_id"], "ts": ts}
    if len(values) == 1 and draw(st.booleans()):
        document["value"] = values[0]
    else:
        document["values"] = values
    document["unit"] = draw(st.none() | st.text(max_size=5))
    return json.dumps(document, ensure_ascii=draw(st.booleans())).encode()


@st.composite
def valid_messages(draw: st.DrawFn) -> Message:
    """A valid reading, keyed by its sensor id or not keyed."""
    reading = draw(valid_reading())
    key = draw(st.sampled_from([None, reading["sensor_id"].encode()]))
    return key, draw(encoded_reading(reading))


JSON_SYNTAX = st.sampled_from([bytes([byte]) for byte in b'"{}[],:-.e0\\ '])


@st.composite
def mutated(draw: st.DrawFn) -> Message:
    """A valid message with a few bytes replaced, inserted, or the end cut off."""
    key, value = draw(valid_messages())
    assert value is not None
    for _ in range(draw(st.integers(1, 3))):
        position = draw(st.integers(0, len(value)))
        cut = draw(st.integers(0, 3))
        inserted = draw(st.binary(max_size=3) | JSON_SYNTAX)
        value = value[:position] + inserted + value[position + cut :]
    return key, value


RANDOM_BYTES = st.tuples(
    st.none() | st.binary(max_size=8),
    st.none() | st.binary(max_size=2 * LIMITS.max_message_bytes),
)
DEEP = st.tuples(st.none(), deep_nesting(5000).map(str.encode))
OVERSIZED = st.tuples(
    st.none() | st.just(b"s-1"),
    st.integers(LIMITS.max_message_bytes - 64, 4 * LIMITS.max_message_bytes).map(
        lambda size: b'{"sensor_id": "s-1", "pad": "' + b"x" * size + b'"}'
    ),
)
HOSTILE = st.one_of(RANDOM_BYTES, DEEP, OVERSIZED, mutated(), reading_shaped(), valid_messages())


def padded_reading(size: int, sensor_id: str = "s-1") -> bytes:
    """A reading-shaped JSON document of exactly ``size`` bytes (at least 64)."""
    head = b'{"sensor_id": "%s", "ts": %d, "value": 1.0, "pad": "' % (sensor_id.encode(), NOW_MS)
    return head + b"x" * (size - len(head) - 2) + b'"}'


def huge_messages(count: int, seed: int) -> list[Message]:
    """``count`` readings from just over the decoder's limit up to the broker's, log-spaced."""
    rng = random.Random(seed)
    low, high = math.log(LIMITS.max_message_bytes + 1), math.log(BROKER_MAX_MESSAGE_BYTES - 1024)
    sizes = sorted(round(math.exp(rng.uniform(low, high))) for _ in range(count - 1))
    keyed = [rng.choice([None, b"s-1"]) for _ in sizes]
    return [(key, padded_reading(size)) for key, size in zip(keyed, sizes, strict=True)] + [
        (b"s-1", padded_reading(BROKER_MAX_MESSAGE_BYTES - 1024))
    ]


def record(section: str, stats: dict[str, Any]) -> None:
    """Write one section of ``fuzz.json`` in ``DETECTOR_RESULTS_DIR``, keeping the others.

    Only when that variable is set (``benchmarks/suite_results.py`` sets it), so that a
    test run leaves the working tree as it was.
    """
    folder = os.environ.get("DETECTOR_RESULTS_DIR")
    if not folder:
        return
    results_file = Path(folder) / "fuzz.json"
    results = json.loads(results_file.read_text()) if results_file.exists() else {}
    results[section] = stats
    results_file.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
