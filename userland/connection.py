"""A blocking TCP connection that moves whole PDUs, with absolute deadlines.

Used for discovery and login (and the kernel path, which hands this socket over once
logged in). Deadlines are ``time.monotonic()`` values; every wait is bounded by one.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import socket
import time

from userland.errors import LoginTimeout, NetworkError
from userland.pdu import Pdu, PduReader
from userland.portal import Portal

log = logging.getLogger("iscsi_handoff.wire")
# RFC 7143 13.12: until login ends, MaxRecvDataSegmentLength is its default, 8192.
LOGIN_MAX_RECV = 8192


def _remaining(deadline: float, what: str) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise LoginTimeout(f"{what}: no answer before the deadline")
    return left


class Connection:
    def __init__(self, sock: socket.socket, portal: Portal) -> None:
        self.sock = sock
        self.portal = portal
        self.reader = PduReader(max_data_segment_length=LOGIN_MAX_RECV)
        self.header_digest = False
        self.data_digest = False

    @classmethod
    def open(cls, portal: Portal, *, deadline: float) -> Connection:
        what = f"connect to {portal}"
        try:
            infos = socket.getaddrinfo(portal.host, portal.port, type=socket.SOCK_STREAM)
        except socket.gaierror as exc:
            raise NetworkError(f"{what}: cannot resolve {portal.host!r} ({exc.strerror})") \
                from None
        last: OSError | None = None
        for family, kind, proto, _, sockaddr in infos:
            sock = socket.socket(family, kind, proto)
            try:
                sock.settimeout(_remaining(deadline, what))
                sock.connect(sockaddr)
            except TimeoutError:
                sock.close()
                raise LoginTimeout(f"{what}: timed out") from None
            except OSError as exc:
                sock.close()
                last = exc
                continue
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return cls(sock, portal)
        reason = _describe(last) if last else "no address"
        raise NetworkError(f"{what}: {reason}")

    def set_digests(self, *, header: bool, data: bool) -> None:
        """Digests start with the first PDU after the final Login Response."""
        self.header_digest = self.reader.header_digest = header
        self.data_digest = self.reader.data_digest = data

    def send(self, pdu: Pdu, *, deadline: float) -> None:
        log.debug("-> %s", pdu.describe())
        data = pdu.encode(header_digest=self.header_digest, data_digest=self.data_digest)
        try:
            self.sock.settimeout(_remaining(deadline, f"send to {self.portal}"))
            self.sock.sendall(data)
        except TimeoutError:
            raise LoginTimeout(f"send to {self.portal}: timed out") from None
        except OSError as exc:
            raise NetworkError(f"send to {self.portal}: {_describe(exc)}") from None

    def receive(self, *, deadline: float, waiting_for: str = "a response") -> Pdu:
        what = f"{self.portal}: waiting for {waiting_for}"
        while True:
            pdu = self.reader.next_pdu()
            if pdu is not None:
                log.debug("<- %s", pdu.describe())
                return pdu
            try:
                self.sock.settimeout(_remaining(deadline, what))
                # Never read past the PDU we wait for: the kernel path hands this socket
                # over right after the last Login Response, with nothing left unread.
                chunk = self.sock.recv(self.reader.bytes_needed())
            except TimeoutError:
                raise LoginTimeout(f"{what}: the target said nothing in time") from None
            except OSError as exc:
                raise NetworkError(f"{what}: {_describe(exc)}") from None
            if not chunk:
                raise NetworkError(f"{what}: the target closed the connection")
            self.reader.feed(chunk)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _describe(exc: OSError) -> str:
    if exc.errno == errno.ECONNREFUSED:
        return "connection refused (is a target listening there?)"
    if exc.errno in (errno.ENETUNREACH, errno.EHOSTUNREACH):
        return "network unreachable"
    if exc.errno == errno.ECONNRESET:
        return "connection reset by the target"
    return exc.strerror or str(exc)
