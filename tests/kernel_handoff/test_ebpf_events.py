"""Decoding what probes.c sends up the perf buffer, from bytes laid out as the C compiler would.

The record is built with a ctypes Structure generated from `struct event_t` in probes.c
itself (ctypes follows the C ABI's alignment rules), and the uevent inside it with a
ctypes mirror of include/scsi/iscsi_if.h's `struct iscsi_uevent`. So a change to the C
struct that events.py does not follow fails here, and so does a wrong offset in the decoder.
"""

from __future__ import annotations

import ctypes
import json
import re
import socket
from importlib import resources
from pathlib import Path
from typing import Any

import pytest

from kernel_handoff import uevent as ue
from kernel_handoff.ebpf import events
from kernel_handoff.ebpf.events import decode_record
from kernel_handoff.ebpf.timeline import format_line, json_line, print_timeline

PROBES_C = resources.files("kernel_handoff.ebpf").joinpath("probes.c").read_text()

C_TYPES = {"u64": ctypes.c_uint64, "u32": ctypes.c_uint32, "s32": ctypes.c_int32,
           "u16": ctypes.c_uint16, "u8": ctypes.c_uint8, "char": ctypes.c_char}


def _defines() -> dict[str, int]:
    return {m[1]: int(m[2]) for m in re.finditer(r"^#define (\w+) (\d+)$", PROBES_C, re.M)}


def _struct_from_c(name: str) -> type[ctypes.Structure]:
    body = re.search(rf"struct {name} {{(.*?)\n}};", PROBES_C, re.S)
    assert body, f"struct {name} not found in probes.c"
    defines = _defines()
    fields: list[tuple[str, type]] = []
    for line in body[1].splitlines():
        line = re.sub(r"/\*.*?\*/", "", line).strip()
        if not line:
            continue
        m = re.fullmatch(r"(\w+) (\w+)(?:\[(\w+)\])?;", line)
        assert m, f"cannot read field {line!r}"
        ctype: Any = C_TYPES[m[1]]
        if m[3]:
            ctype = ctype * (int(m[3]) if m[3].isdigit() else defines[m[3]])
        fields.append((m[2], ctype))
    return type(name, (ctypes.Structure,), {"_fields_": fields})


EventT = _struct_from_c("event_t")
KINDS = {m[1]: int(m[2]) for m in re.finditer(r"(KIND_\w+) = (\d+),", PROBES_C)}


# struct iscsi_uevent, include/scsi/iscsi_if.h (the members the observer decodes)
class CSession(ctypes.Structure):
    _fields_ = [("initial_cmdsn", ctypes.c_uint32), ("cmds_max", ctypes.c_uint16),
                ("queue_depth", ctypes.c_uint16)]


class BConn(ctypes.Structure):
    _fields_ = [("sid", ctypes.c_uint32), ("cid", ctypes.c_uint32),
                ("transport_eph", ctypes.c_uint64), ("is_leading", ctypes.c_uint32)]


class SetParam(ctypes.Structure):
    _fields_ = [("sid", ctypes.c_uint32), ("cid", ctypes.c_uint32),
                ("param", ctypes.c_uint32), ("len", ctypes.c_uint32)]


class StopConn(ctypes.Structure):
    _fields_ = [("sid", ctypes.c_uint32), ("cid", ctypes.c_uint32),
                ("conn_handle", ctypes.c_uint64), ("flag", ctypes.c_uint32)]


class SidCid(ctypes.Structure):
    _fields_ = [("sid", ctypes.c_uint32), ("cid", ctypes.c_uint32)]


class U(ctypes.Union):
    # the real union also holds the 24-byte ep/iface members: its size is 24
    _fields_ = [("c_session", CSession), ("b_conn", BConn), ("set_param", SetParam),
                ("stop_conn", StopConn), ("c_conn", SidCid), ("start_conn", SidCid),
                ("_size", ctypes.c_uint8 * 24)]


class R(ctypes.Union):
    _fields_ = [("retcode", ctypes.c_int32), ("_size", ctypes.c_uint8 * 16)]


class IscsiUevent(ctypes.Structure):
    _fields_ = [("type", ctypes.c_uint32), ("iferror", ctypes.c_uint32),
                ("transport_handle", ctypes.c_uint64), ("u", U), ("r", R)]


def uevent_bytes(kind: str, transport_handle: int = 0xFFFF8880_12345678,
                 **members: object) -> bytes:
    ev = IscsiUevent()
    ev.type = ue.Request[kind]
    ev.transport_handle = transport_handle
    target = {"CREATE_SESSION": ev.u.c_session, "BIND_CONN": ev.u.b_conn,
              "SET_PARAM": ev.u.set_param, "STOP_CONN": ev.u.stop_conn,
              "CREATE_CONN": ev.u.c_conn, "START_CONN": ev.u.start_conn}[kind]
    for key, value in members.items():
        setattr(target, key, value)
    return bytes(ev)


def record(kind: str, *, comm: bytes = b"iscsi-handoff", pid: int = 4242, ts_ns: int = 10**9,
           uevent: bytes = b"", nlmsg_type: int = 0, text: bytes = b"", text_len: int | None = None,
           dev: bytes = b"", sid: int = -1, cid: int = -1, value: int = 0,
           value64: int = 0, family: int = 0, local: tuple[bytes, int] = (b"", 0),
           peer: tuple[bytes, int] = (b"", 0)) -> bytes:
    """What probes.c's perf_submit hands up, field by field."""
    e = EventT()
    e.ts_ns, e.pid, e.tid, e.comm = ts_ns, pid, pid + 1, comm
    e.kind = KINDS[kind]
    e.sid, e.cid, e.value, e.value64 = sid, cid, value, value64
    e.nlmsg_len = 16 + len(uevent) + len(text)
    e.nlmsg_type = nlmsg_type
    if uevent:
        e.uevent_len = len(uevent)
        ctypes.memmove(e.uevent, uevent, len(uevent))
    e.family = family
    ctypes.memmove(e.saddr, local[0], len(local[0]))
    ctypes.memmove(e.daddr, peer[0], len(peer[0]))
    e.lport, e.dport = local[1], peer[1]
    e.dev = dev
    e.text = text
    e.text_len = (len(text) + 1 if text else 0) if text_len is None else text_len
    return bytes(e)


def test_struct_layouts_agree() -> None:
    assert ctypes.sizeof(EventT) == events.RECORD.size
    assert ctypes.sizeof(IscsiUevent) == events.UEVENT_SIZE == _defines()["UEVENT_SIZE"]
    assert len(KINDS) == 9
    assert {name: getattr(events, name) for name in KINDS} == KINDS


def test_create_session() -> None:
    raw = record("KIND_UEVENT", nlmsg_type=11, uevent=uevent_bytes(
        "CREATE_SESSION", initial_cmdsn=7, cmds_max=128, queue_depth=32))
    ev = decode_record(raw)
    assert (ev.name, ev.source, ev.sid, ev.cid) == ("CREATE_SESSION", "iscsi_if_rx", None, None)
    assert (ev.fields["initial_cmdsn"], ev.fields["cmds_max"], ev.fields["queue_depth"]) == (
        7, 128, 32)
    assert (ev.pid, ev.tid, ev.comm, ev.ts_ns) == (4242, 4243, "iscsi-handoff", 10**9)
    assert ev.fields["transport_handle"] == 0xFFFF8880_12345678


def test_bind_conn_carries_the_fd() -> None:
    raw = record("KIND_UEVENT", nlmsg_type=15, uevent=uevent_bytes(
        "BIND_CONN", sid=3, cid=0, transport_eph=9, is_leading=1))
    ev = decode_record(raw)
    assert (ev.name, ev.sid, ev.cid, ev.fields["fd"], ev.fields["is_leading"]) == (
        "BIND_CONN", 3, 0, 9, 1)


@pytest.mark.parametrize(("param", "value"), [
    ("MAX_RECV_DLENGTH", "262144"), ("TARGET_NAME", "iqn.2024-01.com.example:disk1"),
    ("EXP_STATSN", "4294967295"), ("SESS_RECOVERY_TMO", "120"),
])
def test_set_param_name_and_value(param: str, value: str) -> None:
    tail = value.encode() + b"\0"
    raw = record("KIND_UEVENT", nlmsg_type=16, text=tail, uevent=uevent_bytes(
        "SET_PARAM", sid=1, cid=0, param=ue.Param[param], len=len(tail)))
    ev = decode_record(raw)
    assert (ev.name, ev.sid, ev.cid) == ("SET_PARAM", 1, 0)
    assert (ev.fields["param_name"], ev.fields["value"]) == (param, value)
    assert f"{param}={value}" in format_line(ev, 0)


def test_set_param_value_cut_at_its_declared_length() -> None:
    # bpf_probe_read_kernel_str reads on to a NUL; the uevent's len says where it ends
    raw = record("KIND_UEVENT", nlmsg_type=16, text=b"8192garbage", uevent=uevent_bytes(
        "SET_PARAM", sid=1, cid=0, param=ue.Param.MAX_XMIT_DLENGTH, len=5))
    assert decode_record(raw).fields["value"] == "8192"


@pytest.mark.parametrize("param", ["PASSWORD", "PASSWORD_IN"])
def test_password_never_shown(param: str) -> None:
    # the probe does not copy it (text_len 0); even a record that carried it shows nothing
    for text, text_len in ((b"", 0), (b"s3cret-value", 13)):
        raw = record("KIND_UEVENT", nlmsg_type=16, text=text, text_len=text_len,
                     uevent=uevent_bytes("SET_PARAM", sid=1, cid=0,
                                         param=ue.Param[param], len=13))
        ev = decode_record(raw)
        assert ev.fields["value"] == "<redacted>"
        assert "s3cret" not in json_line(ev) and "s3cret" not in format_line(ev, 0)


def test_numbers_no_enum_knows_still_show() -> None:
    tail = b"x\0"
    raw = record("KIND_UEVENT", nlmsg_type=16, text=tail, uevent=uevent_bytes(
        "SET_PARAM", sid=1, cid=0, param=250, len=2))
    assert decode_record(raw).fields["param_name"] == "PARAM_250"
    odd = decode_record(record("KIND_UEVENT", nlmsg_type=99,
                               uevent=uevent_bytes("START_CONN", sid=1, cid=0)))
    assert (odd.name, odd.sid) == ("TYPE_99", None)  # no layout known: no ids guessed
    err = decode_record(record("KIND_CONN_ERROR", sid=1, cid=0, value=1999))
    assert err.fields["error_name"] == "ERR_1999"


def test_stop_conn_flag() -> None:
    raw = record("KIND_UEVENT", nlmsg_type=18, uevent=uevent_bytes(
        "STOP_CONN", sid=2, cid=0, conn_handle=0xFFFF, flag=3))
    ev = decode_record(raw)
    assert (ev.name, ev.sid, ev.fields["flag_name"]) == ("STOP_CONN", 2, "RECOVER")


def test_start_conn_and_create_conn() -> None:
    for kind, code in (("CREATE_CONN", 13), ("START_CONN", 17)):
        ev = decode_record(record("KIND_UEVENT", nlmsg_type=code,
                                  uevent=uevent_bytes(kind, sid=5, cid=1)))
        assert (ev.name, ev.sid, ev.cid) == (kind, 5, 1)


def test_kernel_dispatches_on_nlmsg_type() -> None:
    # iscsi_if_recv_msg switches on nlmsg_type: a uevent.type that disagrees is shown aside
    ev = decode_record(record("KIND_UEVENT", nlmsg_type=17,
                              uevent=uevent_bytes("CREATE_CONN", sid=1, cid=0)))
    assert ev.name == "START_CONN" and ev.fields["uevent_type"] == 13


def test_short_skb_is_marked() -> None:
    ev = decode_record(record("KIND_UEVENT", nlmsg_type=11))
    assert ev.name == "CREATE_SESSION" and ev.fields["truncated"] is True


def test_conn_bind_kprobe() -> None:
    ev = decode_record(record("KIND_BIND", sid=1, cid=0, value=1, value64=7))
    assert (ev.name, ev.source, ev.sid, ev.cid, ev.fields) == (
        "conn_bind", "iscsi_sw_tcp_conn_bind", 1, 0, {"fd": 7, "is_leading": 1})
    tcp = decode_record(record("KIND_BIND", sid=1, cid=0, value=1, value64=7, family=2,
                               local=(socket.inet_aton("127.0.0.1"), 51234),
                               peer=(socket.inet_aton("127.0.0.2"), 3260)))
    assert (tcp.fields["local"], tcp.fields["peer"]) == ("127.0.0.1:51234", "127.0.0.2:3260")
    assert "local=127.0.0.1:51234 peer=127.0.0.2:3260" in format_line(tcp, 0)
    tcp6 = decode_record(record("KIND_BIND", value64=7, family=10,
                                local=(socket.inet_pton(socket.AF_INET6, "::1"), 40000),
                                peer=(socket.inet_pton(socket.AF_INET6, "fe80::1"), 3260)))
    assert (tcp6.fields["local"], tcp6.fields["peer"]) == ("[::1]:40000", "[fe80::1]:3260")
    done = decode_record(record("KIND_BIND_RET", sid=1, cid=0, value=-9))
    assert (done.name, done.fields["retval"]) == ("conn_bind_done", -9)


def test_conn_error_and_failure() -> None:
    ev = decode_record(record("KIND_CONN_ERROR", sid=1, cid=0, value=1020))
    assert (ev.name, ev.source, ev.fields["error_name"], ev.fields["error"]) == (
        "CONN_ERROR", "iscsi_conn_error_event", "TCP_CONN_CLOSE", 1020)
    assert "error=TCP_CONN_CLOSE (1020)" in format_line(ev, 0)
    fail = decode_record(record("KIND_CONN_FAILURE", sid=1, cid=0, value=1011))
    assert (fail.name, fail.fields["error_name"]) == ("conn_failure", "CONN_FAILED")


def test_unknown_sid_is_none() -> None:
    ev = decode_record(record("KIND_CONN_STOP", value=2))
    assert (ev.sid, ev.cid, ev.fields["flag_name"]) == (None, None, "SUSPEND")


def test_tracepoint_message() -> None:
    index = events.TRACEPOINTS.index("iscsi_dbg_trans_conn")
    ev = decode_record(record("KIND_TRACEPOINT", value=index, dev=b"connection4:0",
                              text=b"iscsi_if_stop_conn: Stopping conn.\n"))
    assert (ev.name, ev.source, ev.sid, ev.cid) == ("trace", "iscsi:iscsi_dbg_trans_conn", 4, 0)
    assert ev.fields == {"device": "connection4:0",
                         "message": "iscsi_if_stop_conn: Stopping conn."}
    sess = decode_record(record("KIND_TRACEPOINT", value=0, dev=b"session12", text=b"x"))
    assert (sess.sid, sess.cid) == (12, None)


def test_short_record_refused() -> None:
    with pytest.raises(ValueError, match="perf record"):
        decode_record(record("KIND_CONN_STOP")[:-1])


def test_json_line_and_timeline() -> None:
    raw = record("KIND_UEVENT", nlmsg_type=15, ts_ns=5_000_000_000, uevent=uevent_bytes(
        "BIND_CONN", sid=1, cid=0, transport_eph=6, is_leading=1))
    ev = decode_record(raw)
    data = json.loads(json_line(ev, wall_offset_ns=1_700_000_000 * 10**9))
    assert data["event"] == "BIND_CONN" and data["fd"] == 6 and data["sid"] == 1
    assert data["time"] == pytest.approx(1_700_000_005.0)
    line = format_line(ev, 4_999_000_000)
    assert line.split()[:4] == ["+0.001000", "4242", "iscsi-handoff", "BIND_CONN"]
    assert "sid=1 cid=0 fd=6 is_leading=1" in line


def test_timeline_says_when_empty() -> None:
    import io
    out = io.StringIO()
    print_timeline([], out)
    assert "no events" in out.getvalue()


# --- which tracepoints the observer compiles in ------------------------------------------

def test_tracepoints_present_and_per_pdu(tmp_path: Path) -> None:
    from kernel_handoff.ebpf.observer import Observer, probe_source
    from kernel_handoff.ebpf.preflight import Machine

    events_dir = tmp_path / "sys" / "kernel" / "tracing" / "events" / "iscsi"
    for tp in ("iscsi_dbg_trans_conn", "iscsi_dbg_session", "iscsi_dbg_eh"):
        (events_dir / tp).mkdir(parents=True)
        (events_dir / tp / "format").write_text("name: " + tp + "\n")
    machine = Machine(sys_dir=tmp_path / "sys")
    assert Observer(machine=machine)._tracepoints_present() == [
        "iscsi_dbg_trans_conn", "iscsi_dbg_eh"]
    assert Observer(machine=machine, per_pdu=True)._tracepoints_present() == [
        "iscsi_dbg_trans_conn", "iscsi_dbg_eh", "iscsi_dbg_session"]
    source = probe_source(["iscsi_dbg_eh"])
    assert source.startswith(PROBES_C)
    index = events.TRACEPOINTS.index("iscsi_dbg_eh")
    assert (f"TRACEPOINT_PROBE(iscsi, iscsi_dbg_eh)\n{{\n\treturn submit_log_msg(args, "
            f"args->data_loc_dname, args->data_loc_msg, {index});") in source
    assert source.count("TRACEPOINT_PROBE(") == 1


def test_no_tracefs_is_a_note(tmp_path: Path) -> None:
    from kernel_handoff.ebpf.observer import Observer
    from kernel_handoff.ebpf.preflight import Machine

    observer = Observer(machine=Machine(sys_dir=tmp_path))
    assert observer._tracepoints_present() == []
    assert observer.skipped == ["iscsi:* tracepoints: tracefs is not mounted "
                                "(mount -t tracefs tracefs /sys/kernel/tracing)"]
