"""What the observer needs before bcc compiles anything, each missing piece one line.

bcc itself comes from Debian's python3-bpfcc, which installs for the system python3 into
/usr/lib/python3/dist-packages. The project's venv does not see that folder (and must not:
Debian's older copies of our dependencies would shadow the venv's). So `import_bcc` first
tries a plain `import bcc` (a venv built with --system-site-packages, or a python3 that
has it), then loads the `bcc` package alone from the Debian folder by its path. bcc is
pure Python over ctypes and libbcc.so.0, so it runs under any Python 3 with that library.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from userland.errors import PathUnavailable

DEBIAN_DIST_PACKAGES = ("/usr/lib/python3/dist-packages",)
CAP_PERFMON = 38
CAP_BPF = 39
CAP_SYS_ADMIN = 21


class ObserverUnavailable(PathUnavailable):
    """The bcc observer cannot run here: bcc, headers, kprobes or privileges are missing."""


@dataclass(frozen=True)
class Machine:
    """Where to look: the real paths by default, a test's tree otherwise."""

    release: str = os.uname().release
    modules_dir: Path = Path("/lib/modules")
    sys_dir: Path = Path("/sys")
    proc_dir: Path = Path("/proc")
    bcc_dirs: Sequence[str] = DEBIAN_DIST_PACKAGES


def import_bcc(search: Sequence[str] = DEBIAN_DIST_PACKAGES) -> ModuleType:
    """The bcc module, or ObserverUnavailable saying how to install it."""
    if "bcc" in sys.modules:
        return sys.modules["bcc"]
    try:
        return importlib.import_module("bcc")
    except ModuleNotFoundError as exc:
        if exc.name != "bcc":
            raise ObserverUnavailable(f"bcc does not import ({exc}): "
                                      "apt install --reinstall python3-bpfcc") from None
    spec = importlib.machinery.PathFinder.find_spec("bcc", list(search))
    if spec is None or spec.loader is None:
        raise ObserverUnavailable("bcc is not installed: apt install python3-bpfcc")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bcc"] = module  # its own relative imports (bcc.libbcc, ...) need it
    try:
        spec.loader.exec_module(module)
    except Exception as exc:  # OSError when libbcc.so.0 is missing, or a syntax mismatch
        del sys.modules["bcc"]
        for name in [n for n in sys.modules if n.startswith("bcc.")]:
            del sys.modules[name]
        first = f"{type(exc).__name__}: {exc}".splitlines()[0]
        raise ObserverUnavailable(f"bcc does not load ({first}): "
                                  "apt install --reinstall python3-bpfcc libbpfcc") from None
    return module


def bcc_findable(search: Sequence[str] = DEBIAN_DIST_PACKAGES) -> bool:
    if importlib.util.find_spec("bcc") is not None:
        return True
    return importlib.machinery.PathFinder.find_spec("bcc", list(search)) is not None


def effective_caps(proc_dir: Path = Path("/proc")) -> int | None:
    try:
        for line in (proc_dir / "self" / "status").read_text().splitlines():
            if line.startswith("CapEff:"):
                return int(line.split()[1], 16)
    except (OSError, ValueError, IndexError):
        pass
    return None


def may_trace(proc_dir: Path = Path("/proc")) -> bool:
    """CAP_SYS_ADMIN, or CAP_BPF with CAP_PERFMON (kernels >= 5.8): what bcc's loads need."""
    caps = effective_caps(proc_dir)
    if caps is None:
        return os.geteuid() == 0
    if (caps >> CAP_SYS_ADMIN) & 1:
        return True
    return bool((caps >> CAP_BPF) & 1 and (caps >> CAP_PERFMON) & 1)


def has_headers(machine: Machine) -> bool:
    """bcc takes /lib/modules/<release>/build, or the kernel's own kheaders archive."""
    build = machine.modules_dir / machine.release / "build"
    return (build / "include").is_dir() or (machine.sys_dir / "kernel" / "kheaders.tar.xz").exists()


def has_kprobes(machine: Machine) -> bool:
    sys_ = machine.sys_dir
    tracing = (sys_ / "kernel" / "tracing", sys_ / "kernel" / "debug" / "tracing")
    return ((sys_ / "bus" / "event_source" / "devices" / "kprobe").exists()
            or any((t / "kprobe_events").exists() for t in tracing))


def kallsyms_has(machine: Machine, symbols: Sequence[str]) -> set[str]:
    """Which of these function names /proc/kallsyms lists (a module's only once loaded)."""
    wanted, found = set(symbols), set()
    try:
        with open(machine.proc_dir / "kallsyms", encoding="ascii", errors="replace") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 3 and parts[2] in wanted:
                    found.add(parts[2])
    except OSError:
        pass
    return found


def tracefs_dir(machine: Machine) -> Path | None:
    for path in (machine.sys_dir / "kernel" / "tracing",
                 machine.sys_dir / "kernel" / "debug" / "tracing"):
        if (path / "events").is_dir():
            return path
    return None


def problems(machine: Machine | None = None) -> list[str]:
    """Every missing piece, each with the command that fixes it; empty when all is there."""
    m = machine or Machine()
    found: list[str] = []
    if not may_trace(m.proc_dir):
        found.append("not root: loading BPF programs and kprobes needs root "
                     "(CAP_SYS_ADMIN, or CAP_BPF with CAP_PERFMON): run it with sudo")
    if not bcc_findable(m.bcc_dirs):
        found.append("bcc is not installed: apt install python3-bpfcc")
    if not has_headers(m):
        found.append(f"no headers for the running kernel {m.release} "
                     f"(no {m.modules_dir / m.release / 'build'}): "
                     f"apt install linux-headers-{m.release}")
    if not has_kprobes(m):
        found.append("this kernel has no kprobes (no kprobe event source in sysfs): "
                     "the observer needs a kernel built with CONFIG_KPROBES, "
                     "as Debian's stock kernels are")
    elif not kallsyms_has(m, ("iscsi_if_rx",)):
        found.append("scsi_transport_iscsi is not loaded (iscsi_if_rx not in "
                     "/proc/kallsyms): modprobe iscsi_tcp")
    return found


def check(machine: Machine | None = None) -> None:
    """Raise ObserverUnavailable with one line naming everything that is missing."""
    missing = problems(machine)
    if missing:
        raise ObserverUnavailable("cannot trace: " + "; ".join(missing))
