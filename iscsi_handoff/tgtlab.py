"""A real tgtd (Debian `tgt`) on loopback, for the tests, the demo and the benchmarks.

Each instance has its own TCP port and its own `-C` control number (the Unix socket
`/run/tgtd/socket.N`), so several run side by side, in one process or in parallel test
processes. An instance never talks to, stops or cleans up after a tgtd it did not start:

- before any tgtadm call it checks that its own tgtd (by PID) holds the POSIX lock on
  `/run/tgtd/socket.N.lock`, which tgtd takes before it creates `socket.N`;
- it counts as started only once its own PID owns a listening socket on the port (tgtd
  keeps running when it cannot bind its portal, so a busy port would otherwise go unseen);
- it ends tgtd through tgtadm (tgtd ignores SIGTERM and SIGINT), then by PID with SIGKILL
  as a last resort, and removes `socket.N*` only when the lock file is the one its tgtd
  held and nobody holds it any more.

A control number or port picked here (not given by the caller) that turns out to be taken
is replaced by another one and tgtd started again.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import random
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from iscsi_handoff.labparts import free_port, libiscsi_url, new_sparse_file, shm_dir
from userland.errors import EXIT_UNAVAILABLE, IscsiError

TGTADM_TIMEOUT = 15.0  # one tgtadm call (each takes 2-3 ms when tgtd is healthy)
START_TIMEOUT = 10.0  # tgtd answers tgtadm within ~15 ms
STOP_TIMEOUT = 5.0  # from `--op delete --mode system` to the exit; then SIGKILL
KILL_TIMEOUT = 10.0
START_ATTEMPTS = 6  # fresh control number / port each time, when they were ours to pick
RUN_DIR = Path("/run/tgtd")
CONTROL_RANGE = (10_000, 32_768)  # tgtd refuses -C above 32767
DEFAULT_LUN_SIZE = 64 << 20

_ANOTHER_TGTD = "another tgtd is using"
_PORTAL_FAILED = "failed to create/bind to portal"


class TgtError(IscsiError):
    """tgtd is missing, would not start or stop, or tgtadm refused a command."""

    exit_code = EXIT_UNAVAILABLE


@dataclass(frozen=True)
class LunSpec:
    """One disk LUN: a new sparse file of `size` bytes, or the existing file `path`."""

    size: int = DEFAULT_LUN_SIZE
    readonly: bool = False
    path: Path | None = None


@dataclass
class Target:
    """A target as configured: LUN n (from 1) is `luns[n-1]` backed by `lun_paths[n-1]`."""

    tid: int
    iqn: str
    lun_paths: list[Path] = field(default_factory=list)
    luns: list[LunSpec] = field(default_factory=list)
    chap: tuple[str, str] | None = None
    mutual: tuple[str, str] | None = None
    params: dict[str, str] = field(default_factory=dict)
    initiator_address: str = "ALL"


def unavailable_reason() -> str | None:
    """Why a Tgt cannot run here (one line), or None when it can."""
    missing = [tool for tool in ("tgtd", "tgtadm") if shutil.which(tool) is None]
    if missing:
        return (f"{' and '.join(missing)} not found on PATH: install Debian's `tgt` "
                "package (./scripts/setup does)")
    if os.geteuid() != 0:
        return (f"tgtd needs root (its control socket lives in {RUN_DIR}); "
                f"running as uid {os.geteuid()}")
    return None


class Tgt:
    """One tgtd instance on HOST:PORT with control number `control`.

    ``with Tgt() as tgt: tgt.add_target(IQN)`` starts it, and stops it afterwards with
    every target, its sockets, and the LUN files it created.
    """

    def __init__(self, *, host: str = "127.0.0.1", port: int | None = None,
                 control: int | None = None, workdir: Path | None = None) -> None:
        self.host = host
        self._fixed_port = port
        self._fixed_control = control
        self.port = port if port is not None else 0
        self.control = control if control is not None else 0
        # Logs (and, without a workdir, the LUN files) go to a directory of our own,
        # made on first use and removed by stop().
        self._rundir: Path | None = None
        self._workdir = None if workdir is None else Path(workdir)
        self.targets: list[Target] = []
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: Path | None = None
        self._lock_id: tuple[int, int] | None = None  # (st_dev, st_ino) of OUR lock file
        self._accounts: dict[str, str] = {}
        self._created: set[Path] = set()  # LUN files made here, removed on stop
        self._atexit_registered = False
        self._last_failure = ""

    @property
    def workdir(self) -> Path:
        """Where new LUN files go: the given workdir, or our own directory in /dev/shm."""
        return self._workdir if self._workdir is not None else self._own_dir()

    def _own_dir(self) -> Path:
        if self._rundir is None:
            self._rundir = Path(tempfile.mkdtemp(prefix="tgtlab-", dir=shm_dir()))
        return self._rundir

    # -- addresses

    @property
    def portal(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def url(self, target: Target | str, lun: int | None = 1) -> str:
        """A libiscsi URL for a LUN of the target, with its CHAP credentials if any."""
        t = target if isinstance(target, Target) else self._target_by_iqn(target)
        return libiscsi_url(self.portal, t.iqn, lun, t.chap, t.mutual)

    # -- lifecycle

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def start(self) -> None:
        """Start tgtd and wait (bounded) until it answers tgtadm and listens on the portal."""
        if self.running:
            raise TgtError(f"tgtd is already running on {self.portal} (pid {self.pid})")
        why = unavailable_reason()
        if why:
            raise TgtError(why)
        try:
            self._start(keep_port=False)
        except BaseException:
            self.stop()  # nothing of ours is left running; drop the log directory
            raise
        if not self._atexit_registered:
            atexit.register(self._atexit)
            self._atexit_registered = True

    def _start(self, *, keep_port: bool) -> None:
        for attempt in range(START_ATTEMPTS):
            if self._fixed_port is None and not keep_port:
                self.port = free_port(self.host)
            if self._fixed_control is None and not (keep_port and attempt == 0
                                                    and _control_free(self.control)):
                self.control = _pick_control()
            retry = self._launch()
            if retry is None:
                return
            if not ((retry == "control" and self._fixed_control is None)
                    or (retry == "port" and self._fixed_port is None and not keep_port)):
                break
        raise TgtError(f"tgtd would not start on {self.portal} (-C {self.control}): "
                       f"{self._last_failure}")

    def _launch(self) -> str | None:
        """Run tgtd once. None when up; "control" or "port" when that was taken."""
        self._log = self._own_dir() / f"tgtd-C{self.control}-p{self.port}.log"
        cmd = ["tgtd", "-f", "-C", str(self.control), "--iscsi", f"portal={self.portal}"]
        if threading.current_thread() is threading.main_thread() and shutil.which("setpriv"):
            # If this process dies without stop(), so does tgtd. Only from the main
            # thread: the signal fires when the *thread* that forked ends.
            cmd = ["setpriv", "--pdeathsig", "KILL", *cmd]
        with self._log.open("wb") as log:
            try:
                proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log,
                                        stderr=subprocess.STDOUT, start_new_session=True)
            except OSError as exc:
                raise TgtError(f"cannot run tgtd: {exc}") from exc
        self._proc = proc
        self._lock_id = None
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                out = self._log_text()
                self._last_failure = f"tgtd exited with status {proc.returncode}: {out}"
                self._proc = None
                return "control" if _ANOTHER_TGTD in out else "error"
            lock_id = _lock_file_id(self.control)
            if lock_id is not None and _lock_holders(lock_id) == {proc.pid}:
                self._lock_id = lock_id
                answered = subprocess.run(
                    ["tgtadm", "-C", str(self.control), "--mode", "system", "--op", "show"],
                    stdin=subprocess.DEVNULL, capture_output=True, timeout=TGTADM_TIMEOUT)
                if answered.returncode == 0:
                    # tgtd tries its portal before it serves tgtadm: the answer is final.
                    if self.port in _listening_ports(proc.pid):
                        return None
                    out = self._log_text()
                    self._last_failure = f"tgtd is up but not listening on {self.portal}: {out}"
                    self._kill()  # ours (lock checked), nothing configured yet
                    self._remove_control_files()
                    self._proc = None
                    return "port" if _PORTAL_FAILED in out else "error"
            time.sleep(0.01)
        self._last_failure = (f"no answer to tgtadm within {START_TIMEOUT:g} s: "
                              f"{self._log_text()}")
        self._kill()
        self._remove_control_files()
        self._proc = None
        return "error"

    def stop(self, *, keep_files: bool = False) -> None:
        """Delete every target, end tgtd, remove its sockets and the LUN files it created.

        Idempotent. With keep_files, LUN files and logs stay (workdir is kept).
        """
        problems: list[str] = []
        if self._proc is not None:
            if self.running and self._owns_control():
                for target in self.targets:
                    try:
                        self._adm("--mode", "target", "--op", "delete", "--force",
                                  "--tid", str(target.tid))
                    except TgtError as exc:
                        problems.append(str(exc))
                try:
                    self._adm("--mode", "system", "--op", "delete")
                except TgtError as exc:
                    problems.append(str(exc))
            self._end_process()
            self._remove_control_files()
            self._proc = None
        self.targets = []
        self._accounts.clear()
        if not keep_files:
            for path in sorted(self._created):
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
            self._created.clear()
            if self._rundir is not None:
                shutil.rmtree(self._rundir, ignore_errors=True)
                self._rundir = None
                self._log = None
        if self._atexit_registered:
            atexit.unregister(self._atexit)
            self._atexit_registered = False
        if problems:
            # tgtd is gone all the same (SIGKILL at worst); say what refused.
            raise TgtError("tgtd stopped, but not cleanly: " + "; ".join(problems))

    def kill(self) -> None:
        """SIGKILL by PID, as a crash: no logout, connections reset, files kept."""
        self._kill()

    def restart(self) -> None:
        """Crash tgtd and start it again on the same port, with the same targets and files."""
        self._kill()
        self._remove_control_files()
        self._proc = None
        self._start(keep_port=True)
        targets, self.targets = self.targets, []
        self._accounts.clear()
        for old in targets:
            specs = [LunSpec(size=s.size, readonly=s.readonly, path=p)
                     for s, p in zip(old.luns, old.lun_paths, strict=True)]
            target = Target(old.tid, old.iqn, chap=old.chap, mutual=old.mutual,
                            params=dict(old.params), initiator_address=old.initiator_address)
            self._configure(target, specs)

    def __enter__(self) -> Tgt:
        self.start()
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def _atexit(self) -> None:
        with contextlib.suppress(Exception):
            self.stop()

    def _end_process(self) -> None:
        """Wait for our tgtd to exit after `delete --mode system`; SIGKILL if it will not."""
        proc = self._proc
        if proc is None:
            return
        try:
            proc.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self._kill()

    def _kill(self) -> None:
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.kill()  # by PID; Popen never signals a PID it has already reaped
            try:
                proc.wait(timeout=KILL_TIMEOUT)
            except subprocess.TimeoutExpired as exc:
                raise TgtError(f"tgtd (pid {proc.pid}) survived SIGKILL") from exc

    def _owns_control(self) -> bool:
        """Our tgtd (by PID) still holds the lock behind /run/tgtd/socket.N."""
        if self._proc is None or self._lock_id is None:
            return False
        return _lock_file_id(self.control) == self._lock_id and \
            _lock_holders(self._lock_id) == {self._proc.pid}

    def _remove_control_files(self) -> None:
        """Remove socket.N and socket.N.lock if the lock file is ours and nobody holds it."""
        lock_id, self._lock_id = self._lock_id, None
        if lock_id is None or _lock_file_id(self.control) != lock_id or _lock_holders(lock_id):
            return
        for name in (f"socket.{self.control}", f"socket.{self.control}.lock"):
            with contextlib.suppress(FileNotFoundError):
                (RUN_DIR / name).unlink()

    def _log_text(self) -> str:
        try:
            text = self._log.read_text(errors="replace").strip() if self._log else ""
        except OSError:
            text = ""
        lines = [line for line in text.splitlines()
                 if "iser_ib_init" not in line and "can't adjust" not in line]
        return " | ".join(lines[-8:]) or "(tgtd printed nothing)"

    # -- configuration

    def _adm(self, *args: str) -> str:
        """One tgtadm call on our control socket; TgtError on any failure."""
        shown = _redacted(args)
        if self._proc is None:
            raise TgtError(f"tgtadm {shown}: tgtd is not running (not started, or stopped)")
        if not self.running:
            raise TgtError(f"tgtadm {shown}: tgtd is not running (exit status "
                           f"{self._proc.returncode}; {self._log_text()})")
        if not self._owns_control():
            raise TgtError(f"tgtadm {shown}: /run/tgtd/socket.{self.control} is no longer "
                           f"our tgtd's (pid {self.pid})")
        cmd = ["tgtadm", "-C", str(self.control), "--lld", "iscsi", *args]
        try:
            proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True,
                                  text=True, timeout=TGTADM_TIMEOUT)
        except subprocess.TimeoutExpired as exc:
            raise TgtError(f"tgtadm -C {self.control} {shown}: no answer within "
                           f"{TGTADM_TIMEOUT:g} s") from exc
        except OSError as exc:
            raise TgtError(f"cannot run tgtadm: {exc}") from exc
        if proc.returncode != 0:
            why = (proc.stderr or proc.stdout).strip() or "(no message)"
            raise TgtError(f"tgtadm -C {self.control} {shown} failed "
                           f"(exit {proc.returncode}): {why}")
        return proc.stdout

    def add_target(self, iqn: str, *, luns: Sequence[LunSpec] = (LunSpec(),),
                   chap: tuple[str, str] | None = None,
                   mutual: tuple[str, str] | None = None,
                   params: Mapping[str, str] | None = None,
                   initiator_address: str = "ALL") -> Target:
        """A new target with disk LUNs 1..n, optional CHAP (mutual = the target's own
        name and secret), negotiation parameters, and an initiator address ACL.

        Bound (visible to initiators) only once everything else is set."""
        if mutual is not None and chap is None:
            raise TgtError("mutual CHAP needs chap= (the initiator's account) as well")
        tid = max((t.tid for t in self.targets), default=0) + 1
        target = Target(tid, iqn, chap=chap, mutual=mutual, params=dict(params or {}),
                        initiator_address=initiator_address)
        return self._configure(target, list(luns))

    def _configure(self, target: Target, luns: list[LunSpec]) -> Target:
        tid = str(target.tid)
        self._adm("--mode", "target", "--op", "new", "--tid", tid, "--targetname", target.iqn)
        self.targets.append(target)
        made: list[Path] = []
        try:
            for n, spec in enumerate(luns, start=1):
                path = self._backing_file(target.tid, n, spec)
                if spec.path is None:
                    made.append(path)
                self._adm("--mode", "logicalunit", "--op", "new", "--tid", tid,
                          "--lun", str(n), "--backing-store", str(path))
                if spec.readonly:
                    self._adm("--mode", "logicalunit", "--op", "update", "--tid", tid,
                              "--lun", str(n), "--params", "readonly=1")
                target.lun_paths.append(path)
                target.luns.append(spec)
            for key, value in target.params.items():
                self._adm("--mode", "target", "--op", "update", "--tid", tid,
                          "--name", key, "--value", value)
            if target.chap is not None:
                self._account(target.tid, *target.chap, outgoing=False)
            if target.mutual is not None:
                self._account(target.tid, *target.mutual, outgoing=True)
            self._adm("--mode", "target", "--op", "bind", "--tid", tid,
                      "--initiator-address", target.initiator_address)
        except BaseException:
            with contextlib.suppress(TgtError):
                self._adm("--mode", "target", "--op", "delete", "--force", "--tid", tid)
            self.targets.remove(target)
            for path in made:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                self._created.discard(path)
            raise
        return target

    def add_lun(self, target: Target, spec: LunSpec = LunSpec()) -> int:
        """A new disk LUN on a running target (the next number); initiators see it
        after a rescan."""
        n = len(target.luns) + 1
        path = self._backing_file(target.tid, n, spec)
        self._adm("--mode", "logicalunit", "--op", "new", "--tid", str(target.tid),
                  "--lun", str(n), "--backing-store", str(path))
        target.lun_paths.append(path)
        target.luns.append(spec)
        return n

    def reload_lun(self, target: Target, lun: int) -> None:
        """Delete LUN ``lun`` and add it again from the same file: tgtd reads a backing
        file's size only when a LUN is added, so this is how a LUN grows on tgt."""
        self.delete_lun(target, lun)
        self._adm("--mode", "logicalunit", "--op", "new", "--tid", str(target.tid),
                  "--lun", str(lun), "--backing-store", str(target.lun_paths[lun - 1]))

    def delete_lun(self, target: Target, lun: int) -> None:
        """LUN ``lun`` gone from the target (its file stays, for a reload)."""
        self._adm("--mode", "logicalunit", "--op", "delete", "--tid", str(target.tid),
                  "--lun", str(lun))

    def _backing_file(self, tid: int, lun: int, spec: LunSpec) -> Path:
        if spec.path is not None:
            if not Path(spec.path).is_file():
                raise TgtError(f"LUN {lun} of tid {tid}: backing file {spec.path} not found")
            return Path(spec.path)
        if spec.size <= 0 or spec.size % 512:
            raise TgtError(f"LUN {lun} of tid {tid}: size {spec.size} is not a positive "
                           "multiple of 512")
        self.workdir.mkdir(parents=True, exist_ok=True)
        path = self.workdir / (f"tgtlab-{os.getpid()}-C{self.control}-t{tid}-l{lun}-"
                               f"{os.urandom(3).hex()}.img")
        new_sparse_file(path, spec.size)
        self._created.add(path)
        return path

    def _account(self, tid: int, user: str, password: str, *, outgoing: bool) -> None:
        known = self._accounts.get(user)
        if known is None:
            self._adm("--mode", "account", "--op", "new", "--user", user,
                      "--password", password)
            self._accounts[user] = password
        elif known != password:
            raise TgtError(f"CHAP user {user!r} already exists in this tgtd with another "
                           "secret (tgt accounts are per tgtd, not per target)")
        self._adm("--mode", "account", "--op", "bind", "--tid", str(tid), "--user", user,
                  *(["--outgoing"] if outgoing else []))

    def update_param(self, tid: int, name: str, value: str) -> None:
        """`--mode target --op update --name KEY --value V` (tgt's own offer for KEY)."""
        self._adm("--mode", "target", "--op", "update", "--tid", str(tid), "--name", name,
                  "--value", value)
        for t in self.targets:
            if t.tid == tid:
                t.params[name] = value

    def delete_target(self, tid: int) -> None:
        """Delete the target (ending its sessions) and the LUN files made for it."""
        self._adm("--mode", "target", "--op", "delete", "--force", "--tid", str(tid))
        for t in [t for t in self.targets if t.tid == tid]:
            for path in t.lun_paths:
                if path in self._created:
                    with contextlib.suppress(FileNotFoundError):
                        path.unlink()
                    self._created.discard(path)
        self.targets = [t for t in self.targets if t.tid != tid]

    def show(self, tid: int | None = None) -> str:
        """`tgtadm --mode target --op show`: every target, LUN, account and ACL; with a
        tid, that target's negotiation parameters (`HeaderDigest=None`, ...) instead."""
        if tid is None:
            return self._adm("--mode", "target", "--op", "show")
        return self._adm("--mode", "target", "--op", "show", "--tid", str(tid))

    def _target_by_iqn(self, iqn: str) -> Target:
        for t in self.targets:
            if t.iqn == iqn:
                return t
        raise TgtError(f"no target {iqn} in this tgtd")


# -- helpers (module level: no state)


def _redacted(args: Sequence[str]) -> str:
    return " ".join("***" if prev == "--password" else a
                    for prev, a in zip(["", *args], args, strict=False))




def _pick_control() -> int:
    """A control number with no socket.N files at all (stale ones included)."""
    rng = random.SystemRandom()
    for _ in range(1000):
        n = rng.randrange(*CONTROL_RANGE)
        if _control_free(n):
            return n
    raise TgtError(f"no free tgtd control number in {RUN_DIR}")


def _control_free(n: int) -> bool:
    return n > 0 and not (RUN_DIR / f"socket.{n}").exists() and \
        not (RUN_DIR / f"socket.{n}.lock").exists()


def _lock_file_id(control: int) -> tuple[int, int] | None:
    try:
        st = os.stat(RUN_DIR / f"socket.{control}.lock")
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _lock_holders(lock_id: tuple[int, int]) -> set[int]:
    """PIDs holding a granted lock on the file (from /proc/locks; waiters excluded)."""
    dev, ino = lock_id
    want = f"{os.major(dev):02x}:{os.minor(dev):02x}:{ino}"
    holders: set[int] = set()
    try:
        lines = Path("/proc/locks").read_text().splitlines()
    except OSError:
        return holders
    for line in lines:
        fields = line.split()
        if len(fields) < 6 or fields[1] == "->":
            continue
        if fields[5] == want:
            with contextlib.suppress(ValueError):
                holders.add(int(fields[4]))
    return holders


def _listening_ports(pid: int) -> set[int]:
    """TCP ports on which the process `pid` itself has a listening socket."""
    inodes: set[str] = set()
    fd_dir = Path(f"/proc/{pid}/fd")
    try:
        for fd in fd_dir.iterdir():
            with contextlib.suppress(OSError):
                link = os.readlink(fd)
                if link.startswith("socket:["):
                    inodes.add(link[8:-1])
    except OSError:
        return set()
    ports: set[int] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) > 9 and fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports
