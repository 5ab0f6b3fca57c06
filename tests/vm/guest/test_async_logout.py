"""A target's Async Message "request logout" (AsyncEvent 1), in the guest's stock kernel.

tgt never sends one, so a relay between the kernel and tgtd slips one into the target's
stream, between two PDUs, with the StatSN/ExpCmdSN/MaxCmdSN tgtd last sent. libiscsi
passes Async Messages up as RECV_PDU (__iscsi_complete_pdu, the reserved-ITT branch);
the keeper answers with a Logout through the kernel (SEND_PDU), tgtd answers it and
closes the connection, and the keeper logs in again: the disk goes on, the relay saw a
Logout Request on the first connection, not a dropped connection.
"""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from iscsi_handoff.tgtlab import LunSpec, Tgt

from .kernel_login import KernelLogin
from .openiscsi import read_direct, wait_for, write_direct

BHS = 48
LOGOUT_REQUEST = 0x06
TARGET_OPCODES_WITH_STATSN = {0x20, 0x21, 0x22, 0x23, 0x24, 0x26}


def pdu_length(bhs: bytes) -> int:
    """A PDU's whole length from its BHS (no digests: tgt's default)."""
    data = int.from_bytes(bhs[5:8], "big")
    return BHS + bhs[4] * 4 + ((data + 3) & ~3)


@dataclass
class Relayed:
    """One relayed connection: the kernel's side, tgtd's side, what went to tgtd."""

    down: socket.socket  # to the initiator (the kernel)
    up: socket.socket  # to tgtd
    lock: threading.Lock = field(default_factory=threading.Lock)  # whole PDUs only
    sn: bytes | None = None  # StatSN, ExpCmdSN, MaxCmdSN of tgtd's last response
    opcodes: list[int] = field(default_factory=list)  # of the initiator's PDUs


def pdus(sock: socket.socket) -> Iterator[bytes]:
    """Whole PDUs as they come off a socket, until it closes."""
    buf = b""
    while True:
        try:
            chunk = sock.recv(1 << 16)
        except OSError:
            return
        if not chunk:
            return
        buf += chunk
        while len(buf) >= BHS and len(buf) >= pdu_length(buf[:BHS]):
            n = pdu_length(buf[:BHS])
            yield buf[:n]
            buf = buf[n:]


class Relay:
    """127.0.0.1:<port> -> tgtd, relaying whole PDUs target-side so one can be slipped in."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.connections: list[Relayed] = []
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def portal(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while True:
            try:
                down, _ = self.listener.accept()
            except OSError:
                return
            conn = Relayed(down, socket.create_connection(self.upstream))
            self.connections.append(conn)
            threading.Thread(target=self._to_target, args=(conn,), daemon=True).start()
            threading.Thread(target=self._to_initiator, args=(conn,), daemon=True).start()

    def _to_target(self, conn: Relayed) -> None:
        for pdu in pdus(conn.down):
            conn.opcodes.append(pdu[0] & 0x3F)
            try:
                conn.up.sendall(pdu)
            except OSError:
                break
        conn.up.close()

    def _to_initiator(self, conn: Relayed) -> None:
        for pdu in pdus(conn.up):
            with conn.lock:
                if pdu[0] & 0x3F in TARGET_OPCODES_WITH_STATSN:
                    conn.sn = pdu[24:36]
                try:
                    conn.down.sendall(pdu)
                except OSError:
                    break
        conn.down.close()

    def request_logout(self, within: int = 10) -> None:
        """An Async Message, AsyncEvent 1, on the newest connection, between PDUs."""
        conn = self.connections[-1]
        assert conn.sn is not None, "tgtd has not answered anything on it yet"
        pdu = bytearray(BHS)
        pdu[0], pdu[1] = 0x32, 0x80
        pdu[16:20] = b"\xff\xff\xff\xff"  # ITT: reserved
        pdu[24:36] = conn.sn
        pdu[36] = 1  # the target requests a logout
        pdu[42:44] = within.to_bytes(2, "big")  # Parameter3: within this many seconds
        with conn.lock:
            conn.down.sendall(pdu)

    def close(self) -> None:
        self.listener.close()
        for conn in self.connections:
            conn.down.close()
            conn.up.close()


def test_async_logout_request_is_answered_with_a_logout_and_a_relogin(
        tgt: Tgt, figure: Callable[[str], None]) -> None:
    iqn = "iqn.2024-01.test.vmlab:async-logout"
    target = tgt.add_target(iqn, luns=[LunSpec(size=16 << 20)])
    host, port = tgt.portal.rsplit(":", 1)
    relay = Relay((host, int(port)))
    try:
        with KernelLogin(relay.portal, iqn) as run:
            (disk,) = run.disks
            first = os.urandom(1 << 20)
            write_direct(disk.dev, 0, first)
            mark = len(run.lines)
            relay.request_logout(within=10)
            run.wait_line(rf"session {disk.sid}: the target requests a logout within 10 s",
                          timeout=30, start=mark)
            answered = run.wait_line(rf"session {disk.sid}: logged out at the target's "
                                     r"request \(response 0\)", timeout=30, start=mark)
            line = run.wait_line(rf"session {disk.sid}: recovered in", timeout=60,
                                 start=mark)
            assert LOGOUT_REQUEST in relay.connections[0].opcodes, \
                "no Logout Request on the first connection"
            wait_for(lambda: len(relay.connections) >= 2, timeout=10, what="the relogin")
            second = os.urandom(1 << 20)
            write_direct(disk.dev, 1 << 20, second)
            assert read_direct(disk.dev, 0, 1 << 20) == first
            assert read_direct(disk.dev, 1 << 20, 1 << 20) == second
            with target.lun_paths[0].open("rb") as f:
                assert f.read(2 << 20) == first + second
            figure(f"async logout request: {answered.strip()}; {line.strip()}")
            assert run.stop() == 0, run.output()
    finally:
        relay.close()
