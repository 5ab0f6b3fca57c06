"""Our kernel session next to open-iscsi's, on the same target in the guest's stock
kernel: each gets its own session and /dev/sdX of one LUN, and what one writes the other
reads. And how long each takes from the command to the disk, printed as a figure
(noisy under emulation: never asserted)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

from iscsi_handoff.tgtlab import LunSpec, Tgt

from .kernel_login import KernelLogin, drop_caches, sessions_in_sysfs
from .openiscsi import Iscsid, disk_bytes, read_direct, wait_for, write_direct

LUN_SIZE = 64 << 20
IQN = "iqn.2024-01.test.vmlab:side-by-side"


def _their_disk(ours: set[int]) -> tuple[int, str] | None:
    for session in Path("/sys/class/iscsi_session").glob("session*"):
        sid = int(session.name[len("session"):])
        if sid in ours or (session / "targetname").read_text().strip() != IQN:
            continue
        for block in (session / "device").glob("target*/*:*:*:1/block/*"):
            return sid, block.name
    return None


def test_side_by_side_with_open_iscsi(tgt: Tgt, iscsid: Iscsid,
                                      figure: Callable[[str], None]) -> None:
    tgt.add_target(IQN, luns=[LunSpec(size=LUN_SIZE)])
    with KernelLogin(tgt.portal, IQN) as run:
        (ours,) = run.disks
        ours_ready = run.ready_seconds
        assert ours_ready is not None
        inside = run.wait_line(rf"session {ours.sid}: login \d+ ms, .* in all", timeout=5)

        assert (tgt.portal, IQN) in iscsid.discover(tgt.portal)
        began = time.monotonic()
        iscsid.login(IQN, tgt.portal)
        sid, name = wait_for(lambda: _their_disk({ours.sid}), timeout=60,
                             what="open-iscsi's disk")
        theirs_ready = time.monotonic() - began
        theirs = f"/dev/{name}"
        assert sid != ours.sid and name != ours.name
        assert disk_bytes(name) == disk_bytes(ours.name) == LUN_SIZE

        mine = os.urandom(2 << 20)
        write_direct(ours.dev, 1 << 20, mine)
        drop_caches()
        assert read_direct(theirs, 1 << 20, len(mine)) == mine
        back = os.urandom(2 << 20)
        write_direct(theirs, 16 << 20, back)
        drop_caches()
        assert read_direct(ours.dev, 16 << 20, len(back)) == back

        # By session id: the node (target + portal) matches our session as well, which
        # iscsid does not own and would report as "session not found".
        iscsid.adm("-m", "session", "-r", str(sid), "-u")
        wait_for(lambda: sid not in sessions_in_sysfs(), timeout=60,
                 what="open-iscsi's session to go")
        # Theirs went; ours carries on.
        assert read_direct(ours.dev, 16 << 20, len(back)) == back
        assert ours.sid in sessions_in_sysfs()
        assert run.stop() == 0, run.output()
    ms = int(inside.rsplit(";", 1)[1].split()[0])
    figure(f"time to /dev/sdX under TCG emulation: iscsi-handoff {ms / 1000:.2f} s from "
          f"connect to disk ({inside.split(': ', 1)[1]}), {ours_ready:.2f} s with the "
          f"Python process start; iscsiadm {theirs_ready:.2f} s (a running iscsid logs "
          "in and scans)")
