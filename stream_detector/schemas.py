"""What goes in and out over Kafka: reading validation, score records, alert events.

The JSON Schemas published for subscribers live next to this module in ``schemas/``;
a unit test keeps them and ``to_json()`` in step.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal, NamedTuple, Self

import msgspec

from stream_detector.config import Limits

SCHEMA_VERSION = 1

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_ONE_MS = timedelta(milliseconds=1)
# About 31,700 years: only a timestamp in the wrong unit gets this far ahead.
_FAR_FUTURE_MS = 10**15

# The codes ``decode_reading`` rejects a message with (``pipeline.DEAD_LETTER_CODES`` adds
# the worker's own).
REASON_CODES = frozenset(
    {
        "too_large",
        "empty",
        "not_utf8",
        "bad_json",
        "not_object",
        "bad_sensor_id",
        "key_mismatch",
        "bad_ts",
        "ts_out_of_range",
        "bad_values",
        "non_numeric",
        "non_finite",
        "too_many_channels",
        "wrong_channels",
    }
)


class InvalidReading(ValueError):
    """A message that cannot be a reading; ``reason`` goes into the dead-letter header.

    ``reason`` is ``"<code>: <detail>"``: ``code`` is one of the small stable set
    ``REASON_CODES``; ``detail`` is one short line that never echoes the input itself.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason

    @property
    def code(self) -> str:
        """The stable part of ``reason``, for metrics labels."""
        return self.reason.split(":", 1)[0]


class _NonFiniteLiteral(ValueError):
    """Raised while parsing when the JSON holds a NaN or Infinity literal."""


def _reject_constant(literal: str) -> float:
    raise _NonFiniteLiteral(literal)


# Built once: json.loads with any keyword argument builds a new decoder per call.
_DECODER = json.JSONDecoder(parse_constant=_reject_constant)


class Reading(NamedTuple):
    """One validated reading: ``values`` has one float per channel (a named tuple, as one
    is built for every message)."""

    sensor_id: str
    ts_ms: int
    values: tuple[float, ...]


class _Wire(msgspec.Struct):
    """What a well-formed reading looks like, for the fast path of ``decode_reading``."""

    sensor_id: str
    ts: int  # epoch ms; a float or an ISO string takes the field-by-field checks
    value: float | msgspec.UnsetType = msgspec.UNSET
    values: list[float] | msgspec.UnsetType = msgspec.UNSET


_WIRE = msgspec.json.Decoder(_Wire)
# The longest message the fast path takes. Python's parser refuses what msgspec skips in
# a field nobody reads: an integer of over 4,300 digits, or nesting deep enough to exhaust
# the recursion limit (two bytes a level). A kilobyte holds neither, and a reading of up to
# about 50 channels.
_FAST_PATH_MAX_BYTES = 1024


def decode_reading(
    key: bytes | None,
    value: bytes | None,
    *,
    expected_channels: int | None,
    limits: Limits,
    now_ms: int | None = None,
) -> Reading:
    """Validate one Kafka message from the readings topic, or raise ``InvalidReading``.

    The value is a UTF-8 JSON object ``{"sensor_id", "ts", "value"}`` or
    ``{"sensor_id", "ts", "values": [...]}``; other keys are ignored. ``ts`` is epoch
    milliseconds (integer or float) or an ISO-8601 string (UTC when it has no offset).
    A message key, when present, must equal ``sensor_id``. ``expected_channels=None``
    accepts any channel count up to ``limits.max_channels``. ``now_ms`` defaults to the
    wall clock and bounds how far in the future ``ts`` may lie.

    A well-formed reading of up to a kilobyte is parsed and typed by msgspec in one pass;
    anything else (and anything msgspec accepts that needs a closer look) goes to the
    field-by-field checks, which give the reason. Both paths accept the same messages with
    the same result (`tests/fuzz/test_decoder_fuzz.py` checks it on every input it makes).
    """
    now = time.time_ns() // 1_000_000 if now_ms is None else now_ms
    if value and len(value) <= min(limits.max_message_bytes, _FAST_PATH_MAX_BYTES):
        reading = _well_formed(key, value, expected_channels, limits, now)
        if reading is not None:
            return reading
    return checked_reading(
        key, value, expected_channels=expected_channels, limits=limits, now_ms=now
    )


def _well_formed(
    key: bytes | None, value: bytes, expected_channels: int | None, limits: Limits, now_ms: int
) -> Reading | None:
    """The reading, when the message is well formed in every respect; else None."""
    try:
        value.decode("utf-8")  # msgspec does not check the strings it skips
        wire = _WIRE.decode(value)
    except (UnicodeDecodeError, msgspec.DecodeError, RecursionError):
        return None
    sensor_id, ts = wire.sensor_id, wire.ts
    if (
        not 0 < len(sensor_id) <= limits.max_sensor_id_length
        or not sensor_id.isprintable()
        or (key is not None and key != sensor_id.encode("utf-8"))
        or not limits.min_ts_ms <= ts <= now_ms + limits.max_future_skew_ms
    ):
        return None
    if wire.values is msgspec.UNSET:
        if wire.value is msgspec.UNSET:
            return None
        values: tuple[float, ...] = (wire.value,)
    elif wire.value is msgspec.UNSET and 0 < len(wire.values) <= limits.max_channels:
        values = tuple(wire.values)
    else:
        return None
    if expected_channels is not None and len(values) != expected_channels:
        return None
    if not math.isfinite(sum(values)):  # a NaN or an infinity makes the sum one too
        return None
    return Reading(sensor_id, ts, values)


def checked_reading(
    key: bytes | None,
    value: bytes | None,
    *,
    expected_channels: int | None,
    limits: Limits,
    now_ms: int | None = None,
) -> Reading:
    """``decode_reading`` field by field, with Python's JSON parser: the reason for every
    rejection. Slower; ``decode_reading`` calls it for messages that are not well formed."""
    if value is None or not value:
        raise InvalidReading("empty: message has no value")
    if len(value) > limits.max_message_bytes:
        raise InvalidReading(f"too_large: {len(value)} bytes > {limits.max_message_bytes}")
    try:
        text = value.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidReading(f"not_utf8: invalid byte at {exc.start}") from None
    try:
        obj = _DECODER.decode(text)
    except _NonFiniteLiteral as exc:
        raise InvalidReading(f"non_finite: {exc} literal") from None
    except json.JSONDecodeError as exc:
        raise InvalidReading(f"bad_json: {exc.msg} at {exc.pos}") from None
    except RecursionError:
        raise InvalidReading("bad_json: nested too deeply") from None
    except ValueError:
        # The only other ValueError: an integer beyond Python's int_max_str_digits.
        raise InvalidReading("bad_json: integer with too many digits") from None
    if type(obj) is not dict:
        raise InvalidReading(f"not_object: top level is {_json_type(obj)}")

    sensor_id = _sensor_id(obj, limits)
    if key is not None and key != sensor_id.encode("utf-8"):
        raise InvalidReading("key_mismatch: message key differs from sensor_id")
    ts_ms = _timestamp_ms(obj)
    if ts_ms < limits.min_ts_ms:
        raise InvalidReading(
            f"ts_out_of_range: before {limits.min_year}-01-01 (epoch seconds instead of ms?)"
        )
    now = time.time_ns() // 1_000_000 if now_ms is None else now_ms
    ahead_ms = ts_ms - now
    if ahead_ms > _FAR_FUTURE_MS:
        # Not echoed: the number may have thousands of digits.
        raise InvalidReading(
            "ts_out_of_range: over 10^15 ms in the future (micro- or nanoseconds instead of ms?)"
        )
    if ahead_ms > limits.max_future_skew_ms:
        raise InvalidReading(
            f"ts_out_of_range: {ahead_ms} ms in the future "
            f"(> {limits.max_future_skew_ms} ms allowed)"
        )
    values = _values(obj, expected_channels, limits)
    return Reading(sensor_id=sensor_id, ts_ms=ts_ms, values=values)


def _json_type(obj: object) -> str:
    if isinstance(obj, bool):
        return "boolean"
    if isinstance(obj, int | float):
        return "number"
    if isinstance(obj, str):
        return "string"
    if isinstance(obj, list):
        return "array"
    return "null" if obj is None else "object"


def _sensor_id(obj: dict[str, Any], limits: Limits) -> str:
    sensor_id = obj.get("sensor_id")
    if sensor_id is None:
        raise InvalidReading("bad_sensor_id: missing")
    if type(sensor_id) is not str:
        raise InvalidReading(f"bad_sensor_id: is a {_json_type(sensor_id)}, not a string")
    if not sensor_id:
        raise InvalidReading("bad_sensor_id: empty")
    if len(sensor_id) > limits.max_sensor_id_length:
        raise InvalidReading(
            f"bad_sensor_id: {len(sensor_id)} characters > {limits.max_sensor_id_length}"
        )
    if not sensor_id.isprintable():
        # Also rejects lone surrogates (a \ud800 escape in the JSON): they cannot be UTF-8
        # encoded, and decode_reading encodes the id to compare it with the message key.
        index, char = next((i, c) for i, c in enumerate(sensor_id) if not c.isprintable())
        raise InvalidReading(
            f"bad_sensor_id: character {index} (U+{ord(char):04X}) is a control, format, "
            "separator, surrogate or unassigned character"
        )
    return sensor_id


def _timestamp_ms(obj: dict[str, Any]) -> int:
    ts = obj.get("ts")
    kind = type(ts)
    if kind is int:
        return ts
    if kind is float:
        if not math.isfinite(ts):
            raise InvalidReading("bad_ts: not finite")
        return round(ts)
    if kind is str:
        try:
            parsed = datetime.fromisoformat(ts)
            if parsed.tzinfo is None:
                parsed = parsed.replace(tzinfo=UTC)
            return (parsed - _EPOCH) // _ONE_MS
        except (ValueError, OverflowError):
            raise InvalidReading("bad_ts: not an ISO-8601 timestamp") from None
    if ts is None:
        raise InvalidReading("bad_ts: missing")
    raise InvalidReading(f"bad_ts: is a {_json_type(ts)}, not epoch ms or an ISO-8601 string")


def _values(
    obj: dict[str, Any], expected_channels: int | None, limits: Limits
) -> tuple[float, ...]:
    has_value = "value" in obj
    has_values = "values" in obj
    if has_value == has_values:
        which = "both" if has_value else "neither"
        raise InvalidReading(f"bad_values: {which} 'value' and 'values'")
    if has_value:
        raw: list[Any] = [obj["value"]]
    else:
        raw = obj["values"]
        if type(raw) is not list:
            raise InvalidReading(f"bad_values: 'values' is a {_json_type(raw)}, not an array")
        if not raw:
            raise InvalidReading("bad_values: 'values' is empty")
        if len(raw) > limits.max_channels:
            raise InvalidReading(f"too_many_channels: {len(raw)} > {limits.max_channels}")
    if expected_channels is not None and len(raw) != expected_channels:
        raise InvalidReading(f"wrong_channels: {len(raw)} channels, expected {expected_channels}")
    # Fast path: all floats and finite (a sum of finite floats that overflows merely
    # takes the slow path below, which judges each channel).
    if all(type(number) is float for number in raw) and math.isfinite(sum(raw)):
        return tuple(raw)
    values: list[float] = []
    for channel, number in enumerate(raw):
        kind = type(number)
        if kind is float:
            converted = number
        elif kind is int:
            try:
                converted = float(number)
            except OverflowError:
                raise InvalidReading(f"non_finite: channel {channel} overflows") from None
        else:
            raise InvalidReading(f"non_numeric: channel {channel} is a {_json_type(number)}")
        if not math.isfinite(converted):
            raise InvalidReading(f"non_finite: channel {channel}")
        values.append(converted)
    return tuple(values)


def _to_json(record: Mapping[str, Any]) -> bytes:
    return json.dumps(record, separators=(",", ":"), allow_nan=False).encode("utf-8")


@dataclass(frozen=True, slots=True)
class ScoreRecord:
    """One scored window, published to the scores topic keyed by ``sensor_id``.

    ``ts_ms`` is the timestamp of the window's last reading, ``window_start_ts_ms`` of its
    first; ``threshold`` is the one in force (``None`` while a quantile fallback warms up).
    """

    sensor_id: str
    ts_ms: int
    window_start_ts_ms: int
    score: float
    threshold: float | None
    model_name: str
    model_version: str
    nearest_prototype: int
    channel_attribution: tuple[float, ...]

    def to_json(self) -> bytes:
        """Compact UTF-8 JSON, matching ``schemas/score_record.schema.json``."""
        return _to_json(
            {
                "schema_version": SCHEMA_VERSION,
                "sensor_id": self.sensor_id,
                "ts_ms": self.ts_ms,
                "window_start_ts_ms": self.window_start_ts_ms,
                "score": float(self.score),
                "threshold": None if self.threshold is None else float(self.threshold),
                "model_name": self.model_name,
                "model_version": self.model_version,
                "nearest_prototype": int(self.nearest_prototype),
                "channel_attribution": [float(a) for a in self.channel_attribution],
            }
        )

    def shrunk(self) -> Self:
        """The same record without its channel attribution, for a topic it would not fit."""
        return dataclasses.replace(self, channel_attribution=())


AlertState = Literal["open", "update", "resolved"]


@dataclass(frozen=True, slots=True)
class AlertEvent:
    """One change in an alert's lifecycle, published to the alerts topic keyed by sensor.

    An alert is ``open`` once (``sequence`` 0), then zero or more ``update`` events as its
    peak grows, then ``resolved`` once, carrying ``end_ts_ms``. ``start_ts_ms`` and
    ``end_ts_ms`` span the alert's evidence: the reading that caused its first window above
    the threshold and the latest that caused a window at or above the resolve level
    (`stream_detector.alerts`). ``alert_id`` is derived from (sensor, the window that
    opened it, model version), so a replay of the same scores yields the same ids;
    ``(alert_id, sequence)``, also given as ``event_id``, identifies one lifecycle change,
    and subscribers de-duplicate on it. ``event_ts_ms`` is the window that caused the
    event; the prototype and attribution are those of the peak window.
    """

    alert_id: str
    sequence: int
    sensor_id: str
    state: AlertState
    severity: str
    start_ts_ms: int
    end_ts_ms: int | None
    event_ts_ms: int
    peak_score: float
    threshold: float
    model_version: str
    nearest_prototype: int
    channel_attribution: tuple[float, ...]

    @property
    def event_id(self) -> str:
        """Unique per lifecycle change: ``<alert_id>:<sequence>``."""
        return f"{self.alert_id}:{self.sequence}"

    def to_json(self) -> bytes:
        """Compact UTF-8 JSON, matching ``schemas/alert_event.schema.json``."""
        return _to_json(
            {
                "schema_version": SCHEMA_VERSION,
                "event_id": self.event_id,
                "alert_id": self.alert_id,
                "sequence": self.sequence,
                "sensor_id": self.sensor_id,
                "state": self.state,
                "severity": self.severity,
                "start_ts_ms": self.start_ts_ms,
                "end_ts_ms": self.end_ts_ms,
                "event_ts_ms": self.event_ts_ms,
                "peak_score": float(self.peak_score),
                "threshold": float(self.threshold),
                "model_version": self.model_version,
                "nearest_prototype": int(self.nearest_prototype),
                "channel_attribution": [float(a) for a in self.channel_attribution],
            }
        )

    def shrunk(self) -> Self:
        """The same record without its channel attribution, for a topic it would not fit."""
        return dataclasses.replace(self, channel_attribution=())
