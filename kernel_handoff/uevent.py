"""struct iscsi_uevent (include/scsi/iscsi_if.h) and its tails: a sans-IO codec.

Every NETLINK_ISCSI message carries one 56-byte ``struct iscsi_uevent`` (header, a
24-byte request union ``u`` at 16 and a 16-byte reply union ``r`` at 40), then a tail:
SET_PARAM's NUL-terminated value, SEND_PDU's BHS and data, RECV_PDU's BHS and data,
GET_STATS' ``struct iscsi_stats``. This module turns requests into payload bytes and
payload bytes into replies and events; the netlink header around them is
kernel_handoff/netlink.py's business. Byte order is the host's, as the kernel's.

Layouts are declared once, as (member, field, offset, struct code) tables, and the
test (tests/kernel_handoff/test_uevent_header.py) compiles a C program against the
kernel's own header to check every offset, size and enum value in them.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

UEVENT_SIZE = 56
U_OFFSET = 16  # union u: messages user -> kernel
U_SIZE = 24
R_OFFSET = 40  # union r: messages kernel -> user
R_SIZE = 16
ISCSI_NL_GRP_ISCSID = 1  # the multicast group iscsid (and we) listen on
ISCSI_NL_GRP_UIP = 2
UEVENT_BASE = 10
KEVENT_BASE = 100
ISCSI_ERR_BASE = 1000

_HEADER = struct.Struct("=IiQ")  # type, iferror (-errno when set), transport_handle
HEADER_FIELDS: tuple[tuple[str, int, str], ...] = (
    ("type", 0, "I"), ("iferror", 4, "i"), ("transport_handle", 8, "Q"))


class Request(enum.IntEnum):
    """enum iscsi_uevent_e, the down events (ISCSI_UEVENT_*): user -> kernel."""

    UNKNOWN = 0
    CREATE_SESSION = UEVENT_BASE + 1
    DESTROY_SESSION = UEVENT_BASE + 2
    CREATE_CONN = UEVENT_BASE + 3
    DESTROY_CONN = UEVENT_BASE + 4
    BIND_CONN = UEVENT_BASE + 5
    SET_PARAM = UEVENT_BASE + 6
    START_CONN = UEVENT_BASE + 7
    STOP_CONN = UEVENT_BASE + 8
    SEND_PDU = UEVENT_BASE + 9
    GET_STATS = UEVENT_BASE + 10
    GET_PARAM = UEVENT_BASE + 11
    TRANSPORT_EP_CONNECT = UEVENT_BASE + 12
    TRANSPORT_EP_POLL = UEVENT_BASE + 13
    TRANSPORT_EP_DISCONNECT = UEVENT_BASE + 14
    TGT_DSCVR = UEVENT_BASE + 15
    SET_HOST_PARAM = UEVENT_BASE + 16
    UNBIND_SESSION = UEVENT_BASE + 17
    CREATE_BOUND_SESSION = UEVENT_BASE + 18
    TRANSPORT_EP_CONNECT_THROUGH_HOST = UEVENT_BASE + 19
    PATH_UPDATE = UEVENT_BASE + 20
    SET_IFACE_PARAMS = UEVENT_BASE + 21
    PING = UEVENT_BASE + 22
    GET_CHAP = UEVENT_BASE + 23
    DELETE_CHAP = UEVENT_BASE + 24
    SET_FLASHNODE_PARAMS = UEVENT_BASE + 25
    NEW_FLASHNODE = UEVENT_BASE + 26
    DEL_FLASHNODE = UEVENT_BASE + 27
    LOGIN_FLASHNODE = UEVENT_BASE + 28
    LOGOUT_FLASHNODE = UEVENT_BASE + 29
    LOGOUT_FLASHNODE_SID = UEVENT_BASE + 30
    SET_CHAP = UEVENT_BASE + 31
    GET_HOST_STATS = UEVENT_BASE + 32
    DESTROY_SESSION_ASYNC = UEVENT_BASE + 33


class Event(enum.IntEnum):
    """enum iscsi_uevent_e, the up events (ISCSI_KEVENT_*): kernel -> user."""

    RECV_PDU = KEVENT_BASE + 1
    CONN_ERROR = KEVENT_BASE + 2
    IF_ERROR = KEVENT_BASE + 3
    DESTROY_SESSION = KEVENT_BASE + 4
    UNBIND_SESSION = KEVENT_BASE + 5
    CREATE_SESSION = KEVENT_BASE + 6
    PATH_REQ = KEVENT_BASE + 7
    IF_DOWN = KEVENT_BASE + 8
    CONN_LOGIN_STATE = KEVENT_BASE + 9
    HOST_EVENT = KEVENT_BASE + 10
    PING_COMP = KEVENT_BASE + 11


class StopConn(enum.IntEnum):
    """STOP_CONN_* flags: why a connection stops."""

    TERM = 1
    SUSPEND = 2
    RECOVER = 3


class ConnErr(enum.IntEnum):
    """enum iscsi_err: the ``error`` of a CONN_ERROR event."""

    OK = 0
    DATASN = ISCSI_ERR_BASE + 1
    DATA_OFFSET = ISCSI_ERR_BASE + 2
    MAX_CMDSN = ISCSI_ERR_BASE + 3
    EXP_CMDSN = ISCSI_ERR_BASE + 4
    BAD_OPCODE = ISCSI_ERR_BASE + 5
    DATALEN = ISCSI_ERR_BASE + 6
    AHSLEN = ISCSI_ERR_BASE + 7
    PROTO = ISCSI_ERR_BASE + 8
    LUN = ISCSI_ERR_BASE + 9
    BAD_ITT = ISCSI_ERR_BASE + 10
    CONN_FAILED = ISCSI_ERR_BASE + 11
    R2TSN = ISCSI_ERR_BASE + 12
    SESSION_FAILED = ISCSI_ERR_BASE + 13
    HDR_DGST = ISCSI_ERR_BASE + 14
    DATA_DGST = ISCSI_ERR_BASE + 15
    PARAM_NOT_FOUND = ISCSI_ERR_BASE + 16
    NO_SCSI_CMD = ISCSI_ERR_BASE + 17
    INVALID_HOST = ISCSI_ERR_BASE + 18
    XMIT_FAILED = ISCSI_ERR_BASE + 19
    TCP_CONN_CLOSE = ISCSI_ERR_BASE + 20
    SCSI_EH_SESSION_RST = ISCSI_ERR_BASE + 21
    NOP_TIMEDOUT = ISCSI_ERR_BASE + 22


class ConnState(enum.IntEnum):
    """enum iscsi_conn_state, in CONN_LOGIN_STATE events."""

    FREE = 0
    XPT_WAIT = 1
    IN_LOGIN = 2
    LOGGED_IN = 3
    IN_LOGOUT = 4
    LOGOUT_REQUESTED = 5
    CLEANUP_WAIT = 6


class Param(enum.IntEnum):
    """enum iscsi_param: what SET_PARAM sets (values go as NUL-terminated text)."""

    MAX_RECV_DLENGTH = 0
    MAX_XMIT_DLENGTH = enum.auto()
    HDRDGST_EN = enum.auto()
    DATADGST_EN = enum.auto()
    INITIAL_R2T_EN = enum.auto()
    MAX_R2T = enum.auto()
    IMM_DATA_EN = enum.auto()
    FIRST_BURST = enum.auto()
    MAX_BURST = enum.auto()
    PDU_INORDER_EN = enum.auto()
    DATASEQ_INORDER_EN = enum.auto()
    ERL = enum.auto()
    IFMARKER_EN = enum.auto()
    OFMARKER_EN = enum.auto()
    EXP_STATSN = enum.auto()
    TARGET_NAME = enum.auto()
    TPGT = enum.auto()
    PERSISTENT_ADDRESS = enum.auto()
    PERSISTENT_PORT = enum.auto()
    SESS_RECOVERY_TMO = enum.auto()
    CONN_PORT = enum.auto()
    CONN_ADDRESS = enum.auto()
    USERNAME = enum.auto()
    USERNAME_IN = enum.auto()
    PASSWORD = enum.auto()
    PASSWORD_IN = enum.auto()
    FAST_ABORT = enum.auto()
    ABORT_TMO = enum.auto()
    LU_RESET_TMO = enum.auto()
    HOST_RESET_TMO = enum.auto()
    PING_TMO = enum.auto()
    RECV_TMO = enum.auto()
    IFACE_NAME = enum.auto()
    ISID = enum.auto()
    INITIATOR_NAME = enum.auto()
    TGT_RESET_TMO = enum.auto()
    TARGET_ALIAS = enum.auto()
    CHAP_IN_IDX = enum.auto()
    CHAP_OUT_IDX = enum.auto()
    BOOT_ROOT = enum.auto()
    BOOT_NIC = enum.auto()
    BOOT_TARGET = enum.auto()
    AUTO_SND_TGT_DISABLE = enum.auto()
    DISCOVERY_SESS = enum.auto()
    PORTAL_TYPE = enum.auto()
    CHAP_AUTH_EN = enum.auto()
    DISCOVERY_LOGOUT_EN = enum.auto()
    BIDI_CHAP_EN = enum.auto()
    DISCOVERY_AUTH_OPTIONAL = enum.auto()
    DEF_TIME2WAIT = enum.auto()
    DEF_TIME2RETAIN = enum.auto()
    MAX_SEGMENT_SIZE = enum.auto()
    STATSN = enum.auto()
    KEEPALIVE_TMO = enum.auto()
    LOCAL_PORT = enum.auto()
    TSID = enum.auto()
    DEF_TASKMGMT_TMO = enum.auto()
    TCP_TIMESTAMP_STAT = enum.auto()
    TCP_WSF_DISABLE = enum.auto()
    TCP_NAGLE_DISABLE = enum.auto()
    TCP_TIMER_SCALE = enum.auto()
    TCP_TIMESTAMP_EN = enum.auto()
    TCP_XMIT_WSF = enum.auto()
    TCP_RECV_WSF = enum.auto()
    IP_FRAGMENT_DISABLE = enum.auto()
    IPV4_TOS = enum.auto()
    IPV6_TC = enum.auto()
    IPV6_FLOW_LABEL = enum.auto()
    IS_FW_ASSIGNED_IPV6 = enum.auto()
    DISCOVERY_PARENT_IDX = enum.auto()
    DISCOVERY_PARENT_TYPE = enum.auto()
    LOCAL_IPADDR = enum.auto()


# Parameters whose values are secrets: never logged, never named with their value.
SECRET_PARAMS = frozenset({Param.PASSWORD, Param.PASSWORD_IN})

# --- layouts ------------------------------------------------------------------------
# (field, offset inside the union member, struct code). Offsets in the whole uevent
# are U_OFFSET/R_OFFSET plus these. Each table is what the C header test checks.
FieldTable = tuple[tuple[str, int, str], ...]

U_MEMBERS: Mapping[str, FieldTable] = MappingProxyType({
    "c_session": (("initial_cmdsn", 0, "I"), ("cmds_max", 4, "H"), ("queue_depth", 6, "H")),
    "c_bound_session": (("ep_handle", 0, "Q"), ("initial_cmdsn", 8, "I"),
                        ("cmds_max", 12, "H"), ("queue_depth", 14, "H")),
    "d_session": (("sid", 0, "I"),),
    "c_conn": (("sid", 0, "I"), ("cid", 4, "I")),
    "b_conn": (("sid", 0, "I"), ("cid", 4, "I"), ("transport_eph", 8, "Q"),
               ("is_leading", 16, "I")),
    "d_conn": (("sid", 0, "I"), ("cid", 4, "I")),
    "send_pdu": (("sid", 0, "I"), ("cid", 4, "I"), ("hdr_size", 8, "I"),
                 ("data_size", 12, "I")),
    "set_param": (("sid", 0, "I"), ("cid", 4, "I"), ("param", 8, "I"), ("len", 12, "I")),
    "start_conn": (("sid", 0, "I"), ("cid", 4, "I")),
    "stop_conn": (("sid", 0, "I"), ("cid", 4, "I"), ("conn_handle", 8, "Q"),
                  ("flag", 16, "I")),
    "get_stats": (("sid", 0, "I"), ("cid", 4, "I")),
    "set_host_param": (("host_no", 0, "I"), ("param", 4, "I"), ("len", 8, "I")),
})

R_MEMBERS: Mapping[str, FieldTable] = MappingProxyType({
    "retcode": (("retcode", 0, "i"),),
    "c_session_ret": (("sid", 0, "I"), ("host_no", 4, "I")),
    "c_conn_ret": (("sid", 0, "I"), ("cid", 4, "I")),
    "unbind_session": (("sid", 0, "I"), ("host_no", 4, "I")),
    "recv_req": (("sid", 0, "I"), ("cid", 4, "I"), ("recv_handle", 8, "Q")),
    "conn_login": (("sid", 0, "I"), ("cid", 4, "I"), ("state", 8, "I")),
    "connerror": (("sid", 0, "I"), ("cid", 4, "I"), ("error", 8, "I")),
    "d_session": (("host_no", 0, "I"), ("sid", 4, "I")),
})

# struct iscsi_stats, which follows the uevent in a GET_STATS answer.
STATS_FIELDS: FieldTable = (
    ("txdata_octets", 0, "Q"), ("rxdata_octets", 8, "Q"),
    ("noptx_pdus", 16, "I"), ("scsicmd_pdus", 20, "I"), ("tmfcmd_pdus", 24, "I"),
    ("login_pdus", 28, "I"), ("text_pdus", 32, "I"), ("dataout_pdus", 36, "I"),
    ("logout_pdus", 40, "I"), ("snack_pdus", 44, "I"),
    ("noprx_pdus", 48, "I"), ("scsirsp_pdus", 52, "I"), ("tmfrsp_pdus", 56, "I"),
    ("textrsp_pdus", 60, "I"), ("datain_pdus", 64, "I"), ("logoutrsp_pdus", 68, "I"),
    ("r2t_pdus", 72, "I"), ("async_pdus", 76, "I"), ("rjt_pdus", 80, "I"),
    ("digest_err", 84, "I"), ("timeout_err", 88, "I"),
    ("custom_length", 92, "I"),
)
STATS_CUSTOM_OFFSET = 96  # custom[], 8-aligned
STATS_CUSTOM_DESC = 64
STATS_CUSTOM_SIZE = 72  # char desc[64]; uint64_t value
STATS_CUSTOM_MAX = 32
BHS_LEN = 48  # struct iscsi_hdr, the header RECV_PDU carries


def _compile(table: FieldTable, size: int) -> struct.Struct:
    """One native-order struct over a union member, padding between declared offsets."""
    fmt, pos = "=", 0
    for name, offset, code in table:
        if offset < pos:
            raise TypeError(f"field {name} overlaps at offset {offset}")
        fmt += "x" * (offset - pos) + code
        pos = offset + struct.calcsize("=" + code)
    if pos > size:
        raise TypeError(f"member is {pos} bytes, more than the union's {size}")
    return struct.Struct(fmt + "x" * (size - pos))


_U = {name: _compile(table, U_SIZE) for name, table in U_MEMBERS.items()}
_R = {name: _compile(table, R_SIZE) for name, table in R_MEMBERS.items()}
_STATS = _compile(STATS_FIELDS, STATS_CUSTOM_OFFSET)
_CUSTOM = struct.Struct(f"={STATS_CUSTOM_DESC}sQ")


def _pack_u(member: str, **values: int) -> bytes:
    names = [name for name, _, _ in U_MEMBERS[member]]
    return _U[member].pack(*(values.get(name, 0) for name in names))


def _unpack(structs: Mapping[str, struct.Struct], tables: Mapping[str, FieldTable],
            member: str, raw: bytes) -> dict[str, int]:
    values = structs[member].unpack(raw)
    return {name: value for (name, _, _), value in zip(tables[member], values, strict=True)}


# --- requests -----------------------------------------------------------------------

@dataclass(frozen=True)
class RequestMsg:
    """One request: its code (the netlink message type) and the payload to send."""

    code: Request
    payload: bytes = field(repr=False)
    what: str  # for errors and logs: "SET_PARAM MAX_RECV_DLENGTH (session 3)"; no values
    sid: int | None = None
    cid: int | None = None

    def __repr__(self) -> str:
        return f"RequestMsg({self.what}, {len(self.payload)} bytes)"


def _request(code: Request, handle: int, union: bytes, tail: bytes = b"", *,
             what: str | None = None, sid: int | None = None,
             cid: int | None = None) -> RequestMsg:
    head = _HEADER.pack(int(code), 0, handle) + union + bytes(R_SIZE)
    assert len(head) == UEVENT_SIZE
    label = what or code.name
    if sid is not None:
        label += f" (session {sid})"
    return RequestMsg(code, head + tail, label, sid, cid)


def create_session(handle: int, *, initial_cmdsn: int, cmds_max: int = 128,
                   queue_depth: int = 32) -> RequestMsg:
    """A session on a new SCSI host; the reply gives sid and host_no."""
    return _request(Request.CREATE_SESSION, handle,
                    _pack_u("c_session", initial_cmdsn=initial_cmdsn & 0xFFFFFFFF,
                            cmds_max=cmds_max, queue_depth=queue_depth))


def destroy_session(handle: int, sid: int) -> RequestMsg:
    return _request(Request.DESTROY_SESSION, handle, _pack_u("d_session", sid=sid), sid=sid)


def unbind_session(handle: int, sid: int) -> RequestMsg:
    """Remove the session's SCSI target (its disks) before a logout."""
    return _request(Request.UNBIND_SESSION, handle, _pack_u("d_session", sid=sid), sid=sid)


def create_conn(handle: int, sid: int, cid: int = 0) -> RequestMsg:
    return _request(Request.CREATE_CONN, handle, _pack_u("c_conn", sid=sid, cid=cid),
                    sid=sid, cid=cid)


def destroy_conn(handle: int, sid: int, cid: int = 0) -> RequestMsg:
    return _request(Request.DESTROY_CONN, handle, _pack_u("d_conn", sid=sid, cid=cid),
                    sid=sid, cid=cid)


def bind_conn(handle: int, sid: int, cid: int, fd: int, *,
              is_leading: bool = True) -> RequestMsg:
    """Give the kernel our socket: ``fd`` is looked up in the sender's file table."""
    return _request(Request.BIND_CONN, handle,
                    _pack_u("b_conn", sid=sid, cid=cid, transport_eph=fd,
                            is_leading=int(is_leading)), sid=sid, cid=cid)


def param_text(value: str | int | bool) -> str:
    """How SET_PARAM values travel: decimal numbers, 1/0 for flags, text as is."""
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    return value


def set_param(handle: int, sid: int, cid: int, param: Param,
              value: str | int | bool) -> RequestMsg:
    """A NUL-terminated ASCII value after the uevent; ``len`` counts the NUL."""
    text = param_text(value).encode("utf-8")
    if b"\0" in text:
        raise ValueError(f"SET_PARAM {param.name}: value contains a NUL byte")
    tail = text + b"\0"
    return _request(Request.SET_PARAM, handle,
                    _pack_u("set_param", sid=sid, cid=cid, param=int(param), len=len(tail)),
                    tail, what=f"SET_PARAM {param.name}", sid=sid, cid=cid)


def start_conn(handle: int, sid: int, cid: int = 0) -> RequestMsg:
    return _request(Request.START_CONN, handle, _pack_u("start_conn", sid=sid, cid=cid),
                    sid=sid, cid=cid)


def stop_conn(handle: int, sid: int, cid: int, flag: StopConn,
              conn_handle: int = 0) -> RequestMsg:
    return _request(Request.STOP_CONN, handle,
                    _pack_u("stop_conn", sid=sid, cid=cid, conn_handle=conn_handle,
                            flag=int(flag)),
                    what=f"STOP_CONN {flag.name}", sid=sid, cid=cid)


def send_pdu(handle: int, sid: int, cid: int, hdr: bytes, data: bytes = b"") -> RequestMsg:
    """A PDU for the kernel to send on the connection; it fills ITT, CmdSN, ExpStatSN."""
    if len(hdr) < BHS_LEN:
        raise ValueError(f"SEND_PDU header is {len(hdr)} bytes, shorter than a BHS")
    tail = hdr + data + bytes(-len(data) & 3)
    return _request(Request.SEND_PDU, handle,
                    _pack_u("send_pdu", sid=sid, cid=cid, hdr_size=len(hdr),
                            data_size=len(data)), tail, sid=sid, cid=cid)


def get_stats(handle: int, sid: int, cid: int = 0) -> RequestMsg:
    return _request(Request.GET_STATS, handle, _pack_u("get_stats", sid=sid, cid=cid),
                    sid=sid, cid=cid)


# --- replies and events -------------------------------------------------------------

class UeventDecodeError(ValueError):
    """A NETLINK_ISCSI payload too short or inconsistent to be an iscsi_uevent."""


@dataclass(frozen=True)
class Uevent:
    """A decoded iscsi_uevent: the header, both unions raw, and the tail."""

    type: int
    iferror: int  # signed: -errno when the kernel refused a request
    transport_handle: int
    u: bytes = field(repr=False)
    r: bytes = field(repr=False)
    tail: bytes = field(repr=False, default=b"")

    def fields_u(self, member: str) -> dict[str, int]:
        return _unpack(_U, U_MEMBERS, member, self.u)

    def fields_r(self, member: str) -> dict[str, int]:
        return _unpack(_R, R_MEMBERS, member, self.r)

    @property
    def retcode(self) -> int:
        return self.fields_r("retcode")["retcode"]

    @property
    def is_if_error(self) -> bool:
        return self.type == Event.IF_ERROR

    def type_name(self) -> str:
        for enum_cls in (Request, Event):
            try:
                return enum_cls(self.type).name
            except ValueError:
                continue
        return str(self.type)


def decode(payload: bytes) -> Uevent:
    """The uevent at the start of a netlink message's payload, and what follows it."""
    if len(payload) < UEVENT_SIZE:
        raise UeventDecodeError(f"iscsi_uevent of {len(payload)} bytes, expected at least "
                                f"{UEVENT_SIZE}")
    kind, iferror, handle = _HEADER.unpack_from(payload, 0)
    return Uevent(kind, iferror, handle, bytes(payload[U_OFFSET:R_OFFSET]),
                  bytes(payload[R_OFFSET:UEVENT_SIZE]), bytes(payload[UEVENT_SIZE:]))


@dataclass(frozen=True)
class Stats:
    """struct iscsi_stats: one connection's counters (and the transport's own)."""

    values: Mapping[str, int]
    custom: tuple[tuple[str, int], ...] = ()

    def __getitem__(self, name: str) -> int:
        return self.values[name]

    @property
    def scsicmd_pdus(self) -> int:
        return self.values["scsicmd_pdus"]


def decode_stats(tail: bytes) -> Stats:
    if len(tail) < STATS_CUSTOM_OFFSET:
        raise UeventDecodeError(f"iscsi_stats of {len(tail)} bytes, expected at least "
                                f"{STATS_CUSTOM_OFFSET}")
    values = dict(zip((n for n, _, _ in STATS_FIELDS), _STATS.unpack_from(tail, 0),
                      strict=True))
    count = values["custom_length"]
    if count > STATS_CUSTOM_MAX:
        raise UeventDecodeError(f"iscsi_stats claims {count} custom counters, at most "
                                f"{STATS_CUSTOM_MAX}")
    end = STATS_CUSTOM_OFFSET + count * STATS_CUSTOM_SIZE
    if len(tail) < end:
        raise UeventDecodeError(f"iscsi_stats with {count} custom counters is cut short")
    custom = []
    for i in range(count):
        desc, value = _CUSTOM.unpack_from(tail, STATS_CUSTOM_OFFSET + i * STATS_CUSTOM_SIZE)
        custom.append((desc.split(b"\0", 1)[0].decode("ascii", "replace"), value))
    return Stats(MappingProxyType(values), tuple(custom))


def encode_stats(stats: Mapping[str, int], custom: tuple[tuple[str, int], ...] = ()) -> bytes:
    """The kernel's side of a stats tail (for tests and the fake kernel)."""
    values = dict(stats)
    values["custom_length"] = len(custom)
    head = _STATS.pack(*(values.get(name, 0) for name, _, _ in STATS_FIELDS))
    body = b"".join(_CUSTOM.pack(desc.encode("ascii"), value) for desc, value in custom)
    return head + body


# Typed events, as the recovery loop and the teardown see them.

@dataclass(frozen=True)
class ConnErrorEvent:
    sid: int
    cid: int
    error: int

    @property
    def error_name(self) -> str:
        try:
            return ConnErr(self.error).name
        except ValueError:
            return str(self.error)


@dataclass(frozen=True)
class RecvPduEvent:
    """A PDU the kernel passed up (login, text, logout responses): BHS and data."""

    sid: int
    cid: int
    recv_handle: int
    bhs: bytes = field(repr=False)
    data: bytes = field(repr=False)

    @property
    def opcode(self) -> int:
        return self.bhs[0] & 0x3F


@dataclass(frozen=True)
class SessionEvent:
    """CREATE_SESSION, DESTROY_SESSION or UNBIND_SESSION, multicast by the kernel."""

    kind: Event
    sid: int
    host_no: int


@dataclass(frozen=True)
class ConnLoginEvent:
    sid: int
    cid: int
    state: int


@dataclass(frozen=True)
class StatsEvent:
    sid: int
    cid: int
    stats: Stats


@dataclass(frozen=True)
class OtherEvent:
    """An event we do not act on (PATH_REQ, IF_DOWN, HOST_EVENT, PING_COMP, ...)."""

    uevent: Uevent


KernelEvent = (ConnErrorEvent | RecvPduEvent | SessionEvent | ConnLoginEvent | StatsEvent
               | OtherEvent)


def parse_event(ev: Uevent) -> KernelEvent:
    """A multicast message (netlink type 0) as a typed event."""
    kind = ev.type
    if kind == Event.CONN_ERROR:
        f = ev.fields_r("connerror")
        return ConnErrorEvent(f["sid"], f["cid"], f["error"])
    if kind == Event.RECV_PDU:
        f = ev.fields_r("recv_req")
        if len(ev.tail) < BHS_LEN:
            raise UeventDecodeError(f"RECV_PDU with {len(ev.tail)} bytes, shorter than a BHS")
        bhs = ev.tail[:BHS_LEN]
        data_len = int.from_bytes(bhs[5:8], "big")
        ahs_len = bhs[4] * 4
        if ahs_len:  # the kernel copies the 48-byte header only
            raise UeventDecodeError("RECV_PDU header announces an AHS")
        data = ev.tail[BHS_LEN:BHS_LEN + data_len]
        if len(data) != data_len:
            raise UeventDecodeError(f"RECV_PDU data is {len(data)} bytes, the header says "
                                    f"{data_len}")
        return RecvPduEvent(f["sid"], f["cid"], f["recv_handle"], bhs, data)
    if kind in (Event.CREATE_SESSION, Event.UNBIND_SESSION):
        member = "c_session_ret" if kind == Event.CREATE_SESSION else "unbind_session"
        f = ev.fields_r(member)
        return SessionEvent(Event(kind), f["sid"], f["host_no"])
    if kind == Event.DESTROY_SESSION:
        f = ev.fields_r("d_session")
        return SessionEvent(Event.DESTROY_SESSION, f["sid"], f["host_no"])
    if kind == Event.CONN_LOGIN_STATE:
        f = ev.fields_r("conn_login")
        return ConnLoginEvent(f["sid"], f["cid"], f["state"])
    if kind == Request.GET_STATS:  # stats come multicast with the request's code
        f = ev.fields_u("get_stats")
        return StatsEvent(f["sid"], f["cid"], decode_stats(ev.tail))
    return OtherEvent(ev)


# --- the kernel's side, for tests ----------------------------------------------------

def encode_uevent(kind: int, *, iferror: int = 0, transport_handle: int = 0,
                  u: bytes = bytes(U_SIZE), r: bytes = bytes(R_SIZE),
                  tail: bytes = b"") -> bytes:
    """Any uevent as bytes (what the kernel sends); tests build replies and events."""
    if len(u) != U_SIZE or len(r) != R_SIZE:
        raise ValueError("union sizes are 24 (u) and 16 (r) bytes")
    return _HEADER.pack(kind, iferror, transport_handle) + u + r + tail


def pack_r(member: str, **values: int) -> bytes:
    names = [name for name, _, _ in R_MEMBERS[member]]
    return _R[member].pack(*(values.get(name, 0) for name in names))


def pack_u(member: str, **values: int) -> bytes:
    return _pack_u(member, **values)


def decode_request(payload: bytes) -> tuple[Uevent, dict[str, int]]:
    """A request as the kernel reads it: the uevent and its union member's fields."""
    ev = decode(payload)
    member = REQUEST_MEMBER.get(ev.type)
    if member is None:
        raise UeventDecodeError(f"no layout for request {ev.type_name()}")
    return ev, ev.fields_u(member)


REQUEST_MEMBER: Mapping[int, str] = MappingProxyType({
    Request.CREATE_SESSION: "c_session",
    Request.CREATE_BOUND_SESSION: "c_bound_session",
    Request.DESTROY_SESSION: "d_session",
    Request.UNBIND_SESSION: "d_session",
    Request.CREATE_CONN: "c_conn",
    Request.DESTROY_CONN: "d_conn",
    Request.BIND_CONN: "b_conn",
    Request.SET_PARAM: "set_param",
    Request.START_CONN: "start_conn",
    Request.STOP_CONN: "stop_conn",
    Request.SEND_PDU: "send_pdu",
    Request.GET_STATS: "get_stats",
    Request.SET_HOST_PARAM: "set_host_param",
})

# Requests whose failures come back in r.retcode rather than as IF_ERROR (seen on 6.1:
# the kernel stores the transport's answer there and reports success at the netlink
# level). Any reply's retcode is checked for these; the others carry ids in r.
RETCODE_REQUESTS = frozenset({Request.BIND_CONN, Request.START_CONN, Request.SEND_PDU,
                              Request.STOP_CONN, Request.GET_STATS,
                              Request.DESTROY_CONN, Request.SET_PARAM,
                              Request.DESTROY_SESSION, Request.UNBIND_SESSION})
