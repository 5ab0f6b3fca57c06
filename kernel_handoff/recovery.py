"""Keep kernel sessions alive: answer each CONN_ERROR with a userland relogin and a rebind.

The kernel multicasts CONN_ERROR{sid, cid, error} and stops the connection itself; its
session goes FAILED and I/O waits, up to SESS_RECOVERY_TMO. For one of our sessions:
STOP_CONN(RECOVER), GET_STATS (the kernel's CmdSN, which sysfs does not show, is
initial_cmdsn + scsicmd_pdus), wait DefaultTime2Wait, log in again on a new socket with
the same ISID, TSIH 0 and that CmdSN, BIND_CONN it to the same sid/cid, SET_PARAM,
START_CONN. Failed attempts are retried until the replacement timeout; past it the
kernel has failed the queued I/O, and we keep trying at a slower pace, as iscsid does.
INVALID_HOST ends the session. Events for sessions not ours (open-iscsi's) are ignored.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from kernel_handoff import uevent as ue
from kernel_handoff.errors import KernelIscsiError
from kernel_handoff.handoff import KernelSession, bind_and_start
from kernel_handoff.netlink import IscsiNetlink
from kernel_handoff.params import SessionFacts, SessionTimers
from kernel_handoff.uevent import (
    ConnErr,
    ConnErrorEvent,
    Event,
    KernelEvent,
    RecvPduEvent,
    SessionEvent,
)
from userland.errors import IscsiError, SessionFailed
from userland.login.machine import LoginConfig
from userland.login.run import LoggedIn, login
from userland.pdu import Opcode, sn_add
from userland.portal import Portal

log = logging.getLogger("iscsi_handoff.kernel")

SLOW_RETRY = 10.0  # seconds between attempts once the replacement timeout has passed
MIN_RETRY = 1.0
ASYNC_REQUEST_LOGOUT = 1

Login = Callable[[Portal, LoginConfig, float], LoggedIn]


def _login(portal: Portal, config: LoginConfig, timeout: float) -> LoggedIn:
    return login(portal, config, timeout=timeout)


@dataclass
class Keeper:
    """One session we own: how to log in again, and what happened to it."""

    session: KernelSession
    portal: Portal  # the portal the user gave: a redirect is followed anew each time
    config: LoginConfig
    timers: SessionTimers
    login_timeout: float = 15.0
    recoveries: int = 0
    last_recovery_seconds: float | None = None
    ended: str | None = None  # why the session is over, once it is
    conn_up: bool = True  # False from a connection error until the rebind succeeds

    @property
    def sid(self) -> int:
        return self.session.sid


class Stopped(Exception):
    """A watched signal came while recovering: the caller tears down."""


class SessionGuard:
    """The foreground loop: dispatch kernel events to the sessions we keep."""

    def __init__(self, nl: IscsiNetlink, keepers: list[Keeper], *,
                 login_fn: Login = _login,
                 on_recovered: Callable[[Keeper], None] | None = None) -> None:
        self.nl = nl
        self.keepers = {k.sid: k for k in keepers}
        self.login_fn = login_fn
        self.on_recovered = on_recovered
        self._deferred: list[KernelEvent] = []

    def live(self) -> list[Keeper]:
        return [k for k in self.keepers.values() if k.ended is None]

    def run(self) -> None:
        """Until a watched signal comes (nl.stop_signal) or every session has ended."""
        while self.live() and self.nl.stop_signal is None:
            event = self._deferred.pop(0) if self._deferred else self.nl.next_event(None)
            if event is None:
                continue
            try:
                self.dispatch(event)
            except Stopped:
                return

    def dispatch(self, event: KernelEvent) -> None:
        keeper = self.keepers.get(getattr(event, "sid", -1))
        if keeper is None or keeper.ended is not None:
            return  # someone else's session (open-iscsi's), or one already over
        if isinstance(event, ConnErrorEvent):
            self.recover(keeper, event.error_name, invalid_host=event.error ==
                         ConnErr.INVALID_HOST)
        elif isinstance(event, SessionEvent) and event.kind == Event.DESTROY_SESSION:
            keeper.ended = "destroyed by another process (logged out elsewhere)"
            log.warning("session %d was destroyed by another process", keeper.sid)
        elif isinstance(event, SessionEvent) and event.kind == Event.UNBIND_SESSION:
            log.info("session %d: its disks were removed by another process", keeper.sid)
        elif isinstance(event, RecvPduEvent) and event.opcode == Opcode.ASYNC_MESSAGE:
            code = event.bhs[36]
            log.warning("session %d: target sent Async Message event %d", keeper.sid, code)
            if code == ASYNC_REQUEST_LOGOUT:
                # The target wants this connection gone: a relogin (session
                # reinstatement, same ISID) replaces it without losing the disks.
                self.recover(keeper, "target requested logout", stop_first=True)

    # -- recovery

    def recover(self, keeper: Keeper, why: str, *, invalid_host: bool = False,
                stop_first: bool = True) -> None:
        s = keeper.session
        began = time.monotonic()
        log.warning("session %d: connection failed (%s); recovering", s.sid, why)
        keeper.conn_up = False
        if invalid_host:
            keeper.ended = "the kernel reports its SCSI host invalid (INVALID_HOST)"
            raise SessionFailed(f"session {s.sid}: {keeper.ended}")
        if stop_first:
            self.nl.request(ue.stop_conn(s.transport_handle, s.sid, s.cid,
                                         ue.StopConn.RECOVER))
        cmd_sn = self.next_cmd_sn(s)
        deadline = began + keeper.timers.replacement_timeout
        wait = max(float(s.negotiated.default_time2wait), 0.0)
        attempt = 0
        while True:
            if not self._pause(wait, failing_sid=s.sid):
                raise Stopped
            attempt += 1
            try:
                self._relogin(keeper, cmd_sn)
            except IscsiError as exc:
                now = time.monotonic()
                late = now >= deadline
                log.warning("session %d: relogin attempt %d failed: %s%s", s.sid, attempt,
                            exc, " (replacement timeout passed: its I/O now fails)"
                            if late else "")
                wait = SLOW_RETRY if late else min(max(MIN_RETRY, wait), deadline - now)
                continue
            break
        keeper.conn_up = True
        keeper.recoveries += 1
        keeper.last_recovery_seconds = time.monotonic() - began
        log.warning("session %d: recovered in %.0f ms (attempt %d, CmdSN %d)", s.sid,
                    keeper.last_recovery_seconds * 1000, attempt, cmd_sn)
        if self.on_recovered is not None:
            self.on_recovered(keeper)

    def next_cmd_sn(self, s: KernelSession) -> int:
        """The CmdSN the kernel will use next: initial_cmdsn + SCSI commands it sent."""
        reply = self.nl.request(ue.get_stats(s.transport_handle, s.sid, s.cid))
        stats = ue.decode_stats(reply.tail)
        return sn_add(s.initial_cmdsn, stats.scsicmd_pdus)

    def _relogin(self, keeper: Keeper, cmd_sn: int) -> None:
        s = keeper.session
        config = dataclasses.replace(keeper.config, isid=s.isid, tsih=0, cid=s.cid,
                                     initial_cmd_sn=cmd_sn, exp_stat_sn=0)
        logged_in = self.login_fn(keeper.portal, config, keeper.login_timeout)
        conn = logged_in.connection
        try:
            facts = SessionFacts(target_name=s.target_name, initiator_name=s.initiator_name,
                                 address=s.address, port=s.port, isid=s.isid)
            if logged_in.result.cmd_sn != cmd_sn:
                log.warning("session %d: target expects CmdSN %d after relogin, the "
                            "kernel will send %d", s.sid, logged_in.result.cmd_sn, cmd_sn)
            bind_and_start(self.nl, s.transport_handle, s.sid, s.cid, conn,
                           logged_in.result, facts, keeper.timers)
        except KernelIscsiError:
            # Unbound or half-set: stop it again so the next attempt starts clean.
            try:
                self.nl.request(ue.stop_conn(s.transport_handle, s.sid, s.cid,
                                             ue.StopConn.RECOVER))
            except KernelIscsiError as exc:
                log.debug("session %d: stop after a failed rebind: %s", s.sid, exc)
            raise
        finally:
            conn.close()  # bound: the kernel holds its own reference
        s.tsih = logged_in.result.tsih
        s.negotiated = logged_in.result.negotiated

    def _pause(self, seconds: float, *, failing_sid: int) -> bool:
        """Wait, keeping events for later; False if a watched signal came.

        A CONN_ERROR for the session being recovered, before its relogin, says again
        what we know (its connection is stopped): dropped, not answered twice.
        """
        deadline = time.monotonic() + max(0.0, seconds)
        while True:
            left = deadline - time.monotonic()
            if self.nl.stop_signal is not None:
                return False
            if left <= 0:
                return True
            event = self.nl.next_event(left)
            if isinstance(event, ConnErrorEvent) and event.sid == failing_sid:
                log.debug("session %d: repeated connection error %s", failing_sid,
                          event.error_name)
            elif event is not None:
                self._deferred.append(event)
