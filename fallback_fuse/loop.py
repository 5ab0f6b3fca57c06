"""A loop device over the storage file, and the FUSE queue depth behind it."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import trio

FUSECTL = Path("/sys/fs/fuse/connections")


class LoopError(OSError):
    pass


async def attach(path: Path, *, read_only: bool = False) -> str:
    """`losetup --direct-io=on`: without it the daemon sees one request at a time."""
    args = ["losetup", "-f", "--show", "--direct-io=on", *(["-r"] if read_only else []),
            str(path)]
    proc = await trio.run_process(args, capture_stdout=True, capture_stderr=True, check=False)
    if proc.returncode != 0:
        raise LoopError(f"losetup failed: {proc.stderr.decode().strip()}")
    return proc.stdout.decode().strip()


async def detach(device: str) -> None:
    proc = await trio.run_process(["losetup", "-d", device], capture_stderr=True, check=False)
    if proc.returncode != 0:
        raise LoopError(f"losetup -d {device} failed: {proc.stderr.decode().strip()}")


def connection_dir(mountpoint: Path) -> Path:
    """/sys/fs/fuse/connections/<N>, N being the minor number of the mount's st_dev."""
    if not FUSECTL.is_dir() or not any(FUSECTL.iterdir()):
        subprocess.run(["mount", "-t", "fusectl", "none", str(FUSECTL)], check=False,
                       capture_output=True)
    return FUSECTL / str(os.minor(os.stat(mountpoint).st_dev))


def raise_max_background(mountpoint: Path, queue_depth: int) -> int:
    """Let the kernel keep ``queue_depth`` requests in flight (FUSE's default is 12)."""
    knob = connection_dir(mountpoint) / "max_background"
    current = int(knob.read_text())
    if queue_depth > current:
        knob.write_text(str(queue_depth))
    return int(knob.read_text())
