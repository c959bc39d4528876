"""Reading validation, output records, and the JSON Schemas published for subscribers."""

from __future__ import annotations

import json
from importlib import resources
from typing import Any

import jsonschema
import pytest

from stream_detector import schemas
from stream_detector.alerts import SensorAlertState, update
from stream_detector.config import AlertPolicy, Limits
from stream_detector.schemas import (
    AlertEvent,
    InvalidReading,
    Reading,
    ScoreRecord,
    decode_reading,
)

pytestmark = pytest.mark.unit

LIMITS = Limits(max_message_bytes=1024, max_channels=4, max_sensor_id_length=16)
NOW_MS = 1_700_000_000_000  # 2023-11-14T22:13:20Z


def encode(obj: Any) -> bytes:
    return json.dumps(obj).encode()


def decode(
    value: bytes | None, key: bytes | None = None, expected_channels: int | None = None
) -> Reading:
    return decode_reading(
        key, value, expected_channels=expected_channels, limits=LIMITS, now_ms=NOW_MS
    )


def load_schema(name: str) -> dict[str, Any]:
    text = resources.files("stream_detector").joinpath(f"schemas/{name}").read_text()
    return json.loads(text)


def test_single_value_reading() -> None:
    reading = decode(encode({"sensor_id": "pump-1", "ts": NOW_MS, "value": 3}), key=b"pump-1")
    assert reading == Reading(sensor_id="pump-1", ts_ms=NOW_MS, values=(3.0,))
    assert type(reading.values[0]) is float


@pytest.mark.parametrize(
    "message",
    [
        {"sensor_id": "pump-1", "ts": NOW_MS, "value": 3},
        {"sensor_id": "pump-1", "ts": NOW_MS, "values": [1.5, -2, 0], "unit": "bar"},
    ],
)
def test_well_formed_readings_skip_the_field_by_field_checks(
    message: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    def fail(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a well-formed reading took the slow path")

    monkeypatch.setattr(schemas, "checked_reading", fail)
    assert decode(encode(message), key=b"pump-1").sensor_id == "pump-1"
    with pytest.raises(AssertionError, match="slow path"):  # and anything else takes it
        decode(encode({**message, "ts": "2023-11-14T22:13:20Z"}))


def test_multi_channel_reading_ignores_unknown_keys() -> None:
    message = {"sensor_id": "pump-1", "ts": NOW_MS, "values": [1.5, -2, 0], "unit": "bar"}
    reading = decode(encode(message), expected_channels=3)
    assert reading.values == (1.5, -2.0, 0.0)


@pytest.mark.parametrize(
    ("ts", "ts_ms"),
    [
        (NOW_MS, NOW_MS),
        (NOW_MS + 0.6, NOW_MS + 1),
        ("2023-11-14T22:13:20Z", NOW_MS),
        ("2023-11-14T22:13:20.250+00:00", NOW_MS + 250),
        ("2023-11-15T00:13:20+02:00", NOW_MS),
        ("2023-11-14T22:13:20", NOW_MS),  # no offset: UTC
    ],
)
def test_timestamps_become_epoch_ms(ts: int | float | str, ts_ms: int) -> None:
    assert decode(encode({"sensor_id": "s", "ts": ts, "value": 1.0})).ts_ms == ts_ms


def ok(**changes: Any) -> dict[str, Any]:
    message: dict[str, Any] = {"sensor_id": "s-1", "ts": NOW_MS, "values": [1.0, 2.0]}
    message.update(changes)
    return message


def without(key: str) -> dict[str, Any]:
    message = ok()
    del message[key]
    return message


REJECTED: list[tuple[str, bytes | None, bytes | None, int | None]] = [
    ("empty", None, None, None),
    ("empty", b"", None, None),
    ("too_large", encode(ok(pad="x" * 2000)), None, None),
    ("not_utf8", b'{"sensor_id": "\xff"}', None, None),
    ("bad_json", b'{"sensor_id": ', None, None),
    ("bad_json", b"[" * 1000, None, None),
    ("not_object", b"[1, 2]", None, None),
    ("not_object", b"42", None, None),
    ("bad_sensor_id", encode(without("sensor_id")), None, None),
    ("bad_sensor_id", encode(ok(sensor_id="")), None, None),
    ("bad_sensor_id", encode(ok(sensor_id="x" * 17)), None, None),
    ("bad_sensor_id", encode(ok(sensor_id=17)), None, None),
    ("bad_sensor_id", encode(ok(sensor_id="a\nb")), None, None),
    ("key_mismatch", encode(ok()), b"other", None),
    ("key_mismatch", encode(ok()), b"", None),
    ("bad_ts", encode(without("ts")), None, None),
    ("bad_ts", encode(ok(ts="yesterday")), None, None),
    ("bad_ts", encode(ok(ts=True)), None, None),
    ("bad_ts", encode(ok(ts=[NOW_MS])), None, None),
    ("ts_out_of_range", encode(ok(ts=NOW_MS // 1000)), None, None),  # epoch seconds
    ("ts_out_of_range", encode(ok(ts=NOW_MS + 3_600_000)), None, None),
    ("ts_out_of_range", encode(ok(ts="1999-12-31T23:59:59Z")), None, None),
    ("bad_values", encode(ok(value=1.0)), None, None),
    ("bad_values", encode(without("values")), None, None),
    ("bad_values", encode(ok(values=[])), None, None),
    ("bad_values", encode(ok(values={"a": 1})), None, None),
    ("non_numeric", encode(ok(values=[1.0, "2"])), None, None),
    ("non_numeric", encode(ok(values=[1.0, None])), None, None),
    ("non_numeric", encode(ok(values=[1.0, True])), None, None),
    ("non_numeric", encode(ok(values=[1.0, [2.0]])), None, None),
    ("non_finite", b'{"sensor_id":"s","ts":1700000000000,"value":NaN}', None, None),
    ("non_finite", b'{"sensor_id":"s","ts":1700000000000,"value":-Infinity}', None, None),
    ("non_finite", b'{"sensor_id":"s","ts":1700000000000,"values":[1e999]}', None, None),
    ("non_finite", encode(ok(values=[1.0, 10**400])), None, None),
    (
        "non_finite",
        b'{"sensor_id":"s","ts":1700000000000,"value":1' + b"0" * 900 + b"}",
        None,
        None,
    ),
    ("too_many_channels", encode(ok(values=[1.0] * 5)), None, None),
    ("wrong_channels", encode(ok()), None, 3),
    ("wrong_channels", encode({"sensor_id": "s", "ts": NOW_MS, "value": 1.0}), None, 2),
]


@pytest.mark.parametrize(("code", "value", "key", "expected_channels"), REJECTED)
def test_every_rejection_has_a_stable_reason(
    code: str, value: bytes | None, key: bytes | None, expected_channels: int | None
) -> None:
    with pytest.raises(InvalidReading) as caught:
        decode(value, key=key, expected_channels=expected_channels)
    assert caught.value.code == code
    assert caught.value.reason.startswith(f"{code}: ")
    assert "\n" not in caught.value.reason


def test_integer_beyond_the_digit_limit_is_bad_json() -> None:
    value = b'{"sensor_id":"s","ts":1700000000000,"value":' + b"1" * 5000 + b"}"
    with pytest.raises(InvalidReading, match=r"^bad_json: "):
        decode_reading(None, value, expected_channels=None, limits=Limits(), now_ms=NOW_MS)


def test_published_reading_schema_agrees_with_the_decoder() -> None:
    validator = jsonschema.Draft202012Validator(load_schema("reading.schema.json"))
    accepted = [
        {"sensor_id": "s", "ts": NOW_MS, "value": 1},
        {"sensor_id": "s", "ts": "2023-11-14T22:13:20Z", "values": [1.0, 2.5]},
    ]
    rejected = [
        {"sensor_id": "s", "ts": NOW_MS},
        {"sensor_id": "s", "ts": NOW_MS, "value": 1, "values": [1]},
        {"sensor_id": "", "ts": NOW_MS, "value": 1},
        {"sensor_id": "s", "ts": NOW_MS, "value": "1"},
        {"sensor_id": "s", "ts": NOW_MS, "values": []},
        {"ts": NOW_MS, "value": 1},
    ]
    for message in accepted:
        validator.validate(message)
        decode(encode(message))
    for message in rejected:
        assert not validator.is_valid(message)
        with pytest.raises(InvalidReading):
            decode(encode(message))


def test_score_records_match_the_published_schema() -> None:
    validator = jsonschema.Draft202012Validator(load_schema("score_record.schema.json"))
    for threshold in (2.5, None):
        record = ScoreRecord(
            sensor_id="pump-1",
            ts_ms=NOW_MS,
            window_start_ts_ms=NOW_MS - 127_000,
            score=3.25,
            threshold=threshold,
            model_name="pumps",
            model_version="20240101T000000Z",
            nearest_prototype=4,
            channel_attribution=(0.75, 0.25),
        )
        validator.validate(json.loads(record.to_json()))


def lifecycle_events() -> list[AlertEvent]:
    policy = AlertPolicy(confirm_k=2, confirm_n=3, min_duration_windows=1)
    state = SensorAlertState(sensor_id="pump-1")
    events: list[AlertEvent] = []
    for step, score in enumerate([0.5, 1.5, 1.6, 4.0, 0.1, 0.1, 0.1]):
        state, new_events = update(
            state,
            score=score,
            ts_ms=NOW_MS + 1000 * step,
            threshold=1.0,
            policy=policy,
            model_version="v1",
            nearest_prototype=2,
            attribution=[0.5, 0.5],
        )
        events.extend(new_events)
    return events


def test_alert_events_match_the_published_schema() -> None:
    validator = jsonschema.Draft202012Validator(load_schema("alert_event.schema.json"))
    events = lifecycle_events()
    assert [event.state for event in events] == ["open", "update", "resolved"]
    for event in events:
        validator.validate(json.loads(event.to_json()))


def test_output_records_refuse_non_finite_numbers() -> None:
    record = ScoreRecord("s", NOW_MS, NOW_MS, float("nan"), 1.0, "m", "v", 0, ())
    with pytest.raises(ValueError, match="JSON compliant"):
        record.to_json()


def test_published_schemas_are_valid_draft_2020_12() -> None:
    for name in ("reading", "score_record", "alert_event"):
        schema = load_schema(f"{name}.schema.json")
        assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
        jsonschema.Draft202012Validator.check_schema(schema)
