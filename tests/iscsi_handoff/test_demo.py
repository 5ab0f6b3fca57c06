"""The README's first command runs `iscsi-handoff demo`: it must work end to end and
leave nothing behind (no tgtd, no mount, no loop device)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from iscsi_handoff.tgtlab import unavailable_reason

pytestmark = pytest.mark.tgt


def _mounts() -> str:
    with open("/proc/self/mounts") as f:
        return f.read()


def test_demo_discovers_logs_in_and_round_trips_a_file_through_ext4() -> None:
    reason = unavailable_reason()
    if reason is None and os.geteuid() != 0:
        reason = "the demo's data tour needs root"
    if reason is None and not os.path.exists("/dev/fuse"):
        reason = "/dev/fuse is missing"
    if reason:
        pytest.skip(reason)
    done = subprocess.run([sys.executable, "-m", "iscsi_handoff", "demo"],
                          capture_output=True, text=True, timeout=300, check=False)
    out = done.stdout
    assert done.returncode == 0, out + done.stderr
    assert re.search(r"started tgtd on 127\.0\.0\.1:\d+", out)
    assert "iqn.2024-01.org.iscsi-handoff.demo:disk1" in out and "logged out" in out
    device = re.search(r"\$ mkfs\.ext4 -q -F (/dev/\S+)", out)
    assert device, out
    assert "read it back after a remount" in out and "matches" in out
    assert "login ended cleanly" in out and "demo: stopped tgtd" in out
    # Nothing left behind: the loop device is free, no FUSE or ext4 mount remains.
    assert "iscsi-handoff-run-" not in _mounts() and "iscsi-handoff-demo-" not in _mounts()
    if device.group(1).startswith("/dev/loop"):
        name = os.path.basename(device.group(1))
        assert not os.path.exists(f"/sys/block/{name}/loop/backing_file"), \
            f"{device.group(1)} still attached"
