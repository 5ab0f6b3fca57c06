"""Which process owns which kernel session: its record in the registry, pidfiles,
and `--daemon`'s detach.

A `login` on the kernel path stays running to answer connection errors; `logout` (any
process) finds the owner of a session here and signals it, or, when the owner is gone,
tears the session down itself. A session without a record is not ours (open-iscsi's,
say) and is left alone. Records carry the owner's pid and its start time from
/proc/<pid>/stat, so a recycled pid is not mistaken for the owner.

The records themselves are the registry's (iscsi_handoff/registry.py, `kernel-<sid>`):
``SessionRecord`` is the kernel path's view of one, kept for its callers. It holds what
a keeper needs to adopt a session nobody keeps (kernel_adopt.py): the ISID and TSIH, the
CmdSN the kernel started from (in the registry's details), the initiator name, the
portal as named and as connected, and the boot id (session ids restart at each boot).
"""

from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from iscsi_handoff import registry, sysstate
from iscsi_handoff.sysstate import process_start_time
from userland.errors import ConfigError, IscsiError

__all__ = [
    "Detached",
    "SessionRecord",
    "all_records",
    "boot_id",
    "detach",
    "own_record",
    "process_start_time",
    "read_record",
    "remove_pidfile",
    "remove_record",
    "sessions_dir",
    "write_pidfile",
    "write_record",
]


def sessions_dir() -> Path:
    return registry.sessions_dir()


def boot_id() -> str:
    return sysstate.boot_id() or ""


@dataclass(frozen=True)
class SessionRecord:
    sid: int
    host_no: int
    target: str
    portal: str  # the connected address:port
    isid: str
    pid: int
    pid_start: int | None
    devices: tuple[str, ...] = ()
    boot_id: str = ""
    login_portal: str = ""  # the portal as the user named it (host:port)
    tsih: int = 0
    initial_cmdsn: int | None = None  # the kernel's CmdSN is this + its scsicmd_pdus
    initiator_name: str = ""

    def owner_alive(self) -> bool:
        start = process_start_time(self.pid)
        return start is not None and (self.pid_start is None or start == self.pid_start)


def _name(sid: int) -> str:
    return f"kernel-{sid}"


def to_registry(record: SessionRecord, **extra: Any) -> registry.Record:
    """The registry's record for ``record``; ``extra`` fills the fields this view lacks
    (portal as named, initiator_name, tsih, by_path, details)."""
    fields: dict[str, Any] = {"portal": record.login_portal or record.portal,
                              "portal_connected": record.portal,
                              "isid": record.isid, "sid": record.sid,
                              "host_no": record.host_no, "devices": record.devices,
                              "tsih": record.tsih, "initiator_name": record.initiator_name,
                              "ready": True}
    if not fields["initiator_name"] and "initiator_name" not in extra:
        fields["initiator_name"] = _sysfs_initiator_name(record.sid)  # the kernel's copy
    if record.initial_cmdsn is not None:
        fields["details"] = {"initial_cmdsn": record.initial_cmdsn}
    fields.update(extra)
    base = registry.new_record("kernel", target=record.target, **fields)
    if record.boot_id:
        base = replace(base, boot_id=record.boot_id)
    return registry.replace_owner(base, pid=record.pid, pid_start=record.pid_start)


def _sysfs_initiator_name(sid: int, sysfs_root: str = "/sys") -> str:
    path = Path(sysfs_root) / "class" / "iscsi_session" / f"session{sid}" / "initiatorname"
    try:
        return path.read_text().strip()
    except OSError:
        return ""


def from_registry(record: registry.Record) -> SessionRecord:
    assert record.sid is not None
    cmdsn = record.details.get("initial_cmdsn")
    return SessionRecord(sid=record.sid, host_no=record.host_no or 0, target=record.target,
                         portal=record.portal_connected or record.portal, isid=record.isid,
                         pid=record.pid, pid_start=record.pid_start, devices=record.devices,
                         boot_id=record.boot_id or "", login_portal=record.portal,
                         tsih=record.tsih,
                         initial_cmdsn=cmdsn if isinstance(cmdsn, int) else None,
                         initiator_name=record.initiator_name)


def write_record(record: SessionRecord, **extra: Any) -> Path:
    return registry.write(to_registry(record, **extra))


def read_record(sid: int) -> SessionRecord | None:
    record = registry.read(_name(sid))
    if record is None or record.path != "kernel" or record.sid != sid:
        return None
    return from_registry(record)


def remove_record(sid: int, *, pid: int | None = None) -> None:
    """Drop session ``sid``'s record (only if ``pid`` still owns it, when given)."""
    registry.remove(_name(sid), pid=pid)


def all_records() -> list[SessionRecord]:
    """Every kernel session record, unchecked (kernel_adopt decides whom to trust)."""
    return [from_registry(r) for _, r in registry.all_records()
            if r is not None and r.path == "kernel" and r.sid is not None]


def own_record(sid: int, host_no: int, target: str, portal: str, isid: bytes,
               devices: list[str], *, login_portal: str = "", tsih: int = 0,
               initial_cmdsn: int | None = None, initiator_name: str = "") -> SessionRecord:
    pid = os.getpid()
    return SessionRecord(sid=sid, host_no=host_no, target=target, portal=portal,
                         isid=isid.hex(), pid=pid, pid_start=process_start_time(pid),
                         devices=tuple(devices), boot_id=boot_id(),
                         login_portal=login_portal or portal, tsih=tsih,
                         initial_cmdsn=initial_cmdsn, initiator_name=initiator_name)


# --- pidfile --------------------------------------------------------------------------

def write_pidfile(path: Path) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(f"{os.getpid()}\n")
        tmp.replace(path)
    except OSError as exc:
        raise ConfigError(f"cannot write the pidfile {path}: {exc.strerror}") from None


def remove_pidfile(path: Path) -> None:
    with contextlib.suppress(OSError, ValueError):
        if int(path.read_text().strip()) == os.getpid():
            path.unlink()


# --- --daemon -------------------------------------------------------------------------

class Detached:
    """The daemon child's end of the pipe to the parent waiting in the foreground."""

    def __init__(self, fd: int) -> None:
        self._fd: int | None = fd

    def ready(self) -> None:
        """Sessions up and printed: let go of the terminal, release the parent (exit 0)."""
        if self._fd is None:
            return
        sys.stdout.flush()
        sys.stderr.flush()
        devnull = os.open(os.devnull, os.O_RDWR)
        for target in (0, 1, 2):
            os.dup2(devnull, target)
        os.close(devnull)
        os.write(self._fd, b"ready\n")
        os.close(self._fd)
        self._fd = None


def detach() -> Detached:
    """Fork: the child returns (in a new session) and goes on; the parent waits.

    The parent exits 0 once the child calls ``ready()``, or with the child's own exit
    status if it ends first (it printed its error to the shared terminal already).
    Nothing that holds sockets or event loops may exist yet: fork before the login.
    """
    read_fd, write_fd = os.pipe()
    try:
        pid = os.fork()
    except OSError as exc:
        raise IscsiError(f"--daemon: fork failed: {exc.strerror}") from None
    if pid == 0:
        os.close(read_fd)
        os.setsid()
        os.chdir("/")
        return Detached(write_fd)
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as pipe:
        message = pipe.read()
    if message.startswith(b"ready"):
        os._exit(0)  # the child owns everything now: no cleanup of ours may run
    _, status = os.waitpid(pid, 0)
    os._exit(os.waitstatus_to_exitcode(status) if os.WIFEXITED(status) else 1)
