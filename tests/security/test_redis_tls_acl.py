"""Redis over TLS (``rediss://``) as an ACL user, through the URL the worker is given.

The server is a real redis-server with TLS only (no plaintext port) and the default user
disabled. The CA reaches redis-py as the URL's ``ssl_ca_certs`` query parameter, so
``DETECTOR_REDIS__URL`` alone configures the worker.
"""

from __future__ import annotations

from urllib.parse import quote

import pytest

from stream_detector.config import Settings
from stream_detector.devtools.services import EmbeddedRedis
from stream_detector.pipeline import PositionedReading
from stream_detector.windows import WindowStore, WindowStoreError
from tests.security.conftest import REDIS_PASSWORD, REDIS_USER, TlsFiles

pytestmark = pytest.mark.integration

WINDOW = 4


def url_with(
    server: EmbeddedRedis,
    *,
    scheme: str = "rediss",
    password: str = REDIS_PASSWORD,
    ca: bool = True,
) -> str:
    """A URL for ``server`` as the ACL user, varied where a test needs it to be wrong."""
    query = f"?ssl_ca_certs={quote(str(server.tls_ca))}" if ca else ""
    return (
        f"{scheme}://{REDIS_USER}:{quote(password, safe='')}@{server.host}:{server.port}/0{query}"
    )


def store_at(url: str, key_prefix: str) -> WindowStore:
    return WindowStore(url, window_length=WINDOW, stride=1, key_prefix=key_prefix)


def test_windows_work_over_tls_as_the_acl_user(
    secure_redis: EmbeddedRedis, key_prefix: str
) -> None:
    url = secure_redis.url
    assert url.startswith(f"rediss://{REDIS_USER}:") and "ssl_ca_certs=" in url
    masked = Settings(redis={"url": url}).masked_dump()["redis"]["url"]
    assert masked.startswith(f"rediss://{REDIS_USER}:***@") and "ssl_ca_certs=" in masked
    store = store_at(url, key_prefix)
    readings = [
        PositionedReading("pump-1", 1_000 * (n + 1), (float(n),), "readings", 0, n)
        for n in range(6)
    ]
    result = store.append_batch(readings)
    assert [window.end_ts_ms for window in result.due] == [4_000, 5_000, 6_000]
    assert store.fetch_windows(["pump-1"])["pump-1"].values.tolist() == [[2.0, 3.0, 4.0, 5.0]]


def test_a_wrong_password_fails_clearly_without_showing_either_password(
    secure_redis: EmbeddedRedis, key_prefix: str
) -> None:
    wrong = "wrong-Pa55word"
    store = store_at(url_with(secure_redis, password=wrong), key_prefix)
    with pytest.raises(WindowStoreError) as failure:
        store.applied_offsets([("readings", 0)])
    message = str(failure.value)
    assert f"Redis at 127.0.0.1:{secure_redis.port}" in message
    assert "invalid username-password pair" in message
    assert wrong not in message and quote(wrong) not in message
    assert "pa:ss" not in message
    assert not store.ping()


def test_a_plaintext_url_to_the_tls_port_fails_and_says_to_use_rediss(
    secure_redis: EmbeddedRedis, key_prefix: str
) -> None:
    store = store_at(url_with(secure_redis, scheme="redis", ca=False), key_prefix)
    with pytest.raises(WindowStoreError, match=r"must start with rediss://") as failure:
        store.applied_offsets([("readings", 0)])
    assert "pa:ss" not in str(failure.value) and quote(REDIS_PASSWORD, safe="") not in str(
        failure.value
    )


def test_a_server_certificate_from_an_unknown_ca_is_refused(
    secure_redis: EmbeddedRedis, key_prefix: str
) -> None:
    store = store_at(url_with(secure_redis, ca=False), key_prefix)
    with pytest.raises(WindowStoreError, match="certificate verify failed"):
        store.applied_offsets([("readings", 0)])


def test_the_default_user_is_disabled(secure_redis: EmbeddedRedis, key_prefix: str) -> None:
    url = f"rediss://{secure_redis.host}:{secure_redis.port}/0?ssl_ca_certs={secure_redis.tls_ca}"
    with pytest.raises(WindowStoreError, match="authenticated"):
        store_at(url, key_prefix).applied_offsets([("readings", 0)])


def test_a_certificate_for_another_host_is_refused(
    foreign_tls_files: TlsFiles, key_prefix: str
) -> None:
    impostor = EmbeddedRedis(
        tls_cert=foreign_tls_files.cert, tls_key=foreign_tls_files.key, tls_ca=foreign_tls_files.ca
    )
    with impostor, pytest.raises(WindowStoreError, match="certificate verify failed"):
        store_at(impostor.url, key_prefix).applied_offsets([("readings", 0)])
