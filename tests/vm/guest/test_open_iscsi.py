"""open-iscsi, the kernel's own initiator, against tgtd in the guest: the reference the
kernel handoff is compared with. Login makes a /dev/sdX of the LUN's size, data written
through it reaches the target's backing file, logout removes it."""

from __future__ import annotations

import os
from pathlib import Path

from iscsi_handoff.tgtlab import LunSpec, Tgt

from .openiscsi import (
    Iscsid,
    disk_bytes,
    read_direct,
    session_disks,
    wait_for,
    write_direct,
)

LUN_SIZE = 48 << 20
IQN = "iqn.2024-01.test.vmlab:open-iscsi"


def test_login_makes_a_disk_that_reaches_the_target_and_logout_removes_it(
        tgt: Tgt, iscsid: Iscsid) -> None:
    target = tgt.add_target(IQN, luns=[LunSpec(size=LUN_SIZE)])
    assert (tgt.portal, IQN) in iscsid.discover(tgt.portal)

    iscsid.login(IQN, tgt.portal)
    disks = wait_for(lambda: session_disks(IQN) or None, timeout=30,
                     what="the LUN's block device after login")
    assert list(disks) == [1], f"tgt exports LUN 1 as the only disk: {disks}"
    dev = disks[1]
    assert Path(f"/dev/{dev}").exists()
    assert disk_bytes(dev) == LUN_SIZE

    pattern = os.urandom(1 << 20)
    write_direct(f"/dev/{dev}", 4 << 20, pattern)
    with target.lun_paths[0].open("rb") as backing:  # tgtd's file, on the guest's /dev/shm
        backing.seek(4 << 20)
        assert backing.read(len(pattern)) == pattern
    assert read_direct(f"/dev/{dev}", 4 << 20, len(pattern)) == pattern

    iscsid.logout(IQN, tgt.portal)
    wait_for(lambda: not Path(f"/sys/block/{dev}").exists(), timeout=30,
             what=f"{dev} to go after logout")
    assert session_disks(IQN) == {}
