"""`session rescan` against a fake sysfs: which sessions it picks, what it writes, what it
prints. Against Debian's kernel and tgtd (a LUN added, a LUN resized):
tests/vm/guest/test_rescan.py."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from iscsi_handoff.cli import cli
from userland.errors import IscsiError


def make_session(root: Path, sid: int, host: int, target: str, *, state: str = "running"
                 ) -> Path:
    sess = root / "devices" / "platform" / f"host{host}" / f"session{sid}"
    cls = root / "class" / "iscsi_session" / f"session{sid}"
    cls.mkdir(parents=True)
    (cls / "targetname").write_text(target + "\n")
    os.symlink(sess, cls / "device")
    scan = root / "class" / "scsi_host" / f"host{host}" / "scan"
    scan.parent.mkdir(parents=True)
    scan.write_text("")
    sdev = sess / f"target{host}:0:0" / f"{host}:0:0:1"
    (sdev / "block" / "sdb").mkdir(parents=True)
    (sdev / "block" / "sdb" / "size").write_text("2048\n")
    (sdev / "type").write_text("0\n")
    (sdev / "state").write_text(state + "\n")
    (sdev / "rescan").write_text("")
    return sdev


@pytest.fixture
def root(tmp_path: Path) -> Path:
    r = tmp_path / "sys"
    make_session(r, 3, 4, "iqn.2024-01.org.example:a", state="offline")
    make_session(r, 5, 6, "iqn.2024-01.org.example:b")
    return r


def invoke(root: Path, *args: str) -> tuple[int, str]:
    """Exit code and output as iscsi_handoff.cli.main gives them (one line, its code)."""
    result = CliRunner().invoke(cli, ["session", "rescan", "--sysfs-root", str(root),
                                      "--timeout", "1", *args])
    if isinstance(result.exception, IscsiError):
        return result.exception.exit_code, result.output + str(result.exception)
    return result.exit_code, result.output


def test_rescan_of_one_target_writes_its_host_only(root: Path) -> None:
    code, out = invoke(root, "--target", "iqn.2024-01.org.example:a")
    assert code == 0, out
    assert (root / "class/scsi_host/host4/scan").read_text() == "- - -"
    assert (root / "class/scsi_host/host6/scan").read_text() == ""
    sdev = root / "devices/platform/host4/session3/target4:0:0/4:0:0:1"
    assert (sdev / "rescan").read_text() == "1"
    assert (sdev / "state").read_text().split() == ["running"]  # was offline
    assert "session 3 (iqn.2024-01.org.example:a): 4:0:0:1 offline -> running" in out
    assert "sdb" in out


def test_rescan_json_covers_every_session(root: Path) -> None:
    code, out = invoke(root, "--json")
    assert code == 0, out
    doc = json.loads(out)
    assert [s["sid"] for s in doc["sessions"]] == [3, 5]
    assert doc["sessions"][0]["revived"] == ["4:0:0:1"]
    assert doc["sessions"][1]["revived"] == [] and doc["sessions"][1]["errors"] == []
    assert doc["sessions"][1]["disks"][0]["name"] == "sdb"


def test_rescan_of_an_unknown_session_is_a_usage_error(root: Path) -> None:
    code, out = invoke(root, "--session", "9")
    assert code == 2 and "no iSCSI session 9" in out
    code, out = invoke(root, "--session", "3", "--target", "x")
    assert code == 2 and "not both" in out
    code, out = invoke(root, "--session", "F0123456789ab")  # a FUSE id no keeper serves
    assert code == 2 and "no iSCSI session F0123456789ab" in out


def test_a_refused_write_fails_with_the_reason(root: Path) -> None:
    (root / "class/scsi_host/host6/scan").unlink()
    code, out = invoke(root, "--session", "5")
    assert code == 9 and "SCSI host 6 is not in sysfs" in out
