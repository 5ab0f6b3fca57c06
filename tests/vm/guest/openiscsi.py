"""open-iscsi in the guest: the kernel's own initiator daemon, the reference we compare with.

`Iscsid` runs `iscsid -f` (in the foreground, so we hold its PID: iscsid refuses a pid
file in that mode) and drives it with `iscsiadm`. open-iscsi cannot run on the host's
kernel (no NETLINK_ISCSI): only here, where no other iscsid runs.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

ADM_TIMEOUT = 60.0  # one iscsiadm call (a login under emulation takes a few seconds)
START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0
# iscsid's control socket, an abstract Unix socket (open-iscsi's ISCSIADM_NAMESPACE)
IPC_SOCKET = "@ISCSIADM_ABSTRACT_NAMESPACE"
SYS_SESSIONS = Path("/sys/class/iscsi_session")

T = TypeVar("T")


def wait_for(probe: Callable[[], T | None], *, timeout: float, what: str,
             interval: float = 0.05) -> T:
    """Poll `probe` until it returns something other than None/False; AssertionError
    naming `what` past the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value is not None and value is not False:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


class Iscsid:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.log = workdir / "iscsid.log"
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("wb") as log:
            # A session of its own: at SIGTERM iscsid signals its whole process group.
            self._proc = subprocess.Popen(["iscsid", "-f"], stdin=subprocess.DEVNULL,
                                          stdout=log, stderr=subprocess.STDOUT,
                                          start_new_session=True)
        proc = self._proc

        def listening() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"iscsid exited with status {proc.returncode}: "
                                     f"{self.log.read_text(errors='replace').strip()}")
            # `iscsiadm -m session` reads sysfs alone: it says nothing about the daemon
            return IPC_SOCKET in Path("/proc/net/unix").read_text()

        wait_for(listening, timeout=START_TIMEOUT, what="iscsid's control socket",
                 interval=0.1)

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        self.adm("-m", "node", "--logoutall=all", check=False)
        proc.terminate()  # by PID; iscsid exits on SIGTERM
        try:
            proc.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=STOP_TIMEOUT)

    def adm(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(["iscsiadm", *args], stdin=subprocess.DEVNULL,
                              capture_output=True, text=True, timeout=ADM_TIMEOUT,
                              check=False)
        if check and done.returncode != 0:
            raise AssertionError(f"iscsiadm {' '.join(args)} exited {done.returncode}: "
                                 f"{(done.stderr or done.stdout).strip()}")
        return done

    def discover(self, portal: str) -> list[tuple[str, str]]:
        """SendTargets through iscsid: [(portal, iqn)] as iscsiadm prints them."""
        out = self.adm("-m", "discovery", "-t", "sendtargets", "-p", portal).stdout
        found = []
        for line in out.splitlines():
            addr, _, iqn = line.strip().partition(" ")
            found.append((addr.split(",")[0], iqn))
        return found

    def login(self, iqn: str, portal: str) -> None:
        self.adm("-m", "node", "-T", iqn, "-p", portal, "--login")

    def logout(self, iqn: str, portal: str) -> None:
        self.adm("-m", "node", "-T", iqn, "-p", portal, "--logout")


def session_disks(iqn: str) -> dict[int, str]:
    """{LUN: "sdX"} for every disk of the kernel's sessions to target `iqn` (sysfs)."""
    disks: dict[int, str] = {}
    for session in SYS_SESSIONS.glob("session*"):
        with contextlib.suppress(OSError):
            if (session / "targetname").read_text().strip() != iqn:
                continue
            for block in (session / "device").glob("target*/*:*:*:*/block/*"):
                lun = int(block.parent.parent.name.rsplit(":", 1)[1])
                disks[lun] = block.name
    return disks


def disk_bytes(dev: str) -> int:
    """The size of /dev/<dev> in bytes (sysfs counts 512-byte sectors whatever the LBA)."""
    return int(Path(f"/sys/block/{dev}/size").read_text()) * 512


def write_direct(path: str, offset: int, data: bytes) -> None:
    """Write `data` at `offset` with O_DIRECT (no page cache: the bytes go to the target)."""
    buf = mmap.mmap(-1, len(data))  # page-aligned, as O_DIRECT wants
    try:
        buf[:] = data
        fd = os.open(path, os.O_WRONLY | os.O_DIRECT)
        try:
            assert os.pwritev(fd, [buf], offset) == len(data)
            os.fsync(fd)
        finally:
            os.close(fd)
    finally:
        buf.close()


def read_direct(path: str, offset: int, length: int) -> bytes:
    buf = mmap.mmap(-1, length)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
        try:
            assert os.preadv(fd, [buf], offset) == length
        finally:
            os.close(fd)
        return bytes(buf)
    finally:
        buf.close()
