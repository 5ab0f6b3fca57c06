"""Give a logged-in connection to the kernel's iscsi_tcp and find the disks it makes.

The order (notes/kernel-iscsi-if.md, seen working on Debian's 6.1):
CREATE_SESSION(initial_cmdsn = the final login response's ExpCmdSN) -> CREATE_CONN
-> SESS_RECOVERY_TMO -> BIND_CONN(our fd, leading) -> SET_PARAM for every session fact,
negotiated value and timer -> START_CONN -> scan the host -> wait for /dev/sdX.
Nothing may be unread in the socket at BIND_CONN: the kernel does not parse bytes that
were queued before it took the socket. After START_CONN the kernel holds its own
reference to the socket, and our descriptor is closed.
CREATE_SESSION alone goes through a short-lived socket on netlink port id 0xFFFFFFFF
(netlink.kernel_port): the session then reads creator -1 in sysfs, and open-iscsi's
iscsid, started later, leaves it alone rather than logging in to it itself.

On any failure whatever was created is undone, newest first, and our descriptor is
closed: no session, no SCSI host and no socket are left behind.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import socket
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path

from kernel_handoff import uevent as ue
from kernel_handoff.errors import HandoffError, KernelIscsiError, KernelUnavailable
from kernel_handoff.netlink import IscsiNetlink, kernel_port
from kernel_handoff.params import (
    ParamValue,
    SessionFacts,
    SessionTimers,
    connection_params,
    recovery_timeout_param,
)
from kernel_handoff.scan import scan_and_wait, wait_by_path
from kernel_handoff.sysfs import DiskInfo, SysfsRoot, by_path_name, transport_handle
from kernel_handoff.teardown import logout_session
from userland.connection import Connection
from userland.errors import IscsiError
from userland.exchange import Exchange
from userland.keys import Negotiated
from userland.login.machine import LoginResult
from userland.login.run import LoggedIn
from userland.portal import Portal

log = logging.getLogger("iscsi_handoff.kernel")


# The socket CREATE_SESSION goes through, given the keeper's: a kernel-port one by default
Creator = Callable[[IscsiNetlink], AbstractContextManager[IscsiNetlink]]


@dataclass(frozen=True)
class HandoffOptions:
    cmds_max: int = 128
    queue_depth: int = 32
    timers: SessionTimers = field(default_factory=SessionTimers)
    disk_timeout: float = 20.0  # scan to every disk LUN's /dev/sdX
    scan: bool = True  # False: the caller scans (recovery.SessionGuard.initial_scan)
    by_path_timeout: float = 2.0  # udev's links, when udev runs
    sysfs_root: SysfsRoot = "/sys"
    dev_root: SysfsRoot = "/dev"
    create_lock: Path | None = None  # queues our processes for the kernel port id
    creator: Creator | None = None  # None: netlink.kernel_port(create_lock)


@dataclass
class KernelSession:
    """A session the kernel now carries, and what recovery needs to log in again."""

    sid: int
    host_no: int
    cid: int
    transport_handle: int
    target_name: str
    initiator_name: str
    portal: Portal  # where the connection went (after any redirect)
    address: str  # persistent address and port, as set in sysfs
    port: int
    isid: bytes
    tsih: int
    initial_cmdsn: int
    negotiated: Negotiated
    disks: list[DiskInfo] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)

    def by_path(self, lun: int) -> str:
        """udev's name for a LUN of this session (the link may not exist: no udev)."""
        return "/dev/disk/by-path/" + by_path_name(self.address, self.port,
                                                   self.target_name, lun)


class _Undo:
    """What the handoff created so far, to take back in reverse on failure."""

    def __init__(self, nl: IscsiNetlink, handle: int) -> None:
        self.nl = nl
        self.handle = handle
        self.sid: int | None = None
        self.cid: int | None = None
        self.bound = False
        self.started = False

    def run(self) -> None:
        if self.sid is None:
            return
        sid, cid = self.sid, self.cid
        if self.started and cid is not None:
            try:
                logout_session(self.nl, self.handle, sid, cid, conn_up=True)
                return
            except IscsiError as exc:
                log.warning("undoing the handoff: logout of session %d failed (%s); "
                            "destroying it", sid, exc)
        steps: list[ue.RequestMsg] = []
        if cid is not None:
            if self.bound:
                steps.append(ue.stop_conn(self.handle, sid, cid, ue.StopConn.TERM))
            steps.append(ue.destroy_conn(self.handle, sid, cid))
        steps.append(ue.destroy_session(self.handle, sid))
        for req in steps:
            try:
                self.nl.request(req)
            except KernelIscsiError as exc:
                log.warning("undoing the handoff: %s", exc)


def check_nothing_unread(conn: Connection) -> None:
    """Raise unless the socket is idle: no buffered PDU bytes, nothing in the kernel."""
    if conn.reader.buffered:
        raise HandoffError(f"{conn.reader.buffered} bytes read past the final login "
                           "response: cannot hand the connection to the kernel")
    # Non-blocking for the peek: with a timeout set, Python would first wait for data.
    conn.sock.setblocking(False)
    try:
        peek = conn.sock.recv(1, socket.MSG_PEEK)
    except BlockingIOError:
        return
    except OSError as exc:
        raise HandoffError("the connection failed before the handoff: "
                           f"{exc.strerror or exc}") from None
    if not peek:
        raise HandoffError("the target closed the connection right after the login")
    raise HandoffError("the target sent a PDU right after the final login response; "
                       "the kernel would misread it (try again)")


def peer_address(conn: Connection) -> tuple[str, int]:
    peer = conn.sock.getpeername()
    return str(peer[0]), int(peer[1])


def apply_params(nl: IscsiNetlink, handle: int, sid: int, cid: int,
                 params: list[tuple[ue.Param, ParamValue, bool]]) -> None:
    for param, value, optional in params:
        try:
            nl.request(ue.set_param(handle, sid, cid, param, value))
        except KernelIscsiError as exc:
            if optional and exc.errno in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                log.debug("SET_PARAM %s not supported here (%s): skipped", param.name,
                          exc.errno)
                continue
            raise


def bind_and_start(nl: IscsiNetlink, handle: int, sid: int, cid: int, conn: Connection,
                   result: LoginResult, facts: SessionFacts, timers: SessionTimers,
                   on_bound: Callable[[], None] | None = None) -> None:
    """BIND_CONN our socket, set every parameter, START_CONN. Used again by recovery."""
    params = connection_params(result, facts, timers)  # refuses ERL > 0 before binding
    check_nothing_unread(conn)
    # The kernel drives the socket from now on; O_NONBLOCK from our timeouts goes.
    conn.sock.setblocking(True)
    nl.request(ue.bind_conn(handle, sid, cid, conn.sock.fileno(), is_leading=True))
    if on_bound is not None:
        on_bound()
    apply_params(nl, handle, sid, cid, params)
    nl.request(ue.start_conn(handle, sid, cid))


def handoff(nl: IscsiNetlink, logged_in: LoggedIn, *, initiator_name: str,
            target_name: str, options: HandoffOptions | None = None) -> KernelSession:
    """Hand ``logged_in``'s connection to the kernel; return the session and its disks.

    ``logged_in`` must have nothing outstanding: call this right after login().
    The connection is closed on return, whatever happens.
    """
    opts = options or HandoffOptions()
    conn, result = logged_in.connection, logged_in.result
    handle = transport_handle(opts.sysfs_root)
    if handle is None:
        conn.close()
        raise KernelUnavailable("iscsi_tcp is not loaded (no class/iscsi_transport/tcp in "
                                "sysfs; modprobe iscsi_tcp)")
    address, port = peer_address(conn)
    facts = SessionFacts(target_name=target_name, initiator_name=initiator_name,
                         address=address, port=port, isid=result.isid)
    undo = _Undo(nl, handle)
    timings: dict[str, float] = {}
    started = time.monotonic()
    try:
        creating = (opts.creator(nl) if opts.creator is not None
                    else kernel_port(opts.create_lock))
        with creating as creator:
            reply = creator.request(ue.create_session(handle, initial_cmdsn=result.cmd_sn,
                                                      cmds_max=opts.cmds_max,
                                                      queue_depth=opts.queue_depth))
        ids = reply.fields_r("c_session_ret")
        sid, host_no = ids["sid"], ids["host_no"]
        undo.sid = sid
        log.info("kernel session %d on SCSI host %d (initial CmdSN %d)", sid, host_no,
                 result.cmd_sn)
        cid = nl.request(ue.create_conn(handle, sid, 0)).fields_r("c_conn_ret")["cid"]
        undo.cid = cid
        # The one parameter taken before the bind; the kernel looks the connection up
        # even for this session-wide value, so it comes after CREATE_CONN.
        param, value, _ = recovery_timeout_param(opts.timers)
        nl.request(ue.set_param(handle, sid, cid, param, value))

        def bound() -> None:
            undo.bound = True

        bind_and_start(nl, handle, sid, cid, conn, result, facts, opts.timers,
                       on_bound=bound)
        undo.started = True
        timings["netlink"] = time.monotonic() - started
        conn.close()  # the kernel holds its own reference since BIND_CONN
        disks: list[DiskInfo] = []
        if opts.scan:
            scanned = time.monotonic()
            disks = scan_and_wait(opts.sysfs_root, sid, host_no, timeout=opts.disk_timeout,
                                  dev_root=opts.dev_root)
            disks = wait_by_path(disks, opts.sysfs_root, sid,
                                 timeout=opts.by_path_timeout, dev_root=opts.dev_root)
            timings["scan"] = time.monotonic() - scanned
    except BaseException:
        if not undo.bound:
            _logout_userland(conn, result)
        conn.close()
        undo.run()
        raise
    return KernelSession(
        sid=sid, host_no=host_no, cid=cid, transport_handle=handle,
        target_name=target_name, initiator_name=initiator_name, portal=logged_in.portal,
        address=address, port=port, isid=result.isid, tsih=result.tsih,
        initial_cmdsn=result.cmd_sn, negotiated=result.negotiated, disks=disks,
        timings=timings)


def _logout_userland(conn: Connection, result: LoginResult) -> None:
    """The socket is still ours: log out on it, so the target frees the session now."""
    with contextlib.suppress(IscsiError, OSError):
        Exchange(conn, result).logout(timeout=5.0)
