"""`logout`: end kernel sessions that a `login` of ours made, from any process.

A session's owner (the `login` process still answering its connection errors) is told
with SIGUSR1 and logs out itself (SIGTERM would only make a service keeper leave); we
wait until the session leaves sysfs. When the owner is gone, we tear the session down
over NETLINK_ISCSI ourselves. Sessions without a record are not ours (open-iscsi's,
say): left alone unless --force.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass

from iscsi_handoff import kernel_owners as owners
from iscsi_handoff import registry
from iscsi_handoff.kernel_adopt import distrust
from kernel_handoff.sysfs import SessionInfo, get_session, list_sessions
from kernel_handoff.teardown import teardown_sid
from userland.errors import ConfigError, IscsiError

POLL = 0.1


@dataclass
class LogoutResult:
    sid: int
    target: str | None
    how: str  # "owner" (signalled), "netlink" (we tore it down), "skipped"
    detail: str


def select(sessions: list[SessionInfo], *, target: str | None, sid: int | None,
           every: bool) -> list[SessionInfo]:
    if sum((target is not None, sid is not None, every)) != 1:
        raise ConfigError("give exactly one of --target IQN, --session N or --all")
    if sid is not None:
        chosen = [s for s in sessions if s.sid == sid]
        if not chosen:
            raise ConfigError(f"no iSCSI session {sid} (see `iscsi-handoff session list`)")
        return chosen
    if target is not None:
        chosen = [s for s in sessions if s.target_name == target]
        if not chosen:
            raise ConfigError(f"no iSCSI session to {target}")
        return chosen
    return sessions


def logout_one(info: SessionInfo, *, timeout: float, force: bool, explicit: bool,
               sysfs_root: str = "/sys",
               teardown: Callable[..., object] = teardown_sid) -> LogoutResult:
    record = owners.read_record(info.sid)
    if record is not None and distrust(record, info, owners.boot_id()) is not None:
        record = None  # another boot's, or another session's now: never ours to end
    if record is None:
        if not force:
            if explicit:
                raise ConfigError(
                    f"session {info.sid} ({info.target_name}) was not made by iscsi-handoff "
                    "(no record of it): open-iscsi's? `iscsiadm -m session -r "
                    f"{info.sid} -u` logs it out; --force tears it down anyway")
            return LogoutResult(info.sid, info.target_name, "skipped",
                                "not made by iscsi-handoff")
        teardown(info.sid, sysfs_root=sysfs_root)
        return LogoutResult(info.sid, info.target_name, "netlink", "torn down (--force)")
    if record.owner_alive():
        try:
            os.kill(record.pid, signal.SIGUSR1)
        except ProcessLookupError:
            pass
        else:
            if _wait_gone(info.sid, record, timeout, sysfs_root):
                return LogoutResult(info.sid, info.target_name, "owner",
                                    f"logged out by its owner, pid {record.pid}")
            if record.owner_alive():
                raise IscsiError(f"session {info.sid}: its owner, pid {record.pid}, did not "
                                 f"log out within {timeout:g} s")
    # The owner is gone (crashed, killed): the session is ours to take down.
    if get_session(sysfs_root, info.sid) is not None:
        teardown(info.sid, sysfs_root=sysfs_root)
    owners.remove_record(info.sid)
    return LogoutResult(info.sid, info.target_name, "netlink",
                        f"logged out here (its owner, pid {record.pid}, was gone)")


def _wait_gone(sid: int, record: owners.SessionRecord, timeout: float,
               sysfs_root: str) -> bool:
    """True once the session left sysfs; False if the owner died first or time ran out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if get_session(sysfs_root, sid) is None:
            return True
        if not record.owner_alive():
            return get_session(sysfs_root, sid) is None
        time.sleep(POLL)
    return False


def logout(*, target: str | None, sid: int | None, every: bool, force: bool,
           timeout: float, sysfs_root: str = "/sys") -> list[LogoutResult]:
    chosen = select(list_sessions(sysfs_root), target=target, sid=sid, every=every)
    results = [logout_one(info, timeout=timeout, force=force, explicit=not every,
                          sysfs_root=sysfs_root) for info in chosen]
    if every:
        _forget_stale_records(sysfs_root)
    return results


def _forget_stale_records(sysfs_root: str) -> None:
    """Records of sessions the kernel no longer has (a crash, a reboot) go: the
    registry drops every stale record as it reads them."""
    registry.entries(sysfs_root=sysfs_root)
