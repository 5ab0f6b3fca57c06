"""A real tgtd (Debian `tgt`) on loopback, for the tests, the demo and the benchmarks.

Each instance has its own port and `-C` control number, so several run side by side
and none touches a tgtd it did not start. tgtd ignores SIGTERM: it is stopped through
tgtadm (delete every target, then the system), and killed by PID only as a last resort.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from userland.errors import IscsiError

TGTADM_TIMEOUT = 15.0
START_TIMEOUT = 10.0


class TgtError(IscsiError):
    """tgtd would not start, or tgtadm refused a command."""


@dataclass(frozen=True)
class LunSpec:
    size: int = 64 << 20
    readonly: bool = False
    path: Path | None = None  # an existing backing file instead of a new sparse one


@dataclass
class Target:
    tid: int
    iqn: str
    lun_paths: list[Path] = field(default_factory=list)
    luns: list[LunSpec] = field(default_factory=list)
    chap: tuple[str, str] | None = None
    mutual: tuple[str, str] | None = None
    params: dict[str, str] = field(default_factory=dict)


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _control_in_use(n: int) -> bool:
    return any(Path("/run/tgtd").glob(f"socket.{n}*")) if Path("/run/tgtd").exists() else False


class Tgt:
    def __init__(self, *, host: str = "127.0.0.1", port: int | None = None,
                 control: int | None = None, workdir: Path | None = None) -> None:
        if shutil.which("tgtd") is None or shutil.which("tgtadm") is None:
            raise TgtError("tgtd is not installed (Debian package tgt: apt-get install tgt)")
        self.host = host
        self.port = port or _free_port(host)
        self.control = control if control is not None else self._pick_control()
        self._own_workdir = workdir is None
        self.workdir = workdir or Path(tempfile.mkdtemp(prefix="tgtlab-", dir=_shm()))
        self.targets: list[Target] = []
        self._proc: subprocess.Popen[bytes] | None = None
        self._log = self.workdir / f"tgtd-{self.control}.log"
        self._accounts: set[str] = set()

    @staticmethod
    def _pick_control() -> int:
        # Control numbers key the Unix socket /run/tgtd/socket.N: pick an unused one,
        # spread by PID so parallel test processes rarely collide.
        base = 1000 + (os.getpid() % 5000) * 8
        for n in range(base, base + 4000):
            if not _control_in_use(n):
                return n
        raise TgtError("no free tgtd control number")

    @property
    def portal(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    # -- lifecycle

    def start(self) -> None:
        with self._log.open("ab") as log:
            self._proc = subprocess.Popen(
                ["tgtd", "-f", "-C", str(self.control), "--iscsi",
                 f"portal={self.portal}"], stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise TgtError(f"tgtd exited at start ({self._proc.returncode}): "
                               f"{self._log_tail()}")
            ok = subprocess.run(["tgtadm", "-C", str(self.control), "--mode", "system",
                                 "--op", "show"], capture_output=True, timeout=TGTADM_TIMEOUT)
            if ok.returncode == 0 and self._listening():
                return
            time.sleep(0.02)
        self._kill()
        raise TgtError(f"tgtd did not come up on {self.portal} within {START_TIMEOUT:g} s: "
                       f"{self._log_tail()}")

    def _listening(self) -> bool:
        try:
            with socket.create_connection((self.host, self.port), timeout=0.5):
                return True
        except OSError:
            return False

    def _log_tail(self) -> str:
        try:
            return self._log.read_text(errors="replace").strip().splitlines()[-1]
        except (OSError, IndexError):
            return "(no output)"

    def stop(self, *, keep_files: bool = False) -> None:
        """Delete every target, stop tgtd, remove its sockets (and LUN files we made)."""
        if self._proc is not None and self._proc.poll() is None:
            for target in self.targets:
                self._adm("--mode", "target", "--op", "delete", "--force",
                          "--tid", str(target.tid), check=False)
            self._adm("--mode", "system", "--op", "delete", check=False)
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._kill()
        self._proc = None
        for stale in Path("/run/tgtd").glob(f"socket.{self.control}*") \
                if Path("/run/tgtd").exists() else []:
            with contextlib.suppress(OSError):
                stale.unlink()
        if not keep_files and self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def kill(self) -> None:
        """SIGKILL, as a crash: no logout, sockets reset, LUN files kept."""
        self._kill()

    def _kill(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(signal.SIGKILL)
            self._proc.wait(timeout=10)

    def restart(self) -> None:
        """Crash tgtd and start it again on the same port with the same targets and files."""
        self._kill()
        self._proc = None
        for stale in Path("/run/tgtd").glob(f"socket.{self.control}*"):
            with contextlib.suppress(OSError):
                stale.unlink()
        self.start()
        targets, self.targets = self.targets, []
        self._accounts.clear()
        for t in targets:
            specs = [LunSpec(size=s.size, readonly=s.readonly, path=p)
                     for s, p in zip(t.luns, t.lun_paths, strict=True)]
            self.add_target(t.iqn, luns=specs, chap=t.chap, mutual=t.mutual, params=t.params)

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def __enter__(self) -> Tgt:
        self.start()
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    # -- configuration

    def _adm(self, *args: str, check: bool = True) -> str:
        cmd = ["tgtadm", "-C", str(self.control), "--lld", "iscsi", *args]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=TGTADM_TIMEOUT)
        if check and proc.returncode != 0:
            shown = " ".join("***" if prev == "--password" else a
                             for prev, a in zip(["", *cmd], cmd, strict=False))
            raise TgtError(f"`{shown}` failed: {(proc.stderr or proc.stdout).strip()}")
        return proc.stdout

    def add_target(self, iqn: str, *, luns: Sequence[LunSpec] = (LunSpec(),),
                   chap: tuple[str, str] | None = None,
                   mutual: tuple[str, str] | None = None,
                   params: Mapping[str, str] | None = None,
                   initiator_address: str = "ALL") -> Target:
        tid = max((t.tid for t in self.targets), default=0) + 1
        self._adm("--mode", "target", "--op", "new", "--tid", str(tid), "--targetname", iqn)
        target = Target(tid, iqn, chap=chap, mutual=mutual, params=dict(params or {}))
        self.targets.append(target)
        for n, spec in enumerate(luns, start=1):
            path = spec.path or self.workdir / f"t{tid}-lun{n}.img"
            if spec.path is None:
                with path.open("wb") as f:
                    f.truncate(spec.size)
            self._adm("--mode", "logicalunit", "--op", "new", "--tid", str(tid),
                      "--lun", str(n), "--backing-store", str(path))
            if spec.readonly:  # tgtadm takes --params only on update
                self._adm("--mode", "logicalunit", "--op", "update", "--tid", str(tid),
                          "--lun", str(n), "--params", "readonly=1")
            target.lun_paths.append(path)
            target.luns.append(spec)
        for key, value in (params or {}).items():
            self.update_param(tid, key, value)
        if chap is not None:
            self._account(tid, *chap, outgoing=False)
        if mutual is not None:
            self._account(tid, *mutual, outgoing=True)
        self._adm("--mode", "target", "--op", "bind", "--tid", str(tid),
                  "--initiator-address", initiator_address)
        return target

    def _account(self, tid: int, user: str, password: str, *, outgoing: bool) -> None:
        if user not in self._accounts:
            self._adm("--mode", "account", "--op", "new", "--user", user,
                      "--password", password)
            self._accounts.add(user)
        self._adm("--mode", "account", "--op", "bind", "--tid", str(tid), "--user", user,
                  *(["--outgoing"] if outgoing else []))

    def update_param(self, tid: int, name: str, value: str) -> None:
        self._adm("--mode", "target", "--op", "update", "--tid", str(tid), "--name", name,
                  "--value", value)
        for t in self.targets:
            if t.tid == tid:
                t.params[name] = value

    def delete_target(self, tid: int) -> None:
        self._adm("--mode", "target", "--op", "delete", "--force", "--tid", str(tid))
        self.targets = [t for t in self.targets if t.tid != tid]

    def show(self) -> str:
        return self._adm("--mode", "target", "--op", "show")


def _shm() -> str | None:
    return "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
