"""One iSCSI session under trio: login, the data path, ERL 0 recovery, logout.

Tasks: one reader (PDUs in, dispatched by ITT to waiting callers), one sender (the only
writer, so PDUs leave in the order the session queued them and the reader never blocks
on a send), one ticker (NOP pings, command timeouts). A command without status in time
is aborted (ABORT TASK) and issued again on the same connection; a target that does not
answer the abort within ABORT_TIMEOUT loses the connection. On a connection failure the
session is recovered by a new login with the same ISID (TSIH 0, session reinstatement),
after DefaultTime2Wait, until the replacement timeout; then every waiting and new
command fails with SessionFailed. A caller never hangs.
"""

from __future__ import annotations

import logging
from dataclasses import replace

import trio

from userland.errors import IscsiError, LoginTimeout, ProtocolError, SessionFailed
from userland.login.machine import LoginConfig, LoginMachine, LoginResult, Redirected
from userland.login.run import MAX_REDIRECTS
from userland.pdu import LoginResponse
from userland.portal import Portal
from userland.session import (
    DEFAULT_NOP_INTERVAL,
    DEFAULT_NOP_TIMEOUT,
    DEFAULT_QUEUE_DEPTH,
    ConnectionFailed,
    Event,
    LogoutDone,
    LogoutRequested,
    Session,
    TaskDone,
    TmfDone,
)
from userland.task import Task
from userland.transport import Transport

log = logging.getLogger("iscsi_handoff.session")

DEFAULT_REPLACEMENT_TIMEOUT = 120.0
DEFAULT_COMMAND_TIMEOUT = 30.0
ABORT_TIMEOUT = 10.0
# Task Management Function responses after which the task is surely gone at the target.
TMF_FUNCTION_COMPLETE, TMF_TASK_DOES_NOT_EXIST = 0, 1
LOGOUT_TIMEOUT = 5.0


async def login_trio(portal: Portal, config: LoginConfig,
                     timeout: float) -> tuple[Transport, LoginResult]:
    """Connect and log in with the same machine the blocking path uses."""
    try:
        with trio.fail_after(timeout):
            for _ in range(MAX_REDIRECTS + 1):
                transport = await Transport.connect(portal)
                try:
                    outcome = await _login_exchange(transport, config)
                except BaseException:
                    transport.close()
                    raise
                if isinstance(outcome, LoginResult):
                    neg = outcome.negotiated
                    transport.header_digest = neg.header_digest == "CRC32C"
                    transport.data_digest = neg.data_digest == "CRC32C"
                    transport.max_recv_data_segment_length = neg.max_recv_data_segment_length
                    return transport, outcome
                transport.close()
                portal = Portal.parse(outcome.target_address, what="redirect TargetAddress")
            raise ProtocolError(f"login redirected more than {MAX_REDIRECTS} times")
    except trio.TooSlowError:
        raise LoginTimeout(f"login to {portal}: no answer within {timeout:g} s") from None


async def _login_exchange(transport: Transport,
                          config: LoginConfig) -> LoginResult | Redirected:
    machine = LoginMachine(config)
    request = machine.initial_request()
    while True:
        await transport.send([request])
        pdu, _ = await transport.receive()
        if not isinstance(pdu, LoginResponse):
            raise ProtocolError(f"expected a Login Response, got {type(pdu).__name__}")
        outcome = machine.receive(pdu)
        if isinstance(outcome, LoginResult | Redirected):
            return outcome
        request = outcome


class SessionRunner:
    def __init__(self, portal: Portal, config: LoginConfig, *,
                 queue_depth: int = DEFAULT_QUEUE_DEPTH,
                 replacement_timeout: float = DEFAULT_REPLACEMENT_TIMEOUT,
                 nop_interval: float = DEFAULT_NOP_INTERVAL,
                 nop_timeout: float = DEFAULT_NOP_TIMEOUT,
                 command_timeout: float = DEFAULT_COMMAND_TIMEOUT,
                 abort_timeout: float = ABORT_TIMEOUT,
                 login_timeout: float = 15.0) -> None:
        self.portal = portal
        self.config = config
        self.queue_depth = queue_depth
        self.replacement_timeout = replacement_timeout
        self.nop_interval = nop_interval
        self.nop_timeout = nop_timeout
        self.command_timeout = command_timeout
        self.abort_timeout = abort_timeout
        self.login_timeout = login_timeout
        self.session: Session | None = None
        self.transport: Transport | None = None
        self.recoveries = 0
        self.failed_reason: str | None = None
        self._waiters: dict[int, trio.Event] = {}
        self._issued: dict[int, float] = {}
        self._aborting: dict[int, float] = {}  # ITT -> when ABORT TASK went out
        self.aborts = 0
        self._kick = trio.Event()
        self._conn_failed = trio.Event()
        self._fail_reason = ""
        self._closing = False
        self._logout_done = trio.Event()
        self._stopped = trio.Event()

    # -- public

    async def start(self, nursery: trio.Nursery) -> LoginResult:
        """Log in (errors reach the caller as they are), then serve in ``nursery``."""
        self.transport, result = await login_trio(self.portal, self.config,
                                                  self.login_timeout)
        self.session = Session(result, queue_depth=self.queue_depth,
                               nop_interval=self.nop_interval, nop_timeout=self.nop_timeout,
                               now=trio.current_time())
        nursery.start_soon(self._serve)
        return result

    async def execute(self, task: Task) -> Task:
        """Run one command to its status; SessionFailed once the session is gone."""
        if self.failed_reason is not None:
            raise SessionFailed(self.failed_reason)
        assert self.session is not None, "start() first"
        done = trio.Event()
        self._waiters[id(task)] = done
        task.done = False
        task.error = None
        self.session.submit(task)
        self._issued[id(task)] = trio.current_time()
        self._kick.set()
        try:
            await done.wait()
        finally:
            self._waiters.pop(id(task), None)
            self._issued.pop(id(task), None)
        if task.error is not None:
            raise SessionFailed(task.error)
        return task

    async def close(self) -> None:
        """Log out (bounded wait) and stop; unfinished commands fail."""
        if self._closing:
            await self._stopped.wait()
            return
        self._closing = True
        if self.session is not None and self.failed_reason is None \
                and not self._conn_failed.is_set():
            self.session.logout()
            self._kick.set()
            with trio.move_on_after(LOGOUT_TIMEOUT):
                await self._logout_done.wait()
        self._fail("session closed")
        with trio.move_on_after(LOGOUT_TIMEOUT):
            await self._stopped.wait()

    # -- the connection's tasks

    async def _serve(self) -> None:
        try:
            while True:
                self._conn_failed = trio.Event()
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._reader)
                    nursery.start_soon(self._sender)
                    nursery.start_soon(self._ticker)
                    await self._conn_failed.wait()
                    nursery.cancel_scope.cancel()
                if self.transport is not None:
                    self.transport.close()
                    self.transport = None
                if self._closing or self.failed_reason is not None:
                    return
                log.warning("connection to %s failed: %s; recovering", self.portal,
                            self._fail_reason)
                if not await self._recover():
                    return
        finally:
            if self.transport is not None:
                self.transport.close()
            self._fail(self.failed_reason or "session closed")
            self._stopped.set()

    def _connection_failed(self, reason: str) -> None:
        if not self._conn_failed.is_set():
            self._fail_reason = reason
            self._conn_failed.set()

    async def _reader(self) -> None:
        assert self.transport is not None and self.session is not None
        transport, session = self.transport, self.session
        try:
            while True:
                pdu, placed = await transport.receive(session.data_in_buffer)
                self._handle(session.receive(pdu, trio.current_time(), placed=placed))
                self._kick.set()
        except IscsiError as exc:
            self._connection_failed(str(exc))

    async def _sender(self) -> None:
        assert self.transport is not None and self.session is not None
        transport, session = self.transport, self.session
        try:
            while True:
                await self._kick.wait()
                self._kick = trio.Event()
                pdus = session.take_outgoing()
                if pdus:
                    await transport.send(pdus)
        except IscsiError as exc:
            self._connection_failed(str(exc))

    async def _ticker(self) -> None:
        assert self.session is not None
        session = self.session
        while True:
            await trio.sleep(0.5)
            now = trio.current_time()
            self._handle(session.tick(now))
            self._kick.set()
            for itt, task in list(session.tasks.items()):
                aborted = self._aborting.get(itt)
                if aborted is not None:
                    if now - aborted > self.abort_timeout:
                        self._connection_failed(f"ABORT TASK for command {task.cdb[0]:#04x} "
                                                f"unanswered in {self.abort_timeout:g} s")
                    continue
                started = self._issued.get(id(task))
                if started is not None and now - started > self.command_timeout:
                    log.warning("command %#04x (ITT %#x) had no status in %g s: aborting it",
                                task.cdb[0], itt, self.command_timeout)
                    self._aborting[itt] = now
                    self.aborts += 1
                    session.abort(task)
                    self._kick.set()

    def _handle(self, events: list[Event]) -> None:
        for event in events:
            if isinstance(event, TaskDone):
                waiter = self._waiters.get(id(event.task))
                if waiter is not None:
                    waiter.set()
            elif isinstance(event, TmfDone):
                self._abort_done(event)
            elif isinstance(event, ConnectionFailed):
                self._connection_failed(event.reason)
            elif isinstance(event, LogoutDone):
                self._logout_done.set()
                self._connection_failed("logged out")
            elif isinstance(event, LogoutRequested):
                log.warning("target asked for a logout; will log in again")
                self._connection_failed("target requested logout")

    def _abort_done(self, event: TmfDone) -> None:
        if self._aborting.pop(event.rtt, None) is None or self.session is None:
            return
        if event.response not in (TMF_FUNCTION_COMPLETE, TMF_TASK_DOES_NOT_EXIST):
            # Not aborted: only a new connection (ERL 0) makes the task's fate certain.
            self._connection_failed(f"target refused ABORT TASK (response {event.response})")
            return
        task = self.session.reissue(event.rtt)
        if task is not None:
            self._issued[id(task)] = trio.current_time()
            log.warning("command %#04x aborted at the target; issued again as ITT %#x",
                        task.cdb[0], task.itt)
            self._kick.set()

    # -- recovery

    async def _recover(self) -> bool:
        """Log in again until the replacement timeout; True when the session is back."""
        assert self.session is not None
        started = trio.current_time()
        deadline = started + self.replacement_timeout
        wait = float(self.session.params.default_time2wait)
        attempt = 0
        while True:
            await trio.sleep(min(wait, max(0.0, deadline - trio.current_time())))
            left = deadline - trio.current_time()
            if left <= 0:
                break
            attempt += 1
            config = replace(self.config, tsih=0, initial_cmd_sn=self.session.cmd_sn,
                             exp_stat_sn=0)
            try:
                self.transport, result = await login_trio(
                    self.portal, config, min(self.login_timeout, left))
            except IscsiError as exc:
                log.warning("relogin %d to %s failed: %s", attempt, self.portal, exc)
                wait = max(1.0, wait)
                continue
            self.recoveries += 1
            now = trio.current_time()
            for key in self._issued:
                self._issued[key] = now
            self._aborting.clear()
            self.session.restart(result, now)
            log.warning("session to %s recovered after %.1f s (%d unfinished commands "
                        "reissued)", self.portal, now - started, len(self.session.tasks))
            self._kick.set()
            return True
        self._fail(f"session to {self.portal} lost and not recovered within "
                   f"{self.replacement_timeout:g} s ({self._fail_reason})")
        return False

    def _fail(self, reason: str) -> None:
        if self.failed_reason is None:
            self.failed_reason = reason
        if self.session is not None:
            for task in self.session.fail_all(self.failed_reason):
                waiter = self._waiters.get(id(task))
                if waiter is not None:
                    waiter.set()

