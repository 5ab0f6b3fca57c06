"""Both data paths against LIO, the kernel's own target, as well as against tgt: the
kernel path (login -> /dev/sdX -> ext4 -> verify after a cache drop -> logout) with
mutual CHAP, and the FUSE fallback (login --fuse --loop -> ext4 -> verify -> SIGTERM)
with one-way CHAP."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

from .kernel_login import (
    KernelLogin,
    drop_caches,
    file_sha256,
    mounted_ext4,
    sessions_in_sysfs,
    write_file,
)
from .lio_fixtures import LUN_SIZE, LioCase, lio_chap, lio_mutual, lio_session  # noqa: F401
from .openiscsi import disk_bytes, wait_for

FILE_SIZE = 8 << 20


def test_kernel_path_against_lio_with_mutual_chap(lio_mutual: LioCase,  # noqa: F811
                                                  tmp_path: Path) -> None:
    extra = lio_mutual.login_args[4:]  # after --portal P --target IQN
    with KernelLogin(lio_mutual.lio.portal, lio_mutual.iqn, *extra) as run:
        assert len(run.disks) == 1, run.output()
        disk = run.disks[0]
        assert disk_bytes(disk.name) == LUN_SIZE, run.output()
        with mounted_ext4(disk.dev, tmp_path / "mnt") as mnt:
            digest = write_file(mnt / "data", FILE_SIZE, b"lio-kernel")
        drop_caches()
        with mounted_ext4(disk.dev, tmp_path / "mnt", mkfs=False) as mnt:
            assert file_sha256(mnt / "data") == digest
        status = run.stop()
    assert status == 0, run.output()
    wait_for(lambda: disk.sid not in sessions_in_sysfs(), timeout=30,
             what="the LIO session to go after logout")
    assert not Path(f"/sys/block/{disk.name}").exists()


def test_fuse_path_against_lio_with_chap(lio_chap: LioCase, tmp_path: Path) -> None:  # noqa: F811
    root = tmp_path / "iscsi"
    root.mkdir()
    proc = subprocess.Popen([sys.executable, "-m", "iscsi_handoff", "login", "--fuse",
                             str(root), "--loop", *lio_chap.login_args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out: list[str] = []
    ready = threading.Event()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            out.append(line.rstrip())
            if line.startswith("serving;"):
                ready.set()
        ready.set()

    threading.Thread(target=pump, daemon=True).start()
    try:
        assert ready.wait(180) and proc.poll() is None, "\n".join(out)
        storage = root / "127.0.0.1" / lio_chap.iqn.rsplit(":", 1)[1] / "storage"
        assert storage.stat().st_size == LUN_SIZE
        loop = next(m.group(1) for line in out if (m := re.search(r"(/dev/loop\d+) ->", line)))
        with mounted_ext4(loop, tmp_path / "mnt") as mnt:
            digest = write_file(mnt / "data", FILE_SIZE, b"lio-fuse")
        drop_caches()
        with mounted_ext4(loop, tmp_path / "mnt", mkfs=False) as mnt:
            assert file_sha256(mnt / "data") == digest
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=120)
    assert code == 0, "\n".join(out)
    assert any("logged out" in line for line in out), out
    assert not storage.exists()  # unmounted
