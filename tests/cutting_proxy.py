"""A TCP proxy on 127.0.0.1 that can cut its connections, on demand or at random.

Sits between the initiator and a real tgtd so recovery is tested against real
connection loss: the target sees a reset, the initiator sees its socket die.
"""

from __future__ import annotations

import contextlib
import random
import socket
import threading
from types import TracebackType


class CuttingProxy:
    def __init__(self, upstream: tuple[str, int], *, seed: int = 0) -> None:
        self.upstream = upstream
        self.cuts = 0
        self.connections = 0
        self._server = socket.create_server(("127.0.0.1", 0))
        self._server.settimeout(0.1)
        self.port = self._server.getsockname()[1]
        self._lock = threading.Lock()
        self._live: list[socket.socket] = []
        self._stop = threading.Event()
        self._random = random.Random(seed)
        self._cut_after: int | None = None  # bytes, then cut (random mode)
        self._range = (0, 0)
        self._moved = 0
        self._threads: list[threading.Thread] = []

    @property
    def portal(self) -> str:
        return f"127.0.0.1:{self.port}"

    def cut_randomly(self, low: int, high: int) -> None:
        """Cut every connection after a random count of bytes in [low, high]."""
        with self._lock:
            self._range = (low, high)
            self._moved = 0
            self._cut_after = self._random.randint(low, high)

    def stop_cutting(self) -> None:
        with self._lock:
            self._cut_after = None

    def cut(self) -> None:
        """Reset every live connection now (RST, as a crashed peer or a cable pull)."""
        with self._lock:
            live, self._live = self._live, []
            if live:
                self.cuts += 1
        for s in live:
            try:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
                s.close()
            except OSError:
                pass

    def __enter__(self) -> CuttingProxy:
        t = threading.Thread(target=self._accept, daemon=True)
        t.start()
        self._threads.append(t)
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._stop.set()
        self._server.close()
        self.cut()
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
            with self._lock:
                self._live += [client, server]
                self.connections += 1
            for a, b in ((client, server), (server, client)):
                t = threading.Thread(target=self._pump, args=(a, b), daemon=True)
                t.start()
                self._threads.append(t)

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
                if self._count(len(data)):
                    self.cut()
                    return
        except OSError:
            pass
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def _count(self, n: int) -> bool:
        with self._lock:
            if self._cut_after is None:
                return False
            self._moved += n
            if self._moved < self._cut_after:
                return False
            self._moved = 0
            self._cut_after = self._random.randint(*self._range)
            return True
