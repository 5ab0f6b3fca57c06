"""Log a kernel session out and take it down, from its owner or from any process.

The order (notes/kernel-iscsi-if.md): UNBIND_SESSION (the kernel removes the SCSI
target, so the disks go and their caches are flushed while the connection still
works; event 105 says it is done), a Logout Request through SEND_PDU (the kernel fills
ITT, CmdSN and ExpStatSN) and its Logout Response as a RECV_PDU event, bounded by 15 s,
then STOP_CONN(TERM), DESTROY_CONN, DESTROY_SESSION (which refuses -EBUSY while a
connection exists). With the connection down (recovery in progress) there is no one to
send a Logout to: the rest still runs. A connection that fails during the teardown
(a CONN_ERROR for the session) short-circuits it the same way: the disks' flush would
wait out the replacement timeout and the Logout Response would never come, so
STOP_CONN(TERM) fails their I/O at once and no Logout is waited for.

From another process only the session id is needed: the transport handle, the
connection id and whether it is up come from sysfs.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from kernel_handoff import uevent as ue
from kernel_handoff.errors import KernelIscsiError, KernelUnavailable, NetlinkTimeout
from kernel_handoff.netlink import IscsiNetlink
from kernel_handoff.sysfs import SysfsRoot, get_session, transport_handle
from kernel_handoff.uevent import (
    ConnErrorEvent,
    Event,
    KernelEvent,
    RecvPduEvent,
    SessionEvent,
)
from userland.errors import IscsiError
from userland.pdu import BHS_LEN, LogoutReason, LogoutRequest, Opcode

log = logging.getLogger("iscsi_handoff.kernel")

LOGOUT_TIMEOUT = 15.0  # iscsid's wait for the Logout Response
UNBIND_MARGIN = 15.0  # beyond the recovery timeout: flushing a failed disk waits for it


@dataclass
class TeardownReport:
    sid: int
    unbound: bool = False
    logged_out: bool = False  # the target answered our Logout Request
    logout_response: int | None = None
    destroyed: bool = False
    seconds: float = 0.0


def logout_request_bhs() -> bytes:
    """Logout (close the session), immediate; ITT, CmdSN, ExpStatSN left to the kernel."""
    bhs = LogoutRequest(immediate=True, reason=LogoutReason.CLOSE_SESSION, itt=0, cid=0,
                        cmd_sn=0, exp_stat_sn=0).encode_bhs()
    assert len(bhs) == BHS_LEN
    return bhs


def _is_conn_error(ev: KernelEvent, sid: int) -> bool:
    return isinstance(ev, ConnErrorEvent) and ev.sid == sid


def _is_unbind(sid: int) -> Callable[[KernelEvent], bool]:
    def match(ev: KernelEvent) -> bool:
        return (isinstance(ev, SessionEvent) and ev.kind == Event.UNBIND_SESSION
                and ev.sid == sid) or _is_conn_error(ev, sid)
    return match


def _is_logout_response(sid: int, cid: int) -> Callable[[KernelEvent], bool]:
    def match(ev: KernelEvent) -> bool:
        return (isinstance(ev, RecvPduEvent) and ev.sid == sid and ev.cid == cid
                and ev.opcode == Opcode.LOGOUT_RESPONSE) or _is_conn_error(ev, sid)
    return match


def _stop_term(nl: IscsiNetlink, handle: int, sid: int, cid: int) -> None:
    try:
        nl.request(ue.stop_conn(handle, sid, cid, ue.StopConn.TERM))
    except KernelIscsiError as exc:
        log.warning("session %d: %s", sid, exc)


def logout_session(nl: IscsiNetlink, handle: int, sid: int, cid: int = 0, *,
                   conn_up: bool, logout_timeout: float = LOGOUT_TIMEOUT,
                   unbind_timeout: float = 120.0 + UNBIND_MARGIN) -> TeardownReport:
    """Take session ``sid`` down, logging out first when its connection is up.

    With the connection up: UNBIND (disks flushed and removed while I/O still flows),
    Logout, then STOP_CONN(TERM). With it down (a recovery in progress) the disks could
    only flush after the recovery timeout: STOP_CONN(TERM) comes first, so the kernel
    fails their I/O at once, and DESTROY_SESSION removes them.
    Raises KernelIscsiError only when the session cannot be destroyed; a target that
    does not answer the Logout in time is logged and the teardown goes on.
    """
    report = TeardownReport(sid)
    started = time.monotonic()
    stopped = False
    if conn_up:
        try:
            nl.request(ue.unbind_session(handle, sid))
            event = nl.wait_for(_is_unbind(sid), timeout=unbind_timeout,
                                what=f"the UNBIND_SESSION event (session {sid})")
            if isinstance(event, ConnErrorEvent):
                log.warning("session %d: the connection failed (%s) while its disks were "
                            "removed: failing their I/O now", sid, event.error_name)
                conn_up = False
                _stop_term(nl, handle, sid, cid)
                stopped = True
                nl.wait_for(_is_unbind(sid), timeout=unbind_timeout,
                            what=f"the UNBIND_SESSION event (session {sid})")
            report.unbound = True
        except KernelIscsiError as exc:
            log.warning("session %d: removing its disks failed (%s); logging out anyway",
                        sid, exc)
    if conn_up:
        report.logout_response = _logout_pdu(nl, handle, sid, cid, logout_timeout)
        report.logged_out = report.logout_response == 0
    if not stopped:
        _stop_term(nl, handle, sid, cid)
    try:
        nl.request(ue.destroy_conn(handle, sid, cid))
    except KernelIscsiError as exc:  # a connection already gone: destroy anyway
        log.warning("session %d: %s", sid, exc)
    nl.request(ue.destroy_session(handle, sid))
    report.destroyed = True
    report.seconds = time.monotonic() - started
    return report


def _logout_pdu(nl: IscsiNetlink, handle: int, sid: int, cid: int,
                timeout: float) -> int | None:
    try:
        nl.request(ue.send_pdu(handle, sid, cid, logout_request_bhs()))
        event = nl.wait_for(_is_logout_response(sid, cid), timeout=timeout,
                            what=f"the Logout Response (session {sid})")
    except NetlinkTimeout as exc:
        log.warning("session %d: %s; closing the connection anyway", sid, exc)
        return None
    except KernelIscsiError as exc:
        log.warning("session %d: sending the Logout failed (%s); closing anyway", sid, exc)
        return None
    if isinstance(event, ConnErrorEvent):
        log.warning("session %d: the connection failed (%s) before the Logout Response; "
                    "closing it", sid, event.error_name)
        return None
    assert isinstance(event, RecvPduEvent)
    response = event.bhs[2]
    if response != 0:
        log.warning("session %d: the target answered the Logout with response %d", sid,
                    response)
    return response


def teardown_sid(sid: int, *, sysfs_root: SysfsRoot = "/sys",
                 nl: IscsiNetlink | None = None,
                 logout_timeout: float = LOGOUT_TIMEOUT) -> TeardownReport:
    """Log out session ``sid`` knowing nothing else: the rest is read from sysfs."""
    info = get_session(sysfs_root, sid)
    if info is None:
        raise IscsiError(f"no iSCSI session {sid} in sysfs")
    handle = transport_handle(sysfs_root)
    if handle is None:
        raise KernelUnavailable("iscsi_tcp is not loaded: cannot reach session "
                                f"{sid} (no class/iscsi_transport/tcp in sysfs)")
    conn = next((c for c in info.connections if c.cid == 0), None) or (
        info.connections[0] if info.connections else None)
    cid = conn.cid if conn is not None else 0
    conn_up = conn is not None and (conn.state or "").lower() in ("up", "")
    recovery = info.recovery_tmo if info.recovery_tmo is not None else 120
    own = nl is None
    link = nl or IscsiNetlink()
    try:
        return logout_session(link, handle, sid, cid, conn_up=conn_up,
                              logout_timeout=logout_timeout,
                              unbind_timeout=recovery + UNBIND_MARGIN)
    finally:
        if own:
            link.close()
