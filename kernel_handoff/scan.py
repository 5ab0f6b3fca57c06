"""After START_CONN: scan the session's SCSI host and wait for its disks' /dev/sdX.

iscsi_tcp leaves scanning to user space (iscsid writes "- - -" to the host's scan
file, as we do). The write returns once the SCSI devices exist; sd then attaches its
disks asynchronously, so the block devices are awaited, bounded, in sysfs. Which
LUNs to wait for comes from the SCSI devices' peripheral type: sd claims disks (0),
optical memory (7), RBC (0x0e) and zoned disks (0x14); tgt's LUN 0, a controller
(0x0c), gets no block device and is not waited for.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from kernel_handoff.sysfs import (
    DiskInfo,
    DisksTimeout,
    SysfsError,
    SysfsRoot,
    scan_host,
    session_disks,
    wait_for_disks,
)

SD_TYPES = frozenset({0x00, 0x07, 0x0E, 0x14})
_TARGET_RE = re.compile(r"target\d+:\d+:\d+")
_HCTL_RE = re.compile(r"(\d+):(\d+):(\d+):(\d+)")


def scsi_luns(root: SysfsRoot, sid: int) -> dict[int, int | None]:
    """LUN -> SCSI peripheral device type of each SCSI device of the session."""
    device = Path(root) / "class" / "iscsi_session" / f"session{sid}" / "device"
    luns: dict[int, int | None] = {}
    try:
        targets = [n for n in os.listdir(device) if _TARGET_RE.fullmatch(n)]
    except OSError:
        return luns
    for tname in targets:
        try:
            names = os.listdir(device / tname)
        except OSError:
            continue
        for name in names:
            m = _HCTL_RE.fullmatch(name)
            if m:
                luns[int(m.group(4))] = _read_type(device / tname / name / "type")
    return luns


def _read_type(path: Path) -> int | None:
    try:
        return int(path.read_text().strip(), 0)
    except (OSError, ValueError):
        return None


def disk_luns(luns: dict[int, int | None]) -> set[int]:
    return {lun for lun, kind in luns.items() if kind in SD_TYPES}


def scan_and_wait(root: SysfsRoot, sid: int, host_no: int, *, timeout: float,
                  dev_root: SysfsRoot = "/dev",
                  clock: Callable[[], float] = time.monotonic) -> list[DiskInfo]:
    """Scan the host, then wait until every disk LUN has its block device."""
    deadline = clock() + timeout
    scan_host(root, host_no)
    expected = disk_luns(scsi_luns(root, sid))
    if not expected:
        return []
    return wait_for_disks(root, sid, expected_luns=expected,
                          timeout=max(0.0, deadline - clock()), dev_root=dev_root)


def wait_by_path(disks: list[DiskInfo], root: SysfsRoot, sid: int, *, timeout: float,
                 dev_root: SysfsRoot = "/dev") -> list[DiskInfo]:
    """Give udev a moment for its by-path links, when udev runs at all."""
    if not disks or not os.path.exists("/run/udev/control"):
        return disks
    deadline = time.monotonic() + timeout
    while True:
        current = [d for d in session_disks(root, sid, dev_root=dev_root)
                   if d.size_bytes is not None]
        if current and all(d.by_path for d in current):
            return current
        if time.monotonic() >= deadline:
            return current or disks
        time.sleep(0.05)


# --- rescans: after a recovery, on REPORTED LUNS DATA HAS CHANGED, on `session rescan` ---

@dataclass
class RescanReport:
    """What one rescan of a session changed."""

    sid: int
    added: list[DiskInfo] = field(default_factory=list)  # disks that were not there before
    resized: list[tuple[DiskInfo, int | None]] = field(default_factory=list)  # (now, before)
    revived: list[str] = field(default_factory=list)  # H:C:T:L set from offline to running
    disks: list[DiskInfo] = field(default_factory=list)  # every disk after the rescan
    errors: list[str] = field(default_factory=list)  # writes the kernel refused

    def summary(self) -> str:
        parts = [f"LUN {d.lun} added as {d.dev}" for d in self.added]
        parts += [f"{d.dev} resized to {d.size_bytes} bytes (was {was})"
                  for d, was in self.resized]
        parts += [f"{hctl} offline -> running" for hctl in self.revived]
        parts += self.errors
        return "; ".join(parts) or "nothing changed"


def scsi_devices(root: SysfsRoot, sid: int) -> list[Path]:
    """The sysfs directory of every SCSI device (H:C:T:L) of the session."""
    device = Path(root) / "class" / "iscsi_session" / f"session{sid}" / "device"
    found: list[Path] = []
    try:
        targets = sorted(n for n in os.listdir(device) if _TARGET_RE.fullmatch(n))
    except OSError:
        return found
    for tname in targets:
        try:
            names = sorted(os.listdir(device / tname))
        except OSError:
            continue
        found += [device / tname / n for n in names if _HCTL_RE.fullmatch(n)]
    return found


def _write(path: Path, text: str) -> str | None:
    """Write an attribute; the refusal as text, or None."""
    try:
        fd = os.open(path, os.O_WRONLY)
    except OSError as exc:
        return f"{path}: {exc.strerror or exc}"
    try:
        os.write(fd, text.encode())
    except OSError as exc:
        return f"{path}: {exc.strerror or exc}"
    finally:
        os.close(fd)
    return None


def revive_offline(root: SysfsRoot, sid: int) -> tuple[list[str], list[str]]:
    """Write `running` to each of the session's SCSI devices that reads `offline`.

    SCSI error handling offlines a device whose commands it could not recover (a long
    outage); nothing brings it back but this write (iscsid does it after each
    recovery). `transport-offline` (past the replacement timeout) the kernel undoes
    itself when the session is unblocked. Returns (revived H:C:T:L, errors).
    """
    revived: list[str] = []
    errors: list[str] = []
    for sdev in scsi_devices(root, sid):
        try:
            state = (sdev / "state").read_text().strip()
        except OSError:
            continue
        if state != "offline":
            continue
        # store_state_field() wants the newline: "running" alone is EINVAL
        failure = _write(sdev / "state", "running\n")
        if failure is None:
            revived.append(sdev.name)
        else:
            errors.append(failure)
    return revived, errors


def rescan_session(root: SysfsRoot, sid: int, host_no: int, *, resize: bool = True,
                   timeout: float = 20.0, dev_root: SysfsRoot = "/dev",
                   clock: Callable[[], float] = time.monotonic) -> RescanReport:
    """Bring a session's disks up to date with the target.

    Offline devices back to running, `- - -` to the host's scan (new LUNs), `1` to
    each device's rescan (sd reads the capacity again: a resized LUN), then a bounded
    wait for every disk LUN's block device. The writes block while the kernel sends
    REPORT LUNS, INQUIRY and READ CAPACITY: call this where a wait cannot hold up a
    connection error's answer (recovery.Rescanner runs it in a thread of its own).
    """
    report = RescanReport(sid)
    before = {d.hctl: d for d in session_disks(root, sid, dev_root=dev_root)}
    report.revived, report.errors = revive_offline(root, sid)
    deadline = clock() + timeout
    try:
        scan_host(root, host_no)
    except SysfsError as exc:
        report.errors.append(str(exc))
    if resize:
        for sdev in scsi_devices(root, sid):
            if (sdev / "rescan").exists():
                failure = _write(sdev / "rescan", "1")
                if failure is not None:
                    report.errors.append(failure)
    expected = disk_luns(scsi_luns(root, sid))
    try:
        disks = wait_for_disks(root, sid, expected_luns=expected,
                               timeout=max(0.0, deadline - clock()), dev_root=dev_root,
                               clock=clock) if expected else []
    except DisksTimeout as exc:
        report.errors.append(str(exc))
        disks = exc.found
    report.disks = disks
    for d in disks:
        old = before.get(d.hctl)
        if old is None:
            report.added.append(d)
        elif old.size_bytes != d.size_bytes:
            report.resized.append((d, old.size_bytes))
    return report
