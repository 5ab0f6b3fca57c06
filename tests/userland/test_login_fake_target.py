"""Login and discovery against a scripted target that misbehaves on purpose."""

from __future__ import annotations

import time

import pytest

from userland.discovery.run import discover
from userland.errors import (
    AuthenticationError,
    LoginTimeout,
    NegotiationError,
    NetworkError,
    ProtocolError,
    TargetNotFoundError,
)
from userland.keys import encode_text
from userland.login.chap import Credentials, Secret, decode_binary, encode_binary
from userland.login.machine import LoginConfig, new_isid
from userland.login.run import login
from userland.pdu import LoginRequest, LogoutRequest, LogoutResponse, TextRequest, TextResponse
from userland.portal import Portal

from fake_target import FakeTarget, Peer, operational, plain_login

INITIATOR = "iqn.2024-01.org.iscsi-handoff:test"
TARGET = "iqn.2024-01.org.example:disk1"
CREDS = Credentials("alice", Secret(b"alice-secret-123"))
MUTUAL = Credentials("target1", Secret(b"target-secret-456"))


def config(**kw: object) -> LoginConfig:
    base: dict[str, object] = {"initiator_name": INITIATOR, "target_name": TARGET,
                               "isid": new_isid()}
    base.update(kw)
    return LoginConfig(**base)  # type: ignore[arg-type]


def test_plain_login_against_the_fake_works() -> None:
    with FakeTarget(plain_login) as fake:
        session = login(Portal.parse(fake.portal), config(), timeout=5)
        session.connection.close()
    assert not fake.errors
    assert session.result.tsih == 7
    assert session.result.negotiated.target_portal_group_tag == 1


def test_downgrade_to_no_authentication_is_refused() -> None:
    def script(peer: Peer) -> None:
        req, keys = peer.recv_login()
        assert keys["AuthMethod"] == "CHAP"
        peer.send(peer.login_response(req, [("AuthMethod", "None")], transit=True, nsg=1))
        peer.recv()  # we must not get here: the initiator hangs up

    with FakeTarget(script) as fake, pytest.raises(AuthenticationError,
                                                   match="AuthMethod=None"):
        login(Portal.parse(fake.portal), config(credentials=CREDS), timeout=5)


def chap_until_challenge(peer: Peer, challenge: bytes) -> tuple[LoginRequest, dict[str, str]]:
    req, keys = peer.recv_login()
    peer.send(peer.login_response(req, [("AuthMethod", "CHAP")]))
    req, keys = peer.recv_login()
    assert keys["CHAP_A"] == "5"
    peer.send(peer.login_response(req, [("CHAP_A", "5"), ("CHAP_I", "3"),
                                        ("CHAP_C", encode_binary(challenge))]))
    return peer.recv_login()


def test_reflected_chap_challenge_is_refused() -> None:
    seen: list[bytes] = []

    def script(peer: Peer) -> None:
        if not seen:  # first connection: learn the initiator's challenge, then fail it
            req, keys = chap_until_challenge(peer, b"\x11" * 16)
            seen.append(decode_binary("CHAP_C", keys["CHAP_C"]))
            peer.send(peer.login_response(req, [], status=(2, 1)))
        else:  # second connection: reflect it back as our own challenge
            chap_until_challenge(peer, seen[0])

    with FakeTarget(script) as fake:
        cfg = config(credentials=CREDS, mutual=MUTUAL)
        with pytest.raises(AuthenticationError, match="authentication failed"):
            login(Portal.parse(fake.portal), cfg, timeout=5)
        with pytest.raises(AuthenticationError, match="reflection"):
            login(Portal.parse(fake.portal), cfg, timeout=5)
    assert seen


def test_chap_required_but_no_credentials_says_so() -> None:
    def script(peer: Peer) -> None:
        req, _ = peer.recv_login()
        peer.send(peer.login_response(req, [], status=(2, 1)))

    with FakeTarget(script) as fake, pytest.raises(AuthenticationError,
                                                   match=r"requires CHAP .* no credentials"):
        login(Portal.parse(fake.portal), config(), timeout=5)


@pytest.mark.parametrize("garbage", [
    b"\xff" * 48,                               # opcode 0x3f with bit 7 set
    bytes([0x1C]) + bytes(47),                  # no such opcode
    bytes([0x23, 0x80, 0, 0, 0, 0xFF, 0xFF, 0xFF]) + bytes(40),  # 16 MiB data segment
    bytes([0x23, 0xC0]) + bytes(46),            # Login Response with T and C both set
])
def test_malformed_pdus_are_refused_cleanly(garbage: bytes) -> None:
    def script(peer: Peer) -> None:
        peer.recv_login()
        peer.send_raw(garbage)
        time.sleep(0.5)

    with FakeTarget(script) as fake, pytest.raises(ProtocolError):
        login(Portal.parse(fake.portal), config(), timeout=5)


def test_wrong_isid_and_wrong_opcode_are_protocol_errors() -> None:
    def wrong_isid(peer: Peer) -> None:
        req, _ = peer.recv_login()
        resp = peer.login_response(req, [("AuthMethod", "None")], transit=True, nsg=1)
        resp.isid = bytes(6)
        peer.send(resp)
        time.sleep(0.5)

    with FakeTarget(wrong_isid) as fake, pytest.raises(ProtocolError, match="ISID"):
        login(Portal.parse(fake.portal), config(), timeout=5)

    def text_instead(peer: Peer) -> None:
        req, _ = peer.recv_login()
        peer.send(TextResponse(itt=req.itt))
        time.sleep(0.5)

    with FakeTarget(text_instead) as fake, pytest.raises(ProtocolError, match="Login Response"):
        login(Portal.parse(fake.portal), config(), timeout=5)


def test_answer_outside_the_offer_names_key_and_value() -> None:
    def script(peer: Peer) -> None:
        req, _ = peer.recv_login()
        peer.send(peer.login_response(req, [("AuthMethod", "None")], transit=True, nsg=1))
        req, keys = peer.recv_login()
        operational(peer, req, keys, answers={"HeaderDigest": "MD5"})
        time.sleep(0.5)

    with FakeTarget(script) as fake, pytest.raises(NegotiationError,
                                                   match=r"HeaderDigest.*MD5"):
        login(Portal.parse(fake.portal), config(), timeout=5)


def test_silent_portal_times_out_in_time() -> None:
    def script(peer: Peer) -> None:
        time.sleep(3)

    with FakeTarget(script) as fake:
        started = time.monotonic()
        with pytest.raises(LoginTimeout, match="said nothing"):
            login(Portal.parse(fake.portal), config(), timeout=1.0)
        assert time.monotonic() - started < 2.5


def test_refused_connection_is_a_network_error() -> None:
    with FakeTarget(plain_login) as fake:
        port = fake.port
    with pytest.raises(NetworkError, match="refused"):
        login(Portal("127.0.0.1", port), config(), timeout=2)


def test_redirect_is_followed_and_bounded() -> None:
    with FakeTarget(plain_login) as real:
        def redirect(peer: Peer) -> None:
            req, _ = peer.recv_login()
            peer.send(peer.login_response(req, [("TargetAddress", f"{real.portal},1")],
                                          status=(1, 1)))

        with FakeTarget(redirect) as mover:
            session = login(Portal.parse(mover.portal), config(), timeout=5)
            session.connection.close()
            assert session.portal == Portal("127.0.0.1", real.port, 1)
            assert session.redirects == [f"{real.portal},1"]

    def loop(peer: Peer) -> None:
        req, _ = peer.recv_login()
        peer.send(peer.login_response(req, [("TargetAddress", f"127.0.0.1:{me.port}")],
                                      status=(1, 2)))

    with FakeTarget(loop) as me, pytest.raises(ProtocolError, match="redirected more than"):
        login(Portal.parse(me.portal), config(), timeout=5)


def test_unknown_target_status() -> None:
    def script(peer: Peer) -> None:
        req, _ = peer.recv_login()
        peer.send(peer.login_response(req, [], status=(2, 3)))

    with FakeTarget(script) as fake, pytest.raises(TargetNotFoundError, match="not found"):
        login(Portal.parse(fake.portal), config(), timeout=5)


def test_send_targets_answer_in_continued_text_pdus() -> None:
    names = [f"iqn.2024-01.org.example:t{i:03d}" for i in range(300)]
    text = encode_text([p for n in names for p in (("TargetName", n),
                                                   ("TargetAddress", "127.0.0.1:3260,1"))])

    def script(peer: Peer) -> None:
        plain_login(peer)
        req = peer.recv()
        assert isinstance(req, TextRequest)
        chunks = [text[i:i + 1000] for i in range(0, len(text), 1000)]
        for i, chunk in enumerate(chunks):
            last = i == len(chunks) - 1
            peer.stat_sn += 1
            peer.send(TextResponse(final=last, cont=not last, itt=req.itt, ttt=0 if last
                                   else 0x55, stat_sn=peer.stat_sn, exp_cmd_sn=req.cmd_sn + 1,
                                   max_cmd_sn=req.cmd_sn + 32, data=chunk))
            if not last:
                more = peer.recv()
                assert isinstance(more, TextRequest) and more.ttt == 0x55 and not more.data
                req = more
        logout = peer.recv()
        assert isinstance(logout, LogoutRequest)
        peer.stat_sn += 1
        peer.send(LogoutResponse(itt=logout.itt, stat_sn=peer.stat_sn,
                                 exp_cmd_sn=logout.cmd_sn, max_cmd_sn=logout.cmd_sn + 32))

    with FakeTarget(script) as fake:
        targets = discover(Portal.parse(fake.portal), initiator_name=INITIATOR, timeout=5)
    assert not fake.errors, fake.errors
    assert [t.name for t in targets] == names
    assert all(t.portals == [Portal("127.0.0.1", 3260, 1)] for t in targets)


def test_target_that_hangs_up_on_no_authentication_suggests_chap() -> None:
    """LIO's answer to AuthMethod=None where it requires CHAP: it closes, no response."""
    def script(peer: Peer) -> None:
        peer.recv_login()  # and hang up

    with FakeTarget(script) as target, \
            pytest.raises(AuthenticationError, match="may require CHAP") as info:
        login(Portal.parse(target.portal), config(), timeout=5)
    assert info.value.exit_code == 4 and "closed the connection" in str(info.value)
