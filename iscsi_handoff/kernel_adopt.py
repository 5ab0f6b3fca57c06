"""Adoption: a keeper that starts finds our kernel sessions that nobody keeps any more
(its keeper killed, stopped by SIGTERM as a service, crashed) and takes them over
instead of logging in again: one session, one disk.

What it needs comes from sysfs and our record of the session (kernel_owners): the
record names the session, its ISID (a relogin must reuse it, or the target sees a new
I_T nexus), its TSIH and the CmdSN the kernel started from (recovery asks the kernel
how many commands it sent since: GET_STATS). A record is trusted only if it is of this
boot (session ids start again at 1 at each boot and module load) and sysfs agrees on
the session's target and portal; otherwise it is stale, left for `doctor` to report,
and never touches the session it seems to name (open-iscsi's, perhaps).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from iscsi_handoff import kernel_owners as owners
from kernel_handoff.handoff import KernelSession
from kernel_handoff.sysfs import SessionInfo, SysfsRoot, get_session
from userland.errors import ConfigError, SessionExists
from userland.keys import Negotiator
from userland.portal import Portal


@dataclass(frozen=True)
class Orphan:
    """A session of ours, alive in the kernel, whose keeper is gone."""

    record: owners.SessionRecord
    info: SessionInfo


def distrust(record: owners.SessionRecord, info: SessionInfo | None,
             boot: str) -> str | None:
    """Why ``record`` must not be trusted for the session it names; None if it may."""
    if not record.boot_id or record.boot_id != boot:
        return "recorded in another boot"
    if info is None:
        return f"session {record.sid} is gone from sysfs"
    if info.target_name != record.target:
        return (f"session {record.sid} in sysfs is to {info.target_name}, not "
                f"{record.target}")
    if info.portal is not None and info.portal != record.portal:  # None: no connection
        return f"session {record.sid} in sysfs is at {info.portal}, not {record.portal}"
    return None


def _matches(record: owners.SessionRecord, target: str, portals: set[str]) -> bool:
    return record.target == target and bool(portals & {record.login_portal, record.portal})


def find(target: str, portals: tuple[Portal, ...], *,
         sysfs_root: SysfsRoot = "/sys") -> Orphan | None:
    """Our live session to ``target`` at one of ``portals`` (as named, as resolved) that
    nobody keeps, if any.

    SessionExists if its keeper is alive (a second `login` must not make a second
    session); untrusted records are skipped.
    """
    boot = owners.boot_id()
    wanted = {p.address() for p in portals}
    for record in owners.all_records():
        if not _matches(record, target, wanted):
            continue
        info = get_session(sysfs_root, record.sid)
        if distrust(record, info, boot) is not None:
            continue
        assert info is not None
        if record.owner_alive() and record.pid != os.getpid():
            raise SessionExists(
                f"{target} at {record.login_portal} already has session {record.sid}, kept "
                f"by pid {record.pid} (`iscsi-handoff logout --session {record.sid}` "
                "ends it)")
        return Orphan(record, info)
    return None


def adopt(orphan: Orphan, *, transport_handle: int, initiator_name: str,
          portal: Portal) -> KernelSession:
    """The KernelSession a keeper needs for ``orphan``: recovery works on it as on one
    it made itself."""
    record, info = orphan.record, orphan.info
    if info.initiator_name not in (None, initiator_name):
        raise ConfigError(f"session {record.sid} to {record.target} was logged in as "
                          f"{info.initiator_name}, not {initiator_name}: not adopted "
                          "(pass the same --initiator-name)")
    if record.initial_cmdsn is None:
        raise ConfigError(f"session {record.sid}: its record lacks the initial CmdSN "
                          "(written by an older iscsi-handoff): not adopted")
    conn = next((c for c in info.connections if c.cid == 0), None) or (
        info.connections[0] if info.connections else None)
    if conn is None:
        raise ConfigError(f"session {record.sid} has no connection in sysfs: not adopted "
                          f"(`iscsi-handoff logout --session {record.sid}` ends it)")
    address = conn.persistent_address or portal.host
    port = conn.persistent_port or portal.port
    return KernelSession(
        sid=record.sid, host_no=info.host_no if info.host_no is not None else
        record.host_no, cid=conn.cid, transport_handle=transport_handle,
        target_name=record.target, initiator_name=initiator_name, portal=portal,
        address=address, port=port, isid=bytes.fromhex(record.isid), tsih=record.tsih,
        initial_cmdsn=record.initial_cmdsn,
        # Only DefaultTime2Wait is read before the next relogin, which negotiates anew.
        negotiated=Negotiator().result(), disks=list(info.disks))


def connection_up(info: SessionInfo) -> bool:
    """The session's connection is up: nothing to recover at adoption."""
    if (info.state or "").upper() != "LOGGED_IN":
        return False
    return all((c.state or "up").lower() in ("up", "") for c in info.connections)


@dataclass(frozen=True)
class RecordState:
    """What `doctor` says of one record: kept, orphan (adoptable) or stale."""

    sid: int
    target: str
    state: str  # "kept", "orphan", "stale"
    detail: str

    def line(self) -> str:
        if self.state == "kept":
            return f"session {self.sid} ({self.target}): {self.detail}"
        if self.state == "orphan":
            return (f"session {self.sid} ({self.target}): {self.detail}; `iscsi-handoff "
                    f"login` of that target adopts it, `iscsi-handoff logout --session "
                    f"{self.sid}` ends it")
        return (f"stale record of session {self.sid} ({self.target}): {self.detail}; "
                f"never used (remove {owners.sessions_dir() / f'{self.sid}.json'})")


def record_states(*, sysfs_root: SysfsRoot = "/sys") -> list[RecordState]:
    boot = owners.boot_id()
    states = []
    for record in owners.all_records():
        why = distrust(record, get_session(sysfs_root, record.sid), boot)
        if why is not None:
            states.append(RecordState(record.sid, record.target, "stale", why))
        elif record.owner_alive():
            states.append(RecordState(record.sid, record.target, "kept",
                                      f"kept by pid {record.pid}"))
        else:
            states.append(RecordState(record.sid, record.target, "orphan",
                                      f"no keeper (pid {record.pid} is gone)"))
    return states
