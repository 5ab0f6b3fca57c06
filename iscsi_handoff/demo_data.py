"""The demo's data tour: `login` as a user runs it, then a filesystem on what it gives.

Whichever path `login` takes here (the kernel's /dev/sdX, or the FUSE fallback's
/dev/loopN), the tour makes ext4 on the block device, writes a file, unmounts, mounts
again, checks the file, and undoes everything: filesystem, login (which detaches the
loop device and unmounts FUSE, or hands the disk back to the kernel and logs out).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import click

from userland.errors import IscsiError, PathUnavailable

DEVICE = re.compile(r"(/dev/(?:sd[a-z]+|loop\d+))\b")
READY_TIMEOUT = 90.0
FILE_SIZE = 8 << 20


class LoginProcess:
    """`iscsi-handoff login` in the background, its output echoed with a prefix."""

    def __init__(self, args: list[str]) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "iscsi_handoff", *args],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True)
        self.lines: list[str] = []
        self.device: str | None = None
        self._ready = threading.Event()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            line = line.rstrip()
            self.lines.append(line)
            click.echo(f"  | {line}")
            found = DEVICE.search(line)
            if found and self.device is None:
                self.device = found.group(1)
            # Both paths print the device, then say they are serving.
            if self.device is not None and ("serving" in line or "Ctrl-C" in line):
                self._ready.set()
        self._ready.set()

    def wait_device(self) -> str:
        self._ready.wait(READY_TIMEOUT)
        if self.device is None or self.proc.poll() is not None:
            self.stop()
            raise PathUnavailable("demo: login gave no block device (its output is above)")
        return self.device

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


def _run(*cmd: str) -> None:
    click.echo(f"$ {' '.join(cmd)}")
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise IscsiError(f"demo: {cmd[0]} failed: {done.stderr.strip() or done.returncode}")


def _wait_block_device(device: str, timeout: float = 10.0) -> None:
    """The kernel path's /dev/sdX may need a moment for udev to make the node."""
    deadline = time.monotonic() + timeout
    while not os.path.exists(device):
        if time.monotonic() > deadline:
            raise PathUnavailable(f"demo: {device} never appeared")
        time.sleep(0.1)


@contextlib.contextmanager
def mounted(device: str, where: Path) -> Iterator[Path]:
    _run("mount", device, str(where))
    try:
        yield where
    finally:
        _run("umount", str(where))


def filesystem_tour(device: str) -> None:
    _wait_block_device(device)
    _run("mkfs.ext4", "-q", "-F", device)
    payload = os.urandom(FILE_SIZE)
    digest = hashlib.sha256(payload).hexdigest()
    with tempfile.TemporaryDirectory(prefix="iscsi-handoff-demo-") as tmp:
        where = Path(tmp)
        with mounted(device, where):
            (where / "hello.bin").write_bytes(payload)
            click.echo(f"wrote hello.bin: {FILE_SIZE >> 20} MiB, sha256 {digest[:16]}...")
            _run("sync")
        with mounted(device, where):
            again = hashlib.sha256((where / "hello.bin").read_bytes()).hexdigest()
            if again != digest:
                raise IscsiError("demo: the file read back differs from what was written")
            click.echo(f"read it back after a remount: sha256 {again[:16]}... matches")


def data_tour(portal: str, target: str) -> None:
    """Run `login` (the path this machine takes), then the filesystem tour, then log out."""
    if os.geteuid() != 0:
        click.echo("demo: skipping the data path (mkfs and mount need root)")
        return
    with tempfile.TemporaryDirectory(prefix="iscsi-handoff-run-") as run_dir:
        # The FUSE fallback's default mount point goes to a throwaway place.
        os.environ["ISCSI_HANDOFF_RUN_DIR"] = run_dir
        click.echo(f"\n$ iscsi-handoff login --portal {portal} --target {target}")
        login = LoginProcess(["login", "--portal", portal, "--target", target])
        try:
            device = login.wait_device()
            filesystem_tour(device)
        finally:
            click.echo("$ kill -TERM <login>   # finish I/O, log out, let go of the device")
            code = login.stop()
        if code != 0:
            raise IscsiError(f"demo: login exited with status {code}")
        click.echo("login ended cleanly: device released, logged out")
