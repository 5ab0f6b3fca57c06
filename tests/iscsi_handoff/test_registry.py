"""The session registry: atomic records, checks against reality, and claims that refuse
a duplicate even when two logins race. Real processes for owners; mountinfo and sysfs
from files where a real FUSE mount or kernel session is not needed (tests of both are in
test_fuse_sessions_tgt.py and the VM guest)."""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from iscsi_handoff import registry, sysstate
from iscsi_handoff.registry import LEFTOVER, LIVE, STALE, Record
from userland.errors import SessionExists

TARGET = "iqn.2024-01.org.example:disk1"
INITIATOR = "iqn.2024-01.org.example:me"


def _fuse(isid: str = "80aabbccddee", **kw: object) -> Record:
    base: dict[str, object] = {"portal": "127.0.0.1:3260", "portal_connected": "127.0.0.1:3260",
                               "isid": isid, "initiator_name": INITIATOR,
                               "mountpoint": "/run/x/fuse/a", "ready": True}
    base.update(kw)
    return registry.new_record("fuse", target=TARGET, **base)  # type: ignore[arg-type]


def _dead_pid() -> tuple[int, int | None]:
    """A pid whose process has exited (and its start time while it lived)."""
    proc = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"],
                            stdin=subprocess.PIPE)
    start = sysstate.process_start_time(proc.pid)
    assert proc.stdin is not None
    proc.stdin.close()
    proc.wait()
    return proc.pid, start


def test_a_record_round_trips_atomically(tmp_path: Path) -> None:
    record = _fuse(loops=("/dev/loop7",), details={"auth": {"method": "CHAP", "user": "u"}})
    path = registry.write(record)
    assert path == tmp_path / "run" / "sessions" / "fuse-80aabbccddee.json"
    assert registry.read(record.name) == record
    assert os.listdir(path.parent) == [path.name]  # no temporary file left
    assert record.session_id == "F80aabbccddee"
    updated = registry.update(record.name, ready=False, details={"recoveries": 2})
    assert updated is not None and updated.details == {"auth": {"method": "CHAP", "user": "u"},
                                                       "recoveries": 2}
    registry.remove(record.name, pid=os.getpid() + 1)  # not its owner: kept
    assert registry.read(record.name) is not None
    registry.remove(record.name)
    assert registry.read(record.name) is None


def test_states_against_reality(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sysstate, "MOUNTINFO", tmp_path / "mountinfo")
    monkeypatch.setattr(sysstate, "SYS_BLOCK", tmp_path / "block")
    (tmp_path / "mountinfo").write_text("")
    live = _fuse("000000000001")
    pid, start = _dead_pid()
    dead_clean = registry.replace_owner(_fuse("000000000002"), pid=pid, pid_start=start)
    # A dead keeper whose mount is still there (mount id 77) and whose loop device is
    # still backed by a file under it: a leftover, with the command that cleans it.
    mp = "/run/x/fuse/with space"
    dead_left = registry.replace_owner(
        _fuse("000000000003", mountpoint=mp, mount_id=77, loops=("/dev/loop5", "/dev/loop6")),
        pid=pid, pid_start=start)
    (tmp_path / "mountinfo").write_text(
        "77 30 0:55 / /run/x/fuse/with\\040space rw,nosuid - fuse.iscsi iscsi-handoff rw\n")
    for name, backing in (("loop5", f"{mp}/127.0.0.1/disk1/storage"),
                          ("loop6", "/somebody/else")):  # loop6 was reused since: not ours
        (tmp_path / "block" / name / "loop").mkdir(parents=True)
        (tmp_path / "block" / name / "loop" / "backing_file").write_text(backing + "\n")
    other_boot = _fuse("000000000004", boot_id="not-this-boot")
    old_format = _fuse("000000000005", format=0)
    recycled = registry.replace_owner(_fuse("000000000006"), pid=os.getpid(),
                                      pid_start=(live.pid_start or 0) + 1)
    for r in (live, dead_clean, dead_left, other_boot, old_format, recycled):
        registry.write(r)
    (tmp_path / "run" / "sessions" / "fuse-garbage.json").write_text("{not json")

    found = {e.record.isid: e for e in registry.entries(include_stale=True,
                                                        remove_stale=False)}
    assert found["000000000001"].state == LIVE
    assert found["000000000003"].state == LEFTOVER
    assert found["000000000003"].cleanup == "iscsi-handoff logout --all"
    assert "loop device /dev/loop5" in found["000000000003"].why
    assert "loop6" not in found["000000000003"].why
    assert registry.our_loops(dead_left) == ["/dev/loop5"]
    assert {k for k, e in found.items() if e.state == STALE} == {
        "000000000002", "000000000004", "000000000005", "000000000006"}
    # A plain read drops the stale ones (and the unreadable file), keeps the rest.
    assert [e.record.isid for e in registry.entries()] == ["000000000001", "000000000003"]
    assert sorted(os.listdir(tmp_path / "run" / "sessions")) == [
        "fuse-000000000001.json", "fuse-000000000003.json"]
    # The mount went (another id at that path now is not ours): nothing left but loop5.
    (tmp_path / "mountinfo").write_text(
        "78 30 0:56 / /run/x/fuse/with\\040space rw - fuse.iscsi iscsi-handoff rw\n")
    assert registry.our_mount(dead_left) is None


def test_kernel_records_follow_sysfs(tmp_path: Path) -> None:
    sysfs = tmp_path / "sys"
    (sysfs / "class" / "iscsi_session" / "session4").mkdir(parents=True)
    pid, start = _dead_pid()
    base = {"portal": "192.0.2.7:3260", "isid": "80aa00000001",
            "initiator_name": INITIATOR, "host_no": 2, "ready": True}
    alive = registry.new_record("kernel", target=TARGET, sid=4, **base)  # type: ignore[arg-type]
    assert registry.check(alive, sysfs_root=str(sysfs)).state == LIVE
    orphan = registry.replace_owner(alive, pid=pid, pid_start=start)
    entry = registry.check(orphan, sysfs_root=str(sysfs))
    assert entry.state == LEFTOVER and entry.cleanup == "iscsi-handoff logout --session 4"
    gone = registry.new_record("kernel", target=TARGET, sid=5, **base)  # type: ignore[arg-type]
    assert registry.check(gone, sysfs_root=str(sysfs)).state == STALE
    claim = registry.new_record("kernel", target=TARGET, **base)  # type: ignore[arg-type]
    assert claim.name == "kernel-isid-80aa00000001"
    assert registry.check(claim, sysfs_root=str(sysfs)).state == LIVE
    registry.write(claim)
    registry.promote(claim.name, alive)
    assert [n for n, _ in registry.all_records()] == ["kernel-4"]


def test_a_duplicate_claim_is_refused_unless_forced(tmp_path: Path) -> None:
    first = registry.claim(_fuse("000000000001", ready=False))
    with pytest.raises(SessionExists, match="session F000000000001") as caught:
        registry.claim(_fuse("000000000002"))
    assert caught.value.exit_code == 15
    # Another portal, another target, or another initiator name is no duplicate.
    registry.claim(_fuse("000000000003", portal="127.0.0.2:3260", portal_connected=""))
    registry.claim(registry.new_record("fuse", target=TARGET + "x", portal="127.0.0.1:3260",
                                       isid="000000000004", initiator_name=INITIATOR))
    registry.claim(_fuse("000000000005", initiator_name=INITIATOR + "2"))
    registry.claim(_fuse("000000000006"), force=True)
    assert registry.read(first.name) is not None


def _race(run_dir: str, isid: str, results: multiprocessing.Queue[str],
          done: Any) -> None:
    os.environ["ISCSI_HANDOFF_RUN_DIR"] = run_dir
    try:
        registry.claim(_fuse(isid))
        results.put("claimed")
        done.wait(60)  # the claim holds only while its owner lives: until all have tried
    except SessionExists:
        results.put("refused")


def test_racing_claims_let_one_through(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("fork")
    results: multiprocessing.Queue[str] = ctx.Queue()
    done = ctx.Event()
    procs = [ctx.Process(target=_race, args=(str(tmp_path / "run"), f"00000000000{i}",
                                              results, done)) for i in range(4)]
    for p in procs:
        p.start()
    got: list[str] = []
    try:
        while len(got) < 4:
            got.append(results.get(timeout=60))
    finally:
        done.set()
        for p in procs:
            p.join(timeout=60)
    assert got.count("claimed") == 1 and got.count("refused") == 3, got


def test_mountinfo_parsing(tmp_path: Path) -> None:
    info = tmp_path / "mountinfo"
    info.write_text("22 1 8:1 / / rw - ext4 /dev/sda1 rw\n"
                    "90 22 0:60 / /mnt/a\\134b rw shared:5 - fuse.iscsi iscsi-handoff rw\n"
                    "91 90 7:3 / /mnt/a\\134b rw - ext4 /dev/loop3 rw\n")
    entries = sysstate.mounts(info)
    assert [(e.mount_id, e.dev, e.mountpoint, e.fstype, e.source) for e in entries] == [
        (22, "8:1", "/", "ext4", "/dev/sda1"),
        (90, "0:60", "/mnt/a\\b", "fuse.iscsi", "iscsi-handoff"),
        (91, "7:3", "/mnt/a\\b", "ext4", "/dev/loop3")]


def test_kernel_duplicates_are_judged_by_sysfs_too(tmp_path: Path) -> None:
    """A kernel record without an initiator name (an older keeper's), and a session that
    is not ours at all: sysfs says whose name each carries."""
    sysfs = tmp_path / "sys"
    for sid in (4, 5):
        folder = sysfs / "class" / "iscsi_session" / f"session{sid}"
        folder.mkdir(parents=True)
        (folder / "targetname").write_text(TARGET + "\n")
        (folder / "initiatorname").write_text(INITIATOR + "\n")
    registry.write(registry.new_record("kernel", target=TARGET, portal="127.0.0.1:3260",
                                       sid=4, devices=("/dev/sdb",), ready=True))
    found = registry.find_duplicates(target=TARGET, portals=("127.0.0.1:3260",),
                                     initiator_name=INITIATOR, sysfs_root=str(sysfs))
    assert found == [f"session 4 (kernel, pid {os.getpid()}, /dev/sdb)",
                     "kernel session 5 (not made by iscsi-handoff)"]
    assert registry.find_duplicates(target=TARGET, portals=("127.0.0.1:3260",),
                                    initiator_name=INITIATOR + "x",
                                    sysfs_root=str(sysfs)) == []
