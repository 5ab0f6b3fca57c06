"""Which process owns which kernel session: records in the state directory, pidfiles,
and `--daemon`'s detach.

A `login` on the kernel path stays running to answer connection errors; `logout` (any
process) finds the owner of a session here and signals it, or, when the owner is gone,
tears the session down itself. A session without a record is not ours (open-iscsi's,
say) and is left alone. Records carry the owner's pid and its start time from
/proc/<pid>/stat, so a recycled pid is not mistaken for the owner, and the boot id:
session ids start again at 1 at each boot (and module load), so a record of another
boot never names a session of this one (kernel_adopt.py checks sysfs as well).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from iscsi_handoff.identity import state_dir
from userland.errors import ConfigError, IscsiError

BOOT_ID = Path("/proc/sys/kernel/random/boot_id")


def boot_id() -> str:
    try:
        return BOOT_ID.read_text().strip()
    except OSError:
        return ""


def sessions_dir() -> Path:
    return state_dir() / "sessions"


def process_start_time(pid: int) -> int | None:
    """Field 22 of /proc/<pid>/stat (clock ticks since boot); None if no live process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may contain spaces and parentheses: split after it.
    rest = stat[stat.rfind(")") + 2:].split()
    if rest and rest[0] in ("Z", "X"):  # exited, not yet reaped: no owner any more
        return None
    try:
        return int(rest[19])
    except (IndexError, ValueError):
        return None


@dataclass(frozen=True)
class SessionRecord:
    sid: int
    host_no: int
    target: str
    portal: str
    isid: str
    pid: int
    pid_start: int | None
    devices: tuple[str, ...] = ()
    boot_id: str = ""
    login_portal: str = ""  # the portal login was asked for (resolved), before redirects
    tsih: int = 0
    initial_cmdsn: int | None = None  # the kernel's CmdSN is this + its scsicmd_pdus

    def owner_alive(self) -> bool:
        start = process_start_time(self.pid)
        return start is not None and (self.pid_start is None or start == self.pid_start)


def write_record(record: SessionRecord) -> Path:
    folder = sessions_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        path = folder / f"{record.sid}.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(record)) + "\n")
        tmp.replace(path)
    except OSError as exc:
        raise ConfigError(f"cannot record session {record.sid} in {folder}: "
                          f"{exc.strerror}") from None
    return path


def read_record(sid: int) -> SessionRecord | None:
    path = sessions_dir() / f"{sid}.json"
    try:
        data = json.loads(path.read_text())
        data["devices"] = tuple(data.get("devices", ()))
        return SessionRecord(**data)
    except (OSError, ValueError, TypeError):
        return None


def remove_record(sid: int, *, pid: int | None = None) -> None:
    """Drop session ``sid``'s record (only if ``pid`` still owns it, when given)."""
    record = read_record(sid)
    if pid is not None and record is not None and record.pid != pid:
        return
    with contextlib.suppress(OSError):
        (sessions_dir() / f"{sid}.json").unlink()


def own_record(sid: int, host_no: int, target: str, portal: str, isid: bytes,
               devices: list[str], *, login_portal: str = "", tsih: int = 0,
               initial_cmdsn: int | None = None) -> SessionRecord:
    pid = os.getpid()
    return SessionRecord(sid=sid, host_no=host_no, target=target, portal=portal,
                         isid=isid.hex(), pid=pid, pid_start=process_start_time(pid),
                         devices=tuple(devices), boot_id=boot_id(),
                         login_portal=login_portal, tsih=tsih, initial_cmdsn=initial_cmdsn)


def all_records() -> list[SessionRecord]:
    try:
        names = sorted(os.listdir(sessions_dir()))
    except OSError:
        return []
    records = []
    for name in names:
        stem, _, ext = name.partition(".")
        if ext == "json" and stem.isdigit():
            record = read_record(int(stem))
            if record is not None:
                records.append(record)
    return records


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
