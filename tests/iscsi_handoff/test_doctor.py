"""`doctor` and `session list` on this very machine, and probe_kernel's reasons.

The subprocess tests run the real CLI. Where the kernel has no iSCSI (no NETLINK_ISCSI,
no modules to load) they check that doctor says so and picks FUSE; on a kernel with
iSCSI they check that the kernel path is not blamed on a missing module.
"""

from __future__ import annotations

import errno
import importlib.util
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from iscsi_handoff import pathchoice
from kernel_handoff.sysfs import kernel_iscsi_loaded

ROOT = Path(__file__).resolve().parent.parent.parent
NO_KERNEL_ISCSI = (pathchoice.netlink_iscsi_errno() == errno.EPROTONOSUPPORT
                   and not kernel_iscsi_loaded("/sys"))
FUSE_HERE = os.path.exists("/dev/fuse") and importlib.util.find_spec("pyfuse3") is not None


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "iscsi_handoff", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60, check=False)


def test_doctor_table() -> None:
    done = run_cli("doctor")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == f"kernel {os.uname().release}"
    assert lines[1].split() == ["PATH", "STATUS", "WHY"]
    rows = {line.split()[0]: line.split()[1] for line in lines[2:6]}
    assert set(rows) == {"kernel", "fuse", "loop", "bcc"}
    assert set(rows.values()) <= {"OK", "MISSING"}
    assert lines[6].startswith("login takes: ")
    if NO_KERNEL_ISCSI:
        kernel_line = lines[2]
        assert "MISSING" in kernel_line
        assert "NETLINK_ISCSI unavailable" in kernel_line and "EPROTONOSUPPORT" in kernel_line
        # modprobe was tried (root) or could not be: either way the line says why
        assert "modprobe" in kernel_line
        if FUSE_HERE:
            assert rows["fuse"] == "OK"
            assert lines[6].startswith("login takes: fuse: the kernel path is missing")


def test_doctor_json() -> None:
    done = run_cli("doctor", "--json", "--no-modprobe")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert set(report["paths"]) == {"kernel", "fuse", "loop", "bcc"}
    kernel = report["paths"]["kernel"]
    if NO_KERNEL_ISCSI:
        assert kernel == {"ok": False, "reason": (
            "NETLINK_ISCSI unavailable: this kernel has no scsi_transport_iscsi "
            "(EPROTONOSUPPORT); modprobe not tried")}
        assert "iscsi_if_rx not in /proc/kallsyms" in report["paths"]["bcc"]["reason"]
        if FUSE_HERE:
            assert report["paths"]["fuse"]["ok"] is True
            assert report["chosen"] == "fuse"
            assert report["chosen_reason"].startswith("fuse: ")
    else:
        assert "EPROTONOSUPPORT" not in kernel["reason"]
    assert (report["chosen"] == "kernel") == kernel["ok"]


def test_session_list_here() -> None:
    done = run_cli("session", "list")
    assert done.returncode == 0 and done.stderr == ""
    if NO_KERNEL_ISCSI:
        assert done.stdout == ("no iSCSI sessions: this kernel has no iSCSI support loaded "
                               "(no class/iscsi_session in sysfs)\n")
    done = run_cli("session", "list", "--json")
    assert done.returncode == 0
    data = json.loads(done.stdout)
    if NO_KERNEL_ISCSI:
        assert data == {"kernel_iscsi": False, "sessions": []}


def test_session_list_loaded_but_empty(tmp_path: Path) -> None:
    (tmp_path / "class" / "iscsi_session").mkdir(parents=True)
    done = run_cli("session", "list", "--sysfs-root", str(tmp_path))
    assert (done.returncode, done.stdout) == (0, "no iSCSI sessions\n")


# --- probe_kernel's reasons, with the machine's answers replaced --------------------

@pytest.fixture
def fake_tcp(tmp_path: Path) -> Path:
    handle = tmp_path / "sys" / "class" / "iscsi_transport" / "tcp" / "handle"
    handle.parent.mkdir(parents=True)
    handle.write_text("18446744072644178752\n")
    (tmp_path / "sys" / "class" / "iscsi_session").mkdir(parents=True)
    return tmp_path / "sys"


def test_kernel_ok(fake_tcp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pathchoice, "netlink_iscsi_errno", lambda: None)
    monkeypatch.setattr(pathchoice, "has_cap_sys_admin", lambda: True)
    ok, reason = pathchoice.probe_kernel(sysfs_root=str(fake_tcp))
    assert ok and reason.startswith("iscsi_tcp loaded (transport handle 18446744072644178752)")


def test_kernel_not_root(fake_tcp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pathchoice, "netlink_iscsi_errno", lambda: None)
    monkeypatch.setattr(pathchoice, "has_cap_sys_admin", lambda: False)
    assert pathchoice.probe_kernel(sysfs_root=str(fake_tcp)) == (
        False, "not root: the kernel path needs CAP_SYS_ADMIN")


def test_kernel_module_loaded_but_other_netns(fake_tcp: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pathchoice, "netlink_iscsi_errno", lambda: errno.EPROTONOSUPPORT)
    monkeypatch.setattr(pathchoice, "has_cap_sys_admin", lambda: True)
    ok, reason = pathchoice.probe_kernel(sysfs_root=str(fake_tcp), try_modprobe=False)
    assert not ok and "only in the initial network namespace" in reason


def test_modprobe_failure_is_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    tool = bin_dir / "modprobe"
    tool.write_text("#!/bin/sh\necho \"$@\" > \"$(dirname \"$0\")/args\"\n"
                    "echo 'modprobe: FATAL: Module iscsi_tcp not found in directory "
                    "/lib/modules/x' >&2\necho second line >&2\nexit 1\n")
    tool.chmod(tool.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ.get('PATH', '')}")
    monkeypatch.setattr(pathchoice, "netlink_iscsi_errno", lambda: errno.EPROTONOSUPPORT)
    monkeypatch.setattr(pathchoice, "has_cap_sys_admin", lambda: True)
    ok, reason = pathchoice.probe_kernel(sysfs_root=str(tmp_path / "sys"))
    assert not ok
    assert reason == (
        "NETLINK_ISCSI unavailable: this kernel has no scsi_transport_iscsi (EPROTONOSUPPORT); "
        "`modprobe -a scsi_transport_iscsi iscsi_tcp` failed: modprobe: FATAL: Module "
        "iscsi_tcp not found in directory /lib/modules/x")
    assert (bin_dir / "args").read_text() == "-a scsi_transport_iscsi iscsi_tcp\n"


def test_iscsi_tcp_missing_not_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pathchoice, "netlink_iscsi_errno", lambda: None)
    monkeypatch.setattr(pathchoice, "has_cap_sys_admin", lambda: False)
    assert pathchoice.probe_kernel(sysfs_root=str(tmp_path)) == (
        False, "iscsi_tcp not loaded (no class/iscsi_transport/tcp in sysfs); "
               "not root, so no modprobe")
