"""login's path choice from a doctor report: forced paths, fallback, and the reasons."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from iscsi_handoff.login_path import decide, prepare_mountpoint, session_mountpoint
from iscsi_handoff.pathchoice import PathReport
from userland.errors import ConfigError, PathUnavailable


def report(*, kernel: bool, fuse: bool = True, loop: bool = True) -> PathReport:
    return PathReport(kernel_ok=kernel, kernel_reason="KREASON", fuse_ok=fuse,
                      fuse_reason="FREASON", loop_ok=loop, loop_reason="LREASON",
                      bcc_ok=False, bcc_reason="", chosen=None, chosen_reason="",
                      kernel_release="x")


def test_kernel_when_present_and_no_notice() -> None:
    d = decide(force_kernel=False, fuse_mount=None, loop=False,
               probe=lambda: report(kernel=True))
    assert (d.path, d.mountpoint, d.notice) == ("kernel", None, None)


def test_fuse_mount_given_wins_without_probing() -> None:
    def never() -> PathReport:
        raise AssertionError("probed")
    d = decide(force_kernel=False, fuse_mount=Path("/m"), loop=True, probe=never)
    assert (d.path, d.mountpoint, d.loop, d.notice) == ("fuse", Path("/m"), True, None)


def test_fallback_says_why_in_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ISCSI_HANDOFF_RUN_DIR", "/r")
    d = decide(force_kernel=False, fuse_mount=None, loop=False,
               probe=lambda: report(kernel=False))
    assert d.path == "fuse" and d.mountpoint == Path("/r/fuse")
    assert d.notice is not None and "\n" not in d.notice and "KREASON" in d.notice
    assert d.loop == (os.geteuid() == 0)
    d = decide(force_kernel=False, fuse_mount=None, loop=False,
               probe=lambda: report(kernel=False, loop=False))
    assert not d.loop and d.notice is not None and "LREASON" in d.notice


def test_forced_kernel_where_missing_is_an_error_naming_the_reason() -> None:
    with pytest.raises(PathUnavailable, match="KREASON"):
        decide(force_kernel=True, fuse_mount=None, loop=False,
               probe=lambda: report(kernel=False))


def test_contradictions_and_nothing_available() -> None:
    with pytest.raises(ConfigError):
        decide(force_kernel=True, fuse_mount=Path("/m"), loop=False)
    with pytest.raises(ConfigError):
        decide(force_kernel=True, fuse_mount=None, loop=True)
    with pytest.raises(PathUnavailable, match=r"KREASON.*FREASON"):
        decide(force_kernel=False, fuse_mount=None, loop=False,
               probe=lambda: report(kernel=False, fuse=False))


def test_each_session_its_own_folder(tmp_path: Path) -> None:
    isid = bytes.fromhex("80aabbccddee")
    first = session_mountpoint("127.0.0.1", "iqn.2024-01.org.example:disk1", isid,
                               parent=tmp_path)
    assert first == tmp_path / "127.0.0.1-disk1"
    assert prepare_mountpoint(first) and first.is_dir()
    assert prepare_mountpoint(first)  # still empty: a killed keeper's, ours to reuse
    (first / "in use").mkdir()  # as a mounted tree looks: taken
    assert session_mountpoint("127.0.0.1", "iqn.2024-01.org.example:disk1", isid,
                              parent=tmp_path) == tmp_path / "127.0.0.1-disk1-80aabbccddee"
    assert not prepare_mountpoint(first)  # not ours to remove
    assert session_mountpoint("h", "iqn.x:../..", isid, parent=tmp_path).parent == tmp_path
