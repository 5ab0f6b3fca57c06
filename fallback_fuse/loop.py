"""A loop device over a storage file, and the FUSE queue depth behind it.

``losetup --direct-io=on``: the loop driver then sends its requests to the file as
asynchronous O_DIRECT I/O, so up to ``max_background`` of them reach the daemon at
once, and none sits in the page cache. Without it the daemon sees one request at a
time. ``max_background`` (12 by default) is raised through fusectl.
"""

from __future__ import annotations

import logging
import os
import subprocess
from pathlib import Path

import trio

from userland.errors import PathUnavailable

log = logging.getLogger("iscsi_handoff.fuse")

FUSECTL = Path("/sys/fs/fuse/connections")
DETACH_SETTLE = 2.0  # seconds for a detached device to let go of its file


class LoopError(PathUnavailable):
    """losetup failed (not root, no free device, ...): the one line says why."""


async def attach(path: str | os.PathLike[str], *, read_only: bool = False,
                 sector_size: int | None = None) -> str:
    """Attach ``path`` to a free loop device with direct I/O; returns "/dev/loopN".

    ``sector_size``: the LUN's block size, so nothing above writes part of a block.
    """
    args = ["losetup", "-f", "--show", "--direct-io=on"]
    if read_only:
        args.append("--read-only")
    if sector_size:
        args += ["--sector-size", str(sector_size)]
    proc = await trio.run_process([*args, os.fspath(path)], capture_stdout=True,
                                  capture_stderr=True, check=False)
    if proc.returncode != 0:
        raise LoopError(f"losetup failed: {proc.stderr.decode().strip()}")
    device = proc.stdout.decode().strip()
    if not uses_direct_io(device):
        log.warning("%s: the kernel refused direct I/O; requests reach the target one "
                    "at a time", device)
    return device


async def detach(device: str) -> None:
    """``losetup -d``, then check: on a busy device the kernel only sets autoclear and
    answers success, so a device still backed by its file is reported as not detached."""
    proc = await trio.run_process(["losetup", "-d", device], capture_stderr=True,
                                  check=False)
    if proc.returncode != 0:
        raise LoopError(f"losetup -d {device} failed: {proc.stderr.decode().strip()}")
    with trio.move_on_after(DETACH_SETTLE):  # some kernels clear it on the last close
        while backing_file(device) is not None:
            await trio.sleep(0.05)
    if backing_file(device) is not None:
        raise LoopError(f"{device} is still attached (busy: it detaches when released)")


async def refresh_capacity(device: str) -> None:
    """``losetup -c``: the loop device takes its file's size again (a resized LUN)."""
    proc = await trio.run_process(["losetup", "-c", device], capture_stderr=True,
                                  check=False)
    if proc.returncode != 0:
        raise LoopError(f"losetup -c {device} failed: {proc.stderr.decode().strip()}")


def backing_file(device: str) -> str | None:
    """The file behind /dev/loopN, or None when it is detached."""
    knob = Path("/sys/block") / Path(device).name / "loop" / "backing_file"
    try:
        return knob.read_text().strip() or None
    except OSError:
        return None


def uses_direct_io(device: str) -> bool:
    knob = Path("/sys/block") / Path(device).name / "loop" / "dio"
    try:
        return knob.read_text().strip() == "1"
    except OSError:
        return False


def connection_dir(mountpoint: str | os.PathLike[str]) -> Path:
    """/sys/fs/fuse/connections/<N>: N is the mount's device number (major 0 for FUSE,
    so its minor), mounting fusectl there first if nobody has."""
    if not os.path.ismount(FUSECTL):
        proc = subprocess.run(["mount", "-t", "fusectl", "fusectl", str(FUSECTL)],
                              capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise LoopError(f"cannot mount fusectl: {proc.stderr.strip()}")
    dev = os.stat(mountpoint).st_dev
    folder = FUSECTL / str(os.major(dev) << 20 | os.minor(dev))  # the kernel's dev_t
    if not folder.is_dir():
        raise LoopError(f"{mountpoint} has no FUSE connection under {FUSECTL}")
    return folder


def raise_max_background(mountpoint: str | os.PathLike[str], queue_depth: int) -> int:
    """Let the kernel keep ``queue_depth`` requests in flight; returns the value now set.

    The congestion threshold follows at 3/4, where FUSE's defaults (12, 9) have it.
    """
    folder = connection_dir(mountpoint)
    knob = folder / "max_background"
    if queue_depth > int(knob.read_text()):
        knob.write_text(str(queue_depth))
        (folder / "congestion_threshold").write_text(str(max(1, queue_depth * 3 // 4)))
    return int(knob.read_text())
