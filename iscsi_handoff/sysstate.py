"""What the machine says right now, for checking records against it: processes, the
boot, mounts (/proc/self/mountinfo), loop devices and kernel sessions (sysfs)."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from kernel_handoff.sysfs import kernel_iscsi_loaded, list_sessions

BOOT_ID = Path("/proc/sys/kernel/random/boot_id")
MOUNTINFO = Path("/proc/self/mountinfo")
SYS_BLOCK = Path("/sys/block")
# fallback_fuse/mount.py mounts with fsname=iscsi-handoff and subtype=iscsi.
FUSE_FSTYPE = "fuse.iscsi"
FUSE_SOURCE = "iscsi-handoff"


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


def boot_id() -> str | None:
    try:
        return BOOT_ID.read_text().strip() or None
    except OSError:
        return None


@dataclass(frozen=True)
class MountEntry:
    mount_id: int
    dev: str  # major:minor of the mounted filesystem
    mountpoint: str
    fstype: str
    source: str


_OCTAL = re.compile(r"\\([0-7]{3})")


def _unescape(field: str) -> str:
    """mountinfo writes space, tab, newline and backslash as \\ooo."""
    return _OCTAL.sub(lambda m: chr(int(m.group(1), 8)), field)


def mounts(path: Path | None = None) -> list[MountEntry]:
    """Every mount this process sees, in mount order (a later one covers an earlier)."""
    try:
        text = (path or MOUNTINFO).read_text()
    except OSError:
        return []
    out = []
    for line in text.splitlines():
        head, sep, tail = line.partition(" - ")
        parts, rest = head.split(), tail.split()
        if not sep or len(parts) < 5 or len(rest) < 2:
            continue
        out.append(MountEntry(int(parts[0]), parts[2], _unescape(parts[4]), rest[0],
                              _unescape(rest[1])))
    return out


def top_mount(mountpoint: str) -> MountEntry | None:
    """The mount one sees at ``mountpoint`` now (the last one mounted there)."""
    found = None
    for entry in mounts():
        if entry.mountpoint == mountpoint:
            found = entry
    return found


def is_mountpoint(path: str) -> bool:
    return top_mount(os.path.realpath(path)) is not None


# --- loop devices ---------------------------------------------------------------------

def _loop_dir(device: str) -> Path:
    return SYS_BLOCK / Path(device).name


def loop_backing_file(device: str) -> str | None:
    """The file behind /dev/loopN, or None when it is detached."""
    try:
        text = (_loop_dir(device) / "loop" / "backing_file").read_text().strip()
    except OSError:
        return None
    return text.removesuffix(" (deleted)") or None


def loop_holders(device: str) -> list[str]:
    """Who keeps ``device`` busy: mount points of filesystems on it (mountinfo), and
    block devices stacked on it (/sys/block/loopN/holders: dm, md)."""
    held: list[str] = []
    try:
        dev = (_loop_dir(device) / "dev").read_text().strip()
    except OSError:
        return held
    held += [f"a filesystem mounted at {m.mountpoint}" for m in mounts() if m.dev == dev]
    try:
        stacked = sorted(os.listdir(_loop_dir(device) / "holders"))
    except OSError:
        stacked = []
    held += [f"/dev/{name}" for name in stacked]
    return held


# --- kernel sessions ------------------------------------------------------------------

def kernel_session_exists(sid: int, sysfs_root: str = "/sys") -> bool:
    return (Path(sysfs_root) / "class" / "iscsi_session" / f"session{sid}").is_dir()


def kernel_sessions_of(target: str, initiator_name: str,
                       sysfs_root: str = "/sys") -> list[tuple[int, str | None]]:
    """(sid, portal) of every kernel session to ``target`` from ``initiator_name``,
    whoever made it (open-iscsi's too)."""
    if not kernel_iscsi_loaded(sysfs_root):
        return []
    return [(s.sid, s.portal) for s in list_sessions(sysfs_root)
            if s.target_name == target and s.initiator_name in (initiator_name, None)]

