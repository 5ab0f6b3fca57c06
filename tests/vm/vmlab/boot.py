"""One QEMU run of the guest: prepare (cached), boot, stream the console, collect results.

QEMU runs under TCG (`-accel tcg -cpu max`: KVM does not run stock kernels here), with
no network card (iSCSI stays on the guest's loopback), the host's `/` shared read-only
over 9p and a run directory `.cache/vm/run-*/` shared writable for the results. The
guest's exit status comes back through isa-debug-exit: QEMU exits with (status << 1) | 1.
A hard timeout kills QEMU by its PID.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .common import CACHE, REPO, LabError, Log
from .initramfs import Initramfs, build_initramfs
from .kernel import Kernel, prepare_kernel
from .kernlog import bad_lines

QEMU = "qemu-system-x86_64"
GUEST_SUITE = "tests/vm/guest"
# A second boot runs these (recovery: outages, rescans, async logout, two targets in one
# keeper, resets; the bcc trace), so that neither boot nears the 10-minute hard timeout
# on a loaded machine (one boot of everything ran past it). Seen: 29 tests in 305 s in
# the first, these 8 in about 460 s.
SECOND_BOOT = ("tests/vm/guest/test_recovery_full.py", "tests/vm/guest/test_rescan.py",
               "tests/vm/guest/test_async_logout.py", "tests/vm/guest/test_kernel_recovery.py",
               "tests/vm/guest/test_trace.py")
# Keepers and their sessions: adoption, iscsid beside us, the session registry.
THIRD_BOOT = ("tests/vm/guest/test_keeper_adopt.py", "tests/vm/guest/test_iscsid_beside.py",
              "tests/vm/guest/test_kernel_sessions.py", "tests/vm/guest/test_nodes_kernel.py")
LATER_BOOTS = (SECOND_BOOT, THIRD_BOOT)
DEFAULT_TIMEOUT = 590.0  # with the kernel fetch, the VM stage stays under 10 minutes
GUEST_MARGIN = 30.0  # the guest's own pytest timeout leaves this for boot and shutdown
LAB_FAILED = 120  # init.sh: the guest could not be set up
KERNEL_LOG_FAILED = 121  # init.sh: the tests passed, the kernel's log did not
CONSOLE_TAIL = 40  # console lines shown when the guest died without a status
GUEST_TIMED_OUT = 128 + 15  # busybox timeout's status when it had to SIGTERM the job
KEEP_RUNS = 20  # run directories kept (older ones are pruned)
# Environment the guest suite inherits from the host: CI=true turns skips into failures.
PASS_ENV = ("CI", "GITHUB_ACTIONS", "GITLAB_CI", "HYPOTHESIS_PROFILE", "NO_COLOR")
# panic=-1 with -no-reboot: a kernel panic ends QEMU at once (no status: a failure).
# log_buf_len: the whole run's kernel log stays for the check at its end.
KERNEL_ARGS = "console=ttyS0 panic=-1 loglevel=4 mitigations=off log_buf_len=8M"
ROOT_READY = "vmlab: stage 2: root ready"
_SUMMARY = re.compile(r"^=+ (.+ in [0-9.]+s(?: \([0-9:]+\))?) =+$")


@dataclass
class RunResult:
    run_dir: Path
    release: str
    qemu_returncode: int | None = None
    status: int | None = None  # the guest job's exit status, None if it never came back
    timed_out: bool = False
    boot_seconds: float | None = None  # QEMU start to the guest's root being ready
    seconds: float = 0.0  # QEMU start to exit
    summary: str | None = None  # pytest's last line, "12 passed in 80.1s"
    console: list[str] = field(default_factory=list)

    @property
    def guest_log(self) -> str:
        return _read(self.run_dir / "pytest.log")

    def kernel_problems(self) -> list[str]:
        """The kernel log's BUG/Oops/WARNING/panic lines: from dmesg.txt, or from the
        console when the guest died before writing it (a panic)."""
        dmesg = _read(self.run_dir / "dmesg.txt")
        return bad_lines(dmesg if dmesg else "\n".join(self.console))

    def console_tail(self, lines: int = CONSOLE_TAIL) -> str:
        return "\n".join(self.console[-lines:])

    def problems(self) -> list[str]:
        """Why this run is not a success; empty when the guest suite ran and passed."""
        found: list[str] = []
        kernel = self.kernel_problems()
        if kernel:
            found.append(f"the guest kernel logged {len(kernel)} BUG/Oops/WARNING/panic/"
                         "Call Trace line(s):\n  " + "\n  ".join(kernel[:30]))
        if self.timed_out:
            found.append("QEMU killed at the hard timeout")
        if self.status is None:
            found.append(f"no exit status from the guest (QEMU exit status "
                         f"{self.qemu_returncode}): it crashed or never reached the job; "
                         f"the console's last lines:\n{self.console_tail()}")
        elif self.status == KERNEL_LOG_FAILED:
            if not kernel:
                found.append("the guest reported a bad kernel log (see kernel-problems.txt)")
        elif self.status == LAB_FAILED:
            found.append("the guest could not be set up (see the console)")
        elif self.status == 5:
            found.append("the guest's pytest collected no tests (exit status 5)")
        elif self.status == GUEST_TIMED_OUT:
            found.append("the guest job was stopped at its own timeout (SIGTERM)")
        elif self.status != 0:
            found.append(f"the guest suite exited with status {self.status}")
        if self.status not in (LAB_FAILED, None) and not self.timed_out:
            if self.summary is None:
                found.append("no pytest summary line in the guest's output")
            elif "no tests ran" in self.summary or not re.search(r"\d+ passed",
                                                                  self.summary):
                found.append(f"the guest ran no passing test: {self.summary}")
        return found


def unavailable_reason() -> str | None:
    """Why the lab cannot run here (one line), or None."""
    if os.geteuid() != 0:
        return f"the VM lab needs root (iSCSI, tgtd and bcc in the guest); uid {os.geteuid()}"
    missing = [t for t in (QEMU, "apt-get", "dpkg-deb", "depmod") if shutil.which(t) is None]
    if missing:
        return (f"{', '.join(missing)} not found: ./scripts/setup installs qemu-system-x86, "
                "kmod and busybox-static")
    if not (REPO / ".venv" / "bin" / "python").exists():
        return "no .venv: run ./scripts/setup"
    return None


def prepare(log: Log | None = None) -> tuple[Kernel, Initramfs]:
    """The current stock kernel and its initramfs, from the cache when it has them."""
    kernel = prepare_kernel(log=log)
    return kernel, build_initramfs(kernel)


def suite_boots(args: Sequence[str]) -> list[list[str]]:
    """The pytest arguments of each boot the whole guest suite takes: three (the rest,
    then each of LATER_BOOTS) when no arguments narrow it, one otherwise (-k, -x, paths:
    a developer's run). One boot would not fit its timeout under TCG."""
    if args:
        return [list(args)]
    later = [path for paths in LATER_BOOTS for path in paths]
    return [[f"--ignore={path}" for path in later], *(list(paths) for paths in LATER_BOOTS)]


def pytest_command(args: Sequence[str]) -> list[str]:
    """The guest's pytest command: tests/vm/guest unless the args name test paths."""
    names_paths = any(a.startswith(GUEST_SUITE) or a.startswith(f"./{GUEST_SUITE}")
                      for a in args)
    return [".venv/bin/python", "-m", "pytest", *([] if names_paths else [GUEST_SUITE]),
            "--color=no", "-p", "no:cacheprovider", *args]


def run(command: Sequence[str], *, timeout: float = DEFAULT_TIMEOUT, echo: Log | None = None,
        interactive: bool = False, memory_mib: int = 2048, cpus: int = 2,
        cache: Path = CACHE) -> RunResult:
    """Boot the guest and run `command` (argv, from the repo root) as its job."""
    kernel, initramfs = prepare(echo)
    run_dir = _new_run_dir(cache)
    _write_job(run_dir, kernel, command, timeout=timeout, interactive=interactive)
    result = RunResult(run_dir, kernel.release)
    qemu = qemu_command(kernel, initramfs, run_dir, memory_mib=memory_mib, cpus=cpus,
                        interactive=interactive)
    (run_dir / "qemu.argv").write_text(shlex.join(qemu) + "\n")
    if echo is not None:
        echo(f"vmlab: booting {kernel.release} (TCG, {cpus} CPUs, {memory_mib} MiB); "
             f"results in {run_dir}")
    start = time.monotonic()
    try:
        _boot(qemu, result, start, timeout=timeout, echo=echo, interactive=interactive)
    finally:
        result.seconds = time.monotonic() - start
        (run_dir / "console.log").write_text("".join(f"{ln}\n" for ln in result.console))
    status_file = _read(run_dir / "status").strip()
    if result.status == 127 and status_file.isdigit():
        result.status = int(status_file)  # isa-debug-exit carries one byte; see init.sh
    result.summary = parse_summary(result.guest_log)
    return result


def run_suite(pytest_args: Sequence[str] = (), *, timeout: float = DEFAULT_TIMEOUT,
              echo: Log | None = None) -> RunResult:
    """Run the guest suite (tests/vm/guest) with extra pytest arguments."""
    return run(pytest_command(pytest_args), timeout=timeout, echo=echo)


def parse_summary(text: str) -> str | None:
    """The text of pytest's last "=== ... in 12.3s ===" line, if any."""
    found = None
    for line in text.splitlines():
        m = _SUMMARY.match(line.strip())
        if m:
            found = m.group(1)
    return found


def qemu_command(kernel: Kernel, initramfs: Initramfs, run_dir: Path, *, memory_mib: int,
                 cpus: int, interactive: bool) -> list[str]:
    virtfs = "security_model=none,multidevs=remap"
    serial = (["-chardev", "stdio,id=con,signal=off", "-serial", "chardev:con"]
              if interactive else ["-serial", "stdio"])
    return [
        QEMU, "-accel", "tcg", "-cpu", "max", "-m", str(memory_mib), "-smp", str(cpus),
        "-nodefaults", "-no-user-config", "-display", "none", "-monitor", "none",
        *serial, "-no-reboot", "-nic", "none",
        "-kernel", str(kernel.vmlinuz), "-initrd", str(initramfs.path),
        "-append", " ".join([KERNEL_ARGS, os.environ.get("VMLAB_KERNEL_ARGS", "")]).strip(),
        "-virtfs", f"local,path=/,mount_tag=hostroot,readonly=on,{virtfs}",
        "-virtfs", f"local,path={run_dir},mount_tag=results,{virtfs}",
        "-device", "isa-debug-exit,iobase=0xf4,iosize=4",
    ]


def _boot(qemu: list[str], result: RunResult, start: float, *, timeout: float,
          echo: Log | None, interactive: bool) -> None:
    if threading.current_thread() is threading.main_thread() and shutil.which("setpriv"):
        # Should this process die, QEMU dies with it (only from the main thread: the
        # signal fires when the *thread* that forked it ends).
        qemu = ["setpriv", "--pdeathsig", "KILL", *qemu]
    try:
        proc = subprocess.Popen(
            qemu, stdin=None if interactive else subprocess.DEVNULL,
            stdout=None if interactive else subprocess.PIPE, stderr=subprocess.STDOUT)
    except OSError as exc:
        raise LabError(f"cannot start {QEMU}: {exc}") from exc
    reader = None
    if proc.stdout is not None:
        reader = threading.Thread(target=_read_console, args=(proc, result, start, echo),
                                  daemon=True)
        reader.start()
    try:
        try:
            result.qemu_returncode = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            result.timed_out = True
    finally:
        if proc.poll() is None:
            proc.kill()  # by PID: Popen never signals a PID it has already reaped
            proc.wait()
        if reader is not None:
            reader.join(timeout=10)
    rc = result.qemu_returncode
    if rc is not None and rc % 2 == 1:
        result.status = rc >> 1
    if result.timed_out and echo is not None:
        echo(f"vmlab: QEMU killed after the {timeout:g} s hard timeout")


def _read_console(proc: subprocess.Popen[bytes], result: RunResult, start: float,
                  echo: Log | None) -> None:
    assert proc.stdout is not None
    for raw in proc.stdout:
        line = raw.decode(errors="replace").rstrip("\r\n").replace("\r", "")
        result.console.append(line)
        if result.boot_seconds is None and line.startswith(ROOT_READY):
            result.boot_seconds = time.monotonic() - start
        if echo is not None:
            echo(line)


def _write_job(run_dir: Path, kernel: Kernel, command: Sequence[str], *, timeout: float,
               interactive: bool) -> None:
    guest_timeout = max(30, int(timeout - GUEST_MARGIN))
    env = {
        "VMLAB_RELEASE": kernel.release,
        "VMLAB_MODULES": str(kernel.modules_dir),
        "VMLAB_REPO": str(REPO),
        "VMLAB_TIMEOUT": str(guest_timeout),
        "VMLAB_INTERACTIVE": "1" if interactive else "0",
    }
    (run_dir / "job.env").write_text(
        "".join(f"{k}={shlex.quote(v)}\n" for k, v in env.items()))
    exports = {
        "HOME": "/root", "LANG": "C.UTF-8", "TERM": "dumb" if not interactive else "vt100",
        "PYTHONUNBUFFERED": "1",
        "ISCSI_HANDOFF_VM": "1",  # tests/vm/conftest.py collects tests/vm/guest only then
        "VMLAB_RELEASE": kernel.release,
        "VMLAB_RESULTS": "/run/vmlab/results",  # guest tests may leave artifacts there
        **{k: os.environ[k] for k in PASS_ENV if k in os.environ},
    }
    lines = ["# written by tests/vm/vmlab/boot.py; run by init.sh in the guest",
             *(f"export {k}={shlex.quote(v)}" for k, v in exports.items()),
             f"cd {shlex.quote(str(REPO))} || exit 120",
             f"exec {shlex.join(command)}"]
    (run_dir / "job.sh").write_text("\n".join(lines) + "\n")


def _new_run_dir(cache: Path) -> Path:
    cache.mkdir(parents=True, exist_ok=True)
    _prune_runs(cache)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path(tempfile.mkdtemp(prefix=f"run-{stamp}-", dir=cache))


def _prune_runs(cache: Path) -> None:
    """Keep the newest KEEP_RUNS run directories; never one touched in the last hour
    (another lab run may still be writing it)."""
    runs = sorted(cache.glob("run-*"), key=lambda p: p.stat().st_mtime, reverse=True)
    now = time.time()
    for old in runs[KEEP_RUNS:]:
        with contextlib.suppress(OSError):
            if now - old.stat().st_mtime > 3600:
                shutil.rmtree(old)


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""
