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
from pathlib import Path

from kernel_handoff.sysfs import (
    DiskInfo,
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
