"""A full-feature iSCSI session on one connection, as a sans-IO state machine.

The caller submits Tasks, feeds every PDU that arrives (with ``now``), sends what
``take_outgoing`` returns in order, and calls ``tick(now)`` now and then for NOP pings.
RFC 7143 rules kept here: ITTs unique among live tasks; CmdSN never beyond MaxCmdSN
(4.2.2.1); ExpStatSN acknowledges status (4.2.2.2); immediate data and unsolicited
Data-Out within FirstBurstLength (13.10, 13.11, 13.14); R2T answered in pieces of at most
the target's MaxRecvDataSegmentLength (13.12); Data-In checked by DataSN and offset.
Error recovery level 0: a fault of the stream ends the connection; ``restart`` puts every
unfinished task back in line for a new login (6.1 of RFC 7143's recovery classes). A
fault that names one command (an answer beyond what it asked) ends that command alone.
Deadlines and counts follow ``userland.policy``; ``tick(now)`` enforces them.
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
from userland.policy import Bounds
from userland.sense import ScsiStatus
from userland.task import Task

DEFAULT_QUEUE_DEPTH = 32
DEFAULT_NOP_INTERVAL = 5.0
DEFAULT_NOP_TIMEOUT = 5.0
# Task Management Function responses after which the task is surely gone at the target.
TMF_FUNCTION_COMPLETE, TMF_TASK_DOES_NOT_EXIST = 0, 1


# -- events the caller reacts to


@dataclass(frozen=True)
class TaskDone:
    task: Task


@dataclass(frozen=True)
class ConnectionFailed:
    """ERL 0: the connection must go; the session may be recovered with a new login."""

    reason: str
    time2wait: float | None = None  # the target's, from an Async Message or Logout


@dataclass(frozen=True)
class LogoutRequested:
    """The target asked us to log out (Async Message event 1) within ``within`` s."""

    within: int


@dataclass(frozen=True)
class LogoutDone:
    response: int
    time2wait: float = 0.0


@dataclass(frozen=True)
class TmfDone:
    function: int
    rtt: int
    response: int


Event = TaskDone | ConnectionFailed | LogoutRequested | LogoutDone | TmfDone


class TaskFault(ProtocolError):
    """The target answered one command against what it asked: that command fails."""

    def __init__(self, task: Task, message: str) -> None:
        super().__init__(message)
        self.task = task


class Session:
    def __init__(self, login: LoginResult, *, queue_depth: int = DEFAULT_QUEUE_DEPTH,
                 nop_interval: float = DEFAULT_NOP_INTERVAL,
                 nop_timeout: float = DEFAULT_NOP_TIMEOUT, now: float = 0.0,
                 bounds: Bounds | None = None) -> None:
        self.queue_depth = queue_depth
        self.nop_interval = nop_interval
        self.nop_timeout = nop_timeout
        self.bounds = bounds or Bounds()
        self.tasks: dict[int, Task] = {}
        self.waiting: deque[Task] = deque()
        self.aborts = 0  # ABORT TASKs sent, for the curious
        self.echoes_dropped = 0  # target pings not answered while echoes waited to go out
        self.now = now
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
        self.last_rx = self.now = now
        self._ping_itt: int | None = None
        self._ping_sent = 0.0
        self._logout_itt: int | None = None
        self._logout_sent = 0.0
        self._logout_due: float | None = None  # the target asked for a logout by then
        self._tmf: dict[int, TaskMgmtRequest] = {}
        self._tmf_sent: dict[int, float] = {}
        self._aborting: dict[int, Task | None] = {}  # rtt -> task to reissue (None: faulted)

    # -- submitting

    def submit(self, task: Task, now: float | None = None) -> None:
        if now is not None:
            self.now = now
        if task.read_length and len(task.data) != task.read_length:
            task.data = bytearray(task.read_length)
        task.queued_at = self.now
        task.sent_at = None
        self.waiting.append(task)
        self._issue_waiting()

    def _window_open(self) -> bool:
        return sn_le(self.cmd_sn, self.max_cmd_sn) and len(self.tasks) < self.queue_depth

    def _issue_waiting(self) -> None:
        while (self.waiting and self._window_open() and self._logout_itt is None
               and self._logout_due is None):
            self._issue(self.waiting.popleft())

    def _new_itt(self) -> int:
        while True:
            itt = next(self._itts) & 0x7FFFFFFF  # never the reserved 0xffffffff
            if (itt and itt not in self.tasks and itt not in self._tmf
                    and itt not in self._aborting):
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
        self._tmf_sent[itt] = self.now
        self.aborts += 1
        self._outbox.append(tmf)

    def _abort_for_reissue(self, task: Task) -> None:
        """No status in time: ABORT TASK; its answer decides (``_tmf_done``)."""
        self._aborting[task.itt] = task
        self.abort(task)

    def _retry(self, task: Task, why: str) -> list[Event]:
        """Put ``task`` back in line, or fail it when its attempts are spent."""
        if task.attempts >= self.bounds.max_attempts:
            return self._fail(task, f"{why}; gave up after {task.attempts} attempts")
        task.reset_attempt()
        task.queued_at = self.now
        task.sent_at = None
        self.waiting.appendleft(task)
        return []

    def _fail(self, task: Task, reason: str) -> list[Event]:
        self.tasks.pop(task.itt, None)
        task.error = reason
        task.done = True
        return [TaskDone(task)]

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
        self._logout_due = None
        self._logout_sent = self.now
        self._logout_itt = self._new_itt()
        self._outbox.append(LogoutRequest(itt=self._logout_itt, reason=reason, cid=0,
                                          cmd_sn=self.cmd_sn, exp_stat_sn=self.exp_stat_sn))

    def take_outgoing(self, now: float | None = None) -> list[Pdu]:
        """What to send, in order. A command's deadline starts here (it is sent now)."""
        if now is not None:
            self.now = now
        out, self._outbox = self._outbox, []
        for pdu in out:
            if isinstance(pdu, ScsiCommand):
                task = self.tasks.get(pdu.itt)
                if task is not None:
                    task.sent_at = self.now
        return out

    # -- time

    def tick(self, now: float) -> list[Event]:
        """Deadlines (``userland.policy``) and NOP-Out pings when idle."""
        self.now = now
        b = self.bounds
        events: list[Event] = []
        if self._logout_itt is not None and now - self._logout_sent > b.abort_timeout:
            return [ConnectionFailed(f"Logout unanswered in {b.abort_timeout:g} s")]
        for itt, sent in self._tmf_sent.items():
            if now - sent > b.abort_timeout:
                tmf = self._tmf[itt]
                return [ConnectionFailed(f"Task Management Function {tmf.function} for ITT "
                                         f"{tmf.rtt:#x} unanswered in {b.abort_timeout:g} s")]
        for task in list(self.tasks.values()):
            if task.itt in self._aborting:
                continue
            if task.sent_at is None:
                if now - task.queued_at > b.window_timeout:
                    # Issued but still in the outbox: the target does not read.
                    return [ConnectionFailed(f"could not send a command in "
                                             f"{b.window_timeout:g} s (the target is not "
                                             "reading)")]
            elif now - task.sent_at > b.command_timeout:
                self._abort_for_reissue(task)
        for task in list(self.waiting):
            if now - task.queued_at > b.window_timeout:
                self.waiting.remove(task)
                why = ("the target's CmdSN window stayed closed"
                       if not sn_le(self.cmd_sn, self.max_cmd_sn) else "the queue stayed full")
                events += self._fail(task, f"command {task.cdb[0]:#04x} could not be sent in "
                                           f"{b.window_timeout:g} s ({why})")
        if self._logout_due is not None and (not self.tasks or now >= self._logout_due):
            self.logout()
        if self._ping_itt is not None:
            if now - self._ping_sent > self.nop_timeout:
                return [*events, ConnectionFailed(f"no answer to a NOP-Out ping in "
                                                  f"{self.nop_timeout:g} s")]
            return events
        if self.nop_interval > 0 and now - self.last_rx >= self.nop_interval:
            self._ping_itt = self._new_itt()
            self._ping_sent = now
            self._outbox.append(NopOut(immediate=True, itt=self._ping_itt, cmd_sn=self.cmd_sn,
                                       exp_stat_sn=self.exp_stat_sn))
        return events

    # -- receiving

    def data_in_buffer(self, itt: int, offset: int, length: int) -> memoryview | None:
        """Where a Data-In payload belongs, so the transport can receive it in place."""
        task = self.tasks.get(itt)
        if task is None or offset + length > task.read_length:
            return None  # received the slow way; _data_in then names the fault
        return memoryview(task.data)[offset:offset + length]

    def receive(self, pdu: Pdu, now: float, *, placed: bool = False) -> list[Event]:
        """Feed one PDU. ``placed``: a Data-In payload already sits in its task's buffer."""
        self.last_rx = self.now = now
        try:
            events = self._dispatch(pdu, placed)
        except TaskFault as fault:
            events = self._fault(fault.task, str(fault))
        except ProtocolError as exc:
            return [ConnectionFailed(str(exc))]
        self._issue_waiting()
        return events

    def _fault(self, task: Task, reason: str) -> list[Event]:
        """One command answered wrongly: it fails (never reissued), and is aborted at the
        target so that nothing more comes for it; until then its PDUs are dropped."""
        events = self._fail(task, f"protocol error: {reason}")
        self._aborting[task.itt] = None
        self.abort(task)
        return events

    def _window(self, pdu: Pdu, *, status: bool, gap_ok: bool = False) -> None:
        """ExpCmdSN/MaxCmdSN (4.2.2.1: ignore stale or inconsistent values), and StatSN.
        ``gap_ok``: Async Message and Reject, which some targets (IET, tgt) count in
        StatSN and others do not; Linux takes their StatSN as it comes, and so do we."""
        exp = getattr(pdu, "exp_cmd_sn", None)
        mx = getattr(pdu, "max_cmd_sn", None)
        if exp is not None and mx is not None and sn_le(exp, sn_add(mx, 1)):
            if sn_lt(self.max_cmd_sn, mx):
                self.max_cmd_sn = mx
            if sn_lt(self.exp_cmd_sn, exp):
                self.exp_cmd_sn = exp
        stat_sn = getattr(pdu, "stat_sn", None)
        if status and stat_sn is not None and sn_le(self.exp_stat_sn, stat_sn):
            if stat_sn != self.exp_stat_sn and not gap_ok:
                # A status we never saw: at ERL 0 only a new connection settles its fate.
                raise ProtocolError(f"StatSN gap: got {stat_sn}, expected {self.exp_stat_sn}")
            self.exp_stat_sn = sn_add(stat_sn, 1)

    def _dispatch(self, pdu: Pdu, placed: bool) -> list[Event]:
        if isinstance(pdu, DataIn | ScsiResponse | R2T) and pdu.itt in self._aborting \
                and pdu.itt not in self.tasks:
            self._window(pdu, status=not isinstance(pdu, R2T) and (
                not isinstance(pdu, DataIn) or pdu.has_status))
            return []  # late words about a command we already ended
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
            self._window(pdu, status=True, gap_ok=True)
            return self._async(pdu)
        if isinstance(pdu, Reject):
            self._window(pdu, status=True, gap_ok=True)
            return self._reject(pdu)
        if isinstance(pdu, TaskMgmtResponse):
            self._window(pdu, status=True)
            return self._tmf_done(pdu)
        if isinstance(pdu, LogoutResponse):
            self._window(pdu, status=True)
            if self._logout_itt is None or pdu.itt != self._logout_itt:
                raise ProtocolError(f"Logout Response for unknown ITT {pdu.itt:#x}")
            return [LogoutDone(pdu.response, pdu.time2wait)]
        raise ProtocolError(f"unexpected {type(pdu).__name__} in full feature phase")

    def _task(self, itt: int, what: str) -> Task:
        task = self.tasks.get(itt)
        if task is None:
            raise ProtocolError(f"{what} for ITT {itt:#x}, which has no live task")
        return task

    def _data_in(self, pdu: DataIn, placed: bool) -> list[Event]:
        task = self._task(pdu.itt, "Data-In")
        if pdu.data_sn != task.exp_data_sn:
            raise TaskFault(task, f"Data-In DataSN {pdu.data_sn}, expected {task.exp_data_sn} "
                                  f"(ITT {pdu.itt:#x})")
        task.exp_data_sn += 1
        n = len(pdu.data)
        if pdu.buffer_offset + n > task.read_length:
            raise TaskFault(task, f"Data-In at offset {pdu.buffer_offset}+{n} beyond the "
                                  f"{task.read_length} bytes expected")
        if task.received + n > task.read_length:
            raise TaskFault(task, f"Data-In: {task.received + n} bytes for a "
                                  f"{task.read_length}-byte read (overlapping)")
        if self.params.data_pdu_in_order and pdu.buffer_offset != task.received:
            raise TaskFault(task, f"Data-In offset {pdu.buffer_offset}, expected "
                                  f"{task.received} (DataPDUInOrder=Yes)")
        if not placed:
            task.data[pdu.buffer_offset:pdu.buffer_offset + n] = pdu.data
        task.received += n
        if not pdu.has_status:
            return []
        task.status = pdu.status
        task.residual = pdu.residual_count if pdu.underflow else (
            -pdu.residual_count if pdu.overflow else 0)
        if pdu.underflow and task.received + pdu.residual_count != task.read_length:
            raise TaskFault(task, f"Data-In: {task.received} bytes and a residual of "
                                  f"{pdu.residual_count} for a {task.read_length}-byte read")
        self._check_all_data(task)
        return self._complete(task)

    def _response(self, pdu: ScsiResponse) -> list[Event]:
        task = self._task(pdu.itt, "SCSI Response")
        task.response = pdu.response
        if pdu.response != 0:
            # 11.4.3: not completed at the target; its status and residual mean nothing.
            return self._complete(task)
        task.status = pdu.status
        try:
            task.sense = pdu.sense() if pdu.status else b""
        except ProtocolError as exc:
            raise TaskFault(task, str(exc)) from None
        task.residual = pdu.residual_count if pdu.underflow else (
            -pdu.residual_count if pdu.overflow else 0)
        self._check_all_data(task)
        return self._complete(task)

    @staticmethod
    def _check_all_data(task: Task) -> None:
        """A read that ends GOOD brought every byte it asked for, less the underflow the
        status reports (11.4.5.2, 11.7.5); with an overflow, all it asked. Otherwise the
        caller would be handed zeros the target never sent. Not GOOD: the data is not
        the caller's to use, and the residual is optional (11.4.5)."""
        if not task.read_length or task.status != ScsiStatus.GOOD:
            return
        expected = task.read_length - max(task.residual, 0)
        if task.received != expected:
            underflow = f"an underflow of {task.residual}" if task.residual > 0 else \
                "no underflow"
            raise TaskFault(task, f"status GOOD after {task.received} of "
                                  f"{task.read_length} bytes with {underflow}")

    def _complete(self, task: Task) -> list[Event]:
        del self.tasks[task.itt]
        task.done = True
        return [TaskDone(task)]

    def _r2t(self, pdu: R2T) -> None:
        task = self._task(pdu.itt, "R2T")
        if not task.write_length:
            raise TaskFault(task, f"R2T for ITT {pdu.itt:#x}, a command with no data to send")
        if pdu.r2t_sn != task.exp_r2t_sn:
            raise TaskFault(task, f"R2TSN {pdu.r2t_sn}, expected {task.exp_r2t_sn}")
        task.exp_r2t_sn += 1
        want = pdu.desired_data_transfer_length
        end = pdu.buffer_offset + want
        if want == 0:
            raise TaskFault(task, "R2T asks for 0 bytes")
        if end > task.write_length:
            raise TaskFault(task, f"R2T asks for bytes up to {end} of a "
                                  f"{task.write_length}-byte write")
        if want > self.params.max_burst_length:
            raise TaskFault(task, f"R2T asks for {want} bytes, more than MaxBurstLength "
                                  f"{self.params.max_burst_length}")
        self._data_out(task, pdu.ttt, pdu.buffer_offset, want)

    def _nop_in(self, pdu: NopIn) -> list[Event]:
        if pdu.ttt != RESERVED_TAG:  # the target pings: answer at once, echoing its data
            pending = sum(1 for p in self._outbox
                          if isinstance(p, NopOut) and p.itt == RESERVED_TAG)
            if pending >= self.bounds.max_echo_pending:
                self.echoes_dropped += 1  # it is not reading: memory is ours to bound
                return []
            data = bytes(pdu.data[:self.params.max_xmit_data_segment_length])
            self._outbox.append(NopOut(immediate=True, itt=RESERVED_TAG, ttt=pdu.ttt,
                                       lun=pdu.lun, cmd_sn=self.cmd_sn,
                                       exp_stat_sn=self.exp_stat_sn, data=data))
        elif pdu.itt != RESERVED_TAG:
            if pdu.itt != self._ping_itt:
                raise ProtocolError(f"NOP-In answers ITT {pdu.itt:#x}, a ping we never sent")
            self._ping_itt = None
        return []

    def _async(self, pdu: AsyncMessage) -> list[Event]:
        event = pdu.async_event
        if event in (AsyncEvent.LOGOUT_REQUESTED, AsyncEvent.NEGOTIATION_REQUESTED):
            # 11.9.1: log out within Parameter3 s; commands in flight may finish first.
            # Negotiation: we have nothing to renegotiate; a logout and relogin answers it.
            if self._logout_itt is not None or self._logout_due is not None:
                return []
            within = pdu.parameter3 if event == AsyncEvent.LOGOUT_REQUESTED else 0
            self._logout_due = self.now + min(float(within), self.bounds.command_timeout)
            if not self.tasks:
                self.logout()
            return [LogoutRequested(within)]
        if event in (AsyncEvent.CONNECTION_DROPPED, AsyncEvent.SESSION_DROPPED):
            what = "connection" if event == AsyncEvent.CONNECTION_DROPPED else "session"
            # Parameter2 is Time2Wait; Parameter3 (Time2Retain) matters only above ERL 0.
            return [ConnectionFailed(f"target dropped the {what} (Async Message)",
                                     float(pdu.parameter2))]
        return []  # SCSI async events (sense) and vendor events: nothing to do at ERL 0

    def _reject(self, pdu: Reject) -> list[Event]:
        itt = pdu.rejected_itt()
        reason = f"target rejected a PDU (reason 0x{pdu.reason:02x})"
        task = self.tasks.get(itt) if itt is not None else None
        if task is not None:
            raise TaskFault(task, f"{reason} of command {task.cdb[0]:#04x}")
        if itt is not None and itt == self._ping_itt:
            self._ping_itt = None  # our ping was refused: the target is alive all the same
            return []
        if itt == RESERVED_TAG or (itt is not None and itt in self._aborting):
            return []  # a ping echo, or words about a command already ended
        return [ConnectionFailed(reason)]

    def _tmf_done(self, pdu: TaskMgmtResponse) -> list[Event]:
        tmf = self._tmf.pop(pdu.itt, None)
        self._tmf_sent.pop(pdu.itt, None)
        if tmf is None:
            raise ProtocolError(f"Task Management Response for unknown ITT {pdu.itt:#x}")
        events: list[Event] = [TmfDone(tmf.function, tmf.rtt, pdu.response)]
        if tmf.rtt not in self._aborting:
            return events
        task = self._aborting.pop(tmf.rtt)
        if task is None or task.done or self.tasks.get(tmf.rtt) is not task:
            return events  # a faulted command, or its status came first
        if pdu.response not in (TMF_FUNCTION_COMPLETE, TMF_TASK_DOES_NOT_EXIST):
            # Not aborted: only a new connection (ERL 0) makes the task's fate certain.
            return [*events, ConnectionFailed(f"target refused ABORT TASK "
                                              f"(response {pdu.response})")]
        del self.tasks[tmf.rtt]
        return events + self._retry(task, f"command {task.cdb[0]:#04x} had no status in "
                                          f"{self.bounds.command_timeout:g} s")

    # -- recovery

    def unfinished(self) -> list[Task]:
        """Live tasks in CmdSN order, then those never issued."""
        live = sorted(self.tasks.values(), key=lambda t: (t.cmd_sn - self.cmd_sn) & 0xFFFFFFFF)
        return [*live, *self.waiting]

    def restart(self, login: LoginResult, now: float) -> list[Event]:
        """After a relogin (ERL 0): issue every task that had no status again, but no
        task more than ``max_attempts`` times in all. Returns the tasks that failed."""
        pending = self.unfinished()
        self.tasks.clear()
        self.waiting.clear()
        self._outbox.clear()
        self._begin(login, now)
        events: list[Event] = []
        for task in pending:
            if task.sent_at is None and task.itt != RESERVED_TAG:
                task.attempts -= 1  # issued while the connection was down: never sent
            if task.attempts >= self.bounds.max_attempts:
                events += self._fail(task, f"command {task.cdb[0]:#04x} had no status after "
                                           f"{task.attempts} attempts across relogins")
                continue
            task.reset_attempt()
            task.queued_at = now
            task.sent_at = None
            self.waiting.append(task)
        self._issue_waiting()
        return events

    def fail_all(self, reason: str) -> list[Task]:
        """Past the replacement timeout: every unfinished task ends with an error."""
        pending = self.unfinished()
        self.tasks.clear()
        self.waiting.clear()
        for task in pending:
            task.error = reason
            task.done = True
        return pending
