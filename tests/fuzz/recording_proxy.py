"""A TCP proxy on 127.0.0.1 that records every byte each side sends, in order.

One record per accepted connection: a list of (direction, bytes), ">" for the initiator
to the target and "<" for the target to the initiator, consecutive chunks of one
direction joined. Used by record_corpus.py to capture real exchanges as fuzz seeds.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from types import TracebackType

Chunk = tuple[str, bytes]


class RecordingProxy:
    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self._server = socket.create_server(("127.0.0.1", 0))
        self._server.settimeout(0.1)
        self.port = self._server.getsockname()[1]
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._socks: list[socket.socket] = []
        self.connections: list[list[Chunk]] = []

    @property
    def portal(self) -> str:
        return f"127.0.0.1:{self.port}"

    def take(self) -> list[list[Chunk]]:
        """The records so far (connections closed or not), and forget them."""
        with self._lock:
            out, self.connections = self.connections, []
        return out

    def __enter__(self) -> RecordingProxy:
        t = threading.Thread(target=self._accept, daemon=True)
        t.start()
        self._threads.append(t)
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._stop.set()
        self._server.close()
        with self._lock:
            socks, self._socks = self._socks, []
        for s in socks:
            with contextlib.suppress(OSError):
                s.close()
        for t in self._threads:
            t.join(5)

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                server = socket.create_connection(self.upstream, timeout=5)
            except OSError:
                client.close()
                continue
            server.settimeout(None)
            client.settimeout(None)
            record: list[Chunk] = []
            with self._lock:
                self._socks += [client, server]
                self.connections.append(record)
            for a, b, direction in ((client, server, ">"), (server, client, "<")):
                t = threading.Thread(target=self._pump, args=(a, b, direction, record),
                                     daemon=True)
                t.start()
                self._threads.append(t)

    def _pump(self, src: socket.socket, dst: socket.socket, direction: str,
              record: list[Chunk]) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                # Recorded before it is forwarded: the answer cannot be recorded first.
                with self._lock:
                    if record and record[-1][0] == direction:
                        record[-1] = (direction, record[-1][1] + data)
                    else:
                        record.append((direction, data))
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
