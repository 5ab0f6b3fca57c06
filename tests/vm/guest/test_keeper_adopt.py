"""Keepers that die, stop and hang up, in the guest's stock kernel (issue 11).

A kernel session outlives its keeper. After `kill -9` the next `login` of the same
target adopts it (same sid, one disk, no new login) and answers its next connection
error (`ss -K`), data verified. A second `login` while the keeper lives is refused
(exit 15); SIGTERM to a --daemon keeper leaves the session for the next keeper; SIGHUP
of a foreground keeper leaves it keeping the session in the background, until
`iscsi-handoff logout`. Each Python start costs 10-25 s under TCG: the scenarios share
starts where they can.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from iscsi_handoff import kernel_owners as owners
from iscsi_handoff.kernel_adopt import record_states
from iscsi_handoff.tgtlab import LunSpec, Tgt

from .kernel_login import KernelLogin, drop_caches, sessions_in_sysfs
from .openiscsi import read_direct, wait_for, write_direct

LUN_SIZE = 32 << 20
PF_MEMALLOC_NOIO = 0x00080000  # what PR_SET_IO_FLUSHER sets (with PF_LOCAL_THROTTLE)
CLI = [sys.executable, "-m", "iscsi_handoff"]


def _sessions_to(iqn: str) -> list[int]:
    found = []
    for sid in sessions_in_sysfs():
        name = Path(f"/sys/class/iscsi_session/session{sid}/targetname")
        if name.read_text().strip() == iqn:
            found.append(sid)
    return found


def _state(sid: int) -> str:
    return Path(f"/sys/class/iscsi_session/session{sid}/state").read_text().strip()


def _cut(port: int) -> None:
    done = subprocess.run(["ss", "-K", "dst", "127.0.0.1", "dport", "=", f":{port}"],
                          capture_output=True, text=True, timeout=30, check=False)
    assert done.returncode == 0, done.stderr


def _round_trip(dev: str, backing: Path, offset: int) -> None:
    data = os.urandom(1 << 20)
    write_direct(dev, offset, data)
    with backing.open("rb") as f:  # tgtd's file: the bytes went over the wire
        f.seek(offset)
        assert f.read(len(data)) == data
    drop_caches()
    assert read_direct(dev, offset, len(data)) == data


def _cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], stdin=subprocess.DEVNULL, capture_output=True,
                          text=True, timeout=timeout, check=False)


def _pinned(pid: int) -> tuple[int, bool]:
    """(VmLck in kB, PF_MEMALLOC_NOIO set) of process ``pid``."""
    status = Path(f"/proc/{pid}/status").read_text()
    locked = next(int(line.split()[1]) for line in status.splitlines()
                  if line.startswith("VmLck:"))
    stat = Path(f"/proc/{pid}/stat").read_text()
    flags = int(stat[stat.rfind(")") + 2:].split()[6])
    return locked, bool(flags & PF_MEMALLOC_NOIO)


def test_kill9_then_login_adopts_and_recovers(tgt_session: Tgt,
                                              figure: Callable[[str], None]) -> None:
    tgt = tgt_session
    iqn = "iqn.2024-01.test.vmlab:adopt-kill9"
    target = tgt.add_target(iqn, luns=[LunSpec(size=LUN_SIZE)])
    backing = target.lun_paths[0]
    try:
        first = KernelLogin(tgt.portal, iqn).wait_ready()
        (disk,) = first.disks
        locked, noio = _pinned(first.proc.pid)
        assert locked > 0 and noio, (locked, noio, first.output())
        _round_trip(disk.dev, backing, 0)
        first.proc.kill()
        first.proc.wait(timeout=30)
        # Nobody keeps it now; the kernel still carries its I/O; doctor says so.
        assert _sessions_to(iqn) == [disk.sid]
        states = {r.sid: r for r in record_states()}
        assert states[disk.sid].state == "orphan", states
        assert "adopts it" in states[disk.sid].line()
        _round_trip(disk.dev, backing, 2 << 20)

        with KernelLogin(tgt.portal, iqn) as second:
            (again,) = second.disks
            assert (again.sid, again.dev) == (disk.sid, disk.dev), second.output()
            assert "adopted" in second.output()
            assert _sessions_to(iqn) == [disk.sid]
            mark = len(second.lines)
            _cut(int(tgt.portal.rsplit(":", 1)[1]))
            line = second.wait_line(rf"session {disk.sid}: recovered in \d+ ms",
                                    timeout=120, start=mark)
            _round_trip(disk.dev, backing, 4 << 20)
            drop_caches()
            with backing.open("rb") as f:
                assert read_direct(disk.dev, 0, 6 << 20) == f.read(6 << 20)
            figure(f"adopted after kill -9, then ss -K: {line.strip()}; keeper VmLck "
                   f"{locked} kB, PF_MEMALLOC_NOIO set")
            assert second.stop() == 0, second.output()
        assert _sessions_to(iqn) == []
    finally:
        tgt.delete_target(target.tid)


def test_daemon_sigterm_then_adopted_then_sighup(tgt_session: Tgt, tmp_path: Path) -> None:
    """One session through three keepers: a --daemon (a second login beside it is
    refused), SIGTERM to it (the session stays; its connection is then cut with nobody
    to answer), a foreground login that adopts it and recovers it at once, SIGHUP to
    that one (it keeps the session), and `logout`, which ends it."""
    tgt = tgt_session
    iqn = "iqn.2024-01.test.vmlab:adopt-daemon"
    target = tgt.add_target(iqn, luns=[LunSpec(size=LUN_SIZE)])
    backing = target.lun_paths[0]
    pidfile = tmp_path / "keeper.pid"
    args = ("login", "--kernel", "--daemon", "--pidfile", str(pidfile), "--portal",
            tgt.portal, "--target", iqn)
    try:
        up = _cli(*args)
        assert up.returncode == 0, up.stderr + up.stdout
        pid = int(pidfile.read_text())
        (sid,) = _sessions_to(iqn)
        dev = "/dev/" + up.stdout.split("/dev/", 1)[1].split()[0]
        _round_trip(dev, backing, 0)

        twice = _cli(*args)  # its keeper is alive: no second session
        assert twice.returncode == 15, twice.stderr + twice.stdout  # session exists
        assert f"already has session {sid}, kept by pid {pid}" in twice.stderr
        assert _sessions_to(iqn) == [sid]

        os.kill(pid, signal.SIGTERM)
        wait_for(lambda: owners.process_start_time(pid) is None, timeout=60,
                 what="the daemon to exit")
        assert _sessions_to(iqn) == [sid]  # left, not logged out
        assert _state(sid) == "LOGGED_IN"
        _round_trip(dev, backing, 2 << 20)  # no keeper: the kernel carries on
        # A connection error nobody answers: the session waits, failed, for a keeper.
        _cut(int(tgt.portal.rsplit(":", 1)[1]))
        wait_for(lambda: _state(sid) == "FAILED", timeout=30, what="the session to fail")

        with KernelLogin(tgt.portal, iqn) as run:
            (disk,) = run.disks
            assert (disk.sid, disk.dev) == (sid, dev), run.output()
            assert f"session {sid}: adopted" in run.output()
            # adopted with its connection down: recovered at once, no command typed
            run.wait_line(rf"session {sid}: recovered in \d+ ms", timeout=120)
            assert _state(sid) == "LOGGED_IN"
            assert _sessions_to(iqn) == [sid]
            _round_trip(dev, backing, 4 << 20)

            run.proc.send_signal(signal.SIGHUP)  # the terminal went away
            time.sleep(1.0)
            assert run.proc.poll() is None, run.output()
            assert _sessions_to(iqn) == [sid]
            _round_trip(dev, backing, 6 << 20)

            out = _cli("logout", "--session", str(sid))
            assert out.returncode == 0, out.stderr + out.stdout
            assert "logged out by its owner" in out.stdout
            assert run.proc.wait(timeout=60) == 0
        assert _sessions_to(iqn) == []
    finally:
        for sid in _sessions_to(iqn):
            _cli("logout", "--session", str(sid))
        tgt.delete_target(target.tid)
