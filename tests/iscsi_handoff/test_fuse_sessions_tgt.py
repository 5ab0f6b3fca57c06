"""FUSE sessions a user can manage, against a real tgtd with real /dev/fuse and losetup:
each login in its own folder, duplicates refused (exit 15), `session list` and `logout`
covering them, SIGHUP, `kill -9` leftovers cleaned by `logout --all`, `--daemon`, and a
stop that waits while a filesystem is mounted on its loop device."""

from __future__ import annotations

import json
import mmap
import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from iscsi_handoff import sysstate
from iscsi_handoff.pathchoice import probe_kernel
from iscsi_handoff.tgtlab import LunSpec, Target, Tgt

from tgt_fixtures import tgt  # noqa: F401

pytestmark = pytest.mark.tgt

IQN_A = "iqn.2024-01.org.iscsi-handoff.test:sessions-a"
IQN_B = "iqn.2024-01.org.iscsi-handoff.test:sessions-b"
MiB = 1 << 20


def _why_not() -> str | None:
    if probe_kernel(try_modprobe=False)[0]:
        return "this kernel has the iSCSI path: default logins would not take FUSE here"
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse is missing"
    if os.geteuid() != 0:
        return "loop devices need root"
    return None


@pytest.fixture
def run_dir(tmp_path: Path) -> Iterator[Path]:
    reason = _why_not()
    if reason:
        pytest.skip(reason)
    run = tmp_path / "run"
    yield run
    _leave_nothing(run)


def _leave_nothing(run: Path) -> None:
    """Whatever a failed test left: loop devices backed by our tree, then our mounts."""
    prefix = str(run) + "/"
    for name in os.listdir("/sys/block"):
        backing = sysstate.loop_backing_file(name)
        if backing is not None and backing.startswith(prefix):
            for m in sysstate.mounts():
                if m.source == f"/dev/{name}":
                    subprocess.run(["umount", "-l", m.mountpoint], check=False)
            subprocess.run(["losetup", "-d", f"/dev/{name}"], check=False)
    for m in reversed(sysstate.mounts()):
        if m.mountpoint.startswith(prefix):
            subprocess.run(["umount", "-l", m.mountpoint], check=False)


def cli(*args: str, timeout: float = 120,
        cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    return subprocess.run([sys.executable, "-m", "iscsi_handoff", *args], capture_output=True,
                          text=True, timeout=timeout, check=False, cwd=cwd, env=env)


class Keeper:
    """A `login` in the foreground, its output read as it comes."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "iscsi_handoff", "login", *args],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True)
        self.lines: list[str] = []
        self._ready = threading.Event()
        self._seen = threading.Condition()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._seen:
                self.lines.append(line.rstrip())
                self._seen.notify_all()
            if line.startswith("serving;"):
                self._ready.set()
        self._ready.set()
        with self._seen:
            self._seen.notify_all()

    def wait_ready(self) -> Keeper:
        assert self._ready.wait(120) and self.proc.poll() is None, self.output()
        return self

    def wait_for(self, text: str) -> None:
        with self._seen:
            assert self._seen.wait_for(lambda: any(text in line for line in self.lines)
                                       or self.proc.poll() is not None, timeout=60)
        assert any(text in line for line in self.lines), self.output()

    def loops(self) -> list[str]:
        return [m.group(1) for line in self.lines if (m := re.search(r"(/dev/loop\d+) ->", line))]

    def storage(self) -> Path:
        m = next(m for line in self.lines if (m := re.search(r": (/\S+/storage) \(LUN", line)))
        return Path(m.group(1))

    def output(self) -> str:
        return "\n".join(self.lines)

    def stop(self, signum: int = signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signum)
        return self.proc.wait(timeout=120)


def wait_gone(pid: int) -> None:
    """Until ``pid`` is no process (a detached keeper is nobody's child here: init reaps)."""
    for _ in range(600):
        if sysstate.process_start_time(pid) is None:
            return
        threading.Event().wait(0.1)
    raise AssertionError(f"pid {pid} is still there")


def write_direct(path: str | Path, offset: int, data: bytes) -> None:
    fd = os.open(path, os.O_RDWR | os.O_DIRECT | os.O_SYNC)
    try:
        buf = mmap.mmap(-1, len(data))
        buf.write(data)
        assert os.pwritev(fd, [buf], offset) == len(data)
    finally:
        os.close(fd)


def backing_bytes(target: Target, lun_index: int, offset: int, size: int) -> bytes:
    with open(target.lun_paths[lun_index], "rb") as f:
        f.seek(offset)
        return f.read(size)


def listed() -> dict[str, dict[str, Any]]:
    done = cli("session", "list", "--json")
    assert done.returncode == 0, done.stderr
    return {s["id"]: s for s in json.loads(done.stdout)["sessions"] if s["path"] == "fuse"}


def ours_left(run: Path) -> list[str]:
    """Mounts and loop devices still tied to the run dir: there must be none."""
    prefix = str(run) + "/"
    left = [f"mount {m.mountpoint}" for m in sysstate.mounts()
            if m.mountpoint.startswith(prefix)]
    left += [f"loop {name}" for name in os.listdir("/sys/block")
             if (sysstate.loop_backing_file(name) or "").startswith(prefix)]
    return left


def test_two_targets_by_default_then_a_duplicate_then_logout_target(
        tgt: Tgt, run_dir: Path) -> None:  # noqa: F811
    a = tgt.add_target(IQN_A, luns=[LunSpec(size=8 * MiB), LunSpec(size=4 * MiB)])
    b = tgt.add_target(IQN_B, luns=[LunSpec(size=8 * MiB)])
    ka = Keeper("--portal", tgt.portal, "--target", IQN_A).wait_ready()
    kb = Keeper("--portal", tgt.portal, "--target", IQN_B).wait_ready()
    try:
        # Each its own folder; --loop (the fallback's default as root) attaches every LUN.
        assert ka.storage().parents[2] != kb.storage().parents[2]
        assert len(ka.loops()) == 2 and len(kb.loops()) == 1
        for keeper, target, index, seed in ((ka, a, 0, b"a"), (ka, a, 1, b"A"), (kb, b, 0, b"b")):
            write_direct(keeper.loops()[index], MiB, seed * MiB)
            assert backing_bytes(target, index, MiB, MiB) == seed * MiB
        sessions = listed()
        assert {s["target"] for s in sessions.values()} == {IQN_A, IQN_B}
        assert all(s["state"] == "live" and s["ours"] for s in sessions.values())
        (sa,) = [s for s in sessions.values() if s["target"] == IQN_A]
        assert [d["dev"] for d in sa["disks"]] == ka.loops()
        assert sa["mountpoint"] == str(ka.storage().parents[2])
        assert sa["pid"] == ka.proc.pid and sa["tsih"] > 0 and sa["isid"]
        detail = cli("session", "list", "-P", "3").stdout
        block = detail[detail.index(f"Target: {IQN_A}"):]
        for line in (f"Session: {sa['id']}  state live", f"Portal: named {tgt.portal}",
                     f"Initiator: {sa['initiator_name']}", "Auth: None  user -",
                     "Timeouts: login 15 s, replacement 120 s", "recoveries 0",
                     "MaxRecvDataSegmentLength: ", f"LUN 2: {ka.loops()[1]} <- "):
            assert line in block, detail

        again = cli("login", "--portal", tgt.portal, "--target", IQN_A)
        assert again.returncode == 15, again.stderr
        assert "already has a session" in again.stderr and sa["id"] in again.stderr
        write_direct(ka.loops()[0], 2 * MiB, b"z" * MiB)  # the first keeps serving
        assert backing_bytes(a, 0, 2 * MiB, MiB) == b"z" * MiB

        done = cli("logout", "--target", IQN_A)
        assert done.returncode == 0, done.stderr
        assert f"session {sa['id']} ({IQN_A}): logged out by its keeper" in done.stdout
        assert ka.proc.wait(timeout=60) == 0, ka.output()
        assert not ka.storage().parents[2].exists()
        assert list(listed()) == [s for s in sessions if s != sa["id"]]
        write_direct(kb.loops()[0], 3 * MiB, b"y" * MiB)  # the other one lives on
        assert backing_bytes(b, 0, 3 * MiB, MiB) == b"y" * MiB

        # SIGHUP (a closed terminal) ends it like SIGTERM: nothing left at all.
        assert kb.stop(signal.SIGHUP) == 0, kb.output()
        assert "got SIGHUP" in kb.output()
        assert ours_left(run_dir) == [] and listed() == {}
        assert not (run_dir / "sessions").exists() or os.listdir(run_dir / "sessions") == []
    finally:
        ka.stop()
        kb.stop()


def test_kill_9_leaves_leftovers_that_logout_all_cleans(tgt: Tgt, run_dir: Path,  # noqa: F811
                                                        tmp_path: Path) -> None:
    tgt.add_target(IQN_A, luns=[LunSpec(size=8 * MiB)])
    # Detached, with paths relative to where it was started (the daemon works from /).
    (tmp_path / "here").mkdir()
    started = cli("login", "--portal", tgt.portal, "--target", IQN_A, "--daemon",
                  "--pidfile", "keeper.pid", cwd=tmp_path / "here")
    assert started.returncode == 0, started.stderr
    (loop,) = re.findall(r"(/dev/loop\d+) ->", started.stdout)
    pidfile = tmp_path / "here" / "keeper.pid"
    os.kill(int(pidfile.read_text()), signal.SIGKILL)
    wait_gone(int(pidfile.read_text()))
    (entry,) = listed().values()
    assert entry["state"] == "leftover" and entry["cleanup"] == "iscsi-handoff logout --all"
    assert loop in entry["why"] and "dead FUSE mount" in entry["why"]
    table = cli("session", "list")
    assert "leftover" in table.stdout and "clean it with: iscsi-handoff logout --all" in (
        table.stdout)
    assert ours_left(run_dir) != []  # what the issue saw: a dead mount and a loop device
    doctor = json.loads(cli("doctor", "--json", "--no-modprobe").stdout)
    assert [(d["id"], d["cleanup"]) for d in doctor["leftovers"]] == [
        (entry["id"], "iscsi-handoff logout --all")]

    done = cli("logout", "--all")
    assert done.returncode == 0, done.stderr
    assert f"detached {loop}" in done.stdout and "unmounted" in done.stdout
    assert ours_left(run_dir) == [] and listed() == {}
    assert not Path(entry["mountpoint"]).exists()
    assert not pidfile.exists()  # it named the dead keeper


def test_daemon_returns_and_logout_ends_it(tgt: Tgt, run_dir: Path,  # noqa: F811
                                           tmp_path: Path) -> None:
    a = tgt.add_target(IQN_A, luns=[LunSpec(size=8 * MiB)])
    pidfile = tmp_path / "keeper.pid"
    done = cli("login", "--portal", tgt.portal, "--target", IQN_A, "--daemon",
               "--pidfile", str(pidfile))
    assert done.returncode == 0, done.stderr
    (loop,) = re.findall(r"(/dev/loop\d+) ->", done.stdout)
    pid = int(pidfile.read_text())
    try:
        (entry,) = listed().values()
        assert entry["pid"] == pid and entry["state"] == "live" and entry["disks"][0]["dev"] == loop
        write_direct(loop, 0, b"d" * MiB)
        assert backing_bytes(a, 0, 0, MiB) == b"d" * MiB
        ended = cli("logout", "--session", entry["id"])
        assert ended.returncode == 0, ended.stderr
        assert sysstate.process_start_time(pid) is None and not pidfile.exists()
        assert ours_left(run_dir) == [] and listed() == {}
        if not os.path.exists("/dev/log"):  # no syslog here: timestamped lines in a file
            log = (run_dir / "iscsi-handoff.log").read_text()
            assert re.search(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ iscsi-handoff\[\d+\]: "
                             r"INFO serving", log, re.M), log
            assert "got SIGTERM" in log and "logged out" in log
    finally:
        if sysstate.process_start_time(pid) is not None:
            os.kill(pid, signal.SIGKILL)


def test_a_mounted_filesystem_on_its_loop_device_holds_the_stop(
        tgt: Tgt, run_dir: Path, tmp_path: Path) -> None:  # noqa: F811
    tgt.add_target(IQN_A, luns=[LunSpec(size=16 * MiB)])
    keeper = Keeper("--portal", tgt.portal, "--target", IQN_A).wait_ready()
    (loop,) = keeper.loops()
    where = tmp_path / "fs"
    where.mkdir()
    subprocess.run(["mkfs.ext4", "-q", loop], check=True, capture_output=True)
    subprocess.run(["mount", loop, str(where)], check=True)
    try:
        (where / "file").write_bytes(b"kept" * 1000)
        refused = cli("logout", "--target", IQN_A)
        assert refused.returncode == 2, refused.stderr
        assert f"{loop} is in use (a filesystem mounted at {where})" in refused.stderr
        keeper.proc.send_signal(signal.SIGTERM)
        keeper.wait_for("not stopping yet")
        assert keeper.proc.poll() is None and (where / "file").read_bytes() == b"kept" * 1000
    finally:
        subprocess.run(["umount", str(where)], check=True)
    assert keeper.proc.wait(timeout=60) == 0, keeper.output()
    assert ours_left(run_dir) == [] and listed() == {}


def test_json_daemon_login_prints_only_its_ready_object_on_stdout(
        tgt: Tgt, run_dir: Path, tmp_path: Path) -> None:  # noqa: F811
    """Scripts read stdout: with --json a serving login's only line there is the ready
    object; the lines for people (storage file, loop device) go to stderr."""
    tgt.add_target(IQN_A, luns=[LunSpec(size=8 * MiB)])
    pidfile = tmp_path / "keeper.pid"
    done = cli("login", "--portal", tgt.portal, "--target", IQN_A, "--daemon", "--json",
               "--pidfile", str(pidfile))
    assert done.returncode == 0, done.stderr
    pid = int(pidfile.read_text())
    try:
        (line,) = done.stdout.splitlines()
        ready = json.loads(line)
        assert ready["event"] == "ready" and ready["path"] == "fuse", ready
        (loop,) = ready["loops"]
        assert f"{loop} ->" in done.stderr and "serving;" in done.stderr
        ended = cli("logout", "--all")
        assert ended.returncode == 0, ended.stderr
        assert ours_left(run_dir) == [] and listed() == {}
    finally:
        if sysstate.process_start_time(pid) is not None:
            os.kill(pid, signal.SIGKILL)


def test_mount_with_iscsiadm_letters_mounts_only_the_target_named(
        tgt: Tgt, run_dir: Path, tmp_path: Path) -> None:  # noqa: F811
    """`mount -p PORTAL -T IQN MOUNTPOINT`: the portal lists two targets, one is mounted;
    a target the portal does not list is exit 5."""
    tgt.add_target(IQN_A, luns=[LunSpec(size=8 * MiB)])
    tgt.add_target(IQN_B, luns=[LunSpec(size=8 * MiB)])
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    missing = cli("mount", "-p", tgt.portal, "-T", IQN_A + "-nope", str(mnt))
    assert missing.returncode == 5, missing.stderr
    assert "does not list" in missing.stderr
    done = cli("mount", "-p", tgt.portal, "-T", IQN_A, str(mnt), "--daemon")
    assert done.returncode == 0, done.stderr
    try:
        assert [e["target"] for e in listed().values()] == [IQN_A]
        assert (mnt / "127.0.0.1" / IQN_A.rsplit(":", 1)[1] / "storage").stat().st_size == 8 * MiB
    finally:
        ended = cli("logout", "--all")
    assert ended.returncode == 0, ended.stderr
    assert ours_left(run_dir) == [] and listed() == {}
