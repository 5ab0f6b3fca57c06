"""From `discover --save` to disks, as at boot, against a real tgtd: node records, a fresh
`login --all` that logs in every automatic node (the FUSE path on this host), and the
iscsiadm-like grammar (`login PORTAL IQN`, iscsi:// URLs, -v after the command)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from iscsi_handoff.pathchoice import probe_kernel
from iscsi_handoff.tgtlab import LunSpec, Tgt

from tgt_fixtures import tgt  # noqa: F401  (fixture)

pytestmark = pytest.mark.tgt

IQN = "iqn.2024-01.org.iscsi-handoff.test:boot"


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "iscsi_handoff", *args], capture_output=True,
                          text=True, timeout=120, env={**os.environ, **(env or {})})


def _fuse_reason() -> str | None:
    if probe_kernel(try_modprobe=False)[0]:
        return "this kernel has the iSCSI path: boot login on FUSE is tested where it is not"
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse is missing"
    if os.geteuid() != 0:
        return "the FUSE tree and loop devices need root here"
    return None


def _mounts() -> str:
    return Path("/proc/self/mountinfo").read_text()


def test_discover_save_then_login_all_as_at_boot(tgt: Tgt, tmp_path: Path) -> None:  # noqa: F811
    reason = _fuse_reason()
    if reason:
        pytest.skip(reason)
    one = tgt.add_target(f"{IQN}1", luns=[LunSpec(size=8 << 20)])
    two = tgt.add_target(f"{IQN}2", luns=[LunSpec(size=8 << 20)])
    tgt.add_target(f"{IQN}3", luns=[LunSpec(size=8 << 20)])  # stays manual
    for target in (one, two):
        with open(target.lun_paths[0], "r+b") as backing:
            backing.write(target.iqn.encode().ljust(4096, b"\0"))

    saved = run("discover", tgt.portal, "--save")
    assert saved.returncode == 0, saved.stderr
    listed = json.loads(run("node", "list", "--json").stdout)["nodes"]
    assert sorted(n["target"] for n in listed) == [f"{IQN}1", f"{IQN}2", f"{IQN}3"]
    assert {n["startup"] for n in listed} == {"manual"}
    assert all(n["portal"] == f"{tgt.portal},1" for n in listed)
    mnt = tmp_path / "mnt"
    assert run("node", "update", "-T", f"{IQN}1", "--set", "startup=automatic",
               "--set", f"mountpoint={mnt}").returncode == 0
    # The other insists on FUSE and names no place: a folder of its own, by the run dir.
    assert run("node", "update", "-T", f"{IQN}2", "--set", "startup=automatic",
               "--set", "path=fuse").returncode == 0
    # A record whose target is gone: reported, and its exit code is the command's.
    assert run("node", "update", "-T", f"{IQN}3", "--set", "startup=automatic").returncode == 0
    tgt.delete_target(3)

    # systemd's side of Type=notify: a datagram socket named in NOTIFY_SOCKET.
    systemd = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    systemd.bind(str(tmp_path / "notify"))
    systemd.settimeout(120)
    env = {"ISCSI_HANDOFF_RUN_DIR": str(tmp_path / "run"),
           "NOTIFY_SOCKET": str(tmp_path / "notify")}
    proc = subprocess.Popen([sys.executable, "-m", "iscsi_handoff", "login", "--all", "--json"],
                            env={**os.environ, **env}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    report: list[str] = []
    got = threading.Event()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            report.append(line)
            got.set()
        got.set()

    threading.Thread(target=pump, daemon=True).start()
    try:
        assert got.wait(120) and report, proc.poll()
        nodes = {n["target"]: n for n in json.loads(report[0])["nodes"]}
        assert nodes[f"{IQN}3"]["ok"] is False and nodes[f"{IQN}3"]["exit_code"] == 5
        assert nodes[f"{IQN}3"]["error"].startswith(f"login to {IQN}3: target not found")
        for target in (one, two):
            ready = nodes[target.iqn]
            assert ready["ok"] is True and ready["ready"]["path"] == "fuse", ready
            [storage] = ready["ready"]["storage"]
            with open(storage, "rb") as f:  # the bytes tgt holds, through the tree
                assert f.read(4096).rstrip(b"\0") == target.iqn.encode()
        assert nodes[f"{IQN}1"]["ready"]["mountpoint"] == str(mnt)
        assert nodes[f"{IQN}2"]["ready"]["mountpoint"] == str(
            tmp_path / "run" / "nodes" / f"{IQN}2,127.0.0.1,{tgt.port}")
        assert proc.poll() is None  # serving
        told = systemd.recv(4096).decode().splitlines()
        assert told[:2] == ["READY=1", "STATUS=2 of 3 nodes logged in"], told
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=120)
    assert code == 5  # the first failure's
    assert str(mnt) not in _mounts() and str(tmp_path / "run") not in _mounts()
    assert proc.stderr is not None and "Traceback" not in proc.stderr.read()
    systemd.close()


def test_login_grammar_against_tgt(tgt: Tgt) -> None:  # noqa: F811
    tgt.add_target(f"{IQN}g", luns=[LunSpec(size=8 << 20)])
    positional = run("login", tgt.portal, f"{IQN}g", "--check", "-v")
    assert positional.returncode == 0, positional.stderr
    assert f"logged in to {IQN}g" in positional.stdout
    assert "login -> TargetName=" in positional.stderr  # -v after the command
    url = run("login", f"iscsi://{tgt.portal}/{IQN}g/1", "--check", "--json")
    assert url.returncode == 0, url.stderr
    assert json.loads(url.stdout)["target"] == f"{IQN}g"
    short = run("login", "-p", tgt.portal, "-T", f"{IQN}g", "--check")
    assert short.returncode == 0, short.stderr
    # A saved node: -T alone finds its portal.
    found = run("discover", "-p", tgt.portal, "-T", f"{IQN}g", "--save", "--json")
    assert found.returncode == 0, found.stderr
    [saved_path] = json.loads(found.stdout)["saved"]
    assert Path(saved_path).name == f"{IQN}g,127.0.0.1,{tgt.port}.conf"
    saved = run("login", "-T", f"{IQN}g", "--check")
    assert saved.returncode == 0, saved.stderr
    missing = run("login", tgt.portal, f"{IQN}nope", "--check")
    assert missing.returncode == 5
    assert f"iscsi-handoff discover {tgt.portal}" in missing.stderr
    assert "we are iqn." in missing.stderr
    as_json = run("login", tgt.portal, f"{IQN}nope", "--check", "--json")
    error = json.loads(as_json.stderr)["error"]
    assert error["exit_code"] == 5 and "0x0203" in error["message"]


def test_chap_with_a_non_md5_algorithm_hints_md5(tgt: Tgt, tmp_path: Path) -> None:  # noqa: F811
    tgt.add_target(f"{IQN}c", chap=("alice", "alice-secret-123"))
    secret = tmp_path / "alice.secret"
    secret.write_text("alice-secret-123\n")
    secret.chmod(0o600)
    proc = run("login", tgt.portal, f"{IQN}c", "--check", "--chap-user", "alice",
               "--chap-secret-file", str(secret), "--chap-algs", "sha256")
    # tgt knows MD5 only and says "initiator error" (0x0200) to an offer of SHA-256.
    assert proc.returncode in (4, 6), (proc.stdout, proc.stderr)
    assert "try --chap-algs md5" in proc.stderr and "Traceback" not in proc.stderr


def test_saved_chap_node_logs_in_with_its_recorded_secret_file(
        tgt: Tgt, tmp_path: Path) -> None:  # noqa: F811
    tgt.add_target(f"{IQN}s", chap=("alice", "alice-secret-123"))
    secret = tmp_path / "alice.secret"
    secret.write_text("alice-secret-123\n")
    secret.chmod(0o600)
    saved = run("discover", tgt.portal, "--save", "--chap-user", "alice",
                "--chap-secret-file", str(secret))
    assert saved.returncode == 0, saved.stderr
    text = next((Path(os.environ["ISCSI_HANDOFF_CONFIG_DIR"]) / "nodes").iterdir()).read_text()
    assert f"chap_secret_file = {secret}" in text and "alice-secret-123" not in text
    assert run("login", "--node", f"{IQN}s", "--check").returncode == 0
    # What is typed wins over the record: a wrong user fails.
    wrong = run("login", "--node", f"{IQN}s", "--check", "--chap-user", "bob")
    assert wrong.returncode == 4, wrong.stderr


def test_mount_mounts_what_it_can_and_reports_the_rest(
        tgt: Tgt, tmp_path: Path) -> None:  # noqa: F811
    reason = _fuse_reason()
    if reason:
        pytest.skip(reason)
    tgt.add_target(f"{IQN}open", luns=[LunSpec(size=8 << 20)])
    tgt.add_target(f"{IQN}shut", chap=("alice", "alice-secret-123"))
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    proc = subprocess.Popen([sys.executable, "-m", "iscsi_handoff", "mount", tgt.portal,
                             str(mnt), "--json"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        ready: dict[str, Any] = {}
        for line in proc.stdout:
            if line.startswith("{"):
                ready = json.loads(line)
                break
        assert ready.get("event") == "ready", ready
        assert [t["target"] for t in ready["targets"]] == [f"{IQN}open"]
        assert (mnt / "127.0.0.1" / "bootopen" / "storage").stat().st_size == 8 << 20
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=120)
    assert proc.stderr is not None
    err = json.loads(proc.stderr.readline())["error"]
    assert err["message"].startswith(f"{IQN}shut: not mounted: ") and err["exit_code"] == 4
    assert code == 0 and str(mnt) not in _mounts()
