"""Several kernel sessions in the guest's stock kernel: two targets at once, what
`session list` shows, `logout` from another process (the owner is signalled), and
`login --daemon --pidfile` through the CLI."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from iscsi_handoff.cli import cli as main_cli
from iscsi_handoff.tgtlab import LunSpec, Tgt
from userland.errors import SessionExists

from .kernel_login import Disk, KernelLogin, sessions_in_sysfs
from .openiscsi import disk_bytes, read_direct, wait_for, write_direct


def cli(*args: str) -> Result:
    """The CLI in-process: under emulation a new Python costs seconds, this nothing."""
    return CliRunner().invoke(main_cli, list(args), catch_exceptions=False)


def test_two_targets_at_once_and_session_list(tgt: Tgt) -> None:
    one = tgt.add_target("iqn.2024-01.test.vmlab:two-a", luns=[LunSpec(size=32 << 20)])
    two = tgt.add_target("iqn.2024-01.test.vmlab:two-b", luns=[LunSpec(size=48 << 20)])
    with KernelLogin(tgt.portal, one.iqn) as a, KernelLogin(tgt.portal, two.iqn) as b:
        (da,), (db,) = a.disks, b.disks
        assert da.sid != db.sid and da.name != db.name
        assert (disk_bytes(da.name), disk_bytes(db.name)) == (32 << 20, 48 << 20)
        for disk, target, seed in ((da, one, b"a"), (db, two, b"b")):
            data = seed * (1 << 20)
            write_direct(disk.dev, 0, data)
            assert target.lun_paths[0].read_bytes()[:len(data)] == data
            assert read_direct(disk.dev, 0, len(data)) == data

        listed = json.loads(cli("session", "list", "--json").output)
        rows = {s["sid"]: s for s in listed["sessions"]}
        for disk, target in ((da, one), (db, two)):
            row = rows[disk.sid]
            assert row["target_name"] == target.iqn and row["state"] == "LOGGED_IN"
            assert [(d["lun"], d["dev"]) for d in row["disks"]] == [(1, disk.dev)]
            assert row["portal"] == tgt.portal
        table = cli("session", "list").output
        assert one.iqn in table and two.iqn in table and da.dev in table
        assert all(rows[d.sid]["ours"] for d in (da, db))
        assert "not made by iscsi-handoff" not in table
        detail = cli("session", "list", "-P", "3").output
        assert f"Session: {da.sid}" in detail and f"Keeper: pid {a.proc.pid}" in detail
        assert f"LUN 1: {da.dev}" in detail
        # This initiator has a session to `one` there already: a second login is refused
        # before anything starts (were it let through, it would serve in this process
        # until killed: fail instead).
        def let_through(*args: object, **kw: object) -> None:
            raise AssertionError("a duplicate login got through to the kernel path")

        with pytest.MonkeyPatch.context() as patch:
            patch.setattr("iscsi_handoff.cli.run_kernel", let_through)
            with pytest.raises(SessionExists, match=rf"session {da.sid} \(kernel, pid"):
                cli("login", "--kernel", "--portal", tgt.portal, "--target", one.iqn)
        assert a.stop() == 0 and b.stop() == 0
    assert {da.sid, db.sid}.isdisjoint(sessions_in_sysfs())


def test_logout_command_signals_the_owner(tgt: Tgt) -> None:
    target = tgt.add_target("iqn.2024-01.test.vmlab:logout-cmd", luns=[LunSpec(32 << 20)])
    run = KernelLogin(tgt.portal, target.iqn).wait_ready()
    (disk,) = run.disks
    done = cli("logout", "--session", str(disk.sid))
    assert done.exit_code == 0, done.output
    assert f"session {disk.sid}" in done.output and "owner" in done.output
    assert run.proc.wait(timeout=60) == 0, run.output()
    assert disk.sid not in sessions_in_sysfs()
    assert not Path(f"/sys/block/{disk.name}").exists()
    assert cli("logout", "--all").exit_code == 0


def test_logout_when_the_owner_is_gone(tgt: Tgt) -> None:
    target = tgt.add_target("iqn.2024-01.test.vmlab:owner-gone", luns=[LunSpec(32 << 20)])
    run = KernelLogin(tgt.portal, target.iqn, "--json").wait_ready()
    doc: dict[str, Any] = run.json()
    assert doc["path"] == "kernel" and doc["pid"] == run.proc.pid
    (session,) = doc["sessions"]
    (json_disk,) = session["disks"]
    assert session["target"] == target.iqn and json_disk["lun"] == 1
    assert json_disk["size_bytes"] == 32 << 20 and json_disk["dev"].startswith("/dev/sd")
    disk = Disk(session["sid"], session["host_no"], json_disk["dev"], json_disk["name"], 1,
                "", json_disk["by_path"])
    run.proc.kill()  # no logout: the session stays in the kernel, owned by nobody
    run.proc.wait(timeout=30)
    assert disk.sid in sessions_in_sysfs()
    write_direct(disk.dev, 0, b"x" * 4096)  # the kernel still carries the data
    done = cli("logout", "--target", target.iqn)
    assert done.exit_code == 0, done.output
    assert "was gone" in done.output
    assert disk.sid not in sessions_in_sysfs()


def test_daemon_and_pidfile(tgt: Tgt, tmp_path: Path, figure: Callable[[str], None]) -> None:
    target = tgt.add_target("iqn.2024-01.test.vmlab:daemon", luns=[LunSpec(32 << 20)])
    pidfile = tmp_path / "login.pid"
    began = time.monotonic()
    # As a user runs it: the command returns once the disks are printed.
    done = subprocess.run([sys.executable, "-m", "iscsi_handoff", "login", "--kernel",
                           "--portal", tgt.portal, "--target", target.iqn, "--daemon",
                           "--pidfile", str(pidfile)],
                          capture_output=True, text=True, timeout=180, check=False)
    assert done.returncode == 0, done.stderr
    assert "serving" in done.stdout and "/dev/sd" in done.stdout
    pid = int(pidfile.read_text())
    assert pid != os.getpid() and Path(f"/proc/{pid}").exists()
    figure(f"--daemon returned after {time.monotonic() - began:.2f} s, daemon pid {pid}")
    sid = int(re.search(r"session (\d+) on host", done.stdout).group(1))  # type: ignore[union-attr]
    os.kill(pid, 15)  # a service keeper leaves its session for the next one (issue 11)
    wait_for(lambda: not Path(f"/proc/{pid}").exists() or
             Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z",
             timeout=60, what="the daemon to exit on SIGTERM")
    assert sid in sessions_in_sysfs()
    assert not pidfile.exists()
    done_out = cli("logout", "--session", str(sid))  # its keeper is gone: logged out here
    assert done_out.exit_code == 0 and "was gone" in done_out.output, done_out.output
    wait_for(lambda: sid not in sessions_in_sysfs(), timeout=30, what="its session to go")
