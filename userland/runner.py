"""One iSCSI session under trio: login, the data path, ERL 0 recovery, logout.

Tasks: one reader (PDUs in, dispatched by ITT to waiting callers), one sender (the only
writer, so PDUs leave in the order the session queued them and the reader never blocks
on a send), one ticker (the session's deadlines and NOP pings). A command without status
in time is aborted (ABORT TASK) and issued again on the same connection; a target that
does not answer the abort loses the connection. On a connection failure the session is
recovered by a new login with the same ISID (TSIH 0, session reinstatement). Every bound
is in ``userland.policy`` (stated once there and in the README): a caller never hangs.
"""

from __future__ import annotations

import logging
from dataclasses import replace

import trio

from userland.errors import ConfigError, IscsiError, LoginTimeout, ProtocolError, SessionFailed
from userland.login.machine import (
    LoginConfig,
    LoginMachine,
    LoginResult,
    Redirected,
    config_for_redirect,
    config_pinned,
)
from userland.login.run import MAX_REDIRECTS
from userland.pdu import LoginResponse
from userland.policy import DEFAULT_REPLACEMENT_TIMEOUT, Bounds
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
)
from userland.task import Task
from userland.transport import Transport

log = logging.getLogger("iscsi_handoff.session")

LOGOUT_TIMEOUT = 5.0
TICK = 0.5  # how often deadlines are looked at: they are kept to within this


async def login_trio(portal: Portal, config: LoginConfig, timeout: float, *,
                     pinned: int | None = None) -> tuple[Transport, LoginResult]:
    """Connect and log in with the same machine the blocking path uses.

    A redirect's portal group is the one due at its address (the user's or SendTargets'
    tag named the portal we were sent away from). ``pinned``: a relogin's, the portal
    group of the session's first login; wherever the login lands it must be that group
    (13.9: a reinstatement in another group is another I_T nexus, not this session).
    """
    if pinned is not None:
        config = config_pinned(replace(config, expected_tpgt=None), pinned)
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
                portal = _redirect(outcome.target_address, pinned)
                config = config_pinned(
                    config_for_redirect(config, outcome.target_address, portal.tpgt), pinned)
            raise ProtocolError(f"login redirected more than {MAX_REDIRECTS} times")
    except trio.TooSlowError:
        raise LoginTimeout(f"login to {portal}: no answer within {timeout:g} s") from None


def _redirect(address: str, pinned: int | None) -> Portal:
    try:
        portal = Portal.parse(address, what="redirect TargetAddress")
    except ConfigError as exc:  # the target's address, not the user's
        raise ProtocolError(str(exc)) from None
    if pinned is not None and portal.tpgt is not None and portal.tpgt != pinned:
        raise ProtocolError(f"relogin redirected to portal group {portal.tpgt}, but the "
                            f"session's first login was in group {pinned} (RFC 7143 13.9)")
    return portal


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
                 command_timeout: float | None = None,
                 abort_timeout: float | None = None,
                 login_timeout: float = 15.0,
                 bounds: Bounds | None = None) -> None:
        self.portal = portal
        self.config = config
        self.queue_depth = queue_depth
        bounds = bounds or Bounds.for_replacement_timeout(replacement_timeout)
        if command_timeout is not None:
            bounds = replace(bounds, command_timeout=command_timeout,
                             window_timeout=command_timeout)
        if abort_timeout is not None:
            bounds = replace(bounds, abort_timeout=abort_timeout)
        self.bounds = bounds
        self.nop_interval = nop_interval
        self.nop_timeout = nop_timeout
        self.login_timeout = login_timeout
        self.session: Session | None = None
        self.transport: Transport | None = None
        self.recoveries = 0
        self.tpgt: int | None = None  # the first login's portal group; relogins keep it
        self.failed_reason: str | None = None  # set past the replacement timeout
        self._waiters: dict[int, trio.Event] = {}
        self._kick = trio.Event()
        self._conn_failed = trio.Event()
        self._fail_reason = ""
        self._next_wait: float | None = None  # the target's Time2Wait for the next relogin
        self._down_since: float | None = None  # first failure not yet followed by progress
        self._closing = False
        self._logout_done = trio.Event()
        self._stopped = trio.Event()
        self._scope = trio.CancelScope()

    @property
    def replacement_timeout(self) -> float:
        return self.bounds.replacement_timeout

    @property
    def aborts(self) -> int:
        return self.session.aborts if self.session is not None else 0

    # -- public

    async def start(self, nursery: trio.Nursery) -> LoginResult:
        """Log in (errors reach the caller as they are), then serve in ``nursery``."""
        self.transport, result = await login_trio(self.portal, self.config,
                                                  self.login_timeout)
        self.tpgt = result.negotiated.target_portal_group_tag
        self.session = Session(result, queue_depth=self.queue_depth,
                               nop_interval=self.nop_interval, nop_timeout=self.nop_timeout,
                               now=trio.current_time(), bounds=self.bounds)
        nursery.start_soon(self._serve)
        return result

    async def execute(self, task: Task) -> Task:
        """Run one command to its status; SessionFailed when policy says it failed."""
        if self._closing:
            raise SessionFailed("session closed")
        if self.failed_reason is not None:
            raise SessionFailed(self.failed_reason)
        assert self.session is not None, "start() first"
        done = trio.Event()
        self._waiters[id(task)] = done
        task.done = False
        task.error = None
        self.session.submit(task, trio.current_time())
        self._kick.set()
        try:
            await done.wait()
        finally:
            self._waiters.pop(id(task), None)
        if task.error is not None:
            raise SessionFailed(task.error)
        return task

    async def close(self) -> None:
        """Log out (bounded wait) and stop; unfinished commands fail. During recovery:
        the relogin is cancelled and no connection is left."""
        if self._closing:
            with trio.move_on_after(LOGOUT_TIMEOUT):
                await self._stopped.wait()
            return
        self._closing = True
        if self.session is not None and self.transport is not None \
                and self.failed_reason is None and not self._conn_failed.is_set():
            self._logout_done = trio.Event()  # ours, not one the target asked for earlier
            self.session.logout()
            self._kick.set()
            with trio.move_on_after(LOGOUT_TIMEOUT):
                await self._logout_done.wait()
        self._fail("session closed")
        self._scope.cancel()
        if self.session is not None:
            with trio.move_on_after(LOGOUT_TIMEOUT):
                await self._stopped.wait()
        self._drop_transport()

    # -- the connection's tasks

    async def _serve(self) -> None:
        try:
            with self._scope:
                while True:
                    self._conn_failed = trio.Event()
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(self._reader)
                        nursery.start_soon(self._sender)
                        nursery.start_soon(self._ticker)
                        await self._conn_failed.wait()
                        nursery.cancel_scope.cancel()
                    self._drop_transport()
                    if self._closing:
                        return
                    log.warning("connection to %s failed: %s; recovering", self.portal,
                                self._fail_reason)
                    await self._recover()
        finally:
            self._drop_transport()
            self._fail(self.failed_reason or "session closed")
            self._stopped.set()

    def _drop_transport(self) -> None:
        if self.transport is not None:
            self.transport.close()
            self.transport = None

    def _connection_failed(self, reason: str, time2wait: float | None = None) -> None:
        if not self._conn_failed.is_set():
            self._fail_reason = reason
            self._next_wait = time2wait
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
                pdus = session.take_outgoing(trio.current_time())
                if pdus:
                    await transport.send(pdus)
        except IscsiError as exc:
            self._connection_failed(str(exc))

    async def _ticker(self) -> None:
        assert self.session is not None
        session = self.session
        while True:
            await trio.sleep(TICK)
            self._handle(session.tick(trio.current_time()))
            self._kick.set()

    def _handle(self, events: list[Event]) -> None:
        for event in events:
            if isinstance(event, TaskDone):
                if event.task.error is None:
                    self._down_since = None  # progress: the next failure starts a new clock
                elif event.task.attempts > 1 or event.task.error.startswith("protocol"):
                    log.warning("command %#04x failed: %s", event.task.cdb[0],
                                event.task.error)
                waiter = self._waiters.get(id(event.task))
                if waiter is not None:
                    waiter.set()
            elif isinstance(event, ConnectionFailed):
                self._connection_failed(event.reason, event.time2wait)
            elif isinstance(event, LogoutDone):
                self._logout_done.set()
                self._connection_failed("logged out", event.time2wait)
            elif isinstance(event, LogoutRequested):
                log.warning("target asked for a logout within %d s; logging out, then in "
                            "again", event.within)

    # -- recovery

    async def _recover(self) -> None:
        """Log in again. Until the replacement timeout (counted from the first failure
        not followed by progress) waiting commands wait; past it they fail, new ones fail
        at once, and relogins go on with backoff until one succeeds or close()."""
        assert self.session is not None
        now = trio.current_time()
        if self._down_since is None:
            self._down_since = now
        deadline = self._down_since + self.bounds.replacement_timeout
        asked = (self._next_wait if self._next_wait is not None
                 else float(self.session.params.default_time2wait))
        wait = asked
        backoff = self.bounds.backoff_min
        attempt = 0
        while True:
            left = deadline - trio.current_time()
            if left > 0:
                await trio.sleep(self.bounds.time2wait(wait, left))
                left = deadline - trio.current_time()
            if left <= 0:
                if self.failed_reason is None:
                    self._fail(f"session to {self.portal} lost and not recovered within "
                               f"{self.bounds.replacement_timeout:g} s ({self._fail_reason})")
                    log.warning("%s; still trying to log in again", self.failed_reason)
                else:
                    await trio.sleep(backoff)
                    backoff = min(2 * backoff, self.bounds.backoff_max)
            attempt += 1
            config = replace(self.config, tsih=0, initial_cmd_sn=self.session.cmd_sn,
                             exp_stat_sn=0)
            timeout = min(self.login_timeout, left) if left > 0 else self.login_timeout
            try:
                self.transport, result = await login_trio(self.portal, config,
                                                          max(1.0, timeout), pinned=self.tpgt)
            except IscsiError as exc:
                log.info("relogin %d to %s failed: %s", attempt, self.portal, exc)
                wait = 1.0
                continue
            break
        self.recoveries += 1
        now = trio.current_time()
        failed = self.session.restart(result, now)
        if self.failed_reason is not None:
            log.warning("session to %s is back; serving again", self.portal)
            self.failed_reason = None
        else:
            log.warning("session to %s recovered after %.1f s (%d unfinished commands "
                        "reissued)", self.portal, now - self._down_since,
                        len(self.session.tasks) + len(self.session.waiting))
        self._handle(failed)
        self._kick.set()

    def _fail(self, reason: str) -> None:
        if self.failed_reason is None:
            self.failed_reason = reason
        if self.session is not None:
            for task in self.session.fail_all(self.failed_reason):
                waiter = self._waiters.get(id(task))
                if waiter is not None:
                    waiter.set()
