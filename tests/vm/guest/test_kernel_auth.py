"""The kernel handoff with CHAP (one-way and mutual) and CRC32C digests, in the guest's
stock kernel against tgtd: the login is ours, the data path the kernel's, and what the
disk carries reaches tgtd's backing file byte for byte."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from iscsi_handoff.identity import initiator_name
from iscsi_handoff.kernel_path import run_kernel_login
from iscsi_handoff.tgtlab import LunSpec, Tgt
from userland.errors import AuthenticationError
from userland.login.chap import Credentials, Secret
from userland.login.machine import LoginConfig, new_isid
from userland.portal import Portal

from .kernel_login import KernelLogin, drop_caches
from .openiscsi import disk_bytes, read_direct, write_direct

LUN_SIZE = 64 << 20
USER, SECRET = "alice", "alice-secret-0123"
TARGET_USER, TARGET_SECRET = "tgt-east", "target-secret-4567"


def _secret_file(tmp_path: Path, name: str, secret: str) -> str:
    path = tmp_path / name
    path.write_text(secret + "\n")
    path.chmod(0o600)
    return str(path)


def _round_trip(dev: str, backing: Path) -> None:
    pattern = os.urandom(4 << 20)
    write_direct(dev, 8 << 20, pattern)
    with backing.open("rb") as f:  # tgtd's file: the bytes went over the wire
        f.seek(8 << 20)
        assert f.read(len(pattern)) == pattern
    drop_caches()
    assert read_direct(dev, 8 << 20, len(pattern)) == pattern


@pytest.mark.parametrize("mutual", [False, True], ids=["one-way+crc32c", "mutual"])
def test_chap(tgt: Tgt, tmp_path: Path, mutual: bool) -> None:
    """One-way CHAP with CRC32C header and data digests, then mutual CHAP without."""
    iqn = f"iqn.2024-01.test.vmlab:chap-{'mutual' if mutual else 'oneway'}"
    # tgt offers no digest unless told to; with them the kernel computes every CRC32C.
    digests = {} if mutual else {"HeaderDigest": "CRC32C", "DataDigest": "CRC32C"}
    target = tgt.add_target(iqn, luns=[LunSpec(size=LUN_SIZE)], chap=(USER, SECRET),
                            mutual=(TARGET_USER, TARGET_SECRET) if mutual else None,
                            params=digests)
    args = ["--chap-user", USER, "--chap-secret-file", _secret_file(tmp_path, "ours", SECRET)]
    if mutual:
        args += ["--mutual-user", TARGET_USER, "--mutual-secret-file",
                 _secret_file(tmp_path, "theirs", TARGET_SECRET)]
    else:
        args += ["--header-digest", "crc32c", "--data-digest", "crc32c"]
    with KernelLogin(tgt.portal, iqn, *args) as run:
        (disk,) = run.disks
        assert disk_bytes(disk.name) == LUN_SIZE
        assert SECRET not in run.output() and TARGET_SECRET not in run.output()
        conn = Path(f"/sys/class/iscsi_connection/connection{disk.sid}:0")
        # iscsi_tcp shows the flags SET_PARAM gave it: 1 is CRC32C on
        flag = "0" if mutual else "1"
        assert (conn / "header_digest").read_text().strip() == flag
        assert (conn / "data_digest").read_text().strip() == flag
        _round_trip(disk.dev, target.lun_paths[0])
        assert run.stop() == 0, run.output()


def test_wrong_chap_secret_leaves_nothing_behind(tgt: Tgt) -> None:
    iqn = "iqn.2024-01.test.vmlab:chap-wrong"
    tgt.add_target(iqn, luns=[LunSpec(size=LUN_SIZE)], chap=(USER, SECRET))
    before = set(Path("/sys/class/iscsi_session").glob("session*"))
    config = LoginConfig(initiator_name=initiator_name(), target_name=iqn, isid=new_isid(),
                         credentials=Credentials(USER, Secret(b"not-the-secret-at-all")))
    with pytest.raises(AuthenticationError):
        run_kernel_login(Portal.parse(tgt.portal), config)  # in-process: no start-up cost
    assert set(Path("/sys/class/iscsi_session").glob("session*")) == before
