"""`login --all --daemon` as a oneshot boot would run it: returns once every automatic
node's storage file exists, a second run finds them logged in already (no failure),
`logout --all` ends them. Needs the FUSE path's --daemon and the session registry."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from iscsi_handoff.pathchoice import probe_kernel
from iscsi_handoff.tgtlab import LunSpec, Tgt

from tgt_fixtures import tgt  # noqa: F401  (fixture)

pytestmark = pytest.mark.tgt

IQN = "iqn.2024-01.org.iscsi-handoff.test:daemon"


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "iscsi_handoff", *args], capture_output=True,
                          text=True, timeout=180, env=dict(os.environ))


def test_login_all_daemon_then_again_then_logout_all(tgt: Tgt) -> None:  # noqa: F811
    if probe_kernel(try_modprobe=False)[0]:
        pytest.skip("this kernel has the iSCSI path: the FUSE boot login is tested where not")
    if not os.path.exists("/dev/fuse") or os.geteuid() != 0:
        pytest.skip("the FUSE tree and loop devices need /dev/fuse and root")
    for n in (1, 2):
        target = tgt.add_target(f"{IQN}{n}", luns=[LunSpec(size=8 << 20)])
        with open(target.lun_paths[0], "r+b") as backing:
            backing.write(target.iqn.encode().ljust(4096, b"\0"))
    assert run("discover", tgt.portal, "--save").returncode == 0
    for n in (1, 2):
        assert run("node", "update", "-T", f"{IQN}{n}", "--set",
                   "startup=automatic").returncode == 0
    try:
        first = run("login", "--all", "--daemon", "--json")
        assert first.returncode == 0, first.stderr
        nodes = json.loads(first.stdout)["nodes"]
        assert [n["ok"] for n in nodes] == [True, True]
        for node in nodes:
            [storage] = node["ready"]["storage"]
            with open(storage, "rb") as f:
                assert f.read(4096).rstrip(b"\0") == node["target"].encode()
        live = json.loads(run("session", "list", "--json").stdout)["sessions"]
        assert sorted(s["target"] for s in live if s["path"] == "fuse") == [
            f"{IQN}1", f"{IQN}2"], live
        again = run("login", "--all", "--daemon", "--json")
        assert again.returncode == 0, again.stderr
        assert [n.get("already") for n in json.loads(again.stdout)["nodes"]] == [True, True]
    finally:
        out = run("logout", "--all")
    assert out.returncode == 0, out.stderr
    listed = json.loads(run("session", "list", "--json").stdout)
    assert not any(s.get("path") == "fuse" for s in listed.get("sessions", [])), listed
    assert str(Path(os.environ["ISCSI_HANDOFF_RUN_DIR"])) not in Path(
        "/proc/self/mountinfo").read_text()
