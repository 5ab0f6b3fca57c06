"""`session rescan` on a FUSE session, against a real tgtd, real /dev/fuse and losetup:
a LUN added on the target appears as lunN/storage (and a loop device), readable and
writable; a LUN grown on the target (tgt: the LUN reloaded from its grown file) shows
its new size in the storage file and the loop device; the record says so. A LUN
removed on the target stays in the tree (its I/O fails) and the keeper serves on."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

import pytest
from test_fuse_sessions_tgt import (  # noqa: F401
    Keeper,
    MiB,
    backing_bytes,
    cli,
    listed,
    ours_left,
    pytestmark,
    run_dir,
    write_direct,
)

from iscsi_handoff.tgtlab import LunSpec, Tgt

from tgt_fixtures import tgt  # noqa: F401

IQN = "iqn.2024-01.org.iscsi-handoff.test:rescan"


def _loop_bytes(device: str) -> int:
    return int(Path(f"/sys/block/{Path(device).name}/size").read_text()) * 512


def _rescan(*args: str) -> dict[str, Any]:
    done = cli("session", "rescan", "--json", "--timeout", "30", *args)
    assert done.returncode == 0, done.stdout + done.stderr
    (session,) = json.loads(done.stdout)["sessions"]
    assert isinstance(session, dict)
    return session


def test_added_lun_then_grown_lun_show_up(tgt: Tgt, run_dir: Path) -> None:  # noqa: F811
    target = tgt.add_target(IQN, luns=[LunSpec(size=8 * MiB)])
    keeper = Keeper("--portal", tgt.portal, "--target", IQN).wait_ready()
    try:
        (loop1,) = keeper.loops()
        write_direct(loop1, MiB, b"1" * MiB)
        (sid,) = listed()

        # Nothing changed yet: the rescan says so.
        same = _rescan("--target", IQN)
        assert same["id"] == sid and same["added"] == [] and same["resized"] == []

        assert tgt.add_lun(target, LunSpec(size=4 * MiB)) == 2
        found = _rescan("--target", IQN)
        assert found["errors"] == [] and found["resized"] == []
        (added,) = found["added"]
        assert isinstance(added, dict) and added["lun"] == 2
        assert added["size_bytes"] == 4 * MiB
        storage2 = Path(added["storage"])
        assert storage2 == keeper.storage().parent / "lun2" / "storage"
        assert storage2.stat().st_size == 4 * MiB
        assert os.readlink(storage2.parent / "targetname") == IQN
        write_direct(storage2, 0, b"2" * MiB)
        assert backing_bytes(target, 1, 0, MiB) == b"2" * MiB
        loop2 = added["loop"]
        assert isinstance(loop2, str) and _loop_bytes(loop2) == 4 * MiB
        write_direct(loop2, 2 * MiB, b"L" * MiB)
        assert backing_bytes(target, 1, 2 * MiB, MiB) == b"L" * MiB
        assert backing_bytes(target, 0, MiB, MiB) == b"1" * MiB  # LUN 1 untouched

        detail = cli("session", "list", "-P", "3").stdout
        assert f"LUN 2: {loop2} <- " in detail, detail
        assert listed()[sid]["storage"][-1] == str(storage2)

        # Grow LUN 2's file to 6 MiB; tgtd takes the new size when the LUN is reloaded.
        os.truncate(target.lun_paths[1], 6 * MiB)
        tgt.reload_lun(target, 2)
        grown = _rescan("--session", sid)
        assert grown["added"] == [] and grown["errors"] == []
        assert grown["resized"] == [{"lun": 2, "was_bytes": 4 * MiB, "size_bytes": 6 * MiB,
                                     "loop": loop2}]
        assert storage2.stat().st_size == 6 * MiB and _loop_bytes(loop2) == 6 * MiB
        write_direct(loop2, 5 * MiB, b"G" * MiB)  # beyond the old end
        assert backing_bytes(target, 1, 5 * MiB, MiB) == b"G" * MiB
        assert backing_bytes(target, 1, 2 * MiB, MiB) == b"L" * MiB

        # LUN 2 removed on the target: reported, left in the tree (its I/O fails); the
        # keeper and LUN 1 serve on.
        tgt.delete_lun(target, 2)
        gone = cli("session", "rescan", "--target", IQN, "--timeout", "30")
        assert gone.returncode == 0, gone.stdout + gone.stderr
        assert "LUN 2 no longer reported" in gone.stdout
        assert storage2.exists() and keeper.proc.poll() is None
        with pytest.raises(OSError):
            backing = os.open(storage2, os.O_RDONLY | os.O_DIRECT)
            try:
                os.pread(backing, 4096, 0)
            finally:
                os.close(backing)
        write_direct(loop1, 3 * MiB, b"k" * MiB)
        assert backing_bytes(target, 0, 3 * MiB, MiB) == b"k" * MiB

        assert keeper.stop(signal.SIGTERM) == 0, keeper.output()
        assert "detached " + loop2 in keeper.output()
        assert ours_left(run_dir) == [] and listed() == {}
    finally:
        if keeper.proc.poll() is None:
            keeper.stop(signal.SIGKILL)
