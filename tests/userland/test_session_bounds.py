"""userland.policy in the sans-IO session machine: each rule with PDUs and times alone."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from userland.keys import Negotiator
from userland.login.machine import LoginResult
from userland.pdu import (
    R2T,
    RESERVED_TAG,
    AsyncMessage,
    DataIn,
    LogoutRequest,
    LogoutResponse,
    NopIn,
    NopOut,
    Pdu,
    Reject,
    ScsiCommand,
    ScsiResponse,
    TaskMgmtRequest,
    TaskMgmtResponse,
)
from userland.policy import Bounds
from userland.session import (
    ConnectionFailed,
    LogoutDone,
    LogoutRequested,
    Session,
    TaskDone,
    TmfDone,
)
from userland.task import Task

BOUNDS = Bounds(command_timeout=10, abort_timeout=5, window_timeout=8, max_attempts=3)


def login_result(**params: object) -> LoginResult:
    neg = dataclasses.replace(Negotiator().result(), **params)  # type: ignore[arg-type]
    return LoginResult(negotiated=neg, isid=b"\x80\0\0\0\0\1", tsih=1, cid=0, cmd_sn=10,
                       exp_stat_sn=100, max_cmd_sn=40, auth_method="None")


def session(**params: object) -> Session:
    return Session(login_result(**params), bounds=BOUNDS, nop_interval=0)


def sent(s: Session, task: Task, now: float = 0.0) -> ScsiCommand:
    s.submit(task, now)
    [cmd] = [p for p in s.take_outgoing(now) if isinstance(p, ScsiCommand)]
    return cmd


def only(pdus: list[Pdu], kind: type) -> list[Pdu]:
    return [p for p in pdus if isinstance(p, kind)]


def failed(task: Task, *words: str) -> bool:
    return task.done and task.error is not None and all(w in task.error for w in words)


# -- deadlines


def test_the_command_timer_starts_when_the_command_is_sent_not_submitted() -> None:
    s = session()
    task = Task(lun=0, cdb=b"\x28", read_length=8)
    s.submit(task, 0)
    s.take_outgoing(7)  # sent at 7 (the sender was busy until then)
    assert s.tick(16) == [] and s.take_outgoing(16) == []  # 9 s after sending: no abort
    assert s.tick(17.5) == []
    [abort] = s.take_outgoing(17.5)
    assert isinstance(abort, TaskMgmtRequest) and abort.rtt == task.itt and abort.immediate


def test_a_command_that_cannot_be_sent_fails_after_the_window_timeout() -> None:
    s = session()
    s.max_cmd_sn = s.cmd_sn - 1  # MaxCmdSN = ExpCmdSN - 1: the window is closed
    task = Task(lun=0, cdb=b"\x28", read_length=8)
    s.submit(task, 0)
    assert s.take_outgoing(0) == [] and s.tick(7) == []
    [event] = s.tick(8.5)
    assert event == TaskDone(task) and failed(task, "could not be sent", "window")
    assert not s.waiting and not s.tasks


def test_a_command_issued_but_never_taken_out_fails_the_connection() -> None:
    s = session()
    s.submit(Task(lun=0, cdb=b"\x00"), 0)  # the sender is stuck: the target does not read
    [event] = s.tick(9)
    assert isinstance(event, ConnectionFailed) and "not reading" in event.reason


def test_an_unanswered_abort_fails_the_connection() -> None:
    s = session()
    task = Task(lun=0, cdb=b"\x28", read_length=8)
    sent(s, task)
    s.tick(11)
    assert only(s.take_outgoing(11), TaskMgmtRequest)
    assert s.tick(15) == []
    [event] = s.tick(16.5)
    assert isinstance(event, ConnectionFailed) and "unanswered" in event.reason


def test_aborts_answered_function_complete_reissue_a_bounded_number_of_times() -> None:
    s = session()
    task = Task(lun=0, cdb=b"\x28", read_length=8)
    now = 0.0
    sent(s, task, now)
    itts = [task.itt]
    for attempt in range(1, 4):
        now += 11
        s.tick(now)
        [tmf] = only(s.take_outgoing(now), TaskMgmtRequest)
        assert isinstance(tmf, TaskMgmtRequest)
        events = s.receive(TaskMgmtResponse(itt=tmf.itt, response=0, stat_sn=100 + attempt - 1),
                           now)
        assert events[0] == TmfDone(tmf.function, tmf.rtt, 0)
        if attempt < 3:
            [again] = only(s.take_outgoing(now), ScsiCommand)
            assert isinstance(again, ScsiCommand) and again.itt not in itts
            itts.append(again.itt)
            assert task.attempts == attempt + 1
        else:
            assert events[1:] == [TaskDone(task)] and failed(task, "after 3 attempts")
    assert not s.tasks and not s.waiting


def test_relogins_count_as_attempts_too() -> None:
    s = session()
    task = Task(lun=0, cdb=b"\x28", read_length=8)
    sent(s, task)
    for n in range(2):
        assert s.restart(login_result(), float(n)) == []
        assert only(s.take_outgoing(float(n)), ScsiCommand)
    assert task.attempts == 3
    assert s.restart(login_result(), 3) == [TaskDone(task)]
    assert failed(task, "3 attempts") and s.take_outgoing(3) == []


# -- answers checked against what was asked


def data_in(task: Task, offset: int, data: bytes, *, sn: int = 0, status: bool = True,
            underflow: int = 0, stat_sn: int = 100) -> DataIn:
    return DataIn(itt=task.itt, data_sn=sn, buffer_offset=offset, data=data, final=status,
                  has_status=status, underflow=underflow > 0, residual_count=underflow,
                  stat_sn=stat_sn, exp_cmd_sn=11, max_cmd_sn=41)


def assert_faulted(s: Session, task: Task, events: Sequence[object], *words: str) -> None:
    """The one command fails at once (EIO upstream), is aborted at the target, and is
    never reissued; the connection stays."""
    assert events == [TaskDone(task)] and failed(task, "protocol error", *words)
    out = s.take_outgoing()
    assert [type(p) for p in out] == [TaskMgmtRequest]
    assert isinstance(out[0], TaskMgmtRequest) and out[0].rtt == task.itt
    assert task.attempts == 1 and not s.waiting


def test_data_in_past_the_expected_length_fails_that_command() -> None:
    s = session()
    task = Task(lun=0, cdb=b"\x28", read_length=8)
    sent(s, task)
    assert_faulted(s, task, s.receive(data_in(task, 0, bytes(12)), 0), "beyond")


def test_overlapping_data_in_fails_that_command() -> None:
    s = session(data_pdu_in_order=False)
    task = Task(lun=0, cdb=b"\x28", read_length=8)
    sent(s, task)
    assert s.receive(data_in(task, 0, bytes(6), status=False), 0) == []
    events = s.receive(data_in(task, 2, bytes(6), sn=1), 0)
    assert_faulted(s, task, events, "overlapping")


def test_a_residual_that_does_not_add_up_fails_that_command() -> None:
    s = session()
    task = Task(lun=0, cdb=b"\x12", read_length=255)
    sent(s, task)
    events = s.receive(data_in(task, 0, bytes(36), underflow=100), 0)
    assert_faulted(s, task, events, "residual")


def test_a_read_ending_good_short_of_its_data_fails_that_command() -> None:
    """11.4.5.2, 11.7.5: GOOD with fewer bytes than asked and no underflow would hand
    the caller zeros the target never sent: a SCSI Response with no Data-In at all, a
    final Data-In after half, an overflow after half."""
    for answer in ("response", "data_in", "overflow"):
        s = session()
        task = Task(lun=0, cdb=b"\x28", read_length=512)
        sent(s, task)
        if answer == "response":
            pdu: Pdu = ScsiResponse(itt=task.itt, stat_sn=100)
        else:
            pdu = data_in(task, 0, bytes(256))
            if answer == "overflow":
                pdu.overflow, pdu.residual_count = True, 512
        assert_faulted(s, task, s.receive(pdu, 0), "GOOD after", "of 512 bytes")
        assert task.status == 0 and task.error is not None


def test_a_read_whose_data_and_residual_add_up_ends_good() -> None:
    """The same answers, consistent: the underflow on the Response, on the last
    Data-In, or all the data with an overflow; and a CHECK CONDITION without data."""
    s = session()
    task = Task(lun=0, cdb=b"\x28", read_length=512)
    sent(s, task)
    assert s.receive(data_in(task, 0, bytes(256), status=False), 0) == []
    resp = ScsiResponse(itt=task.itt, underflow=True, residual_count=256, stat_sn=100)
    assert s.receive(resp, 0) == [TaskDone(task)]
    assert (task.error, task.received, task.residual) == (None, 256, 256)
    task = Task(lun=0, cdb=b"\x28", read_length=512)
    sent(s, task)
    assert s.receive(data_in(task, 0, bytes(200), underflow=312, stat_sn=101), 0) == [
        TaskDone(task)]
    task = Task(lun=0, cdb=b"\x28", read_length=512)
    sent(s, task)
    full = data_in(task, 0, bytes(512), stat_sn=102)
    full.overflow, full.residual_count = True, 4096
    assert s.receive(full, 0) == [TaskDone(task)] and task.residual == -4096
    task = Task(lun=0, cdb=b"\x28", read_length=512)
    sent(s, task)
    check = ScsiResponse(itt=task.itt, status=2, data=(18).to_bytes(2, "big") + bytes(18),
                         stat_sn=103)
    assert s.receive(check, 0) == [TaskDone(task)] and task.error is None
    task = Task(lun=0, cdb=b"\x28", read_length=512)
    sent(s, task)
    failure = ScsiResponse(itt=task.itt, response=0x01, status=0, stat_sn=104)
    assert s.receive(failure, 0) == [TaskDone(task)]
    assert (task.response, task.status) == (1, None)  # 11.4.3: no status to take as GOOD
    assert not s.take_outgoing() and not s.tasks


def test_late_pdus_for_a_faulted_command_are_dropped_until_the_abort_answer() -> None:
    s = session()
    task = Task(lun=0, cdb=b"\x28", read_length=8)
    sent(s, task)
    s.receive(data_in(task, 0, bytes(12), status=False), 0)
    [tmf] = s.take_outgoing()
    assert s.receive(data_in(task, 8, bytes(4), sn=1), 0) == []  # no connection failure
    assert s.receive(TaskMgmtResponse(itt=tmf.itt, response=0, stat_sn=101), 0) == [
        TmfDone(1, task.itt, 0)]
    [event] = s.receive(data_in(task, 8, bytes(4), sn=2, stat_sn=102), 0)
    assert isinstance(event, ConnectionFailed)  # now truly unknown


def test_sense_length_beyond_the_segment_fails_that_command() -> None:
    s = session()
    task = Task(lun=0, cdb=b"\x28", read_length=8)
    sent(s, task)
    bad = ScsiResponse(itt=task.itt, status=2, data=(200).to_bytes(2, "big") + bytes(18),
                       stat_sn=100)
    assert_faulted(s, task, s.receive(bad, 0), "SenseLength 200")


def test_bad_r2ts_fail_that_write() -> None:
    for offset, want, words in ((0, 8192 + 4096, "up to"), (0, 0, "0 bytes"),
                                (0, 16 << 20, "up to")):
        s = session(immediate_data=False, initial_r2t=True, max_burst_length=65536)
        task = Task(lun=0, cdb=b"\x2a", write_data=bytes(8192))
        sent(s, task)
        r2t = R2T(itt=task.itt, ttt=1, r2t_sn=0, buffer_offset=offset,
                  desired_data_transfer_length=want)
        assert_faulted(s, task, s.receive(r2t, 0), words)
    s = session(immediate_data=False, initial_r2t=True, max_burst_length=4096)
    task = Task(lun=0, cdb=b"\x2a", write_data=bytes(8192))
    sent(s, task)
    r2t = R2T(itt=task.itt, ttt=1, r2t_sn=0, desired_data_transfer_length=8192)
    assert_faulted(s, task, s.receive(r2t, 0), "MaxBurstLength")


def test_an_unknown_itt_fails_the_connection() -> None:
    s = session()
    [event] = s.receive(ScsiResponse(itt=0x4242, stat_sn=100), 0)
    assert isinstance(event, ConnectionFailed) and "0x4242" in event.reason


def test_a_stat_sn_gap_fails_the_connection() -> None:
    s = session()
    task = Task(lun=0, cdb=b"\x00")
    sent(s, task)
    [event] = s.receive(ScsiResponse(itt=task.itt, stat_sn=103), 0)
    assert isinstance(event, ConnectionFailed) and "StatSN gap" in event.reason
    s = session()
    task = Task(lun=0, cdb=b"\x00")
    sent(s, task)
    assert s.receive(ScsiResponse(itt=task.itt, stat_sn=100), 0) == [TaskDone(task)]


def test_a_reject_naming_one_command_fails_that_command_alone() -> None:
    s = session()
    task, other = Task(lun=0, cdb=b"\x28", read_length=8), Task(lun=0, cdb=b"\x00")
    cmd = sent(s, task)
    sent(s, other)
    reject = Reject(reason=0x06, data=cmd.encode()[:48], stat_sn=100)
    assert_faulted(s, task, s.receive(reject, 0), "reason 0x06")
    assert s.receive(ScsiResponse(itt=other.itt, stat_sn=101), 0) == [TaskDone(other)]


def test_a_reject_of_our_ping_is_no_failure() -> None:
    s = Session(login_result(), bounds=BOUNDS, nop_interval=1, nop_timeout=5)
    s.tick(2)
    [ping] = s.take_outgoing(2)
    assert s.receive(Reject(reason=0x04, data=ping.encode()[:48], stat_sn=100), 2) == []
    assert s.tick(10) == []  # not waiting for an answer that will never come


# -- async messages


def test_async_logout_request_is_answered_by_a_logout_within_parameter3() -> None:
    s = session()
    task = Task(lun=0, cdb=b"\x28", read_length=8)
    sent(s, task)
    [event] = s.receive(AsyncMessage(async_event=1, parameter3=4), 1)
    assert event == LogoutRequested(4)
    later = Task(lun=0, cdb=b"\x00")
    s.submit(later, 1)
    assert s.take_outgoing(1) == []  # nothing new goes out once the target asked
    s.tick(3)
    assert s.take_outgoing(3) == []  # the command in flight may still finish
    s.tick(5.5)
    [logout] = s.take_outgoing(5.5)
    assert isinstance(logout, LogoutRequest)
    [done] = s.receive(LogoutResponse(itt=logout.itt, stat_sn=100, time2wait=2), 6)
    assert done == LogoutDone(0, 2)


def test_async_logout_with_nothing_in_flight_logs_out_at_once() -> None:
    s = session()
    s.receive(AsyncMessage(async_event=1, parameter3=30), 0)
    assert [type(p) for p in s.take_outgoing(0)] == [LogoutRequest]
    assert s.receive(AsyncMessage(async_event=1, parameter3=30), 0) == []  # once


def test_async_drop_events_carry_time2wait() -> None:
    for event in (2, 3):
        s = session()
        [failed_conn] = s.receive(AsyncMessage(async_event=event, parameter2=7,
                                               parameter3=20), 0)
        assert isinstance(failed_conn, ConnectionFailed) and failed_conn.time2wait == 7


# -- memory


def test_ping_echoes_are_bounded_while_the_target_does_not_read() -> None:
    s = session(max_xmit_data_segment_length=8192)
    for _ in range(1000):
        s.receive(NopIn(ttt=0x42, itt=RESERVED_TAG, data=bytes(256 << 10), stat_sn=100), 0)
    [echo] = s.take_outgoing(0)
    assert isinstance(echo, NopOut) and echo.ttt == 0x42 and len(echo.data) == 8192
    assert s.echoes_dropped == 999
    s.receive(NopIn(ttt=0x43, itt=RESERVED_TAG, data=b"hi", stat_sn=100), 0)
    [echo] = s.take_outgoing(0)  # the target reads again: answered again
    assert isinstance(echo, NopOut) and echo.data == b"hi"


def test_time2wait_is_clamped_so_a_relogin_fits() -> None:
    b = Bounds(replacement_timeout=5)
    assert b.time2wait(2, 5) == 2
    assert b.time2wait(3600, 5) == 2.5 and b.time2wait(20, 0) == 0
    fuse = Bounds.for_replacement_timeout(5)
    assert (fuse.command_timeout, fuse.abort_timeout, fuse.window_timeout) == (5, 5, 5)
    assert dataclasses.replace(fuse, max_attempts=1).max_attempts == 1


def test_an_unanswered_logout_fails_the_connection() -> None:
    s = session()
    s.receive(AsyncMessage(async_event=1, parameter3=0), 0)
    assert [type(p) for p in s.take_outgoing(0)] == [LogoutRequest]
    assert s.tick(4) == []
    [event] = s.tick(5.5)
    assert isinstance(event, ConnectionFailed) and "Logout unanswered" in event.reason


def test_a_command_issued_while_the_connection_was_down_is_not_an_attempt() -> None:
    s = session()
    task = Task(lun=0, cdb=b"\x00")
    s.submit(task, 0)  # into the outbox of a connection that is already gone
    assert s.restart(login_result(), 1) == []
    assert only(s.take_outgoing(1), ScsiCommand) and task.attempts == 1
