"""The kernel handoff in Debian's stock kernel: `iscsi-handoff login --kernel` against a
real tgtd on the guest's loopback gives a /dev/sdX of the LUN's size, a filesystem on it
keeps 64 MiB across a cache drop, and SIGTERM logs out: disk and session gone."""

from __future__ import annotations

from pathlib import Path

from iscsi_handoff.tgtlab import LunSpec, Tgt

from .kernel_login import (
    KernelLogin,
    drop_caches,
    file_sha256,
    mounted_ext4,
    sessions_in_sysfs,
    write_file,
)
from .openiscsi import disk_bytes, wait_for

LUN_SIZE = 256 << 20
IQN = "iqn.2024-01.test.vmlab:handoff"


def test_login_filesystem_64mib_and_logout(tgt: Tgt, tmp_path: Path) -> None:
    tgt.add_target(IQN, luns=[LunSpec(size=LUN_SIZE)])
    before = sessions_in_sysfs()
    with KernelLogin(tgt.portal, IQN) as run:
        assert len(run.disks) == 1, run.output()
        disk = run.disks[0]
        assert disk.lun == 1 and disk.size_text == "256.0 MiB"
        assert Path(disk.dev).exists() and disk_bytes(disk.name) == LUN_SIZE
        assert disk.sid in sessions_in_sysfs() - before
        sysfs = Path(f"/sys/class/iscsi_session/session{disk.sid}")
        assert (sysfs / "targetname").read_text().strip() == IQN
        assert (sysfs / "state").read_text().strip() == "LOGGED_IN"
        conn = Path(f"/sys/class/iscsi_connection/connection{disk.sid}:0")
        assert (conn / "persistent_address").read_text().strip() == "127.0.0.1"

        with mounted_ext4(disk.dev, tmp_path / "mnt") as mnt:
            digest = write_file(mnt / "data", 64 << 20, b"handoff")
        drop_caches()
        with mounted_ext4(disk.dev, tmp_path / "mnt", mkfs=False) as mnt:
            assert file_sha256(mnt / "data") == digest
        status = run.stop()
    assert status == 0, run.output()
    assert f"logged out of session {disk.sid}" in run.output()
    wait_for(lambda: not Path(f"/sys/block/{disk.name}").exists(), timeout=30,
             what=f"{disk.name} to go after logout")
    assert disk.sid not in sessions_in_sysfs()
