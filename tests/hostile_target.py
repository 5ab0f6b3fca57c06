"""A target that logs in correctly, serves a small disk, and then misbehaves in the full
feature phase: the things a real tgtd never does (issue 10).

It is built on ``fake_target.FakeTarget`` (one thread per connection). LUN 0 is a 1 MiB
disk; the probe (REPORT LUNS, INQUIRY, READ CAPACITY, MODE SENSE) is answered well unless
the misbehaviour is about the probe. Misbehaviours (``HostileTarget(name)``):

- ``overrun``: a READ gets 512 bytes more Data-In than it asked for.
- ``sense_overflow``: a READ gets CHECK CONDITION whose SenseLength exceeds the segment.
- ``r2t_beyond`` / ``r2t_zero`` / ``r2t_huge``: a WRITE gets an R2T past its end, for 0
  bytes, or for 16 MiB (the login says InitialR2T=Yes, ImmediateData=No).
- ``async_logout``: every READ is answered by an Async Message "please log out".
- ``closed_window``: from the first READ on, MaxCmdSN stays at ExpCmdSN - 1 (pings are
  still answered).
- ``swallow_abort_ok``: READs are never answered; ABORT TASK gets "function complete".
- ``capacity_2_63``: READ CAPACITY(16) says 2^63 blocks.
- ``swallow_probe``: READ CAPACITY is never answered (nor its ABORT TASK unless
  ``abort_ok``).
- ``recovered_error``: a READ's data comes with CHECK CONDITION, RECOVERED ERROR.
- ``write_residual``: a WRITE is answered GOOD with an underflow of 512 bytes.
- ``nop_flood``: once the probe is over, ``flood`` NOP-In pings carrying 256 KiB each,
  and the target never reads again.
"""

from __future__ import annotations

import struct
import threading
from types import TracebackType

from userland.keys import encode_text
from userland.pdu import (
    R2T,
    RESERVED_TAG,
    AsyncMessage,
    DataIn,
    DataOut,
    LoginRequest,
    LoginResponse,
    LogoutRequest,
    LogoutResponse,
    NopIn,
    NopOut,
    Pdu,
    ScsiCommand,
    ScsiResponse,
    TaskMgmtRequest,
    TaskMgmtResponse,
)

from fake_target import FakeTarget, Peer

BLOCK = 512
BLOCKS = 2048
CHECK_CONDITION = 0x02
READS, WRITES = {0x28, 0x88}, {0x2A, 0x8A}
MODES = {"none", "overrun", "sense_overflow", "r2t_beyond", "r2t_zero", "r2t_huge",
         "async_logout", "closed_window", "swallow_abort_ok", "capacity_2_63",
         "swallow_probe", "nop_flood", "recovered_error", "write_residual"}


def pattern(offset: int, length: int) -> bytes:
    """The disk's bytes: each 4-byte word is its own offset, so any slip shows."""
    start = offset - offset % 4
    words = b"".join(struct.pack(">I", i) for i in range(start, offset + length + 4, 4))
    return words[offset - start:offset - start + length]


def illegal_request() -> bytes:
    sense = bytes([0x70, 0, 0x05, 0, 0, 0, 0, 10, 0, 0, 0, 0, 0x20, 0x00, 0, 0, 0, 0])
    return len(sense).to_bytes(2, "big") + sense


class HostileTarget(FakeTarget):
    def __init__(self, mode: str = "none", *, abort_ok: bool = False, flood: int = 1200,
                 answers: dict[str, str] | None = None) -> None:
        assert mode in MODES, mode
        super().__init__(self._connection)
        self.mode = mode
        self.abort_ok = abort_ok
        self.flood = flood
        self.disk = bytearray(pattern(0, BLOCK * BLOCKS))
        self.lock = threading.Lock()
        self.commands: list[int] = []  # opcodes seen, all connections
        self.aborts = 0
        self.logouts = 0
        self.pings_sent = 0
        self.stopped = threading.Event()
        self.answers = answers or {}  # login keys answered with these values
        # Switches a test flips while running:
        self.down = False  # new connections are closed at once (a target away)
        self.drop_on_command = False  # a SCSI command closes its connection, unanswered
        self.tpgt = 1  # the portal group declared at login (a relogin may find another)

    def __enter__(self) -> HostileTarget:
        super().__enter__()
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stopped.set()
        super().__exit__(et, e, tb)

    # -- one connection

    def _connection(self, peer: Peer) -> None:
        if self.down:
            return  # FakeTarget closes the socket
        Connection(self, peer).run()


class Connection:
    def __init__(self, target: HostileTarget, peer: Peer) -> None:
        self.t = target
        self.peer = peer
        self.exp_cmd_sn = 0
        self.frozen_max: int | None = None  # closed_window: MaxCmdSN stays here
        self.writes: dict[int, tuple[ScsiCommand, bytearray, int]] = {}

    # login, with InitialR2T=Yes/ImmediateData=No when R2Ts are the point

    def login(self) -> None:
        req, keys = self.peer.recv_login()
        self.respond_login(req, [("AuthMethod", "None"),
                                 ("TargetPortalGroupTag", str(self.t.tpgt))],
                           nsg=1)
        req, keys = self.peer.recv_login()
        r2t = self.t.mode.startswith("r2t")
        reply = []
        for key, value in keys.items():
            if key == "MaxRecvDataSegmentLength":
                reply.append((key, "262144"))
            elif key in self.t.answers:
                reply.append((key, self.t.answers[key]))
            elif r2t and key in ("InitialR2T", "ImmediateData"):
                reply.append((key, "Yes" if key == "InitialR2T" else "No"))
            else:
                reply.append((key, value.split(",")[0]))
        self.respond_login(req, reply, nsg=3)
        self.exp_cmd_sn = req.cmd_sn

    def respond_login(self, req: LoginRequest, pairs: list[tuple[str, str]], nsg: int) -> None:
        self.peer.stat_sn += 1
        self.peer.send(LoginResponse(
            transit=True, csg=req.csg, nsg=nsg, isid=req.isid, tsih=7 if nsg == 3 else 0,
            itt=req.itt, stat_sn=self.peer.stat_sn, exp_cmd_sn=req.cmd_sn,
            max_cmd_sn=req.cmd_sn + self.window() - 1, data=encode_text(pairs)))

    def window(self) -> int:
        # closed_window: one command at a time, so that freezing MaxCmdSN closes it.
        return 1 if self.t.mode == "closed_window" else 32

    # sending with StatSN and the window filled in

    def send(self, pdu: Pdu, *, status: bool = True) -> None:
        if status:
            self.peer.stat_sn += 1
        mx = (self.frozen_max if self.frozen_max is not None
              else self.exp_cmd_sn + self.window() - 1)
        for name, value in (("stat_sn", self.peer.stat_sn), ("exp_cmd_sn", self.exp_cmd_sn),
                            ("max_cmd_sn", mx & 0xFFFFFFFF)):
            setattr(pdu, name, value)
        self.peer.send(pdu)

    def run(self) -> None:
        self.login()
        while True:
            pdu = self.peer.recv()
            if isinstance(pdu, ScsiCommand | LogoutRequest | NopOut) and not pdu.immediate:
                self.exp_cmd_sn = (pdu.cmd_sn + 1) & 0xFFFFFFFF
            if isinstance(pdu, NopOut):
                if pdu.itt != RESERVED_TAG:
                    self.send(NopIn(itt=pdu.itt, data=bytes(pdu.data)))
            elif isinstance(pdu, ScsiCommand):
                with self.t.lock:
                    self.t.commands.append(pdu.cdb[0])
                if self.t.drop_on_command:
                    return
                self.command(pdu)
            elif isinstance(pdu, DataOut):
                self.data_out(pdu)
            elif isinstance(pdu, TaskMgmtRequest):
                with self.t.lock:
                    self.t.aborts += 1
                if self.t.mode != "swallow_probe" or self.t.abort_ok:
                    self.send(TaskMgmtResponse(itt=pdu.itt, response=0))
            elif isinstance(pdu, LogoutRequest):
                with self.t.lock:
                    self.t.logouts += 1
                self.send(LogoutResponse(itt=pdu.itt))
                return

    # SCSI

    def command(self, cmd: ScsiCommand) -> None:
        op, mode = cmd.cdb[0], self.t.mode
        if op in READS:
            if mode == "closed_window" and self.frozen_max is None:
                self.frozen_max = (self.exp_cmd_sn - 1) & 0xFFFFFFFF
            if mode in ("swallow_abort_ok",):
                return
            if mode == "async_logout":
                self.send(AsyncMessage(lun=0, itt=RESERVED_TAG, async_event=1, parameter3=2),
                          status=False)
                return
            if mode == "sense_overflow":
                sense = illegal_request()
                self.send(ScsiResponse(itt=cmd.itt, status=CHECK_CONDITION,
                                       data=(200).to_bytes(2, "big") + sense[2:]))
                return
            lba, count = self.lba_count(cmd.cdb)
            data = bytes(self.t.disk[lba * BLOCK:(lba + count) * BLOCK])
            if mode == "recovered_error":
                self.send(DataIn(itt=cmd.itt, data=data), status=False)
                recovered = bytearray(illegal_request())
                recovered[2 + 2], recovered[2 + 12] = 0x01, 0x17  # RECOVERED ERROR, 17/00
                self.send(ScsiResponse(itt=cmd.itt, status=CHECK_CONDITION,
                                       data=bytes(recovered)))
                return
            if mode == "overrun":
                data += bytes(BLOCK)
            self.data_in(cmd, data, cmd.expected_data_transfer_length)
        elif op in WRITES:
            self.write(cmd)
        elif op == 0x00 or op == 0x35:  # TEST UNIT READY, SYNCHRONIZE CACHE
            self.send(ScsiResponse(itt=cmd.itt))
        elif op == 0x12:
            self.inquiry(cmd)
        elif op == 0xA0:  # REPORT LUNS: LUN 0 alone
            self.data_in(cmd, (8).to_bytes(4, "big") + bytes(12),
                         cmd.expected_data_transfer_length)
        elif op == 0x9E and (cmd.cdb[1] & 0x1F) == 0x10:
            if mode == "swallow_probe":
                return
            last = (1 << 63) - 1 if mode == "capacity_2_63" else BLOCKS - 1
            self.data_in(cmd, last.to_bytes(8, "big") + BLOCK.to_bytes(4, "big") + bytes(20),
                         cmd.expected_data_transfer_length)
        elif op == 0x5A:  # MODE SENSE(10): a header, not write protected
            self.data_in(cmd, (6).to_bytes(2, "big") + bytes(6),
                         cmd.expected_data_transfer_length)
            if mode == "nop_flood":
                self.flood()
        else:
            self.send(ScsiResponse(itt=cmd.itt, status=CHECK_CONDITION,
                                   data=illegal_request()))

    def inquiry(self, cmd: ScsiCommand) -> None:
        if cmd.cdb[1] & 1:  # EVPD: page 0 lists page 0 alone
            if cmd.cdb[2] == 0:
                data = bytes([0, 0, 0, 1, 0])
            else:
                self.send(ScsiResponse(itt=cmd.itt, status=CHECK_CONDITION,
                                       data=illegal_request()))
                return
        else:
            data = (bytes([0, 0, 5, 2, 31, 0, 0, 0]) + b"HOSTILE ".ljust(8)
                    + b"misbehaves".ljust(16) + b"0001")
        self.data_in(cmd, data, cmd.expected_data_transfer_length)

    @staticmethod
    def lba_count(cdb: bytes) -> tuple[int, int]:
        if cdb[0] in (0x28, 0x2A):
            return int.from_bytes(cdb[2:6], "big"), int.from_bytes(cdb[7:9], "big")
        return int.from_bytes(cdb[2:10], "big"), int.from_bytes(cdb[10:14], "big")

    def data_in(self, cmd: ScsiCommand, data: bytes, asked: int) -> None:
        """Data-In in 8 KiB pieces, status in the last; an underflow when short. Sends
        everything in ``data``, even past ``asked`` (that is the overrun's point)."""
        if self.t.mode != "overrun":
            data = data[:asked]
        pieces = [data[i:i + 8192] for i in range(0, len(data), 8192)] or [b""]
        for sn, piece in enumerate(pieces):
            last = sn == len(pieces) - 1
            self.send(DataIn(itt=cmd.itt, data_sn=sn, buffer_offset=sn * 8192, data=piece,
                             final=last, has_status=last,
                             underflow=last and len(data) < asked,
                             residual_count=max(0, asked - len(data)) if last else 0),
                      status=last)

    def write(self, cmd: ScsiCommand) -> None:
        length = cmd.expected_data_transfer_length
        mode = self.t.mode
        if mode.startswith("r2t"):
            want = {"r2t_beyond": length + 4096, "r2t_zero": 0, "r2t_huge": 16 << 20}[mode]
            self.send(R2T(itt=cmd.itt, ttt=0x1000, r2t_sn=0, buffer_offset=0,
                          desired_data_transfer_length=want), status=False)
            return
        buf = bytearray(length)
        buf[:len(cmd.data)] = cmd.data
        self.writes[cmd.itt] = (cmd, buf, len(cmd.data))
        if len(cmd.data) >= length:
            self.write_done(cmd.itt)
        elif cmd.final:  # nothing unsolicited follows: ask for the rest
            self.send(R2T(itt=cmd.itt, ttt=0x2000, r2t_sn=0, buffer_offset=len(cmd.data),
                          desired_data_transfer_length=length - len(cmd.data)),
                      status=False)

    def data_out(self, pdu: DataOut) -> None:
        if pdu.itt not in self.writes:
            return
        cmd, buf, got = self.writes[pdu.itt]
        buf[pdu.buffer_offset:pdu.buffer_offset + len(pdu.data)] = pdu.data
        got += len(pdu.data)
        self.writes[pdu.itt] = (cmd, buf, got)
        if got >= len(buf):
            self.write_done(pdu.itt)
        elif pdu.final and pdu.ttt == RESERVED_TAG:
            self.send(R2T(itt=cmd.itt, ttt=0x2000, r2t_sn=0, buffer_offset=got,
                          desired_data_transfer_length=len(buf) - got), status=False)

    def write_done(self, itt: int) -> None:
        cmd, buf, _ = self.writes.pop(itt)
        lba, _count = self.lba_count(cmd.cdb)
        if self.t.mode == "write_residual":  # took all but the last block, says so
            buf = buf[:-BLOCK]
            self.t.disk[lba * BLOCK:lba * BLOCK + len(buf)] = buf
            self.send(ScsiResponse(itt=itt, underflow=True, residual_count=BLOCK))
            return
        self.t.disk[lba * BLOCK:lba * BLOCK + len(buf)] = buf
        self.send(ScsiResponse(itt=itt))

    def flood(self) -> None:
        """Ping with 256 KiB each and never read again: only our memory bound helps."""
        data = bytes(256 << 10)
        for _ in range(self.t.flood):
            self.send(NopIn(itt=RESERVED_TAG, ttt=0x4000, data=data), status=False)
            with self.t.lock:
                self.t.pings_sent += 1
        self.t.stopped.wait()  # never read again, until the test ends
        raise ConnectionError("flood over")
