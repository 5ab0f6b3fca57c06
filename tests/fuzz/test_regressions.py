"""Minimal reproducers of what the fuzzer found, one test each.

Each is a strict xfail while the bug stands: when the owner fixes it, the test passes,
strict xfail fails the run, and the marker goes (with its line in known.py).
"""

from __future__ import annotations

import pytest

from userland.errors import IscsiError, ProtocolError
from userland.keys import encode_text
from userland.login.chap import ChapExchange, Credentials, Secret, encode_binary
from userland.login.machine import LoginConfig, LoginMachine
from userland.pdu import LoginRequest, LoginResponse, Stage

INITIATOR = "iqn.2026-12.lab.fuzz:initiator"
TARGET = "iqn.2026-12.lab.fuzz:chap"
ISID = bytes.fromhex("80d19ea53fb0")
OURS = Credentials("fuzz-user", Secret(b"fuzz-secret-0123"))
CHALLENGE = encode_binary(bytes(range(16)))
OTHER_CHALLENGE = encode_binary(bytes(range(16, 32)))


def _chap_machine() -> LoginMachine:
    machine = LoginMachine(LoginConfig(initiator_name=INITIATOR, target_name=TARGET,
                                       isid=ISID, credentials=OURS))
    machine.initial_request()
    return machine


def _response(text: bytes, stat_sn: int) -> LoginResponse:
    return LoginResponse(csg=Stage.SECURITY, nsg=0, isid=ISID, tsih=0, stat_sn=stat_sn,
                         exp_cmd_sn=1, max_cmd_sn=1, data=text)


@pytest.mark.xfail(strict=True, reason=(
    "userland/login/machine.py LoginMachine._security: `keys = dict(pairs)` keeps the last "
    "of two AuthMethod keys in one Login Response instead of refusing it (RFC 7143 6.3; "
    "issue 10, 'repeated keys ... collapsed silently')"))
def test_repeated_auth_method_refused() -> None:
    machine = _chap_machine()
    with pytest.raises(ProtocolError):
        machine.receive(_response(b"AuthMethod=CHAP\0AuthMethod=CHAP\0", 0))


@pytest.mark.xfail(strict=True, reason=(
    "userland/login/machine.py LoginMachine._security: `keys = dict(pairs)` lets a second "
    "CHAP_C (and CHAP_I, CHAP_A) in one Login Response silently replace the first, and "
    "the initiator answers whichever came last (RFC 7143 6.3; issue 10)"))
def test_repeated_chap_challenge_refused() -> None:
    machine = _chap_machine()
    step = machine.receive(_response(b"AuthMethod=CHAP\0", 0))
    assert isinstance(step, LoginRequest)
    challenge = encode_text([("CHAP_A", "5"), ("CHAP_I", "1"), ("CHAP_C", CHALLENGE),
                             ("CHAP_C", OTHER_CHALLENGE)])
    with pytest.raises(ProtocolError):
        machine.receive(_response(challenge, 1))


@pytest.mark.parametrize("identifier", ["00", "0b101", "5_0", " 5", "+5"])
@pytest.mark.xfail(strict=True, reason=(
    "userland/login/chap.py ChapExchange.answer_challenge: `int(keys['CHAP_I'], 0)` "
    "takes Python literals ('00', '0b101', '5_0', ' 5', '+5') that are not RFC 7143 6.1 "
    "numbers (decimal-constant or hex-constant); issue 10, 'strict CHAP number parsing'"))
def test_chap_identifier_must_be_an_rfc_number(identifier: str) -> None:
    exchange = ChapExchange(OURS, (5,))
    keys = {"CHAP_A": "5", "CHAP_I": identifier, "CHAP_C": CHALLENGE}
    with pytest.raises(IscsiError):
        exchange.answer_challenge(keys)
