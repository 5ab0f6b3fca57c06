"""Where the time goes: py-spy samples of a Python process while it serves one point.

``py-spy record --format raw`` writes one line per distinct stack: frames from the
outermost in, ``;``-separated, each ``function (file)``, then the sample count. Idle
threads are left out by py-spy, so samples / (rate x seconds) is how busy the process was.
With ``--native`` the C frames show too: pyfuse3's Cython wrapper and trio's socket calls
then resolve to the syscalls (writev, read, sendmsg, recv) and copies they spend time in.
"""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from bench.children import ChildFailed, spawn, stop

RATE = 100  # samples a second, py-spy's default
TOP = 8
_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*)\)$")
# Frames every stack starts with: they say nothing about where the time goes.
_OUTER = ("runpy", "<frozen runpy>", "trio/_core/_run.py")
# Code whose frames are worth naming in the inclusive list (the CLI's own frames hold
# everything, so they say nothing).
_OURS = ("userland/", "fallback_fuse/", "bench/", "pyfuse3")
_ENTRY = ("<module>", "main", "_main", "_session_main", "login", "_run", "mount")
# Leaf frames of a process waiting for the next event (native and Python views of it).
_WAITING = ("epoll_wait", "select_epoll_poll_impl", "EpollIOManager.get_events",
            "EpollIOManager._epoll_wait")

Stacks = dict[tuple[str, ...], int]


def py_spy() -> str | None:
    """The py-spy executable: beside this Python (the venv), else on PATH."""
    here = Path(sys.executable).with_name("py-spy")
    return str(here) if here.exists() else shutil.which("py-spy")


def parse_raw(text: str) -> Stacks:
    stacks: Stacks = {}
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = tuple(stack.split(";"))
        stacks[frames] = stacks.get(frames, 0) + int(count)
    return stacks


def split_frame(frame: str) -> tuple[str, str]:
    """("Transport.receive", "userland/transport.py") from "Transport.receive (...)"."""
    m = _FRAME.match(frame)
    return (m["func"], m["file"]) if m else (frame, "")


def _area(file: str) -> str:
    """A leaf frame's file, shortened to what a reader groups by."""
    if file.startswith(("trio/", "outcome/", "sniffio/")):
        return "trio"
    if "pyfuse3" in file or file.endswith(".pyx"):
        return "pyfuse3 (Cython)"
    if ".so" in file:  # a native frame: libc's syscall wrappers and memcpy, mostly
        return f"native {file}"
    if file.startswith(("<", "runpy")):
        return "python internals"
    return file or "?"


@dataclass
class Profile:
    samples: int
    seconds: float
    rate: int = RATE
    by_file: list[tuple[str, float]] = field(default_factory=list)  # self time, by file
    top_self: list[tuple[str, float]] = field(default_factory=list)  # leaf frames
    top_inclusive: list[tuple[str, float]] = field(default_factory=list)  # our frames
    waiting: float = 0.0  # share of samples waiting in epoll: the process had nothing to do

    @property
    def busy(self) -> float:
        """Share of wall time py-spy found the thread not idle (it drops idle samples;
        with --native it keeps those in epoll_wait, counted in ``waiting``)."""
        expected = self.rate * self.seconds
        return min(1.0, self.samples / expected) if expected else 0.0

    def as_dict(self) -> dict[str, object]:
        return {"samples": self.samples, "seconds": self.seconds, "rate": self.rate,
                "busy": round(self.busy, 3), "waiting": round(self.waiting, 3),
                "by_file": [[k, round(v, 4)] for k, v in self.by_file],
                "top_self": [[k, round(v, 4)] for k, v in self.top_self],
                "top_inclusive": [[k, round(v, 4)] for k, v in self.top_inclusive]}

    def lines(self) -> list[str]:
        def pct(items: list[tuple[str, float]]) -> str:
            return ", ".join(f"{name} {share:.0%}" for name, share in items)

        working = self.busy * (1 - self.waiting)
        return [f"sampled {self.busy:.0%} of wall time ({self.samples} samples), "
                f"{self.waiting:.0%} of them waiting in epoll: working {working:.0%}",
                f"self time by file: {pct(self.by_file)}",
                f"hottest frames (self): {pct(self.top_self)}",
                f"inclusive, our code: {pct(self.top_inclusive)}"]


def summarize(stacks: Stacks, seconds: float, *, rate: int = RATE, top: int = TOP) -> Profile:
    total = sum(stacks.values())
    profile = Profile(total, seconds, rate)
    if not total:
        return profile
    by_file: Counter[str] = Counter()
    leaf: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    waiting = 0
    for frames, count in stacks.items():
        func, file = split_frame(frames[-1])
        if func in _WAITING:
            waiting += count
        by_file[_area(file)] += count
        leaf[f"{func} ({file})"] += count
        seen = set()
        for frame in frames:
            func, file = split_frame(frame)
            if file.startswith(_OUTER) or not any(mark in file for mark in _OURS):
                continue
            if func in _ENTRY:
                continue
            name = f"{func} ({file})"
            if name not in seen:
                seen.add(name)
                inclusive[name] += count
    profile.waiting = waiting / total
    profile.by_file = [(k, v / total) for k, v in by_file.most_common(top)]
    profile.top_self = [(k, v / total) for k, v in leaf.most_common(top)]
    profile.top_inclusive = [(k, v / total) for k, v in inclusive.most_common(top)]
    return profile


class Recorder:
    """One py-spy run against ``pid`` for ``seconds``, raw output to ``path``."""

    def __init__(self, executable: str, pid: int, seconds: int, path: Path, *,
                 native: bool = True) -> None:
        self.seconds = seconds
        self.path = path
        # --native pauses the process for each sample (it cannot be --nonblocking):
        # the profiled figures run a little slower, and are kept apart from the table.
        mode = ["--native"] if native else ["--nonblocking"]
        self._proc = spawn([executable, "record", "--pid", str(pid), "--duration",
                            str(seconds), "--rate", str(RATE), "--format", "raw",
                            "--nolineno", *mode, "--output", str(path)], deathsig="KILL")

    def cancel(self) -> None:
        """Stop sampling now (the measurement it watched failed or was interrupted)."""
        stop(self._proc, signal.SIGINT)

    def finish(self, timeout: float = 60.0) -> Profile:
        try:
            out, _ = self._proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            stop(self._proc)
            raise ChildFailed(f"py-spy did not finish within {timeout:g} s") from None
        except BaseException:
            stop(self._proc)
            raise
        if not self.path.exists():
            last = out.strip().splitlines()[-1:] or ["(no output)"]
            raise ChildFailed(f"py-spy wrote nothing (status {self._proc.returncode}): "
                              f"{last[0]}")
        return summarize(parse_raw(self.path.read_text()), self.seconds)
