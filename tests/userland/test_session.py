"""The full-feature session state machine, with bytes alone: no target, no sockets."""

from __future__ import annotations

import dataclasses
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from userland.keys import Negotiator
from userland.login.machine import LoginResult
from userland.pdu import (
    R2T,
    RESERVED_TAG,
    DataIn,
    DataOut,
    NopIn,
    NopOut,
    ScsiCommand,
    ScsiResponse,
    TaskMgmtRequest,
)
from userland.session import ConnectionFailed, Session, TaskDone
from userland.task import Task


def login_result(**params: Any) -> LoginResult:
    neg = dataclasses.replace(Negotiator().result(), **params)
    return LoginResult(negotiated=neg, isid=b"\x80\0\0\0\0\1", tsih=1, cid=0, cmd_sn=10,
                       exp_stat_sn=100, max_cmd_sn=40, auth_method="None")


def commands(s: Session) -> list[ScsiCommand]:
    out = s.take_outgoing()
    assert all(isinstance(p, ScsiCommand) for p in out)
    return [p for p in out if isinstance(p, ScsiCommand)]


def data_in(task: Task, sn: int, offset: int, data: bytes, *, status: bool = False,
            stat_sn: int = 100) -> DataIn:
    return DataIn(itt=task.itt, data_sn=sn, buffer_offset=offset, data=data, final=status,
                  has_status=status, stat_sn=stat_sn, exp_cmd_sn=11, max_cmd_sn=41)


def test_read_reassembles_data_in_and_acknowledges_status() -> None:
    s = Session(login_result())
    task = Task(lun=1 << 48, cdb=b"\x28" + bytes(9), read_length=12)
    s.submit(task)
    [cmd] = s.take_outgoing()
    assert isinstance(cmd, ScsiCommand) and cmd.read and not cmd.write
    assert cmd.cmd_sn == 10 and cmd.exp_stat_sn == 100 and cmd.expected_data_transfer_length == 12
    assert s.receive(data_in(task, 0, 0, b"abcd"), 0) == []
    assert s.receive(data_in(task, 1, 4, b"efgh"), 0) == []
    events = s.receive(data_in(task, 2, 8, b"ijkl", status=True, stat_sn=100), 0)
    assert events == [TaskDone(task)]
    assert bytes(task.data) == b"abcdefghijkl" and task.status == 0
    assert s.exp_stat_sn == 101 and s.max_cmd_sn == 41


@given(st.lists(st.integers(1, 50), min_size=1, max_size=30))
def test_any_split_of_data_in_reassembles(sizes: list[int]) -> None:
    payload = bytes(i % 251 for i in range(sum(sizes)))
    s = Session(login_result())
    task = Task(lun=0, cdb=b"\x28", read_length=len(payload))
    s.submit(task)
    s.take_outgoing()
    offset = 0
    for sn, size in enumerate(sizes):
        last = sn == len(sizes) - 1
        events = s.receive(data_in(task, sn, offset, payload[offset:offset + size],
                                   status=last), 0)
        offset += size
    assert events == [TaskDone(task)] and bytes(task.data) == payload


def test_data_in_faults_fail_the_command_and_unknown_itts_the_connection() -> None:
    s = Session(login_result())
    for (sn, offset, data), words in (((1, 0, b"abcd"), "DataSN 1, expected 0"),
                                      ((0, 4, b"abcdefgh"), "beyond")):
        task = Task(lun=0, cdb=b"\x28", read_length=8)
        s.submit(task)
        s.take_outgoing()
        [event] = s.receive(data_in(task, sn, offset, data), 0)
        assert event == TaskDone(task) and task.error is not None and words in task.error
        [abort] = s.take_outgoing()  # the target is told to forget it
        assert isinstance(abort, TaskMgmtRequest) and abort.rtt == task.itt
    [event] = s.receive(DataIn(itt=999, data=b"x"), 0)
    assert isinstance(event, ConnectionFailed) and "no live task" in event.reason


def test_write_immediate_unsolicited_and_r2t_pieces() -> None:
    s = Session(login_result(immediate_data=True, initial_r2t=False, first_burst_length=8192,
                             max_xmit_data_segment_length=4096, max_burst_length=65536))
    payload = bytes(range(256)) * 79 + b"tail"  # 20228 bytes
    task = Task(lun=0, cdb=b"\x2a", write_data=payload)
    s.submit(task)
    cmd, unsolicited = s.take_outgoing()
    assert isinstance(cmd, ScsiCommand) and cmd.write and not cmd.final
    assert bytes(cmd.data) == payload[:4096]
    assert isinstance(unsolicited, DataOut) and unsolicited.final
    assert unsolicited.ttt == RESERVED_TAG and unsolicited.buffer_offset == 4096
    assert unsolicited.data_sn == 0 and bytes(unsolicited.data) == payload[4096:8192]
    s.receive(R2T(itt=task.itt, ttt=0x77, r2t_sn=0, buffer_offset=8192,
                  desired_data_transfer_length=len(payload) - 8192, exp_cmd_sn=11,
                  max_cmd_sn=41), 0)
    outs = [o for o in s.take_outgoing() if isinstance(o, DataOut)]
    assert [o.buffer_offset for o in outs] == [8192, 12288, 16384, 20480][:len(outs)]
    assert all(isinstance(o, DataOut) and o.ttt == 0x77 for o in outs)
    assert [o.data_sn for o in outs] == list(range(len(outs)))
    assert [o.final for o in outs] == [False] * (len(outs) - 1) + [True]
    assert b"".join(bytes(o.data) for o in outs) == payload[8192:]
    done = s.receive(ScsiResponse(itt=task.itt, stat_sn=100, exp_cmd_sn=11, max_cmd_sn=41), 0)
    assert done == [TaskDone(task)]


def test_write_with_initial_r2t_and_no_immediate_data_waits_for_r2t() -> None:
    s = Session(login_result(immediate_data=False, initial_r2t=True, first_burst_length=8192,
                             max_xmit_data_segment_length=4096, max_burst_length=16384))
    task = Task(lun=0, cdb=b"\x2a", write_data=bytes(10000))
    s.submit(task)
    [cmd] = s.take_outgoing()
    assert isinstance(cmd, ScsiCommand) and cmd.final and not cmd.data
    [event] = s.receive(R2T(itt=task.itt, ttt=1, r2t_sn=0, buffer_offset=0,
                            desired_data_transfer_length=20000), 0)
    assert event == TaskDone(task) and task.error is not None and "20000" in task.error


def test_cmd_sn_window_holds_commands_back() -> None:
    s = Session(dataclasses.replace(login_result(), max_cmd_sn=11))
    tasks = [Task(lun=0, cdb=b"\x00") for _ in range(4)]
    for t in tasks:
        s.submit(t)
    assert [p.cmd_sn for p in commands(s)] == [10, 11]
    assert len(s.waiting) == 2
    s.receive(ScsiResponse(itt=tasks[0].itt, stat_sn=100, exp_cmd_sn=12, max_cmd_sn=12), 0)
    assert [p.cmd_sn for p in commands(s)] == [12]
    # A window update that goes backwards is ignored (RFC 7143 4.2.2.1).
    s.receive(ScsiResponse(itt=tasks[1].itt, stat_sn=101, exp_cmd_sn=12, max_cmd_sn=5), 0)
    assert s.max_cmd_sn == 12 and s.take_outgoing() == []


def test_queue_depth_bounds_outstanding_commands() -> None:
    s = Session(login_result(), queue_depth=2)
    for _ in range(5):
        s.submit(Task(lun=0, cdb=b"\x00"))
    assert len(s.take_outgoing()) == 2 and len(s.waiting) == 3


def test_nop_in_ping_is_answered_and_idle_connection_is_pinged() -> None:
    s = Session(login_result(), nop_interval=5, nop_timeout=5, now=0)
    s.receive(NopIn(ttt=0x42, itt=RESERVED_TAG, data=b"hi", stat_sn=100), 1)
    [reply] = s.take_outgoing()
    assert isinstance(reply, NopOut) and reply.ttt == 0x42 and reply.itt == RESERVED_TAG
    assert reply.data == b"hi" and s.exp_stat_sn == 100  # unsolicited NOP-In: no advance
    assert s.tick(3) == [] and s.take_outgoing() == []
    assert s.tick(6.5) == []
    [ping] = s.take_outgoing()
    assert isinstance(ping, NopOut) and ping.itt != RESERVED_TAG and ping.immediate
    [failed] = s.tick(12)
    assert isinstance(failed, ConnectionFailed) and "NOP-Out" in failed.reason
    s.receive(NopIn(itt=ping.itt, stat_sn=100), 12.1)  # the answer clears the ping
    assert s.tick(13) == []


def test_restart_reissues_unfinished_commands_in_order() -> None:
    s = Session(login_result())
    reads = [Task(lun=0, cdb=bytes([0x28, i]), read_length=4) for i in range(3)]
    for t in reads:
        s.submit(t)
    s.take_outgoing()
    s.receive(data_in(reads[1], 0, 0, b"done", status=True), 0)
    s.receive(data_in(reads[0], 0, 0, b"ha"), 0)  # half done, then the connection dies
    s.restart(dataclasses.replace(login_result(), cmd_sn=500, max_cmd_sn=600,
                                  exp_stat_sn=7), 1)
    again = commands(s)
    assert [p.cdb[1] for p in again] == [0, 2]
    assert [p.cmd_sn for p in again] == [500, 501] and all(p.exp_stat_sn == 7 for p in again)
    assert reads[0].received == 0 and reads[0].attempts == 2 and reads[1].attempts == 1
    s.receive(data_in(reads[0], 0, 0, b"full", status=True, stat_sn=7), 2)
    assert bytes(reads[0].data) == b"full"


def test_fail_all_ends_every_waiting_task() -> None:
    s = Session(dataclasses.replace(login_result(), max_cmd_sn=10))
    tasks = [Task(lun=0, cdb=b"\x00") for _ in range(3)]
    for t in tasks:
        s.submit(t)
    failed = s.fail_all("gone")
    assert failed == tasks and all(t.done and t.error == "gone" for t in tasks)
