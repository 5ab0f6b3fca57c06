"""A storage file behind FUSE, attached with `losetup --direct-io=on`, measured with fio.

Two servers: ours (`iscsi-handoff login --fuse`, the product itself) and the in-memory
ceiling (bench.fuse_server). Each runs as its own process; the bench attaches the loop
device itself so it can take things down in order: fio, loop, FUSE (the server then
finishes I/O, logs out and unmounts), whatever stopped it.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from bench.children import ChildFailed, ToolOutputError, run_child, spawn, stop
from bench.points import Point, Result
from fallback_fuse import loop as loopdev

READY_TIMEOUT = 30.0
SERVER_STOP_TIMEOUT = 30.0  # it waits for the loop device to let go of the file


def parse_fio(out: str, point: Point) -> float:
    """IOPS of the one job in ``fio --output-format=json`` output.

    fio may print warnings before the JSON document: it starts at the first '{' line.
    """
    lines = out.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith("{")), None)
    if start is None:
        raise ToolOutputError(f"fio printed no JSON; first line: {lines[:1]!r}")
    try:
        doc: dict[str, Any] = json.loads("\n".join(lines[start:]))
        job = doc["jobs"][0]
        side = job["write" if point.write else "read"]
        if job.get("error"):
            raise ToolOutputError(f"fio job failed with error {job['error']}")
        return float(side["iops"])
    except (ValueError, KeyError, IndexError, TypeError) as exc:
        raise ToolOutputError(f"fio's JSON has no figure for {point.name}: {exc!r}") from None


def fio_command(device: str, point: Point, seconds: int) -> list[str]:
    return ["fio", f"--name={point.name}", f"--filename={device}", "--direct=1",
            "--ioengine=libaio", f"--rw={'write' if point.write else 'read'}",
            f"--bs={point.block_size}", f"--iodepth={point.queue_depth}", "--numjobs=1",
            "--time_based=1", f"--runtime={max(1, math.ceil(seconds))}",
            "--output-format=json"]


def run_fio(layer: str, device: str, point: Point, seconds: int) -> tuple[Result, str]:
    out = run_child(fio_command(device, point, seconds), timeout=seconds + 60)
    return Result.from_iops(layer, point, parse_fio(out, point)), out


class FuseLoop:
    """A FUSE server process, its storage file on a loop device with direct I/O.

    ``{mount}`` in ``command`` stands for the mount point, a new directory made here;
    ``storage`` is the storage file's path under it.
    """

    def __init__(self, name: str, command: Sequence[str], storage: Path, *,
                 queue_depth: int) -> None:
        self.name = name
        self._command = list(command)
        self._storage_rel = storage
        self.queue_depth = queue_depth
        self.mountpoint: Path | None = None
        self.device: str | None = None
        self.direct_io = False
        self.max_background = 0
        self.proc: subprocess.Popen[str] | None = None
        self.output: list[str] = []
        self._pump: threading.Thread | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def __enter__(self) -> FuseLoop:
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def _start(self) -> None:
        self.mountpoint = Path(tempfile.mkdtemp(prefix=f"bench-{self.name}-"))
        cmd = [part.replace("{mount}", str(self.mountpoint)) for part in self._command]
        self.proc = spawn(cmd)
        self._pump = threading.Thread(target=self._read_output, daemon=True)
        self._pump.start()
        storage = self.mountpoint / self._storage_rel
        waited = time.monotonic() + READY_TIMEOUT
        while not storage.exists():
            if self.proc.poll() is not None:
                raise ChildFailed(f"{self.name} server exited with status "
                                  f"{self.proc.returncode}: {self._last_line()}")
            if time.monotonic() > waited:
                raise ChildFailed(f"{self.name}: {storage} did not appear within "
                                  f"{READY_TIMEOUT:g} s: {self._last_line()}")
            time.sleep(0.05)
        proc = subprocess.run(["losetup", "-f", "--show", "--direct-io=on", str(storage)],
                              capture_output=True, text=True, check=False, timeout=60)
        if proc.returncode != 0:
            raise ChildFailed(f"losetup failed: {proc.stderr.strip()}")
        self.device = proc.stdout.strip()
        self.direct_io = loopdev.uses_direct_io(self.device)
        self.max_background = loopdev.raise_max_background(self.mountpoint, self.queue_depth)

    def _read_output(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            self.output.append(line.rstrip("\n"))

    def _last_line(self) -> str:
        time.sleep(0.1)  # let the pump catch the last words
        return self.output[-1] if self.output else "(no output)"

    def close(self) -> None:
        """Detach the loop device, stop the server (it unmounts), remove the mount point."""
        problems: list[str] = []
        if self.device is not None:
            proc = subprocess.run(["losetup", "-d", self.device], capture_output=True,
                                  text=True, check=False, timeout=60)
            if proc.returncode != 0:
                problems.append(f"losetup -d {self.device}: {proc.stderr.strip()}")
            self.device = None
        if self.proc is not None:
            status = stop(self.proc, signal.SIGTERM, SERVER_STOP_TIMEOUT)
            if status not in (0, -signal.SIGTERM):
                problems.append(f"{self.name} server ended with status {status}: "
                                f"{self._last_line()}")
            if self._pump is not None:
                self._pump.join(5)
            self.proc = None
        if self.mountpoint is not None:
            if os.path.ismount(self.mountpoint):  # the server died without unmounting
                subprocess.run(["umount", "-l", str(self.mountpoint)], check=False,
                               capture_output=True, timeout=60)
            try:
                self.mountpoint.rmdir()
            except OSError as exc:
                problems.append(f"cannot remove {self.mountpoint}: {exc.strerror}")
            self.mountpoint = None
        if problems:
            raise ChildFailed("; ".join(problems))
