"""A real LIO target (the Linux kernel's own) on loopback, for the QEMU guest tests.

LIO lives in the kernel: there is no daemon to start or stop. An instance here owns a
TCP port, the targets it created and their LUN files, and removes exactly those:

- LIO is one per kernel, so target names are the caller's to keep unique; creating a
  target whose IQN already exists fails rather than touching someone else's;
- the configuration goes through iscsi_handoff/lio_target.py run by Debian's python3
  (python3-rtslib-fb is not in the venv), one `serve` worker per process answering JSON
  requests over a pipe (in the QEMU guest a Python start and an rtslib import cost
  seconds each); CHAP secrets travel in that pipe, never in an argv (targetcli would
  need them as arguments);
- all targets of an instance share its portal (LIO shares one listening socket between
  the portal groups that name the same address).

A port picked here (not given by the caller) that turns out to be taken is replaced by
another one while no target exists yet.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import json
import os
import select
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from iscsi_handoff.labparts import free_port, libiscsi_url, new_sparse_file, shm_dir
from userland.errors import EXIT_UNAVAILABLE, IscsiError

SYSTEM_PYTHON = "/usr/bin/python3"  # where Debian's python3-rtslib-fb is importable
WORKER = Path(__file__).with_name("lio_target.py")
WORKER_TIMEOUT = 120.0  # one request, the worker's start and modprobe included (TCG)
DEFAULT_LUN_SIZE = 64 << 20
PORT_ATTEMPTS = 5
_ADDRESS_IN_USE = "Address already in use"


class LioError(IscsiError):
    """LIO is missing here, or refused a configuration."""

    exit_code = EXIT_UNAVAILABLE


@dataclass(frozen=True)
class LunSpec:
    """One disk LUN: a new sparse file of `size` bytes, or the existing file `path`."""

    size: int = DEFAULT_LUN_SIZE
    path: Path | None = None


@dataclass
class Target:
    """A target as configured: LUN n (from 0, LIO has no controller LUN) is `luns[n]`
    backed by `lun_paths[n]`. No `acls`: any initiator may log in (demo mode)."""

    iqn: str
    lun_paths: list[Path] = field(default_factory=list)
    luns: list[LunSpec] = field(default_factory=list)
    acls: list[str] = field(default_factory=list)
    chap: tuple[str, str] | None = None
    mutual: tuple[str, str] | None = None
    params: dict[str, str] = field(default_factory=dict)

    def __repr__(self) -> str:  # secrets never in repr
        return (f"Target(iqn={self.iqn!r}, luns={len(self.luns)}, acls={self.acls!r}, "
                f"chap_user={self.chap[0] if self.chap else None!r}, "
                f"mutual_user={self.mutual[0] if self.mutual else None!r})")


@functools.cache
def unavailable_reason(python: str = SYSTEM_PYTHON) -> str | None:
    """Why a Lio cannot run here (one line), or None when it can.

    Loads the target modules and mounts configfs on the way, as root. Asked once per
    process: modules stay loaded."""
    if not os.access(python, os.X_OK):
        return f"{python} not found: LIO is configured through Debian's python3-rtslib-fb"
    if os.geteuid() != 0:
        return f"LIO needs root (configfs, modprobe); running as uid {os.geteuid()}"
    try:
        worker(python).request({"op": "check"})
    except LioError as exc:
        return str(exc)
    return None


class Worker:
    """One `lio_target.py serve` process: requests and answers, one JSON line each.

    Thread-safe (one request at a time); restarted when it has died."""

    def __init__(self, python: str) -> None:
        self.python = python
        self._proc: subprocess.Popen[str] | None = None
        self._log: Path | None = None
        self._lock = threading.Lock()

    def request(self, request: Mapping[str, Any]) -> Any:
        """The answer's result; LioError with the worker's one line when it refused."""
        with self._lock:
            proc = self._running()
            assert proc.stdin is not None and proc.stdout is not None
            try:
                proc.stdin.write(json.dumps(request) + "\n")
                proc.stdin.flush()
                ready, _, _ = select.select([proc.stdout], [], [], WORKER_TIMEOUT)
                line = proc.stdout.readline() if ready else None
            except OSError as exc:
                line = None
                why = f"pipe to the LIO worker broke: {exc}"
            else:
                why = (f"the LIO worker gave no answer within {WORKER_TIMEOUT:g} s"
                       if line is None else "the LIO worker died")
            if not line:
                self._end()
                raise LioError(f"{request.get('op')}: {why} ({self._log_tail()})")
        try:
            answer = json.loads(line)
        except ValueError:
            raise LioError(f"{request.get('op')}: the LIO worker answered garbage") from None
        if not isinstance(answer, dict) or not answer.get("ok"):
            raise LioError(str(answer.get("error") or "the LIO worker refused"))
        return answer.get("result")

    def _running(self) -> subprocess.Popen[str]:
        if self._proc is not None and self._proc.poll() is None:
            return self._proc
        self._end()
        if self._log is not None:
            with contextlib.suppress(FileNotFoundError):
                self._log.unlink()
        fd, log = tempfile.mkstemp(prefix="liolab-worker-", suffix=".log")
        self._log = Path(log)
        try:
            self._proc = subprocess.Popen(
                [self.python, "-P", str(WORKER), "serve"], stdin=subprocess.PIPE,
                stdout=subprocess.PIPE, stderr=fd, text=True, bufsize=1,
                start_new_session=True)
        except OSError as exc:
            raise LioError(f"cannot run {self.python}: {exc}") from exc
        finally:
            os.close(fd)
        return self._proc

    def _end(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.stdin is not None:
            with contextlib.suppress(OSError):
                proc.stdin.close()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()  # ours, by PID (Popen never signals a reaped PID)
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()

    def close(self) -> None:
        """End the worker (stdin closed: it exits) and drop its log."""
        with self._lock:
            self._end()
            if self._log is not None:
                with contextlib.suppress(FileNotFoundError):
                    self._log.unlink()
                self._log = None

    def _log_tail(self) -> str:
        try:
            text = self._log.read_text(errors="replace") if self._log else ""
        except OSError:
            text = ""
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
        return " | ".join(lines[-3:]) or "it printed nothing"


_workers: dict[str, Worker] = {}
_workers_lock = threading.Lock()


def worker(python: str = SYSTEM_PYTHON) -> Worker:
    """This process's worker for `python`, made on first use and ended at exit."""
    with _workers_lock:
        if python not in _workers:
            _workers[python] = Worker(python)
            if len(_workers) == 1:
                atexit.register(_close_workers)
        return _workers[python]


def _close_workers() -> None:
    for w in list(_workers.values()):
        with contextlib.suppress(Exception):
            w.close()


class Lio:
    """LIO targets on HOST:PORT, made by this instance and removed by stop().

    ``with Lio() as lio: lio.add_target(IQN, acls=[initiator])`` checks that LIO can run,
    and afterwards deletes every target it added, their backstores and LUN files.
    """

    def __init__(self, *, host: str = "127.0.0.1", port: int | None = None,
                 workdir: Path | None = None, python: str = SYSTEM_PYTHON) -> None:
        self.host = host
        self._fixed_port = port
        self.port = port if port is not None else 0
        self.python = python
        self._workdir = None if workdir is None else Path(workdir)
        self._rundir: Path | None = None
        self.targets: list[Target] = []
        self._created: set[Path] = set()  # LUN files made here, removed on stop
        self._started = False
        self._atexit_registered = False

    @property
    def workdir(self) -> Path:
        """Where new LUN files go: the given workdir, or our own directory in /dev/shm."""
        if self._workdir is not None:
            return self._workdir
        if self._rundir is None:
            self._rundir = Path(tempfile.mkdtemp(prefix="liolab-", dir=shm_dir()))
        return self._rundir

    @property
    def portal(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def url(self, target: Target | str, lun: int | None = 0) -> str:
        """A libiscsi URL for a LUN of the target, with its CHAP credentials if any."""
        t = target if isinstance(target, Target) else self._target_by_iqn(target)
        return libiscsi_url(self.portal, t.iqn, lun, t.chap, t.mutual)

    # -- lifecycle

    def start(self) -> None:
        """Check that LIO can run (loading its modules) and pick the port."""
        if self._started:
            raise LioError(f"this Lio is already started on {self.portal}")
        why = unavailable_reason(self.python)
        if why:
            raise LioError(why)
        if self._fixed_port is None:
            self.port = free_port(self.host)
        self._started = True
        if not self._atexit_registered:
            atexit.register(self._atexit)
            self._atexit_registered = True

    def stop(self, *, keep_files: bool = False) -> None:
        """Delete every target made here, their backstores and (unless keep_files) the
        LUN files made here. Idempotent; the first refusal is raised at the end."""
        problems: list[str] = []
        for target in list(self.targets):
            try:
                worker(self.python).request({"op": "delete", "iqn": target.iqn})
            except LioError as exc:
                problems.append(str(exc))
        self.targets = []
        if not keep_files:
            for path in sorted(self._created):
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
            self._created.clear()
            if self._rundir is not None:
                shutil.rmtree(self._rundir, ignore_errors=True)
                self._rundir = None
        self._started = False
        if self._atexit_registered:
            atexit.unregister(self._atexit)
            self._atexit_registered = False
        if problems:
            raise LioError("LIO targets not all deleted: " + "; ".join(problems))

    def __enter__(self) -> Lio:
        self.start()
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def _atexit(self) -> None:
        with contextlib.suppress(Exception):
            self.stop()

    # -- configuration

    def add_target(self, iqn: str, *, luns: Sequence[LunSpec] = (LunSpec(),),
                   acls: Sequence[str] = (), chap: tuple[str, str] | None = None,
                   mutual: tuple[str, str] | None = None,
                   params: Mapping[str, str] | None = None) -> Target:
        """A new target with disk LUNs 0..n-1 on our portal.

        acls: initiator IQNs allowed in (each sees every LUN); empty: any initiator.
        chap: the initiator's (user, secret) the target requires; mutual: the target's
        own (user, secret) for mutual CHAP. params: login keys the target offers."""
        if not self._started:
            raise LioError("start() the Lio first")
        if mutual is not None and chap is None:
            raise LioError("mutual CHAP needs chap= (the initiator's account) as well")
        if not luns:
            raise LioError(f"target {iqn}: at least one LUN")
        target = Target(iqn, acls=list(acls), chap=chap, mutual=mutual,
                        params=dict(params or {}))
        made: list[Path] = []
        try:
            for n, spec in enumerate(luns):
                path = self._backing_file(iqn, n, spec)
                if spec.path is None:
                    made.append(path)
                target.lun_paths.append(path)
                target.luns.append(spec)
            self._create(target)
        except BaseException:
            for path in made:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                self._created.discard(path)
            raise
        self.targets.append(target)
        return target

    def _create(self, target: Target) -> None:
        for attempt in range(PORT_ATTEMPTS):
            try:
                worker(self.python).request(self.create_request(target))
                return
            except LioError as exc:
                retry = (_ADDRESS_IN_USE in str(exc) and self._fixed_port is None
                         and not self.targets and attempt + 1 < PORT_ATTEMPTS)
                if not retry:
                    raise
            self.port = free_port(self.host)

    def create_request(self, target: Target) -> dict[str, Any]:
        """The worker's `create` request (secrets included: it goes down a pipe)."""
        return {"op": "create", "spec": {
            "iqn": target.iqn, "portal": self.portal,
            "luns": [str(p) for p in target.lun_paths], "acls": list(target.acls),
            "chap": list(target.chap) if target.chap else None,
            "mutual": list(target.mutual) if target.mutual else None,
            "params": dict(target.params)}}

    def delete_target(self, iqn: str) -> None:
        """Delete the target (ending its sessions), its backstores and LUN files made here."""
        target = self._target_by_iqn(iqn)
        worker(self.python).request({"op": "delete", "iqn": iqn})
        self.targets.remove(target)
        for path in target.lun_paths:
            if path in self._created:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                self._created.discard(path)

    def show(self, iqn: str | None = None) -> list[dict[str, Any]]:
        """What LIO holds for our targets (or one of them), as the worker's JSON."""
        names = [iqn] if iqn is not None else [t.iqn for t in self.targets]
        found: list[dict[str, Any]] = []
        for name in names:
            found += worker(self.python).request({"op": "show", "iqn": name})
        return found

    def _backing_file(self, iqn: str, lun: int, spec: LunSpec) -> Path:
        if spec.path is not None:
            if not Path(spec.path).is_file():
                raise LioError(f"LUN {lun} of {iqn}: backing file {spec.path} not found")
            return Path(spec.path)
        if spec.size <= 0 or spec.size % 512:
            raise LioError(f"LUN {lun} of {iqn}: size {spec.size} is not a positive "
                           "multiple of 512")
        self.workdir.mkdir(parents=True, exist_ok=True)
        path = self.workdir / f"liolab-{os.getpid()}-l{lun}-{os.urandom(4).hex()}.img"
        new_sparse_file(path, spec.size)
        self._created.add(path)
        return path

    def _target_by_iqn(self, iqn: str) -> Target:
        for t in self.targets:
            if t.iqn == iqn:
                return t
        raise LioError(f"no target {iqn} made by this Lio")


