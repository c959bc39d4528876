"""How the publisher reads producer errors and sizes what it cuts (no broker needed)."""

from __future__ import annotations

import hashlib

import pytest
from confluent_kafka import KafkaError

from stream_detector.publisher import Failure, classify, cut_headers, payload_budget

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    ("error", "failure"),
    [
        (KafkaError(KafkaError.MSG_SIZE_TOO_LARGE), Failure.RECORD),
        (KafkaError(KafkaError.INVALID_RECORD), Failure.RECORD),
        (KafkaError(KafkaError.RECORD_LIST_TOO_LARGE), Failure.RECORD),
        (KafkaError(KafkaError.TOPIC_AUTHORIZATION_FAILED), Failure.TOPIC),
        (KafkaError(KafkaError.TOPIC_EXCEPTION), Failure.TOPIC),
        (KafkaError(KafkaError._UNKNOWN_TOPIC), Failure.TOPIC),
        (KafkaError(KafkaError._TRANSPORT), Failure.RETRY),
        (KafkaError(KafkaError._MSG_TIMED_OUT), Failure.RETRY),
        (KafkaError(KafkaError.NOT_LEADER_FOR_PARTITION), Failure.RETRY),
        (KafkaError(KafkaError._PURGE_QUEUE), Failure.RETRY),
        # librdkafka's own flags win over the code.
        (KafkaError(KafkaError.MSG_SIZE_TOO_LARGE, retriable=True), Failure.RETRY),
        (KafkaError(KafkaError._FATAL, fatal=True), Failure.FATAL),
        (KafkaError(KafkaError.TOPIC_EXCEPTION, txn_requires_abort=True), Failure.RETRY),
    ],
)
def test_producer_errors_are_classified_by_what_a_retry_can_fix(
    error: KafkaError, failure: Failure
) -> None:
    assert classify(error) is failure


def test_cut_headers_name_the_original_by_size_and_sha256() -> None:
    original = b"x" * 5_000_000
    assert dict(cut_headers(original)) == {
        "truncated": b"true",
        "original_size": b"5000000",
        "original_sha256": hashlib.sha256(original).hexdigest().encode(),
    }


@pytest.mark.parametrize("limit", [4096, 16_384, 1_000_000, 8_388_608])
def test_a_payload_cut_to_its_budget_fits_the_limit_and_wastes_little(limit: int) -> None:
    key = b"sensor-1"
    headers = [("reason", b"too_large: 5000000 bytes > 65536"), *cut_headers(b"x")]
    budget = payload_budget(limit, key, headers)
    fixed = len(key) + sum(len(name) + len(value) for name, value in headers)
    assert budget + fixed + 512 <= limit  # 512: the record batch's own bytes
    assert budget >= 0.98 * limit - fixed - 512


def test_nothing_is_left_for_the_payload_when_the_headers_fill_the_limit() -> None:
    assert payload_budget(600, b"k", [("reason", b"r" * 200)]) == 0
