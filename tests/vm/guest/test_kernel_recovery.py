"""Recovery in the guest's stock kernel: the connection iscsi_tcp carries is cut (`ss -K`,
or tgtd crashes and comes back); the kernel reports CONN_ERROR, `login` answers with a
userland relogin and a rebind, the same /dev/sdX goes on, and every byte written
through it, before, during and after the cut, is in tgtd's backing file."""

from __future__ import annotations

import os
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

from iscsi_handoff.tgtlab import LunSpec, Tgt

from .kernel_login import KernelLogin, drop_caches
from .openiscsi import read_direct, wait_for, write_direct

LUN_SIZE = 128 << 20
CHUNK = 1 << 20
CHUNKS = 48


class Writer(threading.Thread):
    """O_DIRECT writes of distinct 1 MiB chunks, one after another, timing each."""

    def __init__(self, dev: str) -> None:
        super().__init__(daemon=True)
        self.dev = dev
        self.chunks = [os.urandom(CHUNK) for _ in range(CHUNKS)]
        self.done = 0
        self.error: BaseException | None = None
        self.slowest = 0.0
        self.pause = threading.Event()

    def run(self) -> None:
        try:
            for i, chunk in enumerate(self.chunks):
                began = time.monotonic()
                write_direct(self.dev, i * CHUNK, chunk)
                self.slowest = max(self.slowest, time.monotonic() - began)
                self.done = i + 1
                time.sleep(0.05)
        except BaseException as exc:
            self.error = exc

    def verify(self, backing: Path) -> None:
        assert self.error is None, f"I/O failed during recovery: {self.error!r}"
        assert self.done == CHUNKS
        drop_caches()
        with backing.open("rb") as f:
            for i, chunk in enumerate(self.chunks):
                f.seek(i * CHUNK)
                assert f.read(CHUNK) == chunk, f"chunk {i} differs in tgtd's file"
                assert read_direct(self.dev, i * CHUNK, CHUNK) == chunk, f"chunk {i} read"


def _session_state(sid: int) -> str:
    return Path(f"/sys/class/iscsi_session/session{sid}/state").read_text().strip()


def _cut(port: int) -> None:
    # SOCK_DESTROY on every socket to the portal: the kernel's connection, reset.
    done = subprocess.run(["ss", "-K", "dst", "127.0.0.1", "dport", "=", f":{port}"],
                          capture_output=True, text=True, timeout=30, check=False)
    assert done.returncode == 0, done.stderr


def test_connection_reset_relogin_and_io_goes_on(tgt: Tgt, figure: Callable[[str], None]) -> None:
    iqn = "iqn.2024-01.test.vmlab:recovery-reset"
    target = tgt.add_target(iqn, luns=[LunSpec(size=LUN_SIZE)])
    port = int(tgt.portal.rsplit(":", 1)[1])
    with KernelLogin(tgt.portal, iqn) as run:
        (disk,) = run.disks
        writer = Writer(disk.dev)
        writer.start()
        wait_for(lambda: writer.done >= 8 or writer.error, timeout=120, what="first writes")
        mark = len(run.lines)
        _cut(port)
        line = run.wait_line(rf"session {disk.sid}: recovered in \d+ ms", timeout=120,
                             start=mark)
        assert "connection failed (TCP_CONN_CLOSE)" in run.output() or \
            "connection failed" in run.output()
        writer.join(timeout=300)
        assert not writer.is_alive()
        writer.verify(target.lun_paths[0])
        assert _session_state(disk.sid) == "LOGGED_IN"
        assert Path(disk.dev).exists()
        figure(f"recovery after ss -K: {line.strip()}; slowest 1 MiB write during it "
              f"{writer.slowest:.2f} s")
        assert run.stop() == 0, run.output()


def test_tgtd_restart_relogin_and_io_goes_on(tgt: Tgt, figure: Callable[[str], None]) -> None:
    iqn = "iqn.2024-01.test.vmlab:recovery-restart"
    target = tgt.add_target(iqn, luns=[LunSpec(size=LUN_SIZE)])
    with KernelLogin(tgt.portal, iqn) as run:
        (disk,) = run.disks
        writer = Writer(disk.dev)
        writer.start()
        wait_for(lambda: writer.done >= 8 or writer.error, timeout=120, what="first writes")
        mark = len(run.lines)
        tgt.restart()  # SIGKILL, then the same port, targets and backing files
        line = run.wait_line(rf"session {disk.sid}: recovered in \d+ ms", timeout=180,
                             start=mark)
        writer.join(timeout=300)
        assert not writer.is_alive()
        writer.verify(target.lun_paths[0])
        assert _session_state(disk.sid) == "LOGGED_IN"
        figure(f"recovery after a tgtd restart: {line.strip()}")
        assert run.stop() == 0, run.output()
