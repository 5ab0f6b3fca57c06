"""Child processes that never outlive the bench, and never see the terminal's Ctrl-C.

Each child gets its own session (a Ctrl-C reaches the bench alone, which then stops
them in order: fio, loop, FUSE, session, tgtd) and, where `setpriv` exists, a parent-death
signal, so a bench killed outright does not leave them running.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import subprocess
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

STOP_TIMEOUT = 15.0
REPO = Path(__file__).resolve().parents[1]  # `python -m bench.x` children find bench here


class ChildFailed(Exception):
    """A child exited non-zero or outlived its time; the message is one line."""


class ToolOutputError(Exception):
    """A tool ran but printed nothing we can read a figure from."""


def _guarded(cmd: Sequence[str], deathsig: str) -> list[str]:
    if threading.current_thread() is threading.main_thread() and shutil.which("setpriv"):
        return ["setpriv", "--pdeathsig", deathsig, *cmd]
    return list(cmd)


def spawn(cmd: Sequence[str], *, deathsig: str = "TERM",
          stdin: int | None = subprocess.DEVNULL) -> subprocess.Popen[str]:
    """Start ``cmd`` with stdout as text lines and stderr merged into it."""
    return subprocess.Popen(_guarded(cmd, deathsig), stdin=stdin, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            cwd=REPO)


def stop(proc: subprocess.Popen[str], sig: int = signal.SIGTERM,
         timeout: float = STOP_TIMEOUT) -> int:
    """Signal by PID (ours), wait, SIGKILL if it will not go; returns the exit status."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)
    return proc.returncode


@contextlib.contextmanager
def deadline(proc: subprocess.Popen[str], timeout: float) -> Iterator[None]:
    """SIGKILL ``proc`` if it is still running after ``timeout`` seconds (reading its
    output line by line has no timeout of its own)."""
    def expire() -> None:
        if proc.poll() is None:
            proc.kill()

    timer = threading.Timer(timeout, expire)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


def run_child(cmd: Sequence[str], *, timeout: float) -> str:
    """Run to the end and return its output; on any interruption stop it first."""
    proc = spawn(cmd, deathsig="KILL")
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        stop(proc, signal.SIGKILL)
        raise ChildFailed(f"{cmd[0]} still running after {timeout:g} s; killed") from None
    except BaseException:
        stop(proc, signal.SIGINT)  # fio and iscsi-perf end cleanly on SIGINT
        raise
    if proc.returncode != 0:
        raise ChildFailed(f"{cmd[0]} exited with status {proc.returncode}: {reason(out)}")
    return out


def reason(out: str) -> str:
    """The line of a tool's output that says what went wrong: the last one naming an
    error, else the last one with words in it; never a line of fio's JSON document."""
    lines = [line.strip() for line in out.splitlines()
             if any(c.isalpha() for c in line) and not line.lstrip().startswith('"')]
    for line in reversed(lines):
        if "error" in line.lower() or "fail" in line.lower():
            return line
    return lines[-1] if lines else "(no output)"
