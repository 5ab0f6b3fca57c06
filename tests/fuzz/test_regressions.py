"""Minimal reproducers of what the fuzzer found, one test each.

Each is a strict xfail while the bug stands: when the owner fixes it, the test passes,
strict xfail fails the run, and the marker goes (with its line in known.py); the test
stays, as a regression test.
"""

from __future__ import annotations

import contextlib
from typing import Any, cast

import pytest
import trio

from userland import lun as lun_module
from userland.errors import IscsiError, ProtocolError
from userland.keys import Negotiator, encode_text
from userland.login.chap import ChapExchange, Credentials, Secret, encode_binary
from userland.login.machine import LoginConfig, LoginMachine, LoginResult
from userland.pdu import DataIn, LoginRequest, LoginResponse, ScsiResponse, Stage
from userland.scsi import read_cdb
from userland.session import ConnectionFailed, Event, Session, TaskDone
from userland.task import Task

INITIATOR = "iqn.2026-12.lab.fuzz:initiator"
TARGET = "iqn.2026-12.lab.fuzz:chap"
ISID = bytes.fromhex("80d19ea53fb0")
OURS = Credentials("fuzz-user", Secret(b"fuzz-secret-0123"))
CHALLENGE = encode_binary(bytes(range(16)))
OTHER_CHALLENGE = encode_binary(bytes(range(16, 32)))
FIRST_TPGT = b"TargetPortalGroupTag=1\0"  # a first Login Response must carry it (13.9)


def _chap_machine() -> LoginMachine:
    machine = LoginMachine(LoginConfig(initiator_name=INITIATOR, target_name=TARGET,
                                       isid=ISID, credentials=OURS))
    machine.initial_request()
    return machine


def _response(text: bytes, stat_sn: int) -> LoginResponse:
    return LoginResponse(csg=Stage.SECURITY, nsg=0, isid=ISID, tsih=0, stat_sn=stat_sn,
                         exp_cmd_sn=1, max_cmd_sn=1, data=text)


def test_repeated_auth_method_refused() -> None:
    """Two AuthMethod keys in one Login Response are refused, not collapsed (RFC 7143 6.3)."""
    machine = _chap_machine()
    with pytest.raises(ProtocolError, match="AuthMethod twice"):
        machine.receive(_response(b"AuthMethod=CHAP\0AuthMethod=CHAP\0" + FIRST_TPGT, 0))


def test_repeated_chap_challenge_refused() -> None:
    """A second CHAP_C in the challenge is refused; the initiator answers neither (6.3).

    The first response carries the portal group tag a first Login Response must (13.9),
    so the refusal can only come from the repeated CHAP_C."""
    machine = _chap_machine()
    step = machine.receive(_response(b"AuthMethod=CHAP\0" + FIRST_TPGT, 0))
    assert isinstance(step, LoginRequest)
    challenge = encode_text([("CHAP_A", "5"), ("CHAP_I", "1"), ("CHAP_C", CHALLENGE),
                             ("CHAP_C", OTHER_CHALLENGE)])
    with pytest.raises(ProtocolError, match="CHAP_C twice"):
        machine.receive(_response(challenge, 1))


@pytest.mark.parametrize("identifier", ["00", "0b101", "5_0", " 5", "+5"])
def test_chap_identifier_must_be_an_rfc_number(identifier: str) -> None:
    """CHAP_I is an RFC 7143 6.1 number, not a Python literal ('00', '0b101', '5_0')."""
    exchange = ChapExchange(OURS, (5,))
    keys = {"CHAP_A": "5", "CHAP_I": identifier, "CHAP_C": CHALLENGE}
    with pytest.raises(IscsiError):
        exchange.answer_challenge(keys)


def _read_session() -> tuple[Session, Task]:
    neg = Negotiator().result()
    session = Session(LoginResult(negotiated=neg, isid=ISID, tsih=1, cid=0, cmd_sn=10,
                                  exp_stat_sn=100, max_cmd_sn=40, auth_method="None"))
    task = Task(lun=1 << 48, cdb=read_cdb(0, 1), read_length=512)
    session.submit(task)
    session.take_outgoing()
    return session, task


def _ended_good_without_data(events: list[Event], task: Task) -> bool:
    done = any(isinstance(e, TaskDone) for e in events)
    failed = any(isinstance(e, ConnectionFailed) for e in events)
    return done and not failed and task.error is None and task.status == 0


def test_read_ending_good_without_its_data_is_refused() -> None:
    session, task = _read_session()
    events = session.receive(ScsiResponse(itt=task.itt, status=0, stat_sn=100,
                                          exp_cmd_sn=11, max_cmd_sn=41), now=0.0)
    assert not _ended_good_without_data(events, task), "read of 512 bytes took 0 as GOOD"


def test_short_data_in_with_good_status_and_no_residual_is_refused() -> None:
    session, task = _read_session()
    events = session.receive(DataIn(itt=task.itt, data_sn=0, buffer_offset=0,
                                    data=bytes(256), final=True, has_status=True,
                                    stat_sn=100, exp_cmd_sn=11, max_cmd_sn=41), now=0.0)
    assert not _ended_good_without_data(events, task), "read of 512 bytes took 256 as GOOD"


class _Answers:
    """Stands in for SessionRunner.execute in lun.py: each command gets the next canned
    Data-In with status GOOD; what each command asked to read is kept."""

    def __init__(self, *answers: bytes) -> None:
        self.answers = list(answers)
        self.read_lengths: list[int] = []

    async def execute(self, task: Task) -> Task:
        self.read_lengths.append(task.read_length)
        data = self.answers.pop(0)[:task.read_length]
        task.data = bytearray(data)
        task.status, task.residual = 0, task.read_length - len(data)
        return task


def test_vpd_page_length_beyond_any_inquiry_is_a_project_error() -> None:
    """A VPD page length of 0xFFFD (65537 bytes in all) is more than INQUIRY's 16-bit
    allocation length can fetch: a ProtocolError, not a ValueError, and no second ask."""
    runner = _Answers(b"\0\x83\xff\xfd" + bytes(251))
    lun = lun_module.Lun(cast(Any, runner), 1)
    with pytest.raises(ProtocolError, match="page length 65533"):
        trio.run(lun._vpd, 0x83)
    assert runner.read_lengths == [255]


def test_vpd_long_page_is_asked_again_whole_and_cut_at_what_came() -> None:
    """A page longer than the first 255 bytes is asked again at its length; a short
    second answer is cut at its residual, not padded with zeros the target never sent."""
    page = b"\0\x83\x01\x2c" + bytes(300)  # 304 bytes in all
    runner = _Answers(page, page[:200])
    lun = lun_module.Lun(cast(Any, runner), 1)
    assert trio.run(lun._vpd, 0x83) == page[:200]
    assert runner.read_lengths == [255, 304]


def test_report_luns_length_beyond_any_allocation_is_a_project_error() -> None:
    """A LUN list length of 0xFFFFFFF8 (needed_length 2**32) is a ProtocolError."""
    runner = _Answers((0xFFFFFFF8).to_bytes(4, "big") + bytes(4) + bytes(16))
    with pytest.raises(IscsiError):
        trio.run(lun_module.report_luns, cast(Any, runner))


def test_report_luns_length_from_target_does_not_size_an_allocation() -> None:
    """A LUN list length of 0x7FFFFFF8 never becomes a 2 GiB read buffer (issue 10:
    'memory bounded by configuration, not by the target')."""
    header = (0x7FFFFFF8).to_bytes(4, "big") + bytes(4)
    runner = _Answers(header + bytes(4088), header + bytes(4088))
    with contextlib.suppress(IscsiError):  # refusing the answer is one right outcome
        trio.run(lun_module.report_luns, cast(Any, runner))
    assert max(runner.read_lengths) <= 16 << 20, f"asked to read {runner.read_lengths} bytes"
