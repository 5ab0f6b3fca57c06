"""A full-feature iSCSI session on one connection, as a sans-IO state machine.

The caller submits Tasks, feeds every PDU that arrives (with ``now``), sends what
``take_outgoing`` returns in order, and calls ``tick(now)`` now and then for NOP pings.
RFC 7143 rules kept here: ITTs unique among live tasks; CmdSN never beyond MaxCmdSN
(4.2.2.1); ExpStatSN acknowledges status (4.2.2.2); immediate data and unsolicited
Data-Out within FirstBurstLength (13.10, 13.11, 13.14); R2T answered in pieces of at most
the target's MaxRecvDataSegmentLength (13.12); Data-In checked by DataSN and offset.
Error recovery level 0: any protocol fault ends the connection; ``restart`` puts every
unfinished task back in line for a new login (6.1 of RFC 7143's recovery classes).
"""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass

from userland.errors import ProtocolError
from userland.login.machine import LoginResult
from userland.pdu import (
    R2T,
    RESERVED_TAG,
    AsyncEvent,
    AsyncMessage,
    DataIn,
    DataOut,
    LogoutReason,
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
    TmfFunction,
    sn_add,
    sn_le,
    sn_lt,
)
from userland.task import Task

DEFAULT_QUEUE_DEPTH = 32
DEFAULT_NOP_INTERVAL = 5.0
DEFAULT_NOP_TIMEOUT = 5.0


# -- events the caller reacts to


@dataclass(frozen=True)
class TaskDone:
    task: Task


@dataclass(frozen=True)
class ConnectionFailed:
    """ERL 0: the connection must go; the session may be recovered with a new login."""

    reason: str


@dataclass(frozen=True)
class LogoutRequested:
    """The target asked us to log out (Async Message event 1) within ``time2wait`` s."""

    time2wait: int


@dataclass(frozen=True)
class LogoutDone:
    response: int


@dataclass(frozen=True)
class TmfDone:
    function: int
    rtt: int
    response: int


Event = TaskDone | ConnectionFailed | LogoutRequested | LogoutDone | TmfDone


class Session:
    def __init__(self, login: LoginResult, *, queue_depth: int = DEFAULT_QUEUE_DEPTH,
                 nop_interval: float = DEFAULT_NOP_INTERVAL,
                 nop_timeout: float = DEFAULT_NOP_TIMEOUT, now: float = 0.0) -> None:
        self.queue_depth = queue_depth
        self.nop_interval = nop_interval
        self.nop_timeout = nop_timeout
        self.tasks: dict[int, Task] = {}
        self.waiting: deque[Task] = deque()
        self._itts = itertools.count(1)
        self._outbox: list[Pdu] = []
        self._begin(login, now)

    def _begin(self, login: LoginResult, now: float) -> None:
        self.login = login
        self.params = login.negotiated
        self.cmd_sn = login.cmd_sn
        self.exp_cmd_sn = login.cmd_sn
        self.max_cmd_sn = login.max_cmd_sn
        self.exp_stat_sn = login.exp_stat_sn
        self.last_rx = now
        self._ping_itt: int | None = None
        self._ping_sent = 0.0
        self._logout_itt: int | None = None
        self._tmf: dict[int, TaskMgmtRequest] = {}

    # -- submitting

    def submit(self, task: Task) -> None:
        if task.read_length and len(task.data) != task.read_length:
            task.data = bytearray(task.read_length)
        self.waiting.append(task)
        self._issue_waiting()

    def _window_open(self) -> bool:
        return sn_le(self.cmd_sn, self.max_cmd_sn) and len(self.tasks) < self.queue_depth

    def _issue_waiting(self) -> None:
        while self.waiting and self._window_open() and self._logout_itt is None:
            self._issue(self.waiting.popleft())

    def _new_itt(self) -> int:
        while True:
            itt = next(self._itts) & 0x7FFFFFFF  # never the reserved 0xffffffff
            if itt and itt not in self.tasks and itt not in self._tmf:
                return itt

    def _issue(self, task: Task) -> None:
        task.itt = self._new_itt()
        task.cmd_sn = self.cmd_sn
        task.attempts += 1
        self.cmd_sn = sn_add(self.cmd_sn, 1)
        self.tasks[task.itt] = task
        p = self.params
        length = task.write_length
        immediate = unsolicited = 0
        if length:
            if p.immediate_data:
                immediate = min(length, p.first_burst_length, p.max_xmit_data_segment_length)
            unsolicited = immediate if p.initial_r2t else min(length, p.first_burst_length)
        data: bytes | memoryview = b""
        if immediate and task.write_data is not None:
            data = memoryview(task.write_data)[:immediate]
        cdb = task.cdb.ljust(16, b"\0")
        self._outbox.append(ScsiCommand(
            final=unsolicited == immediate, read=task.read_length > 0, write=length > 0,
            lun=task.lun, itt=task.itt,
            expected_data_transfer_length=length or task.read_length,
            cmd_sn=task.cmd_sn, exp_stat_sn=self.exp_stat_sn, cdb=cdb[:16], data=data))
        task.write_sent = immediate
        if unsolicited > immediate:
            self._data_out(task, RESERVED_TAG, immediate, unsolicited - immediate)

    def _data_out(self, task: Task, ttt: int, offset: int, length: int) -> None:
        """One sequence of Data-Out PDUs, each at most the target's MaxRecvDSL."""
        assert task.write_data is not None
        view = memoryview(task.write_data)
        piece = self.params.max_xmit_data_segment_length
        end = offset + length
        for data_sn, start in enumerate(range(offset, end, piece)):
            stop = min(start + piece, end)
            self._outbox.append(DataOut(
                final=stop == end, lun=task.lun, itt=task.itt, ttt=ttt,
                exp_stat_sn=self.exp_stat_sn, data_sn=data_sn, buffer_offset=start,
                data=view[start:stop]))
        task.write_sent = max(task.write_sent, end)

    def abort(self, task: Task, function: int = TmfFunction.ABORT_TASK) -> None:
        """ABORT TASK (or LOGICAL UNIT RESET with the task's LUN)."""
        itt = self._new_itt()
        tmf = TaskMgmtRequest(immediate=True, function=function, lun=task.lun, itt=itt,
                              rtt=task.itt if function == TmfFunction.ABORT_TASK
                              else RESERVED_TAG,
                              cmd_sn=self.cmd_sn, exp_stat_sn=self.exp_stat_sn,
                              ref_cmd_sn=task.cmd_sn, exp_data_sn=task.exp_data_sn)
        self._tmf[itt] = tmf
        self._outbox.append(tmf)

    def reissue(self, itt: int) -> Task | None:
        """After ABORT TASK ended the task at the target: issue it again (new ITT, new
        CmdSN). None when it is no longer live (its status came first)."""
        task = self.tasks.pop(itt, None)
        if task is None:
            return None
        task.reset_attempt()
        self.waiting.appendleft(task)
        self._issue_waiting()
        return task

    def logout(self, reason: int = LogoutReason.CLOSE_SESSION) -> None:
        self._logout_itt = self._new_itt()
        self._outbox.append(LogoutRequest(itt=self._logout_itt, reason=reason, cid=0,
                                          cmd_sn=self.cmd_sn, exp_stat_sn=self.exp_stat_sn))

    def take_outgoing(self) -> list[Pdu]:
        out, self._outbox = self._outbox, []
        return out

    # -- time

    def tick(self, now: float) -> list[Event]:
        """NOP-Out pings when idle; a ping unanswered in time fails the connection."""
        if self._ping_itt is not None:
            if now - self._ping_sent > self.nop_timeout:
                return [ConnectionFailed(f"no answer to a NOP-Out ping in "
                                         f"{self.nop_timeout:g} s")]
            return []
        if self.nop_interval > 0 and now - self.last_rx >= self.nop_interval:
            self._ping_itt = self._new_itt()
            self._ping_sent = now
            self._outbox.append(NopOut(immediate=True, itt=self._ping_itt, cmd_sn=self.cmd_sn,
                                       exp_stat_sn=self.exp_stat_sn))
        return []

    # -- receiving

    def data_in_buffer(self, itt: int, offset: int, length: int) -> memoryview | None:
        """Where a Data-In payload belongs, so the transport can receive it in place."""
        task = self.tasks.get(itt)
        if task is None or offset + length > task.read_length:
            return None  # received the slow way; _data_in then names the fault
        return memoryview(task.data)[offset:offset + length]

    def receive(self, pdu: Pdu, now: float, *, placed: bool = False) -> list[Event]:
        """Feed one PDU. ``placed``: a Data-In payload already sits in its task's buffer."""
        self.last_rx = now
        try:
            events = self._dispatch(pdu, placed)
        except ProtocolError as exc:
            return [ConnectionFailed(str(exc))]
        self._issue_waiting()
        return events

    def _window(self, pdu: Pdu, *, status: bool) -> None:
        """ExpCmdSN/MaxCmdSN (4.2.2.1: ignore stale or inconsistent values), and StatSN."""
        exp = getattr(pdu, "exp_cmd_sn", None)
        mx = getattr(pdu, "max_cmd_sn", None)
        if exp is not None and mx is not None and sn_le(exp, sn_add(mx, 1)):
            if sn_lt(self.max_cmd_sn, mx):
                self.max_cmd_sn = mx
            if sn_lt(self.exp_cmd_sn, exp):
                self.exp_cmd_sn = exp
        stat_sn = getattr(pdu, "stat_sn", None)
        if status and stat_sn is not None and sn_le(self.exp_stat_sn, stat_sn):
            self.exp_stat_sn = sn_add(stat_sn, 1)

    def _dispatch(self, pdu: Pdu, placed: bool) -> list[Event]:
        if isinstance(pdu, DataIn):
            self._window(pdu, status=pdu.has_status)
            return self._data_in(pdu, placed)
        if isinstance(pdu, ScsiResponse):
            self._window(pdu, status=True)
            return self._response(pdu)
        if isinstance(pdu, R2T):
            self._window(pdu, status=False)
            self._r2t(pdu)
            return []
        if isinstance(pdu, NopIn):
            self._window(pdu, status=pdu.itt != RESERVED_TAG)
            return self._nop_in(pdu)
        if isinstance(pdu, AsyncMessage):
            self._window(pdu, status=False)
            return self._async(pdu)
        if isinstance(pdu, Reject):
            self._window(pdu, status=False)
            return self._reject(pdu)
        if isinstance(pdu, TaskMgmtResponse):
            self._window(pdu, status=True)
            tmf = self._tmf.pop(pdu.itt, None)
            if tmf is None:
                raise ProtocolError(f"Task Management Response for unknown ITT {pdu.itt:#x}")
            return [TmfDone(tmf.function, tmf.rtt, pdu.response)]
        if isinstance(pdu, LogoutResponse):
            self._window(pdu, status=True)
            if pdu.itt != self._logout_itt:
                raise ProtocolError(f"Logout Response for unknown ITT {pdu.itt:#x}")
            return [LogoutDone(pdu.response)]
        raise ProtocolError(f"unexpected {type(pdu).__name__} in full feature phase")

    def _task(self, itt: int, what: str) -> Task:
        task = self.tasks.get(itt)
        if task is None:
            raise ProtocolError(f"{what} for ITT {itt:#x}, which has no live task")
        return task

    def _data_in(self, pdu: DataIn, placed: bool) -> list[Event]:
        task = self._task(pdu.itt, "Data-In")
        if pdu.data_sn != task.exp_data_sn:
            raise ProtocolError(f"Data-In DataSN {pdu.data_sn}, expected {task.exp_data_sn} "
                                f"(ITT {pdu.itt:#x})")
        task.exp_data_sn += 1
        n = len(pdu.data)
        if pdu.buffer_offset + n > task.read_length:
            raise ProtocolError(f"Data-In at offset {pdu.buffer_offset}+{n} beyond the "
                                f"{task.read_length} bytes expected")
        if self.params.data_pdu_in_order and pdu.buffer_offset != task.received:
            raise ProtocolError(f"Data-In offset {pdu.buffer_offset}, expected "
                                f"{task.received} (DataPDUInOrder=Yes)")
        if not placed:
            task.data[pdu.buffer_offset:pdu.buffer_offset + n] = pdu.data
        task.received += n
        if not pdu.has_status:
            return []
        task.status = pdu.status
        task.residual = pdu.residual_count if pdu.underflow else (
            -pdu.residual_count if pdu.overflow else 0)
        return self._complete(task)

    def _response(self, pdu: ScsiResponse) -> list[Event]:
        task = self._task(pdu.itt, "SCSI Response")
        task.response = pdu.response
        task.status = pdu.status
        task.sense = pdu.sense() if pdu.status else b""
        task.residual = pdu.residual_count if pdu.underflow else (
            -pdu.residual_count if pdu.overflow else 0)
        return self._complete(task)

    def _complete(self, task: Task) -> list[Event]:
        del self.tasks[task.itt]
        task.done = True
        return [TaskDone(task)]

    def _r2t(self, pdu: R2T) -> None:
        task = self._task(pdu.itt, "R2T")
        if not task.write_length:
            raise ProtocolError(f"R2T for ITT {pdu.itt:#x}, a command with no data to send")
        if pdu.r2t_sn != task.exp_r2t_sn:
            raise ProtocolError(f"R2TSN {pdu.r2t_sn}, expected {task.exp_r2t_sn}")
        task.exp_r2t_sn += 1
        end = pdu.buffer_offset + pdu.desired_data_transfer_length
        if end > task.write_length:
            raise ProtocolError(f"R2T asks for bytes up to {end} of a {task.write_length}-byte "
                                "write")
        if pdu.desired_data_transfer_length > self.params.max_burst_length:
            raise ProtocolError(f"R2T asks for {pdu.desired_data_transfer_length} bytes, more "
                                f"than MaxBurstLength {self.params.max_burst_length}")
        self._data_out(task, pdu.ttt, pdu.buffer_offset, pdu.desired_data_transfer_length)

    def _nop_in(self, pdu: NopIn) -> list[Event]:
        if pdu.ttt != RESERVED_TAG:  # the target pings: answer at once, echoing its data
            self._outbox.append(NopOut(immediate=True, itt=RESERVED_TAG, ttt=pdu.ttt,
                                       lun=pdu.lun, cmd_sn=self.cmd_sn,
                                       exp_stat_sn=self.exp_stat_sn, data=bytes(pdu.data)))
        elif pdu.itt != RESERVED_TAG:
            if pdu.itt != self._ping_itt:
                raise ProtocolError(f"NOP-In answers ITT {pdu.itt:#x}, a ping we never sent")
            self._ping_itt = None
        return []

    def _async(self, pdu: AsyncMessage) -> list[Event]:
        event = pdu.async_event
        if event == AsyncEvent.LOGOUT_REQUESTED:
            return [LogoutRequested(pdu.parameter3)]
        if event in (AsyncEvent.CONNECTION_DROPPED, AsyncEvent.SESSION_DROPPED):
            what = "connection" if event == AsyncEvent.CONNECTION_DROPPED else "session"
            return [ConnectionFailed(f"target dropped the {what} (Async Message)")]
        if event == AsyncEvent.NEGOTIATION_REQUESTED:
            # We have nothing to renegotiate; a clean logout and relogin is the answer.
            return [LogoutRequested(0)]
        return []  # SCSI async events (sense) and vendor events: nothing to do at ERL 0

    def _reject(self, pdu: Reject) -> list[Event]:
        itt = pdu.rejected_itt()
        task = self.tasks.get(itt) if itt is not None else None
        reason = f"target rejected a PDU (reason 0x{pdu.reason:02x})"
        if task is not None:
            return [ConnectionFailed(f"{reason} for ITT {itt:#x}")]
        return [ConnectionFailed(reason)]

    # -- recovery

    def unfinished(self) -> list[Task]:
        """Live tasks in CmdSN order, then those never issued."""
        live = sorted(self.tasks.values(), key=lambda t: (t.cmd_sn - self.cmd_sn) & 0xFFFFFFFF)
        return [*live, *self.waiting]

    def restart(self, login: LoginResult, now: float) -> None:
        """After a relogin (ERL 0): issue every task that had no status again."""
        pending = self.unfinished()
        self.tasks.clear()
        self.waiting.clear()
        self._outbox.clear()
        self._begin(login, now)
        for task in pending:
            task.reset_attempt()
            self.waiting.append(task)
        self._issue_waiting()

    def fail_all(self, reason: str) -> list[Task]:
        """Past the replacement timeout: every unfinished task ends with an error."""
        pending = self.unfinished()
        self.tasks.clear()
        self.waiting.clear()
        for task in pending:
            task.error = reason
            task.done = True
        return pending
