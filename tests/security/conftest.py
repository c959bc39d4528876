"""Certificates made at test time, and a TLS terminator to stand in front of tansu.

Keys live in pytest's temporary directories only. tansu 0.6.0 cannot serve TLS itself (its
``--cert`` and ``--key`` options exclude each other), so the Kafka TLS tests put
``TlsTerminator`` in front of it: the clients' side of TLS (protocol, CA, host name
verification), which is what the worker's settings control, is real.
"""

from __future__ import annotations

import asyncio
import shutil
import ssl
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from stream_detector.devtools.services import EmbeddedRedis, ServiceStartError

REDIS_USER = "detector"
# Characters that must be percent-encoded in a URL, so that the encoding is tested too.
REDIS_PASSWORD = "pa:ss/w@rd 7?"


@dataclass(frozen=True)
class TlsFiles:
    """A CA and a server certificate (with its key) that the CA signed, as PEM files."""

    ca: Path
    cert: Path
    key: Path


_EC_KEY = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=30)


def _server_certificate(directory: Path, name: str, subject_alt_names: str) -> TlsFiles:
    """A key and a certificate for ``subject_alt_names``, signed by the CA in ``directory``."""
    _openssl(
        "req", *_EC_KEY, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}",
        cwd=directory,
    )  # fmt: skip
    (directory / f"{name}.ext").write_text(
        f"subjectAltName={subject_alt_names}\nextendedKeyUsage=serverAuth\n"
    )
    _openssl(
        "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
        "-CAcreateserial", "-out", f"{name}.crt", "-days", "1", "-extfile", f"{name}.ext",
        cwd=directory,
    )  # fmt: skip
    return TlsFiles(directory / "ca.crt", directory / f"{name}.crt", directory / f"{name}.key")


@pytest.fixture(scope="session")
def tls_directory(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory with a throw-away CA (P-256 key, valid for one day)."""
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command line tool is needed to make test certificates")
    directory = tmp_path_factory.mktemp("tls")
    _openssl(
        "req", "-x509", *_EC_KEY, "-keyout", "ca.key", "-out", "ca.crt", "-days", "1",
        "-subj", "/CN=stream-detector test CA", cwd=directory,
    )  # fmt: skip
    return directory


@pytest.fixture(scope="session")
def tls_files(tls_directory: Path) -> TlsFiles:
    """The CA and a server certificate for 127.0.0.1 and localhost."""
    return _server_certificate(tls_directory, "server", "IP:127.0.0.1,DNS:localhost")


@pytest.fixture(scope="session")
def foreign_tls_files(tls_directory: Path) -> TlsFiles:
    """The same CA and a certificate for another host: valid, but not for 127.0.0.1."""
    return _server_certificate(tls_directory, "elsewhere", "DNS:kafka.elsewhere.example")


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65_536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, ssl.SSLError):
        pass
    finally:
        writer.close()


class TlsTerminator:
    """Accepts TLS on a free local port and forwards the plaintext to ``upstream_port``."""

    def __init__(self, files: TlsFiles, host: str = "127.0.0.1") -> None:
        self.host = host
        self.upstream_port: int | None = None
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(files.cert, files.key)
        self._writers: set[asyncio.StreamWriter] = set()
        self._loop = asyncio.new_event_loop()
        self._server = self._loop.run_until_complete(
            asyncio.start_server(self._forward, host, 0, ssl=context)
        )
        self.port: int = self._server.sockets[0].getsockname()[1]
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()

    @property
    def bootstrap_servers(self) -> str:
        """The bootstrap.servers string for TLS clients."""
        return f"{self.host}:{self.port}"

    async def _forward(
        self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter
    ) -> None:
        if self.upstream_port is None:
            client_writer.close()
            return
        upstream_reader, upstream_writer = await asyncio.open_connection(
            self.host, self.upstream_port
        )
        self._writers |= {client_writer, upstream_writer}
        await asyncio.gather(
            _pump(client_reader, upstream_writer), _pump(upstream_reader, client_writer)
        )
        self._writers -= {client_writer, upstream_writer}

    async def _shutdown(self) -> None:
        self._server.close()
        for writer in list(self._writers):
            writer.close()
        await asyncio.sleep(0.1)

    def close(self) -> None:
        """Stop accepting, drop every forwarded connection and stop the loop's thread."""
        asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()


@pytest.fixture(scope="session")
def secure_redis(tls_files: TlsFiles) -> Iterator[EmbeddedRedis]:
    """redis-server accepting only TLS, with one ACL user and the default user off."""
    server = EmbeddedRedis(
        tls_cert=tls_files.cert,
        tls_key=tls_files.key,
        tls_ca=tls_files.ca,
        username=REDIS_USER,
        password=REDIS_PASSWORD,
    )
    try:
        server.start()
    except ServiceStartError as error:
        pytest.skip(f"redis-server with TLS did not start: {error}")
    yield server
    server.stop()
