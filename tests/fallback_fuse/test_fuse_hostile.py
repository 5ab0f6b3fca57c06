"""Issue 10 through the real CLI and FUSE: `iscsi-handoff login --fuse MOUNT
--replacement-timeout 5` against a target that misbehaves in the full feature phase,
and against a real tgtd stopped (SIGSTOP) past the replacement timeout.

Each misbehaviour must end in EIO for the reader (in a subprocess, with a timeout) within
a generous multiple of the configured timeouts, and the daemon must still answer SIGTERM
and leave no mount behind. The bounds below are correctness bounds (no hang), not speed.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from iscsi_handoff.tgtlab import LunSpec, Tgt

from hostile_target import BLOCK, HostileTarget, pattern
from tgt_fixtures import tgt  # noqa: F401

IQN = "iqn.2024-01.org.iscsi-handoff.test:hostile"
REPLACEMENT = 5.0
# Three attempts of command timeout + abort timeout + relogin, and then some: a bound on
# hanging, far above what a loaded machine needs.
BOUND = 3 * (REPLACEMENT + REPLACEMENT) + 30


@dataclass
class Daemon:
    proc: subprocess.Popen[str]
    root: Path
    output: list[str]
    ready: threading.Event
    name: str = "hostile"

    @property
    def storage(self) -> Path:
        return self.root / "127.0.0.1" / self.name / "storage"

    def text(self) -> str:
        return "\n".join(self.output)

    def stop(self, timeout: float = BOUND) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout)


def mounted(root: Path) -> bool:
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == str(root) for line in f)


_started: list[subprocess.Popen[str]] = []


@pytest.fixture
def mount_root(tmp_path: Path) -> Iterator[Path]:
    if not os.path.exists("/dev/fuse"):
        pytest.skip("/dev/fuse is missing (no FUSE in this kernel or container)")
    root = tmp_path / "iscsi"
    root.mkdir()
    yield root
    # Whatever a failed test left behind: no daemon, no mount.
    while _started:
        proc = _started.pop()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    subprocess.run(["fusermount3", "-u", "-z", str(root)], capture_output=True, check=False)


def start(target: HostileTarget | str, root: Path, *, iqn: str = IQN,
          wait_ready: bool = True) -> Daemon:
    portal = target if isinstance(target, str) else target.portal
    proc = subprocess.Popen(
        [sys.executable, "-m", "iscsi_handoff", "login", "--portal", portal,
         "--target", iqn, "--fuse", str(root), "--replacement-timeout", str(REPLACEMENT)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    _started.append(proc)
    output: list[str] = []
    ready = threading.Event()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            output.append(line.rstrip())
            if line.startswith("serving;"):
                ready.set()

    threading.Thread(target=pump, daemon=True).start()
    daemon = Daemon(proc, root, output, ready, iqn.rsplit(":", 1)[-1])
    if wait_ready:
        deadline = time.monotonic() + 60
        while not ready.is_set() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        if not ready.is_set():
            proc.kill()
            proc.wait()
            raise AssertionError("mount did not come up:\n" + daemon.text())
    return daemon


READER = """
import errno, os, sys
path, write, count = sys.argv[1], sys.argv[2] == "w", int(sys.argv[3])
fd = os.open(path, os.O_RDWR if write else os.O_RDONLY)
for i in range(count):
    try:
        if write:
            os.pwrite(fd, b"w" * 4096, i * 4096)
        else:
            data = os.pread(fd, 4096, i * 4096)
            print("read", i, data.hex(), flush=True)
    except OSError as exc:
        print("error", errno.errorcode.get(exc.errno, exc.errno), flush=True)
        break
else:
    print("done", flush=True)
"""


def access(storage: Path, *, write: bool = False, count: int = 1,
           timeout: float = BOUND) -> tuple[list[str], float]:
    started = time.monotonic()
    out = subprocess.run([sys.executable, "-c", READER, str(storage), "w" if write else "r",
                          str(count)], capture_output=True, text=True, timeout=timeout)
    return out.stdout.splitlines(), time.monotonic() - started


def finish(daemon: Daemon) -> None:
    """SIGTERM still works after the misbehaviour: exit 0, nothing left mounted."""
    assert daemon.stop() == 0, daemon.text()
    assert "Traceback" not in daemon.text(), daemon.text()
    assert not mounted(daemon.root)


@pytest.mark.parametrize("mode", ["overrun", "sense_overflow", "async_logout",
                                  "swallow_abort_ok"])
def test_a_read_the_target_answers_wrongly_ends_in_eio(mode: str, mount_root: Path) -> None:
    with HostileTarget(mode) as target:
        daemon = start(target, mount_root)
        try:
            lines, took = access(daemon.storage)
            assert lines == ["error EIO"], (lines, daemon.text())
            assert took < BOUND
            if mode == "async_logout":  # answered by a Logout each time, then a relogin
                assert target.logouts >= 2 and target.connections >= 3
            if mode == "swallow_abort_ok":  # aborted, reissued, and given up on
                assert target.aborts == 3 and target.commands.count(0x28) == 3
        finally:
            finish(daemon)
    assert not target.errors, target.errors


@pytest.mark.parametrize("mode", ["r2t_beyond", "r2t_zero", "r2t_huge"])
def test_a_bad_r2t_ends_the_write_in_eio(mode: str, mount_root: Path) -> None:
    with HostileTarget(mode) as target:
        daemon = start(target, mount_root)
        try:
            lines, took = access(daemon.storage, write=True)
            assert lines == ["error EIO"], (lines, daemon.text())
            assert took < BOUND
            assert target.disk[:4096] == pattern(0, 4096)  # nothing was written
        finally:
            finish(daemon)
    assert not target.errors, target.errors


def test_a_window_closed_forever_ends_the_waiting_read_in_eio(mount_root: Path) -> None:
    with HostileTarget("closed_window") as target:
        daemon = start(target, mount_root)
        try:
            lines, took = access(daemon.storage, count=3)
            assert lines[0] == f"read 0 {pattern(0, 4096).hex()}"
            assert lines[1:] == ["error EIO"], (lines, daemon.text())
            assert took < BOUND
        finally:
            finish(daemon)
    assert not target.errors, target.errors


def test_a_ping_flood_the_target_does_not_read_keeps_memory_bounded(
        mount_root: Path) -> None:
    with HostileTarget("nop_flood", flood=1200) as target:
        daemon = start(target, mount_root)
        try:
            deadline = time.monotonic() + 120
            while target.pings_sent < 1200 and time.monotonic() < deadline:
                assert daemon.proc.poll() is None, daemon.text()
                time.sleep(0.2)
            assert target.pings_sent == 1200  # 300 MiB of ping data went to the daemon
            status = Path(f"/proc/{daemon.proc.pid}/status").read_text()
            peak_kib = int(next(line.split()[1] for line in status.splitlines()
                                if line.startswith("VmHWM:")))
            assert peak_kib < 150 << 10, f"peak RSS {peak_kib} KiB"
        finally:
            finish(daemon)


def test_read_capacity_of_2_63_blocks_is_one_line_and_exit_7(mount_root: Path) -> None:
    with HostileTarget("capacity_2_63") as target:
        daemon = start(target, mount_root, wait_ready=False)
        assert daemon.proc.wait(timeout=BOUND) == 7, daemon.text()
    errors = [line for line in daemon.output if line.startswith("iscsi-handoff:")]
    assert len(errors) == 1, daemon.text()
    assert "beyond the 8 EiB" in errors[0], daemon.text()
    assert "Traceback" not in daemon.text() and not mounted(mount_root)


def test_a_swallowed_probe_command_ends_the_cli_with_one_line(mount_root: Path) -> None:
    with HostileTarget("swallow_probe", abort_ok=True) as target:
        daemon = start(target, mount_root, wait_ready=False)
        assert daemon.proc.wait(timeout=BOUND) == 8, daemon.text()
    errors = [line for line in daemon.output if line.startswith("iscsi-handoff:")]
    assert len(errors) == 1 and "3 attempts" in errors[0], daemon.text()
    assert target.aborts == 3 and not mounted(mount_root)


def test_sigterm_during_a_swallowed_probe_exits_at_once(mount_root: Path) -> None:
    with HostileTarget("swallow_probe") as target:
        daemon = start(target, mount_root, wait_ready=False)
        deadline = time.monotonic() + 30
        while 0x9E not in target.commands and time.monotonic() < deadline:
            time.sleep(0.05)
        assert 0x9E in target.commands, daemon.text()
        daemon.proc.send_signal(signal.SIGTERM)
        assert daemon.proc.wait(timeout=REPLACEMENT * 4) == 130, daemon.text()
    assert "iscsi-handoff: interrupted" in daemon.text()
    assert "Traceback" not in daemon.text() and not mounted(mount_root)


def test_block_size_of_the_reads_is_the_targets(mount_root: Path) -> None:
    """The well-behaved baseline of the hostile target: the tree serves its bytes."""
    with HostileTarget("none") as target:
        daemon = start(target, mount_root)
        try:
            lines, _ = access(daemon.storage, count=2)
            assert lines == [f"read 0 {pattern(0, 4096).hex()}",
                             f"read 1 {pattern(4096, 4096).hex()}", "done"]
            assert daemon.storage.stat().st_size == 2048 * BLOCK
        finally:
            finish(daemon)
    assert not target.errors, target.errors


@pytest.mark.tgt
def test_tgtd_stopped_past_the_replacement_timeout_then_back(tgt: Tgt,  # noqa: F811
                                                             mount_root: Path) -> None:
    """EIO while it is stopped; after SIGCONT the SAME session serves the same bytes
    (issue 9: keep reconnecting with backoff past the replacement timeout)."""
    iqn = "iqn.2024-01.org.iscsi-handoff.test:stopped"
    target = tgt.add_target(iqn, luns=[LunSpec(size=8 << 20)])
    with open(target.lun_paths[0], "r+b") as f:
        f.write(os.urandom(4096))
    daemon = start(tgt.portal, mount_root, iqn=iqn)
    pid = tgt.pid
    assert pid is not None
    try:
        before, _ = access(daemon.storage)
        assert before[0].startswith("read 0 ") and before[1:] == ["done"], before
        os.kill(pid, signal.SIGSTOP)
        try:
            lines, took = access(daemon.storage)
            assert lines == ["error EIO"], (lines, daemon.text())
            assert took < BOUND
        finally:
            os.kill(pid, signal.SIGCONT)
        deadline = time.monotonic() + BOUND
        while True:  # relogins back off up to 30 s; the first after SIGCONT gets in
            lines, _ = access(daemon.storage)
            if lines != ["error EIO"] or time.monotonic() > deadline:
                break
            time.sleep(1)
        assert lines == before, (lines, daemon.text())
        assert daemon.proc.poll() is None  # the same daemon, the same session
        assert any("serving again" in line for line in daemon.output), daemon.text()
    finally:
        finish(daemon)


def test_sigterm_while_a_read_is_stuck_still_ends_everything(mount_root: Path) -> None:
    """No reader left in D state: the stuck read ends within the policy's bound, the
    daemon unmounts and exits 0."""
    with HostileTarget("swallow_abort_ok") as target:
        daemon = start(target, mount_root)
        reader = subprocess.Popen([sys.executable, "-c", READER, str(daemon.storage), "r",
                                   "1"], stdout=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + 30
            while 0x28 not in target.commands and time.monotonic() < deadline:
                time.sleep(0.05)
            assert 0x28 in target.commands, daemon.text()
            daemon.proc.send_signal(signal.SIGTERM)
            out, _ = reader.communicate(timeout=BOUND)
            assert out.splitlines() in (["error EIO"], ["error ENOTCONN"]), out
        finally:
            if reader.poll() is None:
                reader.kill()
        assert daemon.proc.wait(timeout=BOUND) == 0, daemon.text()  # one SIGTERM was enough
        assert "Traceback" not in daemon.text() and not mounted(mount_root)
