"""LUNs added or resized on the target show up, in the guest's stock kernel with tgtd.

A LUN added while the session runs: tgt raises REPORTED LUNS DATA HAS CHANGED on the
nexus; the next command meets it, the kernel sends a SCSI uevent, and the keeper
rescans by itself. `iscsi-handoff session rescan` does the same on demand, and reads
each disk's capacity again: a LUN that grew shows its new size on the same /dev/sdX.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from iscsi_handoff.tgtlab import LunSpec, Target, Tgt

from .kernel_login import KernelLogin
from .openiscsi import read_direct, wait_for, write_direct

SIZE = 16 << 20
GROWN = 48 << 20


def add_lun(tgt: Tgt, target: Target, lun: int, path: Path) -> None:
    tgt._adm("--mode", "logicalunit", "--op", "new", "--tid", str(target.tid),
             "--lun", str(lun), "--backing-store", str(path))


def delete_lun(tgt: Tgt, target: Target, lun: int) -> None:
    tgt._adm("--mode", "logicalunit", "--op", "delete", "--tid", str(target.tid),
             "--lun", str(lun))


def sparse(path: Path, size: int) -> Path:
    with path.open("ab") as f:
        f.truncate(size)
    return path


def rescan(*args: str) -> dict[str, Any]:
    """`session rescan --json ARGS`: the one session it names."""
    done = subprocess.run([sys.executable, "-m", "iscsi_handoff", "session", "rescan",
                           "--json", *args], capture_output=True, text=True, timeout=120,
                          check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    (session,) = json.loads(done.stdout)["sessions"]
    assert isinstance(session, dict)
    return session


def disk_of(sid: int, lun: int) -> str | None:
    base = Path(f"/sys/class/iscsi_session/session{sid}/device")
    for block in base.glob(f"target*/*:*:*:{lun}/block/*"):
        return block.name
    return None


def size_of(name: str) -> int:
    return int(Path(f"/sys/block/{name}/size").read_text()) * 512


def test_added_lun_appears_by_itself_and_after_session_rescan(
        tgt: Tgt, tmp_path: Path, figure: Callable[[str], None]) -> None:
    iqn = "iqn.2024-01.test.vmlab:rescan-add"
    target = tgt.add_target(iqn, luns=[LunSpec(size=SIZE)])
    with KernelLogin(tgt.portal, iqn) as run:
        (disk,) = run.disks
        write_direct(disk.dev, 0, b"a" * 4096)  # past the first UNIT ATTENTION
        mark = len(run.lines)
        add_lun(tgt, target, 2, sparse(tmp_path / "lun2.img", SIZE))
        # The next command on the nexus meets REPORTED LUNS DATA HAS CHANGED: the kernel
        # sends its uevent, and the keeper rescans with no command typed.
        assert read_direct(disk.dev, 0, 4096) == b"a" * 4096
        line = run.wait_line(r"rescan \(REPORTED_LUNS_DATA_HAS_CHANGED\).*LUN 2 added as "
                             r"/dev/sd", timeout=60, start=mark)
        name = wait_for(lambda: disk_of(disk.sid, 2), timeout=30, what="LUN 2's disk")
        assert size_of(name) == SIZE
        # session rescan finds it too (nothing new now), and writes to every device
        session = rescan("--session", str(disk.sid))
        assert session["errors"] == [] and {d["lun"] for d in session["disks"]} == {1, 2}
        write_direct(f"/dev/{name}", 8192, b"b" * 4096)
        with (tmp_path / "lun2.img").open("rb") as f:
            f.seek(8192)
            assert f.read(4096) == b"b" * 4096
        figure(f"LUN added on the target, found by the keeper: {line.strip()}")
        assert run.stop() == 0, run.output()


def test_session_rescan_shows_a_new_lun_and_a_resized_one(tgt: Tgt, tmp_path: Path) -> None:
    iqn = "iqn.2024-01.test.vmlab:rescan-resize"
    target = tgt.add_target(iqn, luns=[LunSpec(size=SIZE)])
    with KernelLogin(tgt.portal, iqn) as run:
        (disk,) = run.disks
        lun2 = sparse(tmp_path / "lun2.img", SIZE)
        add_lun(tgt, target, 2, lun2)
        session = rescan("--target", iqn)  # no command in between: only the rescan finds it
        assert [d["lun"] for d in session["added"]] == [2], session
        name = session["added"][0]["name"]
        assert size_of(name) == SIZE
        # grow LUN 2 on the target (tgt reads a LUN's size when it is added)
        delete_lun(tgt, target, 2)
        sparse(lun2, GROWN)
        add_lun(tgt, target, 2, lun2)
        session = rescan("--session", str(disk.sid))
        assert [(r["disk"]["name"], r["disk"]["size_bytes"], r["was_bytes"])
                for r in session["resized"]] == [(name, GROWN, SIZE)], session
        assert size_of(name) == GROWN  # the same /dev/sdX, its new size
        write_direct(f"/dev/{name}", GROWN - 4096, b"z" * 4096)  # past the old end
        assert os.path.getsize(lun2) == GROWN
        with lun2.open("rb") as f:
            f.seek(GROWN - 4096)
            assert f.read() == b"z" * 4096
        assert run.stop() == 0, run.output()
