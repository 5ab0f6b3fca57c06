"""One registry of sessions, both paths: a JSON record per session under the run dir.

    /run/iscsi-handoff/sessions/kernel-<sid>.json     a kernel session (sid from sysfs)
    /run/iscsi-handoff/sessions/fuse-<isid>.json      a FUSE session (served by its keeper)
    /run/iscsi-handoff/lock                           flock: claim = check + write, atomic

``$ISCSI_HANDOFF_RUN_DIR`` replaces /run/iscsi-handoff (tests; non-root users get
``$XDG_RUNTIME_DIR/iscsi-handoff``). Records are written atomically (tmp, fsync,
rename) and never trusted: every read checks them against reality (owner pid and its
start time, boot id, /proc/self/mountinfo, sysfs) and sorts them into live sessions,
leftovers of a dead owner (with the command that cleans them) and stale records
(removed). The keepers (kernel_path, fuse_path) write; `session list`, `logout` and
the duplicate check read. Secrets never enter a record.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from iscsi_handoff import sysstate
from userland.errors import ConfigError, SessionExists

FORMAT = 1  # bump when a field changes meaning; older records are then stale
LIVE, LEFTOVER, STALE = "live", "leftover", "stale"


def run_dir() -> Path:
    """$ISCSI_HANDOFF_RUN_DIR, else /run/iscsi-handoff (root) or the user's runtime dir."""
    override = os.environ.get("ISCSI_HANDOFF_RUN_DIR")
    if override:
        return Path(override)
    if os.geteuid() == 0:
        return Path("/run/iscsi-handoff")
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    base = Path(runtime) if runtime else Path(f"/tmp/iscsi-handoff-{os.getuid()}")
    return base / "iscsi-handoff"


def sessions_dir() -> Path:
    return run_dir() / "sessions"


def fuse_dir() -> Path:
    """Parent of the FUSE sessions' default mount points, one folder each."""
    return run_dir() / "fuse"


@dataclass(frozen=True)
class Record:
    """One session as its keeper wrote it. ``details`` is free-form and shown at -P 2/3:
    negotiated parameters, auth method and user, timeouts, recovery count, LUN map."""

    path: str  # "kernel" or "fuse"
    target: str
    portal: str  # as the user named it, host:port
    pid: int  # the keeper
    pid_start: int | None  # its start time (/proc/<pid>/stat field 22): pids recycle
    boot_id: str | None
    portal_connected: str = ""  # address:port of the connection (after redirects)
    isid: str = ""  # hex
    tsih: int = 0
    initiator_name: str = ""
    created: float = 0.0  # unix time
    sid: int | None = None  # kernel
    host_no: int | None = None  # kernel
    mountpoint: str | None = None  # fuse
    mount_id: int | None = None  # fuse: our mount's id in mountinfo
    loops: tuple[str, ...] = ()  # fuse: /dev/loopN we attached
    storage: tuple[str, ...] = ()  # fuse: storage files in the tree
    devices: tuple[str, ...] = ()  # kernel: /dev/sdX
    by_path: tuple[str, ...] = ()  # ip-ADDR:PORT-iscsi-IQN-lun-N names
    made_mountpoint: bool = False  # fuse: we created the folder, so we remove it
    pidfile: str | None = None  # --pidfile: removed with a dead keeper's leftovers
    ready: bool = False  # false while logging in: a claim that blocks duplicates
    details: dict[str, Any] = field(default_factory=dict)
    format: int = FORMAT

    @property
    def name(self) -> str:
        """File stem, and the key a keeper updates its record by."""
        if self.path == "kernel":
            # Before the kernel gives a sid (a claim while logging in), the ISID names it.
            return f"kernel-{self.sid}" if self.sid is not None else f"kernel-isid-{self.isid}"
        return f"fuse-{self.isid}"

    @property
    def session_id(self) -> str:
        """What `session list` shows and `logout --session` takes: the kernel's sid, or
        F followed by the ISID for a FUSE session (the kernel never saw those)."""
        if self.path == "kernel" and self.sid is not None:
            return str(self.sid)
        return f"F{self.isid}" if self.path == "fuse" else f"K{self.isid}"

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        for key in ("loops", "storage", "devices", "by_path"):
            data[key] = list(data[key])
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Record:
        known = {f.name for f in fields(cls)}
        kept = {k: v for k, v in data.items() if k in known}
        for key in ("loops", "storage", "devices", "by_path"):
            kept[key] = tuple(kept.get(key, ()))
        record = cls(**kept)
        if record.path not in ("kernel", "fuse"):
            raise ValueError(f"unknown path {record.path!r}")
        return record


def new_record(path: str, *, target: str, portal: str, **kw: Any) -> Record:
    """A record owned by this process, on this boot, made now."""
    pid = os.getpid()
    base: dict[str, Any] = {"pid": pid, "pid_start": sysstate.process_start_time(pid),
                            "boot_id": sysstate.boot_id(), "created": time.time()}
    return Record(path=path, target=target, portal=portal, **{**base, **kw})


def replace_owner(record: Record, *, pid: int, pid_start: int | None) -> Record:
    return replace(record, pid=pid, pid_start=pid_start)


# --- files ----------------------------------------------------------------------------

def _file(name: str) -> Path:
    return sessions_dir() / f"{name}.json"


def write(record: Record) -> Path:
    """Write (or replace) ``record`` atomically: tmp file, fsync, rename, fsync dir."""
    folder = sessions_dir()
    path = _file(record.name)
    try:
        # Private: no secrets in here, but user names and initiator names all the same.
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = folder / f".{record.name}.{os.getpid()}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(record.to_json(), f, indent=1)  # details keep their order
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dfd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError as exc:
        raise ConfigError(f"cannot record session {record.session_id} in {folder}: "
                          f"{exc.strerror}") from None
    return path


def read(name: str) -> Record | None:
    """The record named ``name`` as written (unchecked); None if absent or unreadable."""
    try:
        return Record.from_json(json.loads(_file(name).read_text()))
    except (OSError, ValueError, TypeError):
        return None


def remove(name: str, *, pid: int | None = None) -> None:
    """Drop a record (only while ``pid`` still owns it, when given)."""
    if pid is not None:
        record = read(name)
        if record is not None and record.pid != pid:
            return
    with contextlib.suppress(OSError):
        _file(name).unlink()


def promote(old_name: str, record: Record) -> Record:
    """Replace a claim by the full record under its final name (a kernel sid)."""
    write(record)
    if old_name != record.name:
        remove(old_name, pid=record.pid)
    return record


def update(name: str, **changes: Any) -> Record | None:
    """Change fields of our own record (``details`` is merged, not replaced)."""
    record = read(name)
    if record is None:
        return None
    if "details" in changes:
        changes["details"] = {**record.details, **changes["details"]}
    record = replace(record, **changes)
    write(record)
    return record


def all_records() -> list[tuple[str, Record | None]]:
    """(name, record) for every file; None for one that cannot be read."""
    try:
        names = sorted(os.listdir(sessions_dir()))
    except OSError:
        return []
    out: list[tuple[str, Record | None]] = []
    for filename in names:
        if filename.startswith(".") or not filename.endswith(".json"):
            continue
        name = filename[:-5]
        out.append((name, read(name)))
    return out


# --- reality --------------------------------------------------------------------------

@dataclass(frozen=True)
class Entry:
    """A record checked against reality."""

    record: Record
    state: str  # LIVE, LEFTOVER or STALE
    why: str  # one line: what was found
    cleanup: str | None = None  # the command that cleans a leftover

    def to_json(self) -> dict[str, Any]:
        return {"state": self.state, "why": self.why, "cleanup": self.cleanup,
                "id": self.record.session_id, **self.record.to_json()}


def owner_alive(record: Record) -> bool:
    start = sysstate.process_start_time(record.pid)
    return start is not None and (record.pid_start is None or start == record.pid_start)


def check(record: Record, *, sysfs_root: str = "/sys") -> Entry:
    if record.format != FORMAT:
        return Entry(record, STALE, f"record format {record.format}, not {FORMAT}")
    if record.boot_id is not None and record.boot_id != sysstate.boot_id():
        return Entry(record, STALE, "written before the last boot")
    if record.path == "kernel":
        return _check_kernel(record, sysfs_root)
    return _check_fuse(record)


def _check_kernel(record: Record, sysfs_root: str) -> Entry:
    if record.sid is None:  # a claim: the keeper is still logging in
        if owner_alive(record):
            return Entry(record, LIVE, f"logging in, pid {record.pid}")
        return Entry(record, STALE, f"its keeper, pid {record.pid}, died logging in")
    if not sysstate.kernel_session_exists(record.sid, sysfs_root):
        return Entry(record, STALE, "the kernel has no such session any more")
    if owner_alive(record):
        return Entry(record, LIVE, f"kept by pid {record.pid}")
    return Entry(record, LEFTOVER,
                 f"its keeper, pid {record.pid}, is gone; the kernel session remains",
                 f"iscsi-handoff logout --session {record.sid}")


def _check_fuse(record: Record) -> Entry:
    if owner_alive(record):
        return Entry(record, LIVE, f"served by pid {record.pid}")
    left = fuse_leftovers(record)
    if not left:
        return Entry(record, STALE, f"its keeper, pid {record.pid}, is gone; nothing left")
    return Entry(record, LEFTOVER,
                 f"its keeper, pid {record.pid}, is gone; left: {', '.join(left)}",
                 "iscsi-handoff logout --all")


def our_mount(record: Record) -> sysstate.MountEntry | None:
    """Our FUSE mount from mountinfo, if it is still there (same id, fs type, source)."""
    if record.mountpoint is None:
        return None
    for entry in sysstate.mounts():
        if (entry.mountpoint == record.mountpoint and entry.fstype == sysstate.FUSE_FSTYPE
                and entry.source == sysstate.FUSE_SOURCE
                and (record.mount_id is None or entry.mount_id == record.mount_id)):
            return entry
    return None


def our_loops(record: Record) -> list[str]:
    """The record's loop devices still backed by a file under its mount point: the
    number may have been reused by someone else since, and those are not ours."""
    if record.mountpoint is None:
        return []
    prefix = record.mountpoint.rstrip("/") + "/"
    return [dev for dev in record.loops
            if (sysstate.loop_backing_file(dev) or "").startswith(prefix)]


def fuse_leftovers(record: Record) -> list[str]:
    left = [f"loop device {dev}" for dev in our_loops(record)]
    if our_mount(record) is not None:
        left.append(f"dead FUSE mount {record.mountpoint}")
    return left


def entries(*, sysfs_root: str = "/sys", remove_stale: bool = True,
            include_stale: bool = False) -> list[Entry]:
    """Every record, checked; stale ones (and unreadable files) are removed on the way
    unless ``remove_stale`` is false, and left out unless ``include_stale``."""
    out: list[Entry] = []
    for name, record in all_records():
        if record is None:
            if remove_stale:
                remove(name)
            continue
        entry = check(record, sysfs_root=sysfs_root)
        if entry.state == STALE and remove_stale:
            remove(name, pid=record.pid)
        if entry.state != STALE or include_stale:
            out.append(entry)
    return out


# --- claims: no duplicates ------------------------------------------------------------

@contextlib.contextmanager
def locked() -> Iterator[None]:
    """flock on run_dir/lock: one check-and-claim at a time on this machine."""
    folder = run_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True, mode=0o755)
        fd = os.open(folder / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise ConfigError(f"cannot lock the session registry in {folder}: "
                          f"{exc.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def find_duplicates(*, target: str, portals: tuple[str, ...], initiator_name: str,
                    sysfs_root: str = "/sys", adoptable: bool = False) -> list[str]:
    """Live sessions (ours on either path, and any kernel session from this initiator
    name) to ``target`` at one of ``portals``: one line each, for the error.
    ``adoptable``: a kernel session of ours whose keeper is gone is no duplicate (the
    kernel path's keeper adopts it, kernel_adopt.py, rather than logging in again)."""
    found: list[str] = []
    ours: dict[int, str] = {}  # kernel sid -> how to name it
    counted: set[int] = set()
    wanted = set(portals)
    for entry in entries(sysfs_root=sysfs_root):
        r = entry.record
        where = r.mountpoint if r.path == "fuse" else ", ".join(r.devices) or "no disks"
        text = f"session {r.session_id} ({r.path}, pid {r.pid}, {where})"
        if r.sid is not None:
            ours[r.sid] = text
            if adoptable and entry.state == LEFTOVER:
                counted.add(r.sid)
        if entry.state != LIVE or r.target != target or r.initiator_name != initiator_name:
            continue  # a kernel record without a name is judged by sysfs below
        if wanted & {r.portal, r.portal_connected}:
            found.append(text)
            if r.sid is not None:
                counted.add(r.sid)
    for sid, portal in sysstate.kernel_sessions_of(target, initiator_name, sysfs_root):
        if sid not in counted and (portal is None or portal in wanted):
            found.append(ours.get(sid, f"kernel session {sid} (not made by iscsi-handoff)"))
    return found


def claim(record: Record, *, force: bool = False, sysfs_root: str = "/sys") -> Record:
    """Refuse a duplicate, else write ``record`` (not yet ready) under the lock, so that
    two logins started together cannot both pass the check. ``force`` skips the check."""
    with locked():
        if not force:
            found = find_duplicates(target=record.target,
                                    portals=tuple(p for p in (record.portal,
                                                              record.portal_connected) if p),
                                    initiator_name=record.initiator_name,
                                    sysfs_root=sysfs_root)
            if found:
                raise duplicate_error(record.target, record.portal, record.initiator_name,
                                      found)
        write(record)
    return record


def refuse_duplicate(*, target: str, portal: str, initiator_name: str,
                     sysfs_root: str = "/sys", adoptable: bool = False) -> None:
    """The check alone, without a claim: an early answer before anything is set up (the
    keeper's claim() is what makes it race-free)."""
    found = find_duplicates(target=target, portals=(portal,), initiator_name=initiator_name,
                            sysfs_root=sysfs_root, adoptable=adoptable)
    if found:
        raise duplicate_error(target, portal, initiator_name, found)


def duplicate_error(target: str, portal: str, initiator_name: str,
                    found: list[str]) -> SessionExists:
    return SessionExists(f"{target} at {portal} already has a session from "
                         f"{initiator_name}: {'; '.join(found)} (`iscsi-handoff session "
                         "list` shows it; --force logs in again)")
