"""Keep kernel sessions alive: answer each CONN_ERROR with a userland relogin and a rebind.

The kernel multicasts CONN_ERROR{sid, cid, error} and stops the connection itself; its
session goes FAILED and I/O waits, up to SESS_RECOVERY_TMO. For one of our sessions:
STOP_CONN(RECOVER), GET_STATS (the kernel's CmdSN, which sysfs does not show, is
initial_cmdsn + scsicmd_pdus), wait DefaultTime2Wait, log in again on a new socket with
the same ISID, TSIH 0 and that CmdSN, BIND_CONN it to the same sid/cid, SET_PARAM,
START_CONN. Failed attempts are retried until the replacement timeout; past it the
kernel has failed the queued I/O, and we keep trying at a slower pace, as iscsid does.
INVALID_HOST ends the session and destroys it. Events for sessions not ours
(open-iscsi's) are ignored.

With ``open_nl`` (what `login` uses) each session's recovery runs in a thread of its
own on a NETLINK_ISCSI socket of its own: the kernel answers a request on the socket
that sent it, so the main loop goes on reading events, and one session's relogin
(seconds, or minutes against a dead portal) never holds up another's CONN_ERROR.
Without it (the scripted-kernel tests) recovery runs inline on the one socket.

After each recovery the session's host is rescanned and its offline devices set back
to running (Rescanner, a thread per session: the scan blocks on SCSI commands); so is it
on a SCSI uevent saying the target's LUNs or capacities changed (scsi_events.py). A
target's Async Message "request logout" (AsyncEvent 1) reaches us as a RECV_PDU
(libiscsi.c passes every Async Message up; iscsid answers it with iscsi_send_logout):
we send a Logout through the kernel (SEND_PDU), and its response, or the connection
the target then closes, starts a relogin as for any connection error.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from kernel_handoff import uevent as ue
from kernel_handoff.errors import KernelIscsiError
from kernel_handoff.handoff import KernelSession, bind_and_start
from kernel_handoff.netlink import IscsiNetlink
from kernel_handoff.params import SessionFacts, SessionTimers
from kernel_handoff.scan import RescanReport, rescan_session, scan_and_wait, wait_by_path
from kernel_handoff.scsi_events import ScsiEvent, ScsiEventListener
from kernel_handoff.sysfs import DiskInfo, DisksTimeout, SysfsRoot
from kernel_handoff.teardown import logout_request_bhs
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
LOGOUT_WAIT = 15.0  # for the Logout Response to a target's request, if it names no time
RESCAN_TIMEOUT = 20.0  # a rescan's wait for new disks' block devices
JOIN_MARGIN = 5.0  # beyond the login timeout, for a recovery thread to notice a stop

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
    failed: bool = False  # ended by the kernel (INVALID_HOST), not by a logout
    conn_up: bool = True  # False from a connection error until the rebind succeeds
    rescans: int = 0
    last_rescan: RescanReport | None = None
    # the recovery thread, and what it and the main loop share (under SessionGuard._lock)
    worker: threading.Thread | None = field(default=None, repr=False)
    bound: bool = False  # this attempt's new connection is bound: a new error is new
    again: bool = False  # it failed as well: recover once more when done
    logout_deadline: float | None = None  # a target asked for a Logout: relogin by then
    rescanner: Rescanner | None = field(default=None, repr=False)

    @property
    def sid(self) -> int:
        return self.session.sid


def pin_persistent_portal(nl: IscsiNetlink, keeper: Keeper) -> None:
    """PERSISTENT_ADDRESS/PORT name the portal the user gave, not a redirect's.

    They are what udev's by-path links and iscsiadm show, and what a relogin starts
    from (iscsid sets them from the node record, and the redirected address shows as
    the connection's own address/port). The handoff set the connected peer's; after a
    login redirect they are set again here.
    """
    s, named = keeper.session, keeper.portal
    if (s.portal.host, s.portal.port) == (named.host, named.port):
        return  # not redirected: the peer's address is the portal's, resolved
    try:
        nl.request(ue.set_param(s.transport_handle, s.sid, s.cid,
                                ue.Param.PERSISTENT_ADDRESS, named.host))
        nl.request(ue.set_param(s.transport_handle, s.sid, s.cid,
                                ue.Param.PERSISTENT_PORT, named.port))
    except KernelIscsiError as exc:
        log.warning("session %d: cannot set the persistent portal %s:%d: %s", s.sid,
                    named.host, named.port, exc)
        return
    log.info("session %d: redirected to %s:%d; persistent portal %s:%d", s.sid,
             s.portal.host, s.portal.port, named.host, named.port)
    s.address, s.port = named.host, named.port


class Stopped(Exception):
    """A watched signal came while recovering: the caller tears down."""


class Rescanner:
    """One session's rescans, in a thread of its own: a scan waits on SCSI commands
    (REPORT LUNS, INQUIRY, READ CAPACITY) that wait in turn for the connection, so it
    must never run where connection errors are answered. Requests made while one runs
    are folded into one more rescan."""

    def __init__(self, keeper: Keeper, *, sysfs_root: SysfsRoot = "/sys",
                 dev_root: SysfsRoot = "/dev", timeout: float = RESCAN_TIMEOUT) -> None:
        self.keeper = keeper
        self.sysfs_root = sysfs_root
        self.dev_root = dev_root
        self.timeout = timeout
        self._cond = threading.Condition()
        self._why: list[str] = []
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name=f"rescan-{keeper.sid}")

    def start(self) -> None:
        self._thread.start()

    def request(self, why: str) -> None:
        with self._cond:
            self._why.append(why)
            self._cond.notify_all()

    def stop(self) -> None:
        """Ask the thread to end; a scan stuck in the kernel is left to finish alone."""
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        self._thread.join(timeout=1.0)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._why and not self._stop:
                    self._cond.wait()
                if self._stop:
                    return
                why = ", ".join(dict.fromkeys(self._why))
                self._why.clear()
            try:
                self.rescan(why)
            except Exception:  # a thread that dies would rescan no more
                log.exception("session %d: rescan failed", self.keeper.sid)

    def rescan(self, why: str) -> RescanReport:
        k = self.keeper
        report = rescan_session(self.sysfs_root, k.sid, k.session.host_no,
                                timeout=self.timeout, dev_root=self.dev_root)
        k.rescans += 1
        k.last_rescan = report
        if report.disks:
            k.session.disks = report.disks
        level = logging.WARNING if (report.added or report.resized or report.revived
                                    or report.errors) else logging.INFO
        log.log(level, "session %d: rescan (%s): %s", k.sid, why, report.summary())
        return report


class SessionGuard:
    """The foreground loop: dispatch kernel events to the sessions we keep."""

    def __init__(self, nl: IscsiNetlink, keepers: list[Keeper], *,
                 login_fn: Login = _login,
                 on_recovered: Callable[[Keeper], None] | None = None,
                 open_nl: Callable[[], IscsiNetlink] | None = None,
                 sysfs_root: SysfsRoot = "/sys", dev_root: SysfsRoot = "/dev") -> None:
        self.nl = nl
        self.keepers = {k.sid: k for k in keepers}
        self.login_fn = login_fn
        self.on_recovered = on_recovered
        self.open_nl = open_nl
        self.sysfs_root = sysfs_root
        self.dev_root = dev_root
        self._deferred: list[KernelEvent] = []
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._listener: ScsiEventListener | None = None

    def live(self) -> list[Keeper]:
        return [k for k in self.keepers.values() if k.ended is None]

    # -- lifecycle

    def start(self, *, uevents: bool = True) -> None:
        """Rescan threads for every session, and the SCSI uevent listener."""
        for k in self.keepers.values():
            pin_persistent_portal(self.nl, k)
            if k.rescanner is None:
                k.rescanner = Rescanner(k, sysfs_root=self.sysfs_root,
                                        dev_root=self.dev_root)
                k.rescanner.start()
        if uevents and self._listener is None:
            self._listener = ScsiEventListener(self._on_scsi_event, self._hosts)
            if not self._listener.start():
                self._listener = None

    def stop(self) -> None:
        """End every thread: recoveries notice at their next wait (a login in progress
        runs out its timeout first), rescans are left to the kernel."""
        self._stopping.set()
        if self._listener is not None:
            self._listener.stop()
        for k in self.keepers.values():
            if k.worker is not None:
                k.worker.join(timeout=k.login_timeout + JOIN_MARGIN)
                if k.worker.is_alive():
                    log.error("session %d: its recovery did not stop", k.sid)
            if k.rescanner is not None:
                k.rescanner.stop()

    def _hosts(self) -> set[int]:
        return {k.session.host_no for k in self.live()}

    def _on_scsi_event(self, event: ScsiEvent) -> None:
        for k in self.live():
            if k.session.host_no == event.host_no and k.rescanner is not None:
                log.warning("session %d: %s on %s", k.sid, event.what, event.hctl)
                k.rescanner.request(event.what)

    def run(self) -> None:
        """Until a watched signal comes (nl.stop_signal) or every session has ended.

        Raises SessionFailed when the kernel ended every session (INVALID_HOST).
        """
        while self.live() and self.nl.stop_signal is None:
            if self._deferred:
                event: KernelEvent | None = self._deferred.pop(0)
            else:
                event = self.nl.next_event(self._until_deadline())
            self._check_deadlines()
            if event is None:
                continue
            try:
                self.dispatch(event)
            except Stopped:
                return
        failed = [k for k in self.keepers.values() if k.failed]
        if not self.live() and failed:
            raise SessionFailed("; ".join(f"session {k.sid}: {k.ended}" for k in failed))

    def initial_scan(self, *, timeout: float, by_path_timeout: float = 2.0) -> None:
        """Scan each session's host for its disks, answering kernel events meanwhile.

        The scan's SCSI commands go over the connection: should it fail during the
        scan, the answer to its CONN_ERROR is what lets the scan finish. Raises
        DisksTimeout (the first) if a session's disks did not all appear in time.
        """
        results: dict[int, list[DiskInfo] | BaseException] = {}

        def scan(k: Keeper) -> None:
            try:
                disks = scan_and_wait(self.sysfs_root, k.sid, k.session.host_no,
                                      timeout=timeout, dev_root=self.dev_root)
                results[k.sid] = wait_by_path(disks, self.sysfs_root, k.sid,
                                              timeout=by_path_timeout,
                                              dev_root=self.dev_root)
            except BaseException as exc:
                results[k.sid] = exc

        threads = [threading.Thread(target=scan, args=(k,), daemon=True,
                                    name=f"scan-{k.sid}") for k in self.live()]
        began = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            while t.is_alive() and self.nl.stop_signal is None:
                event = self.nl.next_event(0.05)
                if event is not None:
                    self.dispatch(event)
            t.join(timeout=0)
        for k in self.live():
            found = results.get(k.sid)
            if isinstance(found, BaseException):
                raise found
            if found is None:  # a signal came: the caller tears down
                raise DisksTimeout(f"session {k.sid}: scan interrupted", [])
            k.session.disks = found
            k.session.timings["scan"] = time.monotonic() - began

    # -- events

    def dispatch(self, event: KernelEvent) -> None:
        keeper = self.keepers.get(getattr(event, "sid", -1))
        if keeper is None or keeper.ended is not None:
            return  # someone else's session (open-iscsi's), or one already over
        if isinstance(event, ConnErrorEvent):
            if event.error == ConnErr.INVALID_HOST:
                self.end_invalid_host(keeper)
            else:
                self.start_recovery(keeper, event.error_name)
        elif isinstance(event, SessionEvent) and event.kind == Event.DESTROY_SESSION:
            keeper.ended = "destroyed by another process (logged out elsewhere)"
            log.warning("session %d was destroyed by another process", keeper.sid)
        elif isinstance(event, SessionEvent) and event.kind == Event.UNBIND_SESSION:
            log.info("session %d: its disks were removed by another process", keeper.sid)
        elif isinstance(event, RecvPduEvent) and event.opcode == Opcode.ASYNC_MESSAGE:
            self._async_message(keeper, event)
        elif (isinstance(event, RecvPduEvent) and event.opcode == Opcode.LOGOUT_RESPONSE
              and keeper.logout_deadline is not None):
            keeper.logout_deadline = None
            log.warning("session %d: logged out at the target's request (response %d); "
                        "logging in again", keeper.sid, event.bhs[2])
            self.start_recovery(keeper, "target requested logout")

    def _async_message(self, keeper: Keeper, event: RecvPduEvent) -> None:
        code = event.bhs[36]
        if code != ASYNC_REQUEST_LOGOUT:
            log.warning("session %d: target sent Async Message event %d", keeper.sid, code)
            return
        within = int.from_bytes(event.bhs[42:44], "big")  # Parameter3: seconds
        log.warning("session %d: the target requests a logout within %d s", keeper.sid,
                    within)
        if not keeper.conn_up or keeper.logout_deadline is not None:
            return  # already recovering, or already logging out
        s = keeper.session
        try:
            # Through the kernel, which stamps ITT, CmdSN and ExpStatSN and stops
            # queueing commands (the session is LOGGING_OUT) until the relogin.
            self.nl.request(ue.send_pdu(s.transport_handle, s.sid, s.cid,
                                        logout_request_bhs()))
        except KernelIscsiError as exc:
            log.warning("session %d: sending the Logout failed (%s): logging in again",
                        s.sid, exc)
            self.start_recovery(keeper, "target requested logout")
            return
        keeper.logout_deadline = time.monotonic() + (float(within) or LOGOUT_WAIT)

    def _until_deadline(self) -> float | None:
        deadlines = [k.logout_deadline for k in self.live() if k.logout_deadline is not None]
        return None if not deadlines else max(0.0, min(deadlines) - time.monotonic())

    def _check_deadlines(self) -> None:
        now = time.monotonic()
        for k in self.live():
            if k.logout_deadline is not None and now >= k.logout_deadline:
                k.logout_deadline = None
                log.warning("session %d: no Logout Response in time; logging in again",
                            k.sid)
                self.start_recovery(k, "target requested logout")

    def end_invalid_host(self, keeper: Keeper) -> None:
        """The kernel says the SCSI host is gone: nothing to relogin to. Destroy the
        session rather than leave a husk that nobody keeps."""
        s = keeper.session
        keeper.conn_up = False
        keeper.failed = True
        keeper.ended = "the kernel reports its SCSI host invalid (INVALID_HOST)"
        log.error("session %d: %s; destroying it", s.sid, keeper.ended)
        if keeper.worker is not None:
            keeper.worker.join(timeout=keeper.login_timeout + JOIN_MARGIN)
        for req in (ue.stop_conn(s.transport_handle, s.sid, s.cid, ue.StopConn.TERM),
                    ue.destroy_conn(s.transport_handle, s.sid, s.cid),
                    ue.destroy_session(s.transport_handle, s.sid)):
            try:
                self.nl.request(req)
            except KernelIscsiError as exc:
                log.warning("session %d: %s", s.sid, exc)

    # -- recovery

    def start_recovery(self, keeper: Keeper, why: str) -> None:
        """Inline without open_nl; else in the session's own thread, so the main loop
        goes on answering the other sessions."""
        keeper.logout_deadline = None
        if self.open_nl is None:
            self.recover(keeper, why)
            return
        with self._lock:
            if keeper.worker is not None and keeper.worker.is_alive():
                if keeper.bound:  # the connection it just bound failed too
                    keeper.again = True
                else:
                    log.debug("session %d: repeated connection error %s", keeper.sid, why)
                return
            keeper.conn_up = False
            keeper.again = False
            keeper.worker = threading.Thread(target=self._recover_thread,
                                             args=(keeper, why), daemon=True,
                                             name=f"recover-{keeper.sid}")
            keeper.worker.start()

    def _recover_thread(self, keeper: Keeper, why: str) -> None:
        """Recover until it works, the session ends, or the keeper stops.

        A kernel that refuses a request (STOP_CONN, GET_STATS) is asked again at the
        slow pace: a thread that gave up would leave a session nobody keeps.
        """
        assert self.open_nl is not None
        nl: IscsiNetlink | None = None
        try:
            while keeper.ended is None and not self._stopping.is_set():
                try:
                    if nl is None:
                        nl = self.open_nl()
                    self.recover(keeper, why, nl=nl)
                except IscsiError as exc:
                    log.error("session %d: recovery failed (%s); trying again in %.0f s",
                              keeper.sid, exc, SLOW_RETRY)
                    if self._stopping.wait(SLOW_RETRY):
                        return
                    why = "retrying"
                    continue
                with self._lock:
                    if not keeper.again:
                        return
                    keeper.again = False
                why = "the new connection failed as well"
        except Stopped:
            log.info("session %d: recovery stopped", keeper.sid)
        except Exception:
            log.exception("session %d: recovery failed", keeper.sid)
        finally:
            if nl is not None:
                nl.close()

    def recover(self, keeper: Keeper, why: str, *, stop_first: bool = True,
                nl: IscsiNetlink | None = None) -> None:
        link = nl or self.nl
        s = keeper.session
        began = time.monotonic()
        log.warning("session %d: connection failed (%s); recovering", s.sid, why)
        keeper.conn_up = False
        keeper.bound = False
        if stop_first:
            link.request(ue.stop_conn(s.transport_handle, s.sid, s.cid,
                                      ue.StopConn.RECOVER))
        cmd_sn = self.next_cmd_sn(s, link)
        deadline = began + keeper.timers.replacement_timeout
        wait = max(float(s.negotiated.default_time2wait), 0.0)
        attempt = 0
        while True:
            if not self._pause(wait, failing_sid=s.sid, threaded=nl is not None):
                raise Stopped
            if keeper.ended is not None:
                raise Stopped
            attempt += 1
            try:
                self._relogin(keeper, cmd_sn, link)
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
        if keeper.rescanner is not None:
            # Disks SCSI error handling offlined during the outage, LUNs added meanwhile.
            keeper.rescanner.request("after recovery")
        if self.on_recovered is not None:
            self.on_recovered(keeper)

    def next_cmd_sn(self, s: KernelSession, nl: IscsiNetlink | None = None) -> int:
        """The CmdSN the kernel will use next: initial_cmdsn + SCSI commands it sent."""
        reply = (nl or self.nl).request(ue.get_stats(s.transport_handle, s.sid, s.cid))
        stats = ue.decode_stats(reply.tail)
        return sn_add(s.initial_cmdsn, stats.scsicmd_pdus)

    def _relogin(self, keeper: Keeper, cmd_sn: int, nl: IscsiNetlink) -> None:
        s = keeper.session
        config = dataclasses.replace(keeper.config, isid=s.isid, tsih=0, cid=s.cid,
                                     initial_cmd_sn=cmd_sn, exp_stat_sn=0)
        logged_in = self.login_fn(keeper.portal, config, keeper.login_timeout)
        conn = logged_in.connection
        if self._stopping.is_set() or keeper.ended is not None:
            conn.close()  # the teardown is coming: binding now would race it
            raise Stopped

        def bound() -> None:
            with self._lock:
                keeper.bound = True

        try:
            # PERSISTENT_ADDRESS/PORT stay what they were (pin_persistent_portal):
            # a redirect during this relogin must not rename the by-path links.
            facts = SessionFacts(target_name=s.target_name, initiator_name=s.initiator_name,
                                 address=s.address, port=s.port, isid=s.isid)
            if logged_in.result.cmd_sn != cmd_sn:
                log.warning("session %d: target expects CmdSN %d after relogin, the "
                            "kernel will send %d", s.sid, logged_in.result.cmd_sn, cmd_sn)
            bind_and_start(nl, s.transport_handle, s.sid, s.cid, conn,
                           logged_in.result, facts, keeper.timers, on_bound=bound)
        except KernelIscsiError:
            # Unbound or half-set: stop it again so the next attempt starts clean.
            with self._lock:
                keeper.bound = False
            try:
                nl.request(ue.stop_conn(s.transport_handle, s.sid, s.cid,
                                        ue.StopConn.RECOVER))
            except KernelIscsiError as exc:
                log.debug("session %d: stop after a failed rebind: %s", s.sid, exc)
            raise
        finally:
            conn.close()  # bound: the kernel holds its own reference
        s.tsih = logged_in.result.tsih
        s.negotiated = logged_in.result.negotiated

    def _pause(self, seconds: float, *, failing_sid: int, threaded: bool = False) -> bool:
        """Wait, keeping events for later; False if a watched signal came.

        A CONN_ERROR for the session being recovered, before its relogin, says again
        what we know (its connection is stopped): dropped, not answered twice. In a
        recovery thread the main loop has the events: only a stop is waited for.
        """
        if threaded:
            return not self._stopping.wait(max(0.0, seconds))
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
