"""LUNs added or resized on the target show up, in the guest's stock kernel with tgtd.

A LUN added while the session runs: tgt raises REPORTED LUNS DATA HAS CHANGED on the
nexus; the next command meets it, the kernel sends a SCSI uevent, and the keeper
rescans by itself. `iscsi-handoff session rescan` does the same on demand, and reads
each disk's capacity again: a LUN that grew shows its new size on the same /dev/sdX.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from click.testing import CliRunner

from iscsi_handoff.cli import cli
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
    """`session rescan --json ARGS`, in this process (a Python start costs ~15 s under
    TCG): the one session it names."""
    result = CliRunner().invoke(cli, ["session", "rescan", "--json", *args])
    assert result.exit_code == 0 and result.exception is None, (result.output,
                                                                 result.exception)
    (session,) = json.loads(result.output)["sessions"]
    assert isinstance(session, dict)
    return session


def disk_of(sid: int, lun: int) -> str | None:
    base = Path(f"/sys/class/iscsi_session/session{sid}/device")
    for block in base.glob(f"target*/*:*:*:{lun}/block/*"):
        return block.name
    return None


def size_of(name: str) -> int:
    return int(Path(f"/sys/block/{name}/size").read_text()) * 512


def test_added_and_resized_luns_show_up(tgt: Tgt, tmp_path: Path,
                                        figure: Callable[[str], None]) -> None:
    iqn = "iqn.2024-01.test.vmlab:rescan"
    target = tgt.add_target(iqn, luns=[LunSpec(size=SIZE)])
    with KernelLogin(tgt.portal, iqn) as run:
        (disk,) = run.disks
        write_direct(disk.dev, 0, b"a" * 4096)  # past the first UNIT ATTENTION
        mark = len(run.lines)

        # 1. A LUN added: the next command on the nexus meets REPORTED LUNS DATA HAS
        # CHANGED, the kernel sends its uevent, the keeper rescans with no command typed.
        add_lun(tgt, target, 2, sparse(tmp_path / "lun2.img", SIZE))
        assert read_direct(disk.dev, 0, 4096) == b"a" * 4096
        line = run.wait_line(r"rescan \(REPORTED_LUNS_DATA_HAS_CHANGED\).*LUN 2 added as "
                             r"/dev/sd", timeout=60, start=mark)
        name2 = wait_for(lambda: disk_of(disk.sid, 2), timeout=30, what="LUN 2's disk")
        assert size_of(name2) == SIZE
        write_direct(f"/dev/{name2}", 8192, b"b" * 4096)
        with (tmp_path / "lun2.img").open("rb") as f:
            f.seek(8192)
            assert f.read(4096) == b"b" * 4096

        # 2. A LUN added with no command after it: `session rescan` finds it.
        lun3 = sparse(tmp_path / "lun3.img", SIZE)
        add_lun(tgt, target, 3, lun3)
        session = rescan("--target", iqn)
        assert [d["lun"] for d in session["added"]] == [3], session
        name3 = session["added"][0]["name"]
        assert {d["lun"] for d in session["disks"]} == {1, 2, 3}

        # 3. LUN 3 grown on the target (tgt reads a LUN's size when it is added):
        # `session rescan` shows the new size on the same /dev/sdX.
        delete_lun(tgt, target, 3)
        sparse(lun3, GROWN)
        add_lun(tgt, target, 3, lun3)
        session = rescan("--session", str(disk.sid))
        assert [(r["disk"]["name"], r["disk"]["size_bytes"], r["was_bytes"])
                for r in session["resized"]] == [(name3, GROWN, SIZE)], session
        assert session["errors"] == []
        assert size_of(name3) == GROWN
        write_direct(f"/dev/{name3}", GROWN - 4096, b"z" * 4096)  # past the old end
        assert os.path.getsize(lun3) == GROWN
        with lun3.open("rb") as f:
            f.seek(GROWN - 4096)
            assert f.read() == b"z" * 4096
        figure(f"LUN added on the target, found by the keeper: {line.strip()}; "
               f"session rescan: LUN 3 added as /dev/{name3}, then grown to {GROWN} bytes")
        assert run.stop() == 0, run.output()
