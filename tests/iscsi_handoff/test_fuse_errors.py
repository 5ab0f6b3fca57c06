"""The FUSE path's refusals, each one line with the next step and its exit code, all
before any connection is made (the portal here listens nowhere): pyfuse3 missing,
--loop without root, a mount point that is taken."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

NOWHERE = "127.0.0.1:1"
TARGET = "iqn.2024-01.org.iscsi-handoff.test:errors"
ROOT = Path(__file__).resolve().parents[2]


def run(prelude: str, *args: str) -> subprocess.CompletedProcess[str]:
    """The real CLI, after ``prelude`` changed what this process sees."""
    program = f"{prelude}\nfrom iscsi_handoff.cli import main\nmain()\n"
    return subprocess.run([sys.executable, "-c", program, *args], capture_output=True,
                          text=True, timeout=60, cwd=ROOT, check=False)


# As after `pip install iscsi-handoff` without the fuse extra: the import fails.
NO_PYFUSE3 = "import sys\nsys.modules['pyfuse3'] = None"


def test_missing_pyfuse3_is_exit_9_with_the_install_line(tmp_path: Path) -> None:
    done = run(NO_PYFUSE3, "login", "--portal", NOWHERE, "--target", TARGET,
               "--fuse", str(tmp_path))
    assert done.returncode == 9, done.stderr
    assert done.stderr.splitlines() == [
        "iscsi-handoff: the FUSE fallback needs pyfuse3, which is not installed: "
        "pip install 'iscsi-handoff[fuse]' (it builds against libfuse3: apt install fuse3 "
        "libfuse3-dev pkg-config)"]
    mount = run(NO_PYFUSE3, "mount", NOWHERE, str(tmp_path))
    assert mount.returncode == 9 and "pip install 'iscsi-handoff[fuse]'" in mount.stderr


def test_missing_pyfuse3_when_the_fallback_is_chosen_for_us() -> None:
    done = run(NO_PYFUSE3, "login", "--portal", NOWHERE, "--target", TARGET)
    if "kernel" in done.stdout:
        pytest.skip("this kernel has the iSCSI path: the fallback is not chosen here")
    assert done.returncode == 9, done.stderr
    assert "internal error" not in done.stderr
    assert "pip install 'iscsi-handoff[fuse]'" in done.stderr


def test_loop_without_root_is_exit_9_not_an_internal_error(tmp_path: Path) -> None:
    if not os.path.exists("/dev/fuse"):
        pytest.skip("/dev/fuse is missing: the FUSE path is refused before --loop is looked at")
    done = run("import os\nos.geteuid = lambda: 1000  # as a user would run it",
               "login", "--portal", NOWHERE, "--target", TARGET, "--fuse", str(tmp_path),
               "--loop")
    assert done.returncode == 9, done.stderr
    assert done.stderr.splitlines() == [
        "iscsi-handoff: --loop needs root (losetup attaches the storage file): run it as "
        "root, or leave out --loop and use the storage file itself"]


def test_no_mount_over_a_mount_or_a_non_empty_folder(tmp_path: Path) -> None:
    if not os.path.exists("/dev/fuse"):
        pytest.skip("/dev/fuse is missing: the FUSE path is refused before its mount point")
    done = run("", "login", "--portal", NOWHERE, "--target", TARGET, "--fuse", "/proc")
    assert done.returncode == 2, done.stderr
    assert "/proc is a mount point already (proc from proc)" in done.stderr
    (tmp_path / "somebody's file").write_text("x")
    done = run("", "login", "--portal", NOWHERE, "--target", TARGET, "--fuse", str(tmp_path))
    assert done.returncode == 2, done.stderr
    assert f"{tmp_path} is not empty" in done.stderr and "--force" in done.stderr
    assert os.listdir(tmp_path) == ["somebody's file"]
