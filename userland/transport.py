"""PDUs over a trio socket: the data path's I/O adapter.

Reads go straight where they belong: a Data-In payload is received with ``recv_into``
into the waiting task's buffer (the only copy a read payload ever makes); other PDUs
into a reused buffer. Writes go out with ``sendmsg`` so a Data-Out payload is sent from
the caller's buffer without being joined into a new one.
"""

from __future__ import annotations

import errno
import socket
import struct
from collections.abc import Callable, Sequence

import trio
from crc32c import crc32c

from userland.errors import DigestError, NetworkError
from userland.pdu import BHS_LEN, DataIn, Pdu, decode_rest, pad_len, parse_bhs
from userland.portal import Portal

Placer = Callable[[int, int, int], memoryview | None]
_IOV_MAX = 1024
RECV_BUFFER = 256 << 10


class Transport:
    def __init__(self, sock: trio.socket.SocketType, portal: Portal) -> None:
        self.sock = sock
        self.portal = portal
        self.header_digest = False
        self.data_digest = False
        self.max_recv_data_segment_length = 8192  # RFC 7143 13.12: the login default
        self._buf = bytearray(RECV_BUFFER)
        self._start = self._end = 0
        self._send_lock = trio.Lock()

    @classmethod
    async def connect(cls, portal: Portal) -> Transport:
        try:
            infos = await trio.socket.getaddrinfo(portal.host, portal.port,
                                                  type=socket.SOCK_STREAM)
        except socket.gaierror as exc:
            raise NetworkError(f"connect to {portal}: cannot resolve {portal.host!r}") from exc
        last: OSError | None = None
        for family, kind, proto, _, addr in infos:
            sock = trio.socket.socket(family, kind, proto)
            try:
                await sock.connect(addr)
            except OSError as exc:
                sock.close()
                last = exc
                continue
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return cls(sock, portal)
        why = "connection refused" if last and last.errno == errno.ECONNREFUSED else (
            last.strerror if last else "no address")
        raise NetworkError(f"connect to {portal}: {why}")

    def close(self) -> None:
        self.sock.close()

    # -- sending

    async def send(self, pdus: Sequence[Pdu]) -> None:
        parts: list[bytes | bytearray | memoryview] = []
        for pdu in pdus:
            parts += pdu.encode_parts(header_digest=self.header_digest,
                                      data_digest=self.data_digest)
        async with self._send_lock:
            try:
                await self._sendmsg_all(parts)
            except OSError as exc:
                raise NetworkError(f"send to {self.portal}: {exc.strerror or exc}") from None

    async def _sendmsg_all(self, parts: list[bytes | bytearray | memoryview]) -> None:
        views = [memoryview(p).cast("B") for p in parts if len(p)]
        while views:
            sent = await self.sock.sendmsg(views[:_IOV_MAX])
            while sent and views:  # drop what went out, keep the rest of a partial part
                if sent >= len(views[0]):
                    sent -= len(views.pop(0))
                else:
                    views[0] = views[0][sent:]
                    sent = 0

    # -- receiving
    # One recv_into fills a buffer with as many PDUs as have arrived, so small I/O costs
    # a fraction of a syscall per PDU. A Data-In payload is copied from that buffer into
    # its task's memory once, and whatever of it has not arrived yet is received straight
    # into the task's memory.

    def _available(self) -> int:
        return self._end - self._start

    async def _fill(self, need: int) -> None:
        """Make at least ``need`` bytes available from ``_start``."""
        if self._available() >= need:
            return
        if len(self._buf) - self._start < need:  # compact, and grow for a big PDU
            left = bytes(self._buf[self._start:self._end])
            if len(self._buf) < need:
                self._buf = bytearray(max(need, 2 * len(self._buf)))
            self._buf[:len(left)] = left
            self._start, self._end = 0, len(left)
        view = memoryview(self._buf)
        while self._available() < need:
            try:
                n = await self.sock.recv_into(view[self._end:])
            except OSError as exc:
                raise NetworkError(f"{self.portal}: {exc.strerror or exc}") from None
            if n == 0:
                raise NetworkError(f"{self.portal}: the target closed the connection")
            self._end += n

    def _take(self, n: int) -> memoryview:
        view = memoryview(self._buf)[self._start:self._start + n]
        self._start += n
        if self._start == self._end:
            self._start = self._end = 0
        return view

    async def _recv_exactly(self, view: memoryview) -> None:
        """Fill ``view``: first from what is buffered, then straight from the socket."""
        got = min(len(view), self._available())
        if got:
            view[:got] = self._take(got)
        while got < len(view):
            try:
                n = await self.sock.recv_into(view[got:])
            except OSError as exc:
                raise NetworkError(f"{self.portal}: {exc.strerror or exc}") from None
            if n == 0:
                raise NetworkError(f"{self.portal}: the target closed the connection")
            got += n

    async def receive(self, place: Placer | None = None) -> tuple[Pdu, bool]:
        """The next PDU, and whether its Data-In payload was placed by ``place``.

        ``place(itt, buffer_offset, length)`` returns the memory a Data-In payload
        belongs in, or None to receive it like any other PDU.
        """
        await self._fill(BHS_LEN)
        bhs = self._take(BHS_LEN)
        header = parse_bhs(bhs, max_data_segment_length=self.max_recv_data_segment_length)
        dlen = header.data_len
        if (place is not None and header.cls is DataIn and dlen and not header.ahs_len
                and not self.header_digest):
            hbytes = header.bhs
            target = place(int.from_bytes(hbytes[16:20], "big"),
                           int.from_bytes(hbytes[40:44], "big"), dlen)
            if target is not None:
                await self._recv_exactly(target)
                tail_len = pad_len(dlen) + (4 if self.data_digest else 0)
                if tail_len:
                    await self._fill(tail_len)
                    tail = self._take(tail_len)
                    if self.data_digest:
                        crc = crc32c(tail[:pad_len(dlen)], crc32c(target))
                        if bytes(tail[-4:]) != struct.pack("<I", crc):
                            raise DigestError("data digest mismatch on DataIn")
                return DataIn.from_bhs(hbytes, b"", target), True
        need = header.rest_len(header_digest=self.header_digest, data_digest=self.data_digest)
        await self._fill(need)
        rest = bytes(self._take(need))  # small PDUs: a copy frees the shared buffer
        pdu = decode_rest(header, rest, header_digest=self.header_digest,
                          data_digest=self.data_digest)
        return pdu, False
