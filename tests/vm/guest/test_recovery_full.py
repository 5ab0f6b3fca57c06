"""Recovery all the way, in the guest's stock kernel with tgtd.

- A target gone longer than the replacement timeout (tgtd stopped with SIGSTOP), then
  back: the keeper's relogin succeeds, it rescans the host and sets the disk SCSI error
  handling offlined back to running, and the same /dev/sdX serves again with no
  command typed.
- Two targets kept by one keeper (two tgtds): one tgtd killed, and while that session
  keeps failing to log in again, the other's connection is reset and recovers, its I/O
  unaffected: one session's recovery never holds up another's.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from iscsi_handoff.cli import cli
from iscsi_handoff.tgtlab import LunSpec, Tgt

from .kernel_login import Disk, KernelLogin, drop_caches
from .openiscsi import read_direct, wait_for, write_direct

SIZE = 32 << 20
CHUNK = 1 << 20
REPLACEMENT = 5  # seconds: the outage below outlasts it


def sdev_state(disk: str) -> str:
    return Path(f"/sys/block/{disk}/device/state").read_text().strip()


def backing_has(path: Path, offset: int, data: bytes) -> bool:
    drop_caches()
    with path.open("rb") as f:
        f.seek(offset)
        return f.read(len(data)) == data


def test_target_gone_past_the_replacement_timeout_comes_back_by_itself(
        tgt: Tgt, figure: Callable[[str], None]) -> None:
    iqn = "iqn.2024-01.test.vmlab:long-outage"
    target = tgt.add_target(iqn, luns=[LunSpec(size=SIZE)])
    pid = tgt.pid
    assert pid is not None
    with KernelLogin(tgt.portal, iqn, "--replacement-timeout", str(REPLACEMENT),
                     "--timeout", "3") as run:
        (disk,) = run.disks
        before = os.urandom(CHUNK)
        write_direct(disk.dev, 0, before)
        mark = len(run.lines)
        os.kill(pid, signal.SIGSTOP)  # the portal still accepts, nothing answers
        stopped_at = time.monotonic()
        try:
            run.wait_line(rf"session {disk.sid}: connection failed", timeout=60, start=mark)
            run.wait_line(rf"session {disk.sid}: relogin attempt \d+ failed.*replacement "
                          "timeout passed", timeout=90, start=mark)
            # past the replacement timeout the kernel fails I/O at once
            wait_for(lambda: sdev_state(disk.name) != "blocked", timeout=30,
                     what="the kernel's replacement timeout")
            outage_state = sdev_state(disk.name)
            with pytest.raises(OSError):
                read_direct(disk.dev, 0, 4096)
        finally:
            os.kill(pid, signal.SIGCONT)
        outage = time.monotonic() - stopped_at
        line = run.wait_line(rf"session {disk.sid}: recovered in", timeout=120, start=mark)
        rescan = run.wait_line(rf"session {disk.sid}: rescan \(after recovery\)",
                               timeout=60, start=mark)
        wait_for(lambda: sdev_state(disk.name) == "running", timeout=30,
                 what="the disk running again")
        # the same /dev/sdX, no command typed: it serves again
        after = os.urandom(CHUNK)
        write_direct(disk.dev, CHUNK, after)
        assert read_direct(disk.dev, 0, CHUNK) == before
        assert read_direct(disk.dev, CHUNK, CHUNK) == after
        assert backing_has(target.lun_paths[0], 0, before)
        assert backing_has(target.lun_paths[0], CHUNK, after)

        # A disk SCSI error handling gave up on is `offline` (its aborts and resets
        # failed while the session was blocked), a state the transport's unblock leaves
        # alone: only a write of `running` brings it back, as the keeper's rescan after
        # each recovery does (here: "nothing changed", the disk was transport-offline,
        # which the unblock clears). Userland cannot stage that offline on this kernel:
        # it may offline only a running disk, and the next block (a reset) turns that
        # into `blocked`, then `running`. So the write itself is checked against this
        # kernel through `session rescan`, which shares the keeper's code.
        Path(f"/sys/block/{disk.name}/device/state").write_text("offline\n")
        with pytest.raises(OSError):
            read_direct(disk.dev, 0, 4096)
        # in this process: a Python start costs ~15 s under TCG
        done = CliRunner().invoke(cli, ["session", "rescan", "--session", str(disk.sid)])
        assert done.exit_code == 0 and done.exception is None, (done.output,
                                                                  done.exception)
        hctl = Path(f"/sys/block/{disk.name}/device").resolve().name
        assert f"{hctl} offline -> running" in done.output, done.output
        assert sdev_state(disk.name) == "running"
        assert read_direct(disk.dev, CHUNK, CHUNK) == after
        revived = done.output.splitlines()[0]
        figure(f"outage of {outage:.0f} s (replacement timeout {REPLACEMENT} s, the disk "
               f"{outage_state} meanwhile): {line.strip()}; {rescan.strip()}; an offline "
               f"disk: {revived.strip()}")
        assert run.stop() == 0, run.output()


# --- two targets, one keeper ---------------------------------------------------------

KEEPER = """
import logging, sys
from iscsi_handoff.identity import initiator_name
from iscsi_handoff.kernel_path import KernelOptions, run_kernel_logins
from userland.login.machine import LoginConfig, new_isid
from userland.portal import Portal
logging.basicConfig(level=logging.INFO, format="%(message)s")
name = initiator_name()
pairs = sys.argv[1:]
logins = [(Portal.parse(p), LoginConfig(initiator_name=name, target_name=t, isid=new_isid()))
          for p, t in zip(pairs[::2], pairs[1::2])]
try:
    run_kernel_logins(logins, KernelOptions(replacement_timeout=30, login_timeout=3))
except KeyboardInterrupt:
    sys.exit(130)
"""


class MultiKeeper(KernelLogin):
    """One keeper process for several targets: kernel_path.run_kernel_logins, which
    `login` uses with one."""

    def __init__(self, *pairs: str) -> None:  # KernelLogin's own, with another argv
        self.args = [sys.executable, "-c", KEEPER, *pairs]
        self.lines = []
        self.disks = []
        self._ready = threading.Event()
        self._cond = threading.Condition()
        self.started = time.monotonic()
        self.ready_seconds = None
        self.proc = subprocess.Popen(self.args, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, env={**os.environ, "PYTHONPATH": os.getcwd()})
        self._reader = threading.Thread(target=self._pump, daemon=True)
        self._reader.start()


class Writer(threading.Thread):
    """Distinct 256 KiB O_DIRECT writes, one after another, until told to stop."""

    def __init__(self, dev: str) -> None:
        super().__init__(daemon=True)
        self.dev = dev
        self.written: list[bytes] = []
        self.error: BaseException | None = None
        self.halt = threading.Event()

    def run(self) -> None:
        try:
            while not self.halt.is_set() and len(self.written) < (SIZE // (256 << 10)):
                data = os.urandom(256 << 10)
                write_direct(self.dev, len(self.written) * len(data), data)
                self.written.append(data)
                time.sleep(0.05)
        except BaseException as exc:
            self.error = exc


@pytest.fixture
def second_tgt() -> Iterator[Tgt]:
    with Tgt() as instance:
        yield instance


def _ss_kill(port: int) -> None:
    done = subprocess.run(["ss", "-K", "dst", "127.0.0.1", "dport", "=", f":{port}"],
                          capture_output=True, text=True, timeout=30, check=False)
    assert done.returncode == 0, done.stderr


def test_two_targets_in_one_keeper_recover_independently(
        tgt: Tgt, second_tgt: Tgt, figure: Callable[[str], None]) -> None:
    iqn1, iqn2 = "iqn.2024-01.test.vmlab:pair-one", "iqn.2024-01.test.vmlab:pair-two"
    tgt.add_target(iqn1, luns=[LunSpec(size=SIZE)])
    target2 = second_tgt.add_target(iqn2, luns=[LunSpec(size=SIZE)])
    with MultiKeeper(tgt.portal, iqn1, second_tgt.portal, iqn2) as run:
        assert len(run.disks) == 2, run.output()
        by_iqn: dict[str, Disk] = {}
        for d in run.disks:
            target_name = Path(f"/sys/class/iscsi_session/session{d.sid}/targetname")
            by_iqn[target_name.read_text().strip()] = d
        one, two = by_iqn[iqn1], by_iqn[iqn2]
        writer = Writer(two.dev)
        writer.start()
        wait_for(lambda: len(writer.written) >= 4 or writer.error, timeout=60,
                 what="the first writes to target two")
        mark = len(run.lines)
        tgt.kill()  # target one gone: its session's relogins fail, 3 s each
        run.wait_line(rf"session {one.sid}: relogin attempt 1 failed", timeout=60,
                      start=mark)
        # While session one is still recovering, session two's connection is reset:
        # its own CONN_ERROR is answered, not queued behind the other's relogins.
        done_before = len(writer.written)
        _ss_kill(int(second_tgt.portal.rsplit(":", 1)[1]))
        line = run.wait_line(rf"session {two.sid}: recovered in", timeout=60, start=mark)
        tail = "\n".join(run.lines[mark:])
        assert f"session {one.sid}: recovered" not in tail  # one is still down
        wait_for(lambda: len(writer.written) >= done_before + 8 or writer.error,
                 timeout=120, what="target two's writes going on")
        writer.halt.set()
        writer.join(timeout=120)
        assert writer.error is None, f"target two's I/O failed: {writer.error!r}"
        for i, data in enumerate(writer.written):
            assert backing_has(target2.lun_paths[0], i * len(data), data), f"write {i}"
        # target one back: its session recovers too
        tgt.restart()
        run.wait_line(rf"session {one.sid}: recovered in", timeout=120, start=mark)
        data = os.urandom(CHUNK)
        write_direct(one.dev, 0, data)
        assert read_direct(one.dev, 0, CHUNK) == data
        figure(f"two sessions in one keeper: {line.strip()} while session {one.sid} was "
               f"still failing to log in; {len(writer.written)} writes to it verified")
        assert run.stop() in (0, 130), run.output()
