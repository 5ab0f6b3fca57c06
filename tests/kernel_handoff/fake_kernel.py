"""A scripted stand-in for scsi_transport_iscsi's netlink side, over a socketpair.

The host kernel has no NETLINK_ISCSI, so the netlink client, the handoff's undo and
the recovery loop are driven here by a thread that reads our requests (netlink header
+ uevent, as the kernel would) and answers the way 6.1 does: replies with the request's
type and sequence number 0, events with type 0, failures as IF_ERROR or retcode. The
real kernel is exercised by the guest tests (tests/vm/guest/test_kernel_*.py).
"""

from __future__ import annotations

import contextlib
import errno
import socket
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from kernel_handoff import uevent as ue
from kernel_handoff.netlink import IscsiNetlink

NLHDR = struct.Struct("=IHHII")


@dataclass
class Seen:
    code: int
    fields: dict[str, int]
    tail: bytes
    payload: bytes = field(repr=False)

    @property
    def name(self) -> str:
        return ue.Request(self.code).name

    @property
    def param(self) -> ue.Param | None:
        return ue.Param(self.fields["param"]) if self.code == ue.Request.SET_PARAM else None

    @property
    def value(self) -> str:
        return self.tail.split(b"\0", 1)[0].decode()


# A handler gets the request and returns datagrams to send back: (nlmsg_type, payload).
Answer = list[tuple[int, bytes]]
Handler = Callable[[Seen], Answer | None] | Callable[[Seen], None]


def reply(seen: Seen, *, r: bytes | None = None, iferror: int = 0) -> tuple[int, bytes]:
    """The kernel's reply: the request's 56 bytes back, r filled, or IF_ERROR."""
    head = seen.payload[:ue.UEVENT_SIZE]
    kind = ue.Event.IF_ERROR if iferror else seen.code
    body = ue.encode_uevent(kind, iferror=-abs(iferror),
                            transport_handle=struct.unpack_from("=Q", head, 8)[0],
                            u=head[ue.U_OFFSET:ue.R_OFFSET],
                            r=r if r is not None else head[ue.R_OFFSET:ue.UEVENT_SIZE])
    return seen.code, body


def event(kind: int, member: str, **values: int) -> tuple[int, bytes]:
    return 0, ue.encode_uevent(kind, r=ue.pack_r(member, **values))


class FakeKernel:
    """Answers requests on one end of a socketpair; ``nl`` is the client on the other."""

    def __init__(self, handler: Handler | None = None, *, sid: int = 3, host_no: int = 4,
                 scsicmd_pdus: int = 0) -> None:
        self.sid, self.host_no = sid, host_no
        self.scsicmd_pdus = scsicmd_pdus
        self.handler = handler
        self.seen: list[Seen] = []
        self.fds: list[int] = []  # BIND_CONN transport_eph values
        self.fail: dict[tuple[int, int | None], int] = {}  # (code, param) -> errno
        self.retcode_fail: dict[int, int] = {}  # code -> errno in r.retcode
        self.silent: set[int] = set()  # codes that get no answer at all
        # The rules 6.1 enforces (seen in the guest): SET_PARAM needs the connection
        # to exist (EINVAL), and all but SESS_RECOVERY_TMO need it bound (ENOTCONN);
        # DESTROY_SESSION refuses while a connection exists (EBUSY).
        self.conns: set[tuple[int, int]] = set()
        self.bound: set[tuple[int, int]] = set()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock = theirs
        self.nl = IscsiNetlink(use_socket=ours, timeout=2.0)
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.nl.close()
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)  # wakes the serving thread's recv
        self._thread.join(timeout=5)
        self._sock.close()

    def send(self, nl_type: int, payload: bytes) -> None:
        self._sock.send(NLHDR.pack(NLHDR.size + len(payload), nl_type, 0, 0, 0) + payload
                        + bytes(-len(payload) & 3))

    def names(self) -> list[str]:
        return [s.name if s.param is None else f"SET_PARAM {s.param.name}" for s in self.seen]

    def _serve(self) -> None:
        while True:
            try:
                data = self._sock.recv(1 << 20)
            except OSError:
                return
            if not data:
                return
            length, code, _, _, _ = NLHDR.unpack_from(data)
            payload = data[NLHDR.size:length]
            ev, fields = ue.decode_request(payload)
            seen = Seen(code, fields, ev.tail, payload)
            self.seen.append(seen)
            try:
                for nl_type, body in self._answer(seen):
                    self.send(nl_type, body)
            except OSError:  # our client went away mid-answer
                return

    def _answer(self, seen: Seen) -> Answer:
        if self.handler is not None:
            custom = self.handler(seen)
            if custom is not None:
                return custom
        if seen.code in self.silent:
            return []
        failure = self.fail.get((seen.code, seen.fields.get("param")
                                 if seen.code == ue.Request.SET_PARAM else None))
        if failure:
            return [reply(seen, iferror=failure)]
        if seen.code in self.retcode_fail:
            return [reply(seen, r=ue.pack_r("retcode", retcode=-self.retcode_fail[seen.code]))]
        code = seen.code
        conn = (seen.fields.get("sid", -1), seen.fields.get("cid", -1))
        if code == ue.Request.SET_PARAM:
            if conn not in self.conns:
                return [reply(seen, iferror=errno.EINVAL)]
            if seen.param != ue.Param.SESS_RECOVERY_TMO and conn not in self.bound:
                return [reply(seen, iferror=errno.ENOTCONN)]
        if code == ue.Request.STOP_CONN:
            self.bound.discard(conn)
        if code == ue.Request.DESTROY_CONN:
            self.conns.discard(conn)
            self.bound.discard(conn)
        if code == ue.Request.DESTROY_SESSION and any(
                c[0] == seen.fields["sid"] for c in self.conns):
            return [reply(seen, iferror=errno.EBUSY)]
        if code == ue.Request.CREATE_SESSION:
            ids = {"sid": self.sid, "host_no": self.host_no}
            return [event(ue.Event.CREATE_SESSION, "c_session_ret", **ids),
                    reply(seen, r=ue.pack_r("c_session_ret", **ids))]
        if code == ue.Request.CREATE_CONN:
            self.conns.add(conn)
            return [reply(seen, r=ue.pack_r("c_conn_ret", sid=seen.fields["sid"],
                                            cid=seen.fields["cid"]))]
        if code == ue.Request.BIND_CONN:
            self.fds.append(seen.fields["transport_eph"])
            self.bound.add(conn)
        if code == ue.Request.UNBIND_SESSION:
            return [reply(seen), event(ue.Event.UNBIND_SESSION, "unbind_session",
                                       sid=seen.fields["sid"], host_no=self.host_no)]
        if code == ue.Request.SEND_PDU:
            logout_rsp = bytes([0x26, 0x80]) + bytes(46)
            body = ue.encode_uevent(ue.Event.RECV_PDU,
                                    r=ue.pack_r("recv_req", sid=seen.fields["sid"],
                                                cid=seen.fields["cid"]), tail=logout_rsp)
            return [reply(seen), (0, body)]
        if code == ue.Request.GET_STATS:
            stats = ue.encode_stats({"scsicmd_pdus": self.scsicmd_pdus})
            body = ue.encode_uevent(ue.Request.GET_STATS,
                                    u=ue.pack_u("get_stats", sid=seen.fields["sid"],
                                                cid=seen.fields["cid"]), tail=stats)
            return [(0, body)]  # no reply of its own: the stats come multicast
        if code == ue.Request.DESTROY_SESSION:
            return [reply(seen), event(ue.Event.DESTROY_SESSION, "d_session",
                                       host_no=self.host_no, sid=seen.fields["sid"])]
        return [reply(seen)]


ENOSYS = errno.ENOSYS
