"""`iscsi-handoff login --kernel` as a user runs it, in the guest: a foreground process
whose output is collected, whose disks are parsed from what it prints, and which is
stopped with SIGTERM (it logs out then)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

READY_TIMEOUT = 90.0
STOP_TIMEOUT = 90.0
LINE = re.compile(r"session (\d+) on host (\d+): (/dev/(sd[a-z]+)) \(LUN (\d+), ([^)]+)\)"
                  r"(?:\s+(\S+))?")


@dataclass(frozen=True)
class Disk:
    sid: int
    host_no: int
    dev: str
    name: str
    lun: int
    size_text: str
    by_path: str | None


class KernelLogin:
    def __init__(self, portal: str, target: str, *extra: str,
                 env: dict[str, str] | None = None) -> None:
        self.args = [sys.executable, "-m", "iscsi_handoff", "-v", "login", "--kernel",
                     "--portal", portal, "--target", target, *extra]
        self.lines: list[str] = []
        self.disks: list[Disk] = []
        self._ready = threading.Event()
        self._cond = threading.Condition()
        self.started = time.monotonic()
        self.ready_seconds: float | None = None
        self.proc = subprocess.Popen(self.args, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, env={**os.environ, **(env or {})})
        self._reader = threading.Thread(target=self._pump, daemon=True)
        self._reader.start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            line = raw.rstrip("\n")
            with self._cond:
                self.lines.append(line)
                self._cond.notify_all()
            m = LINE.search(line)
            if m and not self._ready.is_set():
                self.disks.append(Disk(int(m.group(1)), int(m.group(2)), m.group(3),
                                       m.group(4), int(m.group(5)), m.group(6), m.group(7)))
            if "serving;" in line and not self._ready.is_set():
                self.ready_seconds = time.monotonic() - self.started
                self._ready.set()
        self._ready.set()

    def output(self) -> str:
        with self._cond:
            return "\n".join(self.lines)

    def json(self) -> dict[str, object]:
        """The JSON document `login --json` printed (its lines "{" to "}")."""
        with self._cond:
            lines = list(self.lines)
        start = lines.index("{")
        end = lines.index("}", start)
        value = json.loads("\n".join(lines[start:end + 1]))
        assert isinstance(value, dict)
        return value

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> KernelLogin:
        self._ready.wait(timeout)
        if self.ready_seconds is None:
            self.stop()
            raise AssertionError(f"login did not get ready (exit {self.proc.returncode}):\n"
                                 f"{self.output()}")
        return self

    def wait_line(self, pattern: str, timeout: float, start: int = 0) -> str:
        """The first output line from index ``start`` on that matches ``pattern``."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for line in self.lines[start:]:
                    if rx.search(line):
                        return line
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None and not self._reader.is_alive()):
                    raise AssertionError(f"no line matching {pattern!r} within {timeout:g} s:"
                                         f"\n{chr(10).join(self.lines)}")
                self._cond.wait(min(left, 0.2))

    def stop(self, sig: int = signal.SIGTERM, timeout: float = STOP_TIMEOUT) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
                raise AssertionError(f"login ignored signal {sig} for {timeout:g} s:\n"
                                     f"{self.output()}") from None
        self._reader.join(timeout=10)
        return self.proc.returncode

    def __enter__(self) -> KernelLogin:
        return self.wait_ready()

    def __exit__(self, *exc: object) -> None:
        with contextlib.suppress(AssertionError):
            self.stop()


def sessions_in_sysfs() -> set[int]:
    return {int(p.name[len("session"):]) for p in Path("/sys/class/iscsi_session").glob(
        "session*")}


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def write_file(path: Path, size: int, seed: bytes) -> str:
    """``size`` bytes of a deterministic pattern; their sha256."""
    digest = hashlib.sha256()
    block = hashlib.sha256(seed).digest() * (1 << 15)  # 1 MiB
    with path.open("wb") as f:
        written = 0
        n = 0
        while written < size:
            chunk = hashlib.sha256(seed + n.to_bytes(8, "big")).digest() + block[32:]
            chunk = chunk[:min(len(chunk), size - written)]
            f.write(chunk)
            digest.update(chunk)
            written += len(chunk)
            n += 1
        f.flush()
        os.fsync(f.fileno())
    return digest.hexdigest()


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


@contextlib.contextmanager
def mounted_ext4(dev: str, where: Path, *, mkfs: bool = True):  # type: ignore[no-untyped-def]
    if mkfs:
        subprocess.run(["mkfs.ext4", "-q", "-F", dev], check=True, timeout=300,
                       capture_output=True)
    where.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "ext4", dev, str(where)], check=True, timeout=60)
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], check=False, timeout=120)
