"""The tgt lab itself: parallel instances, CHAP, clean stop (checked with libiscsi)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from iscsi_handoff.tgtlab import LunSpec, Tgt

from tgt_fixtures import tgt  # noqa: F401

pytestmark = pytest.mark.tgt


def test_two_instances_side_by_side_then_gone(tgt: Tgt) -> None:  # noqa: F811
    other = Tgt()
    other.start()
    try:
        assert other.port != tgt.port and other.control != tgt.control
        tgt.add_target("iqn.2024-01.org.test:a", luns=[LunSpec(size=4 << 20)])
        other.add_target("iqn.2024-01.org.test:b", chap=("user1", "secret-secret-1"))
        out = subprocess.run(["iscsi-ls", "-s", f"iscsi://{tgt.portal}"], capture_output=True,
                             text=True, timeout=30)
        assert "iqn.2024-01.org.test:a" in out.stdout and ":b" not in out.stdout
        inq = subprocess.run(["iscsi-inq", f"iscsi://user1%secret-secret-1@{other.portal}/"
                                           "iqn.2024-01.org.test:b/1"],
                             capture_output=True, text=True, timeout=30)
        assert inq.returncode == 0 and "VIRTUAL-DISK" in inq.stdout, inq.stderr
        bad = subprocess.run(["iscsi-inq", f"iscsi://{other.portal}/iqn.2024-01.org.test:b/1"],
                             capture_output=True, text=True, timeout=30)
        assert bad.returncode != 0
    finally:
        pid, control, workdir = other.pid, other.control, other.workdir
        other.stop()
    assert pid is not None
    assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(
        f"/proc/{pid}/status").read_text().lower()
    assert not list(Path("/run/tgtd").glob(f"socket.{control}*"))
    assert not workdir.exists()
    assert os.path.exists(tgt.workdir)
