"""The kernel path's front end on the host: what login prints, session records and their
owners, --daemon's detach, and `logout`'s choices. The real kernel runs these in the
guest (tests/vm/guest/test_kernel_*.py); the host has no NETLINK_ISCSI."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from iscsi_handoff import kernel_owners as owners
from iscsi_handoff.cli import cli
from iscsi_handoff.kernel_logout import logout_one, select
from iscsi_handoff.kernel_path import human_size, session_json, session_lines
from kernel_handoff.handoff import KernelSession
from kernel_handoff.sysfs import DiskInfo, SessionInfo
from userland.errors import ConfigError
from userland.keys import Negotiator
from userland.portal import Portal

TARGET = "iqn.2024-01.org.example:disk1"
ROOT = Path(__file__).resolve().parents[2]


def _session(disks: list[DiskInfo]) -> KernelSession:
    return KernelSession(sid=3, host_no=4, cid=0, transport_handle=1, target_name=TARGET,
                         initiator_name="iqn.2024-01.org.example:i",
                         portal=Portal("192.0.2.7", 3260), address="192.0.2.7", port=3260,
                         isid=bytes.fromhex("80aabbccddee"), tsih=5, initial_cmdsn=1,
                         negotiated=Negotiator(session_type="Normal").result(), disks=disks,
                         timings={"login": 0.0123, "total": 0.2})


def _disk(lun: int, name: str, size: int, by_path: str | None) -> DiskInfo:
    return DiskInfo(lun=lun, name=name, dev=f"/dev/{name}", size_bytes=size, vendor="IET",
                    model="VIRTUAL-DISK", hctl=f"4:0:0:{lun}", state="running",
                    by_path=by_path)


def test_the_line_login_prints() -> None:
    link = f"/dev/disk/by-path/ip-192.0.2.7:3260-iscsi-{TARGET}-lun-1"
    s = _session([_disk(1, "sdb", 1 << 30, link), _disk(2, "sdc", 3 << 19, None)])
    assert session_lines(s) == [
        f"session 3 on host 4: /dev/sdb (LUN 1, 1.0 GiB)  {link}",
        "session 3 on host 4: /dev/sdc (LUN 2, 1.5 MiB)",
    ]
    assert session_lines(_session([])) == [f"session 3 on host 4: {TARGET} has no disk LUNs"]
    data = session_json(s)
    assert data["disks"][1]["by_path"] is None
    assert data["disks"][1]["by_path_name"].endswith(f"iscsi-{TARGET}-lun-2")
    assert data["isid"] == "80aabbccddee" and data["seconds"]["login"] == 0.0123
    assert human_size(None) == "size unknown" and human_size(512) == "512 B"


def test_records_and_owners() -> None:
    record = owners.own_record(7, 2, TARGET, "192.0.2.7:3260", b"\x80\x01\x02\x03\x04\x05",
                               ["/dev/sdb"])
    owners.write_record(record)
    assert owners.read_record(7) == record and record.owner_alive()
    stale = owners.SessionRecord(7, 2, TARGET, "p", "x", os.getpid(),
                                 (record.pid_start or 0) + 1)
    assert not stale.owner_alive()  # the pid was recycled: not our owner any more
    owners.remove_record(7, pid=os.getpid() + 1)  # someone else's: kept
    assert owners.read_record(7) is not None
    owners.remove_record(7)
    assert owners.read_record(7) is None


def test_pidfile(tmp_path: Path) -> None:
    path = tmp_path / "run" / "login.pid"
    owners.write_pidfile(path)
    assert int(path.read_text()) == os.getpid()
    owners.remove_pidfile(path)
    assert not path.exists()


@pytest.mark.parametrize(("child", "code", "out"), [
    ("d.ready(); time.sleep(0.2)", 0, "before ready"),
    ("raise SystemExit(4)", 4, "before ready"),
])
def test_daemon_detach(child: str, code: int, out: str) -> None:
    program = ("import time\nfrom iscsi_handoff.kernel_owners import detach\n"
               "d = detach()\nprint('before ready', flush=True)\n" + child + "\n")
    began = time.monotonic()
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True,
                          timeout=60, cwd=ROOT, check=False)
    assert done.returncode == code and out in done.stdout
    assert time.monotonic() - began < 30


def _info(sid: int, target: str = TARGET) -> SessionInfo:
    return SessionInfo(sid=sid, host_no=1, target_name=target, tpgt=1, initiator_name=None,
                       iface_name=None, state="LOGGED_IN", recovery_tmo=120, username=None,
                       connections=(), disks=())


def test_logout_selection() -> None:
    sessions = [_info(1), _info(2, "iqn.2024-01.org.example:other")]
    assert [s.sid for s in select(sessions, target=None, sid=2, every=False)] == [2]
    assert [s.sid for s in select(sessions, target=TARGET, sid=None, every=False)] == [1]
    assert len(select(sessions, target=None, sid=None, every=True)) == 2
    with pytest.raises(ConfigError):
        select(sessions, target=None, sid=9, every=False)
    with pytest.raises(ConfigError):
        select(sessions, target=TARGET, sid=1, every=False)


def test_logout_leaves_other_initiators_sessions_alone() -> None:
    torn: list[int] = []

    def teardown(sid: int, **kw: object) -> None:
        torn.append(sid)

    result = logout_one(_info(5), timeout=1, force=False, explicit=False, teardown=teardown)
    assert result.how == "skipped" and torn == []
    with pytest.raises(ConfigError, match="iscsiadm"):
        logout_one(_info(5), timeout=1, force=False, explicit=True, teardown=teardown)
    assert logout_one(_info(5), timeout=1, force=True, explicit=True,
                      teardown=teardown).how == "netlink"
    assert torn == [5]


def test_logout_signals_a_live_owner(tmp_path: Path) -> None:
    owner = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        time.sleep(0.2)
        record = owners.SessionRecord(6, 1, TARGET, "p", "x", owner.pid,
                                      owners.process_start_time(owner.pid),
                                      boot_id=owners.boot_id())
        owners.write_record(record)
        (tmp_path / "class" / "iscsi_session" / "session6").mkdir(parents=True)
        torn: list[int] = []
        # The owner dies of SIGUSR1 without logging out (it is only `sleep`): the
        # session is still there, so logout takes it down itself.
        result = logout_one(_info(6), timeout=10, force=False, explicit=True,
                            sysfs_root=str(tmp_path),
                            teardown=lambda sid, **kw: torn.append(sid))
        assert owner.wait(timeout=10) == -signal.SIGUSR1
        assert result.how == "netlink" and torn == [6] and owners.read_record(6) is None
    finally:
        owner.kill()
        owner.wait()


def test_logout_cli_without_kernel_iscsi(tmp_path: Path) -> None:
    runner = CliRunner()
    done = runner.invoke(cli, ["logout", "--all", "--sysfs-root", str(tmp_path)])
    assert done.exit_code == 0 and "no sessions to log out" in done.output
    both = subprocess.run([sys.executable, "-m", "iscsi_handoff", "logout", "--session", "1",
                           "--target", TARGET], capture_output=True, text=True, timeout=60,
                          cwd=ROOT, check=False)
    assert both.returncode == 2 and "exactly one of" in both.stderr


def test_logout_never_trusts_a_record_of_another_boot() -> None:
    # Session ids restart at each boot: this session 7 is not the one recorded.
    owners.write_record(owners.SessionRecord(7, 1, TARGET, "p", "x", 1, None,
                                             boot_id="another-boot"))
    torn: list[int] = []
    with pytest.raises(ConfigError, match="not made by iscsi-handoff"):
        logout_one(_info(7), timeout=1, force=False, explicit=True,
                   teardown=lambda sid, **kw: torn.append(sid))
    assert torn == []
