"""What a hostile target sends, checked with bytes alone: keys, CHAP numbers, TPGT,
digests, streamed text, SendTargets bounds, SCSI lengths, escaping."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from userland.discovery.sendtargets import SendTargetsParser
from userland.errors import ConfigError, IscsiError, NegotiationError, ProtocolError
from userland.keys import Pair, TextStream, decode_text, encode_text
from userland.login.chap import decode_binary, parse_small_decimal
from userland.login.machine import (
    LoginConfig,
    LoginMachine,
    LoginResult,
    config_for_redirect,
    new_isid,
)
from userland.pdu import LoginRequest, LoginResponse, Stage
from userland.portal import Portal
from userland.printable import escape
from userland.scsi import (
    MAX_REPORT_LUNS_LENGTH,
    parse_read_capacity10,
    parse_read_capacity16,
    parse_report_luns,
    parse_vpd_serial,
)
from userland.untrusted import from_target

from fake_target import raw_text

INITIATOR = "iqn.2024-01.org.iscsi-handoff:test"
TARGET = "iqn.2024-01.org.example:disk1"
HERE = Portal("127.0.0.1", 3260)


# -- escape


@pytest.mark.parametrize(("raw", "shown"), [
    ("iqn.a:b", "iqn.a:b"),
    ("a\x1b[2Jb", "a\\x1b[2Jb"),
    ("cr\rlf\n", "cr\\x0dlf\\x0a"),
    ("c1\x9bdel\x7f", "c1\\x9bdel\\x7f"),
    ("bidi\u202eltr", "bidi\\u202eltr"),
    ("back\\x1b", "back\\\\x1b"),  # a literal backslash cannot forge an escape
    ("naïve disk", "naïve disk"),
])
def test_escape(raw: str, shown: str) -> None:
    assert escape(raw) == shown


def test_escape_bytes_and_limit() -> None:
    assert escape(b"ok\xff\x1b") == "ok\\xff\\x1b"
    assert escape("x" * 1000, limit=8) == "xxxxxxxx...(1000 characters)"


@settings(deadline=None)  # no timing in tests: a busy CI machine is slow
@given(st.text())
def test_escape_never_lets_a_control_character_through(text: str) -> None:
    shown = escape(text, limit=10**6)
    assert all(c == " " or c.isprintable() for c in shown)


# -- streamed text (6.1, 11.11)


pairs_strategy = st.lists(st.tuples(st.sampled_from(["TargetName", "TargetAddress", "X#A"]),
                                    st.text(st.characters(codec="utf-8",
                                                          exclude_characters="\0"),
                                            max_size=40)), max_size=30)


@settings(deadline=None)
@given(pairs_strategy, st.lists(st.integers(1, 50), max_size=30))
def test_text_stream_split_anywhere_gives_the_same_pairs(pairs: list[Pair],
                                                         cuts: list[int]) -> None:
    data = encode_text(pairs)
    stream, got, pos = TextStream(1 << 20), [], 0
    for cut in cuts:
        if pos >= len(data):
            break
        got += stream.feed(data[pos:pos + cut], True)
        pos += cut
    got += stream.feed(data[pos:], False)
    stream.finish()
    assert got == pairs == decode_text(data)


def test_text_stream_bounds() -> None:
    stream = TextStream(100)
    assert stream.feed(b"A=1\0B=", True) == [("A", "1")]
    with pytest.raises(ProtocolError, match="ends inside a key=value pair"):
        stream.feed(b"2\0C=", False)  # C=0: the PDU must end on a pair boundary
    with pytest.raises(ProtocolError, match="longer than 100 bytes"):
        TextStream(100).feed(b"A=1\0" * 26, True)
    with pytest.raises(ProtocolError, match="key=value pair of more than"):
        TextStream(1 << 20).feed(b"A=" + b"x" * 5000, True)


# -- strict CHAP numbers


@pytest.mark.parametrize("text", ["0b101", "0x05", "+5", " 5", "5 ", "05", "256", "", "٥",
                                  "1e2", "-1"])
def test_chap_identifier_is_strictly_decimal(text: str) -> None:
    with pytest.raises(ProtocolError, match="CHAP_I"):
        parse_small_decimal("CHAP_I", text, 255)


def test_chap_identifier_range() -> None:
    assert [parse_small_decimal("CHAP_I", t, 255) for t in ("0", "7", "255")] == [0, 7, 255]


@pytest.mark.parametrize("text", ["0x12 34", "0x", "0b", "0x12g4", "0bAB=C", "0b====",
                                  "0bQUJD\n", "12", "0x" + "00" * 1025,
                                  "0b" + "AAAA" * 342])
def test_chap_binary_is_strict_and_bounded(text: str) -> None:
    with pytest.raises(ProtocolError, match="CHAP_C"):
        decode_binary("CHAP_C", text)


def test_chap_binary_forms() -> None:
    assert decode_binary("CHAP_C", "0xABC") == b"\x0a\xbc"
    assert decode_binary("CHAP_C", "0Bq80=") == b"\xab\xcd"
    assert decode_binary("CHAP_C", "0x" + "01" * 1024) == b"\x01" * 1024


# -- the login machine: repeats, TPGT, digests


def respond(req: LoginRequest, pairs: list[Pair], *, transit: bool = True, nsg: int = 1,
            tsih: int = 0, stat_sn: int = 1) -> LoginResponse:
    return LoginResponse(transit=transit, csg=req.csg, nsg=nsg if transit else 0,
                         isid=req.isid, tsih=tsih, itt=req.itt, stat_sn=stat_sn,
                         exp_cmd_sn=req.cmd_sn, max_cmd_sn=req.cmd_sn + 8,
                         data=raw_text(pairs))


def log_in(config: LoginConfig, first: list[Pair],
           answers: dict[str, str | None] | None = None) -> LoginResult:
    machine = LoginMachine(config)
    req = machine.initial_request()
    step = machine.receive(respond(req, first))
    assert isinstance(step, LoginRequest) and step.csg == Stage.OPERATIONAL
    reply = []
    for key, value in decode_text(bytes(step.data)):
        answer = (answers or {}).get(key, value.split(",")[0])
        if answer is not None:
            reply.append((key, answer))
    done = machine.receive(respond(step, reply, nsg=3, tsih=5, stat_sn=2))
    assert isinstance(done, LoginResult)
    return done


def normal(**kw: object) -> LoginConfig:
    return LoginConfig(initiator_name=INITIATOR, target_name=TARGET, isid=new_isid(),
                       **kw)  # type: ignore[arg-type]


def test_a_key_twice_in_one_response_is_refused() -> None:
    with pytest.raises(NegotiationError, match="AuthMethod twice"):
        log_in(normal(), [("AuthMethod", "None"), ("AuthMethod", "None")])
    # and TargetAddress, which 13.8 lets repeat, is not counted
    result = log_in(normal(), [("AuthMethod", "None"), ("TargetPortalGroupTag", "3"),
                               ("TargetAddress", "10.0.0.1:3260,3"),
                               ("TargetAddress", "10.0.0.2:3260,3")])
    assert result.negotiated.target_portal_group_tag == 3


def test_tpgt_required_on_a_normal_session_only() -> None:
    with pytest.raises(NegotiationError, match="did not send TargetPortalGroupTag"):
        log_in(normal(), [("AuthMethod", "None")])
    discovery = LoginConfig(initiator_name=INITIATOR, target_name=None, isid=new_isid())
    assert log_in(discovery, [("AuthMethod", "None")]).negotiated.target_portal_group_tag \
        is None


def test_tpgt_compared_with_what_we_were_told() -> None:
    first = [("AuthMethod", "None"), ("TargetPortalGroupTag", "1")]
    assert log_in(normal(expected_tpgt=1), first).negotiated.target_portal_group_tag == 1
    with pytest.raises(ConfigError, match="portal group tag 2, but the target serves it "
                                          "in group 1") as user:
        log_in(normal(expected_tpgt=2), first)
    assert user.value.exit_code == 2
    with pytest.raises(ProtocolError, match="the SendTargets answer said 2") as listed:
        log_in(normal(expected_tpgt=2, expected_tpgt_from="the SendTargets answer"), first)
    assert listed.value.exit_code == 7
    redirected = config_for_redirect(normal(expected_tpgt=1), "10.0.0.2:3260,4", 4)
    assert redirected.expected_tpgt == 4 and "redirect" in redirected.expected_tpgt_from


@pytest.mark.parametrize("answer", ["Reject", "NotUnderstood", None])
def test_required_digest_must_be_granted(answer: str | None) -> None:
    first = [("AuthMethod", "None"), ("TargetPortalGroupTag", "1")]
    cfg = normal(header_digest=("CRC32C",))
    with pytest.raises(NegotiationError, match="HeaderDigest=CRC32C was required"):
        log_in(cfg, first, {"HeaderDigest": answer})
    granted = log_in(cfg, first, {"HeaderDigest": "CRC32C"})
    assert granted.negotiated.header_digest == "CRC32C"
    preferred = log_in(normal(header_digest=("CRC32C", "None")), first,
                       {"HeaderDigest": answer})
    assert preferred.negotiated.header_digest == "None"  # allowed: the user said either


# -- SendTargets bounds


def test_send_targets_parser_bounds() -> None:
    parser = SendTargetsParser(discovery_portal=HERE, max_targets=2)
    parser.feed([("TargetName", "iqn.2024-01.a:1"), ("TargetName", "iqn.2024-01.a:2")])
    with pytest.raises(ProtocolError, match="more than 2 targets"):
        parser.feed([("TargetName", "iqn.2024-01.a:3")])
    with pytest.raises(ProtocolError, match="listed twice"):
        SendTargetsParser(discovery_portal=HERE).feed([("TargetName", "iqn.2024-01.a:1")] * 2)
    with pytest.raises(ProtocolError, match="more than 256 addresses"):
        SendTargetsParser(discovery_portal=HERE).feed(
            [("TargetName", "iqn.2024-01.a:1")] + [("TargetAddress", "h:1,1")] * 257)


# -- portals


@pytest.mark.parametrize("text", ["host:", "[::1]:", "host:,1", "host:３２６０", "host:²",
                                  "host,¹", "ev\x1bil:3260", "a b:3260"])
def test_bad_portals_are_refused(text: str) -> None:
    with pytest.raises(ConfigError):
        Portal.parse(text)


# -- SCSI lengths


def test_report_luns_of_four_gib_is_refused_before_any_allocation() -> None:
    claim = struct.pack(">I4x", 0xFFFFFFF8) + bytes(8)
    with pytest.raises(ProtocolError, match="beyond the 65536 LUNs"):
        parse_report_luns(claim)
    ok = parse_report_luns(struct.pack(">I4x", MAX_REPORT_LUNS_LENGTH) + bytes(8))
    assert ok.truncated and ok.needed_length == MAX_REPORT_LUNS_LENGTH + 8


@pytest.mark.parametrize(("last", "size", "match"), [
    (2**63 - 1, 512, "beyond the 8 EiB"), (2**64 - 1, 512, "beyond the 8 EiB"),
    (1000, 0, "block length 0"), (1000, 2**31, "block length 2147483648"),
])
def test_implausible_capacity_is_refused(last: int, size: int, match: str) -> None:
    with pytest.raises(ProtocolError, match=match):
        parse_read_capacity16(struct.pack(">QI", last, size) + bytes(20))


def test_plausible_capacity_passes() -> None:
    assert parse_read_capacity16(struct.pack(">QI", 2**40 - 1, 4096) + bytes(20)).num_blocks \
        == 2**40
    assert parse_read_capacity10(struct.pack(">II", 2**32 - 1, 512)).use_16


def test_serial_from_the_target_is_printable() -> None:
    page = b"\x00\x80\x00\x08SN\x1b[2J\x9b\x07"
    assert parse_vpd_serial(page).serial.isprintable()


def test_any_slip_of_a_parser_becomes_a_protocol_error() -> None:
    @from_target
    def sloppy(data: bytes) -> int:
        return int(struct.unpack(">I", data)[0]) + data[10]

    for bad in (b"", b"\x00\x00\x00\x01"):
        with pytest.raises(ProtocolError, match="sloppy: malformed data from the target"):
            sloppy(bad)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=64))
def test_login_machine_takes_any_response_text_as_a_project_error(data: bytes) -> None:
    machine = LoginMachine(normal())
    req = machine.initial_request()
    resp = LoginResponse(transit=True, csg=0, nsg=1, isid=req.isid, itt=req.itt, stat_sn=1,
                         exp_cmd_sn=1, max_cmd_sn=9, data=data)
    try:
        machine.receive(resp)
    except IscsiError:
        pass
    except Exception as exc:  # anything else is a crash a target could cause
        pytest.fail(f"{type(exc).__name__}: {exc}")


def test_a_security_key_sent_again_later_is_refused() -> None:
    from userland.login.chap import Credentials, Secret

    machine = LoginMachine(normal(credentials=Credentials("alice", Secret(b"a" * 16))))
    req = machine.initial_request()
    step = machine.receive(respond(req, [("AuthMethod", "CHAP"),
                                         ("TargetPortalGroupTag", "1")], transit=False))
    assert isinstance(step, LoginRequest)
    with pytest.raises(NegotiationError, match="AuthMethod again in a later"):
        machine.receive(respond(step, [("AuthMethod", "CHAP"), ("CHAP_A", "5"),
                                       ("CHAP_I", "1"), ("CHAP_C", "0x" + "11" * 16)],
                                transit=False, stat_sn=2))


def test_relogin_keeps_the_first_logins_tpgt() -> None:
    from userland.login.machine import config_pinned

    first = [("AuthMethod", "None"), ("TargetPortalGroupTag", "1")]
    result = log_in(normal(), first)
    again = config_pinned(normal(), result.negotiated.target_portal_group_tag)
    assert log_in(again, first).negotiated.target_portal_group_tag == 1
    with pytest.raises(ProtocolError, match="the session's first login said 1"):
        log_in(again, [("AuthMethod", "None"), ("TargetPortalGroupTag", "2")])
    users = normal(expected_tpgt=1)
    assert config_pinned(users, 1) is users
