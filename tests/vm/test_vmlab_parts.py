"""The lab's host-side parts, without booting: module order, the cpio writer, the kernel
release lookup, the reading of the guest's results."""

from __future__ import annotations

import gzip
import io
import lzma
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from .vmlab import boot, initramfs
from .vmlab.kernel import Kernel, resolve_release
from .vmlab.modules import module_name, plan

MODULES_DEP = """\
kernel/drivers/scsi/iscsi_tcp.ko: kernel/drivers/scsi/libiscsi_tcp.ko \
kernel/drivers/scsi/libiscsi.ko kernel/drivers/scsi/scsi_transport_iscsi.ko \
kernel/drivers/scsi/scsi_mod.ko kernel/drivers/scsi/scsi_common.ko
kernel/drivers/scsi/libiscsi_tcp.ko: kernel/drivers/scsi/libiscsi.ko \
kernel/drivers/scsi/scsi_transport_iscsi.ko kernel/drivers/scsi/scsi_mod.ko \
kernel/drivers/scsi/scsi_common.ko
kernel/drivers/scsi/libiscsi.ko: kernel/drivers/scsi/scsi_transport_iscsi.ko \
kernel/drivers/scsi/scsi_mod.ko kernel/drivers/scsi/scsi_common.ko
kernel/drivers/scsi/scsi_transport_iscsi.ko: kernel/drivers/scsi/scsi_mod.ko \
kernel/drivers/scsi/scsi_common.ko
kernel/drivers/scsi/scsi_mod.ko: kernel/drivers/scsi/scsi_common.ko
kernel/drivers/scsi/scsi_common.ko:
kernel/lib/crc64-rocksoft.ko.xz: kernel/lib/crc64.ko
kernel/lib/crc64.ko:
"""


def test_plan_loads_every_module_after_its_dependencies(tmp_path: Path) -> None:
    (tmp_path / "modules.dep").write_text(MODULES_DEP)
    (tmp_path / "modules.builtin").write_text("kernel/fs/overlayfs/overlay.ko\n")
    result = plan(tmp_path, ("iscsi_tcp", "scsi_mod", "crc64_rocksoft", "overlay", "nosuch"))
    assert result.names == ["scsi_common", "scsi_mod", "scsi_transport_iscsi", "libiscsi",
                            "libiscsi_tcp", "iscsi_tcp", "crc64", "crc64_rocksoft"]
    assert result.builtin == ["overlay"]
    assert result.absent == ["nosuch"]


def test_module_names_follow_the_kernel_spelling() -> None:
    assert module_name("kernel/lib/crc64-rocksoft.ko.xz") == "crc64_rocksoft"
    assert module_name("kernel/net/9p/9pnet_virtio.ko") == "9pnet_virtio"


@pytest.mark.skipif(shutil.which("cpio") is None, reason="cpio(1) not installed")
def test_newc_archive_is_read_back_by_cpio() -> None:
    buf = io.BytesIO()
    cpio = initramfs._Newc(buf)
    cpio.directory("etc")
    cpio.file("etc/odd-size", b"12345", mode=0o644)
    cpio.file("init", b"#!/bin/sh\n", mode=0o755)
    cpio.node("dev/console", major=5, minor=1)
    cpio.trailer()
    listing = subprocess.run(["cpio", "-t", "-v", "--quiet"], input=buf.getvalue(),
                             capture_output=True, check=True, timeout=30).stdout.decode()
    lines = listing.splitlines()
    assert [ln.split()[-1] for ln in lines] == ["etc", "etc/odd-size", "init", "dev/console"]
    assert lines[2].startswith("-rwxr-xr-x")
    assert lines[3].startswith("crw-------") and "5,   1" in lines[3]


def test_busybox_static_check() -> None:
    busybox = Path("/bin/busybox")
    if not busybox.exists():
        pytest.skip("busybox-static not installed (./scripts/setup installs it)")
    assert initramfs._is_static(busybox)
    python = Path(shutil.which("python3") or "/usr/bin/python3").resolve()
    assert not initramfs._is_static(python)


def test_initramfs_has_init_busybox_and_the_modules_in_order(tmp_path: Path) -> None:
    if not Path("/bin/busybox").exists():
        pytest.skip("busybox-static not installed (./scripts/setup installs it)")
    root = tmp_path / "k"
    moddir = root / "lib" / "modules" / "9.9.9-test"
    (moddir / "kernel" / "lib").mkdir(parents=True)
    (moddir / "modules.dep").write_text("kernel/lib/crc64-rocksoft.ko.xz: kernel/lib/crc64.ko\n"
                                        "kernel/lib/crc64.ko:\n")
    (moddir / "kernel" / "lib" / "crc64-rocksoft.ko.xz").write_bytes(lzma.compress(b"ELF-r"))
    (moddir / "kernel" / "lib" / "crc64.ko").write_bytes(b"ELF-c")
    built = initramfs.build_initramfs(Kernel("9.9.9-test", root), cache=tmp_path / "cache",
                                      wanted=("crc64_rocksoft", "9p", "nosuch"))
    again = initramfs.build_initramfs(Kernel("9.9.9-test", root), cache=tmp_path / "cache",
                                      wanted=("crc64_rocksoft", "9p", "nosuch"))
    assert again.path == built.path  # cached: same inputs, same image
    out = tmp_path / "x"
    out.mkdir()
    subprocess.run(["cpio", "-i", "-d", "--quiet", "--no-absolute-filenames"],
                   input=gzip.decompress(built.path.read_bytes()), cwd=out, check=True,
                   timeout=30, capture_output=True)
    assert (out / "init").read_bytes() == initramfs.INIT_SCRIPT.read_bytes()
    assert (out / "modules" / "kernel" / "lib" / "crc64-rocksoft.ko").read_bytes() == b"ELF-r"
    assert (out / "etc" / "vmlab" / "modules.list").read_text().split() == \
        ["kernel/lib/crc64.ko", "kernel/lib/crc64-rocksoft.ko"]
    assert (out / "etc" / "vmlab" / "modules.absent").read_text().split() == ["9p", "nosuch"]
    assert (out / "etc" / "vmlab" / "modules.critical").read_text().split() == ["9p"]


def test_stock_kernel_release_is_resolved_from_apt() -> None:
    if shutil.which("apt-cache") is None:
        pytest.skip("no apt-cache: not a Debian host")
    assert re.fullmatch(r"\d+\.\d+\.\d+-\d+-amd64", resolve_release())


def test_summary_line_and_problems() -> None:
    log = ("tests/vm/guest/test_lab.py ....\n"
           "======= 12 passed, 1 skipped in 80.12s (0:01:20) =======\n")
    assert boot.parse_summary(log) == "12 passed, 1 skipped in 80.12s (0:01:20)"
    assert boot.parse_summary("=== no tests ran in 0.50s ===") == "no tests ran in 0.50s"
    assert boot.parse_summary("nothing here") is None

    ok = boot.RunResult(Path("/nonexistent"), "r", qemu_returncode=1, status=0,
                        summary="12 passed in 80.12s")
    assert ok.problems() == []
    empty = boot.RunResult(Path("/nonexistent"), "r", qemu_returncode=11, status=5,
                           summary="no tests ran in 0.50s")
    assert any("collected no tests" in p for p in empty.problems())
    crashed = boot.RunResult(Path("/nonexistent"), "r", qemu_returncode=0)
    assert any("no exit status" in p for p in crashed.problems())
    skipped_only = boot.RunResult(Path("/nonexistent"), "r", status=0,
                                  summary="3 skipped in 1.00s")
    assert any("no passing test" in p for p in skipped_only.problems())


def test_pytest_command_runs_the_guest_suite_unless_given_paths() -> None:
    assert boot.pytest_command(["-k", "chap"])[3:] == \
        ["tests/vm/guest", "--color=no", "-p", "no:cacheprovider", "-k", "chap"]
    one = boot.pytest_command(["tests/vm/guest/test_lab.py"])
    assert "tests/vm/guest" not in one and one[-1] == "tests/vm/guest/test_lab.py"


PANIC_CONSOLE = [
    "vm| tests/vm/guest/test_kernel_recovery.py .",
    "[   81.123456] BUG: kernel NULL pointer dereference, address: 0000000000000008",
    "[   81.123999] Oops: 0000 [#1] PREEMPT SMP NOPTI",
    "[   81.124100] Call Trace:",
    "[   81.125000] Kernel panic - not syncing: Fatal exception in interrupt",
]


def test_the_kernel_log_check_finds_every_kind_of_splat() -> None:
    from .vmlab.kernlog import bad_lines

    log = "\n".join([
        "[    1.0] iscsi: registered transport (tcp)",
        "[    2.0] sd 2:0:0:1: [sdb] 2097152 512-byte logical blocks",
        "[    3.0] ------------[ cut here ]------------",
        "[    3.1] WARNING: CPU: 1 PID: 77 at drivers/scsi/libiscsi.c:123 foo+0x1/0x2",
        "[    4.0] general protection fault, probably for non-canonical address",
        "[    5.0] INFO: task python3:99 blocked for more than 120 seconds.",
        "[    5.1] Call Trace:",
        "[    6.0] sd 2:0:0:1: LUN assignments on this target have changed.",
        *PANIC_CONSOLE[1:],
    ])
    found = bad_lines(log)
    assert [line.split("] ", 1)[1][:12] for line in found] == [
        "------------", "WARNING: CPU", "general prot", "Call Trace:",
        "BUG: kernel ", "Oops: 0000 [", "Call Trace:", "Kernel panic"]


def test_init_sh_greps_what_the_host_checks() -> None:
    from .vmlab.kernlog import BAD

    text = (Path(boot.__file__).parent / "init.sh").read_text()
    m = re.search(r"^KERNEL_BAD='([^']*)'$", text, re.M)
    assert m is not None
    # init.sh's grep -E pattern is the same expression (its \\[ is \[ to grep)
    assert m.group(1).replace("\\\\", "\\") == BAD


def test_a_bad_kernel_log_fails_a_passing_run(tmp_path: Path) -> None:
    (tmp_path / "dmesg.txt").write_text(
        "[ 1.0] ok\n[ 2.0] WARNING: CPU: 0 PID: 1 at net/core/sock.c:1 x+0x1/0x2\n")
    run = boot.RunResult(tmp_path, "r", qemu_returncode=243, status=121,
                         summary="12 passed in 80.12s")
    (problem,) = run.problems()
    assert "WARNING: CPU: 0 PID: 1" in problem
    clean = boot.RunResult(tmp_path / "none", "r", status=0, summary="1 passed in 1.00s")
    assert clean.problems() == []


def test_a_panic_fails_with_the_console_tail(tmp_path: Path) -> None:
    run = boot.RunResult(tmp_path, "r", qemu_returncode=0, console=list(PANIC_CONSOLE))
    problems = run.problems()
    assert any("Kernel panic - not syncing" in p and "BUG: kernel NULL" in p
               for p in problems)  # the bad lines, from the console: no dmesg.txt
    crashed = next(p for p in problems if "no exit status" in p)
    assert "Fatal exception in interrupt" in crashed  # the console's last lines


def test_the_whole_suite_takes_three_boots_a_narrowed_one_one() -> None:
    first, second, third = boot.suite_boots([])
    assert list(boot.SECOND_BOOT) == second and list(boot.THIRD_BOOT) == third
    assert first == [f"--ignore={p}" for p in (*boot.SECOND_BOOT, *boot.THIRD_BOOT)]
    assert "tests/vm/guest" in boot.pytest_command(first)  # the rest of the suite
    assert boot.suite_boots(["-k", "rescan"]) == [["-k", "rescan"]]
    assert not set(boot.SECOND_BOOT) & set(boot.THIRD_BOOT)  # no test runs twice
    from .vmlab.common import REPO

    for path in (*boot.SECOND_BOOT, *boot.THIRD_BOOT):
        assert (REPO / path).is_file(), path
