"""Decode the records probes.c sends up the perf buffer into TraceEvents.

Pure Python and bytes only, so every decoding rule is tested without a kernel. The
record layout mirrors `struct event_t` in probes.c (x86-64/arm64 natural alignment, little
endian); the uevent inside it is `struct iscsi_uevent` from include/scsi/iscsi_if.h.
"""

from __future__ import annotations

import ipaddress
import re
import struct
from dataclasses import dataclass, field
from typing import Any

from kernel_handoff import uevent as ue
from kernel_handoff.ebpf import codes

# struct event_t: ts_ns, pid, tid, comm, kind, sid, cid, value, value64, nlmsg_len,
# nlmsg_type, nlmsg_flags, uevent_len, text_len, family, lport, dport, pad, saddr[16],
# daddr[16], uevent[56], dev[32], text[224]
RECORD = struct.Struct("<QII16sIiiiQIHHIiHHHH16s16s56s32s224s")
AF_INET = 2
AF_INET6 = 10
UEVENT_SIZE = 56
NLMSG_HDRLEN = 16

KIND_UEVENT = 1
KIND_BIND = 2
KIND_BIND_RET = 3
KIND_CONN_START = 4
KIND_CONN_START_RET = 5
KIND_CONN_STOP = 6
KIND_CONN_FAILURE = 7
KIND_CONN_ERROR = 8
KIND_TRACEPOINT = 9

# The kernel function behind each kind, shown in JSON as "source".
KIND_SOURCES: dict[int, str] = {
    KIND_UEVENT: "iscsi_if_rx",
    KIND_BIND: "iscsi_sw_tcp_conn_bind",
    KIND_BIND_RET: "iscsi_sw_tcp_conn_bind",
    KIND_CONN_START: "iscsi_conn_start",
    KIND_CONN_START_RET: "iscsi_conn_start",
    KIND_CONN_STOP: "iscsi_conn_stop",
    KIND_CONN_FAILURE: "iscsi_conn_failure",
    KIND_CONN_ERROR: "iscsi_conn_error_event",
}
# Event names for what is not a uevent request. CONN_ERROR keeps the uevent's name: it is
# the moment the kernel sends ISCSI_KEVENT_CONN_ERROR up.
KIND_NAMES: dict[int, str] = {
    KIND_BIND: "conn_bind",
    KIND_BIND_RET: "conn_bind_done",
    KIND_CONN_START: "conn_start",
    KIND_CONN_START_RET: "conn_start_done",
    KIND_CONN_STOP: "conn_stop",
    KIND_CONN_FAILURE: "conn_failure",
    KIND_CONN_ERROR: "CONN_ERROR",
    KIND_TRACEPOINT: "trace",
}

# The kernel's iscsi:* tracepoints (class iscsi_log_msg), in this order: the record's
# `value` is the index. The last three fire for every SCSI command or PDU, so the
# observer attaches them only when asked (PER_PDU_TRACEPOINTS).
TRACEPOINTS: tuple[str, ...] = (
    "iscsi_dbg_trans_session", "iscsi_dbg_trans_conn", "iscsi_dbg_conn", "iscsi_dbg_eh",
    "iscsi_dbg_session", "iscsi_dbg_tcp", "iscsi_dbg_sw_tcp",
)
PER_PDU_TRACEPOINTS = frozenset({"iscsi_dbg_session", "iscsi_dbg_tcp", "iscsi_dbg_sw_tcp"})

_CONN_DEV = re.compile(r"connection(\d+):(\d+)")
_SESSION_DEV = re.compile(r"session(\d+)")

Value = int | str | None


@dataclass(frozen=True)
class TraceEvent:
    """One thing the kernel did or was asked, as seen by a probe."""

    ts_ns: int          # CLOCK_MONOTONIC, as time.monotonic_ns() counts
    pid: int
    tid: int
    comm: str
    name: str           # CREATE_SESSION, SET_PARAM, ..., CONN_ERROR, conn_bind, trace
    source: str         # the kernel function or iscsi:* tracepoint behind it
    sid: int | None = None
    cid: int | None = None
    fields: dict[str, Value] = field(default_factory=dict)

    def to_json(self, *, wall_offset_ns: int | None = None) -> dict[str, Any]:
        data: dict[str, Any] = {"ts_ns": self.ts_ns}
        if wall_offset_ns is not None:
            data["time"] = (self.ts_ns + wall_offset_ns) / 1e9
        data.update(pid=self.pid, tid=self.tid, comm=self.comm, event=self.name,
                    source=self.source, sid=self.sid, cid=self.cid)
        data.update(self.fields)
        return data


def _cstr(raw: bytes, limit: int | None = None) -> str:
    if limit is not None:
        raw = raw[:max(limit, 0)]
    return raw.split(b"\0", 1)[0].decode("utf-8", "replace")


def decode_record(raw: bytes) -> TraceEvent:
    """One perf-buffer record (at least RECORD.size bytes) to a TraceEvent."""
    if len(raw) < RECORD.size:
        raise ValueError(f"perf record of {len(raw)} bytes, expected {RECORD.size}")
    (ts_ns, pid, tid, comm_raw, kind, sid, cid, value, value64, nlmsg_len, nlmsg_type,
     nlmsg_flags, uevent_len, text_len, family, lport, dport, _pad, saddr, daddr, uevent,
     dev_raw, text_raw) = RECORD.unpack_from(raw)
    comm = _cstr(comm_raw)
    sid_opt = None if sid < 0 else sid
    cid_opt = None if cid < 0 else cid
    common: dict[str, Any] = {"ts_ns": ts_ns, "pid": pid, "tid": tid, "comm": comm}
    if kind == KIND_UEVENT:
        text = _cstr(text_raw) if text_len > 0 else None
        return decode_uevent(nlmsg_type, uevent[:uevent_len], text, nlmsg_len=nlmsg_len,
                             nlmsg_flags=nlmsg_flags, **common)
    if kind == KIND_TRACEPOINT:
        return _tracepoint_event(value, _cstr(dev_raw), _cstr(text_raw), common)
    name = KIND_NAMES.get(kind, f"kind_{kind}")
    source = KIND_SOURCES.get(kind, "?")
    fields: dict[str, Value] = {}
    if kind == KIND_BIND:
        fields = {"fd": value64, "is_leading": value}
        if family in (AF_INET, AF_INET6):
            fields["local"] = _endpoint(family, saddr, lport)
            fields["peer"] = _endpoint(family, daddr, dport)
    elif kind in (KIND_BIND_RET, KIND_CONN_START_RET):
        fields = {"retval": value}
    elif kind == KIND_CONN_STOP:
        fields = {"flag": value, "flag_name": codes.stop_flag_name(value)}
    elif kind in (KIND_CONN_FAILURE, KIND_CONN_ERROR):
        fields = {"error": value, "error_name": codes.error_name(value)}
    return TraceEvent(name=name, source=source, sid=sid_opt, cid=cid_opt, fields=fields,
                      **common)


def _endpoint(family: int, addr: bytes, port: int) -> str:
    if family == AF_INET:
        return f"{ipaddress.IPv4Address(addr[:4])}:{port}"
    return f"[{ipaddress.IPv6Address(addr)}]:{port}"


def decode_uevent(nlmsg_type: int, uevent: bytes, text: str | None, *, ts_ns: int, pid: int,
                  tid: int, comm: str, nlmsg_len: int = 0,
                  nlmsg_flags: int = 0) -> TraceEvent:
    """A request as iscsi_if_rx received it: the kernel dispatches on nlmsg_type."""
    name = codes.type_name(nlmsg_type)
    fields: dict[str, Value] = {"nlmsg_type": nlmsg_type}
    if len(uevent) < UEVENT_SIZE:
        fields["truncated"] = True
        return TraceEvent(ts_ns=ts_ns, pid=pid, tid=tid, comm=comm, name=name,
                          source="iscsi_if_rx", fields=fields)
    ev = ue.decode(uevent)
    if ev.type != nlmsg_type:
        fields["uevent_type"] = ev.type
    fields["transport_handle"] = ev.transport_handle
    member = ue.REQUEST_MEMBER.get(nlmsg_type)
    values = ev.fields_u(member) if member is not None else {}
    sid = values.pop("sid", None)
    cid = values.pop("cid", None)
    values.pop("conn_handle", None)  # unused by iscsi_tcp, and a kernel address
    if "transport_eph" in values:  # iscsi_tcp's endpoint handle is the socket's fd
        fields["fd"] = values.pop("transport_eph")
    fields.update(values)
    if name == "SET_PARAM":
        param, length = values["param"], values["len"]
        fields["param_name"] = codes.param_name(param)
        if param in codes.SECRET_PARAMS:
            fields["value"] = "<redacted>"
        elif text is not None:
            # len counts the NUL: a value sent without one shows only its declared bytes
            fields["value"] = text[:max(length - 1, 0)] if length else text
    elif name == "STOP_CONN":
        fields["flag_name"] = codes.stop_flag_name(values["flag"])
    elif name == "SET_HOST_PARAM" and text is not None:
        fields["value"] = text
    return TraceEvent(ts_ns=ts_ns, pid=pid, tid=tid, comm=comm, name=name,
                      source="iscsi_if_rx", sid=sid, cid=cid, fields=fields)


def _tracepoint_event(index: int, dev: str, message: str,
                      common: dict[str, Any]) -> TraceEvent:
    tp = TRACEPOINTS[index] if 0 <= index < len(TRACEPOINTS) else f"tracepoint_{index}"
    sid: int | None = None
    cid: int | None = None
    if m := _CONN_DEV.fullmatch(dev):
        sid, cid = int(m[1]), int(m[2])
    elif m := _SESSION_DEV.fullmatch(dev):
        sid = int(m[1])
    return TraceEvent(name="trace", source=f"iscsi:{tp}", sid=sid, cid=cid,
                      fields={"device": dev, "message": message.rstrip("\n")}, **common)
