"""Which records a new keeper trusts (kernel_adopt.py), on a sysfs tree made here, and
the small OS pieces of a keeper: sd_notify to a real socket, mlockall/IO_FLUSHER in a
child. The real kernel adopts in the guest: tests/vm/guest/test_keeper_adopt.py."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from iscsi_handoff import kernel_adopt, sdnotify
from iscsi_handoff import kernel_owners as owners
from iscsi_handoff.pathchoice import probe_iscsid
from kernel_handoff.sysfs import get_session
from userland.errors import ConfigError, SessionExists
from userland.portal import Portal

TARGET = "iqn.2024-01.org.example:disk1"
INITIATOR = "iqn.2024-01.org.example:host"
PORTAL = Portal("192.0.2.10", 3260)
ROOT = Path(__file__).resolve().parents[2]


def _session(root: Path, sid: int, target: str, address: str, *,
             state: str = "LOGGED_IN", conn_state: str = "up") -> None:
    sdir = root / "class" / "iscsi_session" / f"session{sid}"
    sdir.mkdir(parents=True)
    for name, value in (("targetname", target), ("state", state),
                        ("initiatorname", INITIATOR)):
        (sdir / name).write_text(value + "\n")
    cdir = root / "class" / "iscsi_connection" / f"connection{sid}:0"
    cdir.mkdir(parents=True)
    for name, value in (("persistent_address", address), ("persistent_port", "3260"),
                        ("state", conn_state)):
        (cdir / name).write_text(value + "\n")


def _record(sid: int, *, pid: int, boot: str | None = None,
            target: str = TARGET) -> owners.SessionRecord:
    record = owners.SessionRecord(
        sid=sid, host_no=sid + 1, target=target, portal="192.0.2.10:3260",
        isid="80aabbccddee", pid=pid, pid_start=owners.process_start_time(pid),
        boot_id=owners.boot_id() if boot is None else boot,
        login_portal="192.0.2.10:3260", tsih=7, initial_cmdsn=41)
    owners.write_record(record)
    return record


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_an_orphan_is_adopted_with_what_recovery_needs(tmp_path: Path) -> None:
    _session(tmp_path, 3, TARGET, "192.0.2.10", state="FAILED", conn_state="failed")
    _record(3, pid=_dead_pid())
    orphan = kernel_adopt.find(TARGET, (PORTAL,), sysfs_root=str(tmp_path))
    assert orphan is not None and orphan.record.sid == 3
    assert not kernel_adopt.connection_up(orphan.info)  # recovered at once
    s = kernel_adopt.adopt(orphan, transport_handle=9, initiator_name=INITIATOR,
                           portal=PORTAL)
    assert (s.sid, s.isid.hex(), s.tsih, s.initial_cmdsn, s.address, s.port) == (
        3, "80aabbccddee", 7, 41, "192.0.2.10", 3260)
    with pytest.raises(ConfigError, match="logged in as"):
        kernel_adopt.adopt(orphan, transport_handle=9, initiator_name="iqn.2024-01.x:y",
                           portal=PORTAL)
    assert kernel_adopt.find(TARGET, (Portal("192.0.2.11", 3260),),
                             sysfs_root=str(tmp_path)) is None


def test_a_live_keeper_is_reported_not_duplicated(tmp_path: Path) -> None:
    _session(tmp_path, 3, TARGET, "192.0.2.10")
    keeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        time.sleep(0.2)
        _record(3, pid=keeper.pid)
        with pytest.raises(SessionExists,
                           match=f"already has session 3, kept by pid {keeper.pid}"):
            kernel_adopt.find(TARGET, (PORTAL,), sysfs_root=str(tmp_path))
    finally:
        keeper.kill()
        keeper.wait()


@pytest.mark.parametrize("why", ["boot", "target", "portal", "gone"])
def test_stale_records_never_touch_the_session_they_name(tmp_path: Path, why: str) -> None:
    # Session ids restart at each boot: session 3 now may be open-iscsi's.
    if why != "gone":
        _session(tmp_path, 3, "iqn.2024-01.org.other:x" if why == "target" else TARGET,
                 "192.0.2.99" if why == "portal" else "192.0.2.10")
    record = _record(3, pid=_dead_pid(), boot="another-boot" if why == "boot" else None)
    assert kernel_adopt.find(TARGET, (PORTAL,), sysfs_root=str(tmp_path)) is None
    info = None if why == "gone" else get_session(str(tmp_path), 3)
    assert kernel_adopt.distrust(record, info, owners.boot_id()) is not None


def test_sd_notify_reaches_the_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                      ) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert sdnotify.notify("READY=1") is False  # not under systemd: nothing sent
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind(str(path))
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        assert sdnotify.notify("READY=1", "STATUS=keeping 3") is True
        server.settimeout(5)
        assert server.recv(4096) == b"READY=1\nSTATUS=keeping 3"


def test_pinning_in_a_child() -> None:
    # mlockall(MCL_FUTURE) would pin this whole test process: a child does it instead.
    code = ("from kernel_handoff.pinning import lock_memory, set_io_flusher\n"
            "import os\n"
            "a, b = lock_memory(), set_io_flusher()\n"
            "locked = [l for l in open('/proc/self/status') if l.startswith('VmLck')]\n"
            "print(a, '|', b, '|', locked[0].split()[1])\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, cwd=ROOT, check=True)
    memory, flusher, locked = (part.strip() for part in done.stdout.split("|"))
    # With the capability each needs, it must work; without, one line says why.
    if _has_cap(CAP_IPC_LOCK):
        assert memory == "None" and int(locked) > 0, done.stdout
    else:
        assert memory == "None" or memory.startswith("mlockall failed"), done.stdout
    if _has_cap(CAP_SYS_RESOURCE):
        assert flusher == "None", done.stdout
    else:
        assert flusher.startswith("prctl(PR_SET_IO_FLUSHER) failed"), done.stdout


CAP_IPC_LOCK = 14
CAP_SYS_RESOURCE = 24


def _has_cap(bit: int) -> bool:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("CapEff:"):
            return bool((int(line.split()[1], 16) >> bit) & 1)
    return False


def test_the_unit_never_logs_out_on_restart() -> None:
    """The unit's promises: ready when the disks exist, SIGTERM leaves the session to the
    next keeper (--service), logout only at shutdown, the OOM killer's last pick."""
    unit = (ROOT / "kernel_handoff" / "systemd" / "iscsi-handoff@.service").read_text()
    settings: dict[str, list[str]] = {}
    for line in unit.splitlines():
        if line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            settings.setdefault(key, []).append(value)
    assert settings["Type"] == ["notify"] and settings["NotifyAccess"] == ["main"]
    assert settings["OOMScoreAdjust"] == ["-1000"]
    (start,) = settings["ExecStart"]
    assert " login --kernel --service " in start and "--daemon" not in start
    (stop,) = settings["ExecStop"]
    assert "is-system-running" in stop and "stopping" in stop and " logout " in stop
    assert settings["KillSignal"] == ["SIGTERM"]


def test_doctor_sees_iscsid_running_and_enabled(tmp_path: Path) -> None:
    proc, units = tmp_path / "proc", tmp_path / "systemd"
    for pid, comm in ((812, "iscsid"), (900, "bash"), (901, "iscsid-helper")):
        (proc / str(pid)).mkdir(parents=True)
        (proc / str(pid) / "comm").write_text(comm + "\n")
    (proc / "self").mkdir()
    (units / "sockets.target.wants").mkdir(parents=True)
    (units / "sockets.target.wants" / "iscsid.socket").symlink_to("/lib/iscsid.socket")
    found = probe_iscsid(proc=str(proc), systemd_dir=str(units))
    assert found.running == (812,) and found.enabled == ("iscsid.socket",)
    assert found.line().startswith("iscsid: running (pid 812) and enabled (iscsid.socket)")
    nothing = probe_iscsid(proc=str(tmp_path / "none"), systemd_dir=str(tmp_path / "none"))
    assert nothing.line() == "iscsid: not running, not enabled"


def test_a_locked_keeper_s_threads_pin_small_stacks() -> None:
    # mlockall(MCL_FUTURE) pins a new thread's whole stack (8 MiB by default, 1 MiB here)
    # and its malloc arena's 64 MiB of address space (none here: one arena for all).
    if not _has_cap(CAP_IPC_LOCK):
        pytest.skip("mlockall needs CAP_IPC_LOCK (root)")
    code = ("from kernel_handoff.pinning import lock_memory\n"
            "import threading\n"
            "def locked():\n"
            "    return int(next(l for l in open('/proc/self/status')\n"
            "                    if l.startswith('VmLck')).split()[1])\n"
            "assert lock_memory() is None\n"
            "before = locked()\n"
            "stop = threading.Event()\n"
            "t = threading.Thread(target=stop.wait)\n"
            "t.start()\n"
            "print(locked() - before)\n"
            "stop.set()\n"
            "t.join()\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, cwd=ROOT, check=True)
    grew_kib = int(done.stdout)
    assert 0 < grew_kib <= 2048, done.stdout  # the 1 MiB stack (and its guard page)
