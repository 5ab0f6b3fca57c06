"""Round trips of every request and event through kernel_handoff.uevent, bytes alone.

The offsets themselves are checked against the kernel's header in
test_uevent_header.py; here, hand-packed bytes at the header's offsets pin what the
encoders write, and random bytes show that decoding fails only as UeventDecodeError.
"""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kernel_handoff import uevent as ue
from kernel_handoff.uevent import Event, Param, Request, StopConn
from userland.pdu import LogoutResponse

HANDLE = 0xFFFF_9A3C_1234_5678


def test_create_session_bytes_at_the_header_offsets() -> None:
    req = ue.create_session(HANDLE, initial_cmdsn=0x01020304, cmds_max=128, queue_depth=32)
    expected = (struct.pack("=IiQ", 11, 0, HANDLE) + struct.pack("=IHH", 0x01020304, 128, 32)
                + bytes(16) + bytes(16))
    assert req.code == Request.CREATE_SESSION
    assert req.payload == expected
    assert len(req.payload) == ue.UEVENT_SIZE


def test_bind_conn_bytes() -> None:
    req = ue.bind_conn(HANDLE, 7, 0, 42)
    p = req.payload
    assert struct.unpack_from("=IIQI", p, 16) == (7, 0, 42, 1)
    assert p[36:56] == bytes(20)


def test_stop_conn_flag_offset() -> None:
    p = ue.stop_conn(HANDLE, 7, 1, StopConn.RECOVER).payload
    assert struct.unpack_from("=IIQI", p, 16) == (7, 1, 0, 3)


@pytest.mark.parametrize(("make", "code", "expected"), [
    (lambda: ue.create_session(HANDLE, initial_cmdsn=5, cmds_max=64, queue_depth=16),
     Request.CREATE_SESSION, {"initial_cmdsn": 5, "cmds_max": 64, "queue_depth": 16}),
    (lambda: ue.destroy_session(HANDLE, 9), Request.DESTROY_SESSION, {"sid": 9}),
    (lambda: ue.unbind_session(HANDLE, 9), Request.UNBIND_SESSION, {"sid": 9}),
    (lambda: ue.create_conn(HANDLE, 9, 0), Request.CREATE_CONN, {"sid": 9, "cid": 0}),
    (lambda: ue.destroy_conn(HANDLE, 9, 2), Request.DESTROY_CONN, {"sid": 9, "cid": 2}),
    (lambda: ue.bind_conn(HANDLE, 9, 0, 11, is_leading=False), Request.BIND_CONN,
     {"sid": 9, "cid": 0, "transport_eph": 11, "is_leading": 0}),
    (lambda: ue.start_conn(HANDLE, 9, 0), Request.START_CONN, {"sid": 9, "cid": 0}),
    (lambda: ue.stop_conn(HANDLE, 9, 0, StopConn.TERM), Request.STOP_CONN,
     {"sid": 9, "cid": 0, "conn_handle": 0, "flag": 1}),
    (lambda: ue.get_stats(HANDLE, 9, 0), Request.GET_STATS, {"sid": 9, "cid": 0}),
])
def test_every_request_round_trips(make, code, expected) -> None:  # type: ignore[no-untyped-def]
    req = make()
    ev, fields = ue.decode_request(req.payload)
    assert ev.type == code == req.code
    assert ev.transport_handle == HANDLE
    assert fields == expected
    assert ev.r == bytes(16) and ev.tail == b""


@pytest.mark.parametrize(("value", "text"), [
    (262144, b"262144\0"), (True, b"1\0"), (False, b"0\0"),
    ("iqn.2024-01.org.example:disk1", b"iqn.2024-01.org.example:disk1\0"),
])
def test_set_param_tail_is_nul_terminated_text(value: object, text: bytes) -> None:
    req = ue.set_param(HANDLE, 3, 0, Param.MAX_RECV_DLENGTH, value)  # type: ignore[arg-type]
    ev, fields = ue.decode_request(req.payload)
    assert fields == {"sid": 3, "cid": 0, "param": 0, "len": len(text)}
    assert ev.tail == text
    assert req.what == "SET_PARAM MAX_RECV_DLENGTH (session 3)"


def test_set_param_refuses_a_nul_inside() -> None:
    with pytest.raises(ValueError, match="NUL"):
        ue.set_param(HANDLE, 3, 0, Param.TARGET_NAME, "a\0b")


def test_request_repr_shows_no_value() -> None:
    req = ue.set_param(HANDLE, 3, 0, Param.USERNAME, "alice-secret-ish")
    assert "alice" not in repr(req) and "alice" not in req.what


def test_send_pdu_tail_is_header_data_padding() -> None:
    hdr = bytes([0x46, 0x80]) + bytes(46)
    req = ue.send_pdu(HANDLE, 3, 0, hdr, b"abcde")
    ev, fields = ue.decode_request(req.payload)
    assert fields == {"sid": 3, "cid": 0, "hdr_size": 48, "data_size": 5}
    assert ev.tail == hdr + b"abcde" + bytes(3)
    with pytest.raises(ValueError):
        ue.send_pdu(HANDLE, 3, 0, b"short")


# --- replies and events --------------------------------------------------------------

def test_if_error_reply_carries_negative_errno() -> None:
    raw = ue.encode_uevent(Event.IF_ERROR, iferror=-22, transport_handle=HANDLE)
    ev = ue.decode(raw)
    assert ev.is_if_error and ev.iferror == -22 and ev.type_name() == "IF_ERROR"


def test_retcode_is_signed() -> None:
    raw = ue.encode_uevent(Request.START_CONN, r=ue.pack_r("retcode", retcode=-107))
    assert ue.decode(raw).retcode == -107


def test_create_session_reply() -> None:
    raw = ue.encode_uevent(Request.CREATE_SESSION, r=ue.pack_r("c_session_ret", sid=3,
                                                               host_no=4))
    assert ue.decode(raw).fields_r("c_session_ret") == {"sid": 3, "host_no": 4}


def test_conn_error_event() -> None:
    raw = ue.encode_uevent(Event.CONN_ERROR, r=ue.pack_r("connerror", sid=3, cid=0,
                                                         error=1020))
    event = ue.parse_event(ue.decode(raw))
    assert event == ue.ConnErrorEvent(3, 0, 1020)
    assert isinstance(event, ue.ConnErrorEvent) and event.error_name == "TCP_CONN_CLOSE"
    assert ue.ConnErrorEvent(3, 0, 4242).error_name == "4242"


def test_recv_pdu_event_with_a_logout_response() -> None:
    pdu = LogoutResponse(itt=5, response=0, stat_sn=10, exp_cmd_sn=20, max_cmd_sn=30)
    bhs = pdu.encode_bhs()
    raw = ue.encode_uevent(Event.RECV_PDU, r=ue.pack_r("recv_req", sid=3, cid=0,
                                                       recv_handle=77),
                           tail=bhs + bytes(2))  # the kernel's alignment padding
    event = ue.parse_event(ue.decode(raw))
    assert isinstance(event, ue.RecvPduEvent)
    assert (event.sid, event.cid, event.recv_handle) == (3, 0, 77)
    assert event.opcode == 0x26 and event.bhs == bhs and event.data == b""


def test_recv_pdu_event_with_data() -> None:
    bhs = bytearray(48)
    bhs[0] = 0x32
    bhs[5:8] = (6).to_bytes(3, "big")
    raw = ue.encode_uevent(Event.RECV_PDU, r=ue.pack_r("recv_req", sid=1, cid=0),
                           tail=bytes(bhs) + b"sense!" + bytes(2))
    event = ue.parse_event(ue.decode(raw))
    assert isinstance(event, ue.RecvPduEvent) and event.data == b"sense!"
    cut = ue.encode_uevent(Event.RECV_PDU, tail=bytes(bhs) + b"sen")
    with pytest.raises(ue.UeventDecodeError):
        ue.parse_event(ue.decode(cut))


@pytest.mark.parametrize(("kind", "member"), [
    (Event.CREATE_SESSION, "c_session_ret"), (Event.UNBIND_SESSION, "unbind_session"),
    (Event.DESTROY_SESSION, "d_session"),
])
def test_session_events(kind: Event, member: str) -> None:
    raw = ue.encode_uevent(kind, r=ue.pack_r(member, sid=8, host_no=9))
    assert ue.parse_event(ue.decode(raw)) == ue.SessionEvent(kind, 8, 9)


def test_conn_login_state_and_other_events() -> None:
    raw = ue.encode_uevent(Event.CONN_LOGIN_STATE,
                           r=ue.pack_r("conn_login", sid=2, cid=0, state=3))
    assert ue.parse_event(ue.decode(raw)) == ue.ConnLoginEvent(2, 0, 3)
    other = ue.parse_event(ue.decode(ue.encode_uevent(Event.IF_DOWN)))
    assert isinstance(other, ue.OtherEvent) and other.uevent.type == Event.IF_DOWN


def test_get_stats_answer_with_custom_counters() -> None:
    counters = {name: i + 1 for i, (name, _, _) in enumerate(ue.STATS_FIELDS)}
    tail = ue.encode_stats(counters, (("eh_abort_cnt", 7), ("tx_sendpage_failures", 2)))
    raw = ue.encode_uevent(Request.GET_STATS, u=ue.pack_u("get_stats", sid=3, cid=0),
                           tail=tail)
    event = ue.parse_event(ue.decode(raw))
    assert isinstance(event, ue.StatsEvent) and (event.sid, event.cid) == (3, 0)
    assert event.stats.scsicmd_pdus == counters["scsicmd_pdus"]
    assert event.stats["timeout_err"] == counters["timeout_err"]
    assert event.stats["custom_length"] == 2
    assert event.stats.custom == (("eh_abort_cnt", 7), ("tx_sendpage_failures", 2))


def test_stats_cut_short_or_overlong_fail_cleanly() -> None:
    with pytest.raises(ue.UeventDecodeError):
        ue.decode_stats(bytes(40))
    bad = ue.encode_stats({})[:92] + struct.pack("=I", 33)
    with pytest.raises(ue.UeventDecodeError):
        ue.decode_stats(bad)
    two = ue.encode_stats({}, (("a", 1), ("b", 2)))
    with pytest.raises(ue.UeventDecodeError):
        ue.decode_stats(two[:-10])


def test_short_payload() -> None:
    with pytest.raises(ue.UeventDecodeError):
        ue.decode(bytes(55))


@given(st.binary(max_size=400))
def test_random_bytes_fail_only_as_decode_errors(data: bytes) -> None:
    try:
        ev = ue.decode(data)
        ue.parse_event(ev)
    except ue.UeventDecodeError:
        pass


@given(st.integers(0, 0xFFFFFFFF), st.integers(1, 0xFFFF), st.integers(1, 0xFFFF))
def test_create_session_round_trips_any_values(cmdsn: int, cmds_max: int, depth: int) -> None:
    req = ue.create_session(HANDLE, initial_cmdsn=cmdsn, cmds_max=cmds_max,
                            queue_depth=depth)
    _, fields = ue.decode_request(req.payload)
    assert fields == {"initial_cmdsn": cmdsn, "cmds_max": cmds_max, "queue_depth": depth}
