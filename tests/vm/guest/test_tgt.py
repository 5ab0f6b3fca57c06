"""tgtd (the project's tgt fixture library) runs on the guest's loopback."""

from __future__ import annotations

import subprocess

from iscsi_handoff.tgtlab import Tgt


def test_tgtd_serves_a_target_on_the_guest_loopback(tgt: Tgt) -> None:
    target = tgt.add_target("iqn.2024-01.test.vmlab:tgt")
    assert tgt.host == "127.0.0.1"
    # libiscsi's iscsi-ls logs in for real and lists the LUN with its size
    done = subprocess.run(["iscsi-ls", "-s", f"iscsi://{tgt.portal}"], capture_output=True,
                          text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert target.iqn in done.stdout
    assert "Lun:1" in done.stdout.replace(" ", ""), done.stdout
