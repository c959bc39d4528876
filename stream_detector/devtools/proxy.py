"""A local TCP forwarder between clients and a broker, Redis or Alertmanager, whose link can
be cut (connections dropped, new ones refused) and restored on the same port: the faults of
the reliability suite, the soak benchmark and the bridge's outage test.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
from typing import Self

from stream_detector.devtools.services import Startable

logger = logging.getLogger(__name__)

_CHUNK_BYTES = 65_536


class TcpProxy(Startable):
    """Forward ``host:port`` to ``target_host:target_port``; ``cut()`` makes the target unreachable.

    While cut, the listening port is closed (clients get "connection refused") and every
    open connection is dropped; ``restore()`` listens on the same port again.
    """

    def __init__(
        self, target_host: str, target_port: int, *, host: str = "127.0.0.1", port: int = 0
    ) -> None:
        self.target = (target_host, target_port)
        self.host = host
        self.port = port
        self._listener: socket.socket | None = None
        self._connections: set[socket.socket] = set()
        self._lock = threading.Lock()

    @property
    def address(self) -> str:
        """``host:port`` clients connect to."""
        return f"{self.host}:{self.port}"

    def start(self) -> Self:
        """Listen (on a free port when none was given) and forward in daemon threads."""
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((self.host, self.port))
        listener.listen(64)
        self.port = listener.getsockname()[1]
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()
        return self

    def cut(self) -> None:
        """Refuse new connections and drop the open ones."""
        listener, self._listener = self._listener, None
        if listener is not None:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
            listener.close()
        with self._lock:
            connections, self._connections = self._connections, set()
        for connection in connections:
            _close(connection)
        logger.info("proxy %s -> %s:%d cut", self.address, *self.target)

    def restore(self) -> None:
        """Accept connections again on the same port."""
        if self._listener is None:
            self.start()
            logger.info("proxy %s -> %s:%d restored", self.address, *self.target)

    def stop(self) -> None:
        """Close everything."""
        self.cut()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # the listener was closed by cut()
            try:
                upstream = socket.create_connection(self.target, timeout=5)
                upstream.settimeout(None)
            except OSError:
                _close(client)
                continue
            with self._lock:
                if self._listener is not listener:  # cut while connecting
                    _close(client)
                    _close(upstream)
                    continue
                self._connections |= {client, upstream}
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(_CHUNK_BYTES):
                sink.sendall(data)
        except OSError:
            pass
        with self._lock:
            self._connections -= {source, sink}
        _close(source)
        _close(sink)


def _close(connection: socket.socket) -> None:
    with contextlib.suppress(OSError):
        connection.shutdown(socket.SHUT_RDWR)
    connection.close()
