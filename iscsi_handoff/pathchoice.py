"""Which data path `login` takes on this machine, and why, as data.

The kernel path (our login, then the socket handed to iscsi_tcp over NETLINK_ISCSI)
is preferred; FUSE (the userland session carries the data) is the fallback. loop and
bcc are reported too: loop is what `--loop` needs, bcc what the optional observer needs.
Every reason is one line a user can act on.
"""

from __future__ import annotations

import errno
import importlib
import os
import shutil
import socket
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from kernel_handoff.ebpf.preflight import Machine, bcc_findable, kallsyms_has
from kernel_handoff.sysfs import kernel_iscsi_loaded, transport_handle

NETLINK_ISCSI = 8
CAP_SYS_ADMIN = 21
MODULES = ("scsi_transport_iscsi", "iscsi_tcp")
MODPROBE_TIMEOUT = 20.0


@dataclass(frozen=True)
class PathReport:
    kernel_ok: bool
    kernel_reason: str
    fuse_ok: bool
    fuse_reason: str
    loop_ok: bool
    loop_reason: str
    bcc_ok: bool
    bcc_reason: str
    chosen: str | None  # "kernel", "fuse", or None when neither works
    chosen_reason: str
    kernel_release: str

    def items(self) -> list[tuple[str, bool, str]]:
        """(name, ok, reason) for each path, in the order doctor shows them."""
        return [("kernel", self.kernel_ok, self.kernel_reason),
                ("fuse", self.fuse_ok, self.fuse_reason),
                ("loop", self.loop_ok, self.loop_reason),
                ("bcc", self.bcc_ok, self.bcc_reason)]

    def to_json(self) -> dict[str, Any]:
        return {"kernel_release": self.kernel_release,
                "paths": {name: {"ok": ok, "reason": reason}
                          for name, ok, reason in self.items()},
                "chosen": self.chosen, "chosen_reason": self.chosen_reason}

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def probe_paths(*, sysfs_root: str = "/sys", try_modprobe: bool = True) -> PathReport:
    kernel_ok, kernel_reason = probe_kernel(sysfs_root=sysfs_root, try_modprobe=try_modprobe)
    fuse_ok, fuse_reason = probe_fuse()
    loop_ok, loop_reason = probe_loop()
    bcc_ok, bcc_reason = probe_bcc(sysfs_root=sysfs_root)
    if kernel_ok:
        chosen: str | None = "kernel"
        chosen_reason = ("kernel: iscsi_tcp is there, so login hands its socket to the kernel "
                         "and the LUNs become /dev/sdX")
    elif fuse_ok:
        chosen = "fuse"
        chosen_reason = ("fuse: the kernel path is missing, so login falls back to the userland "
                         "session, each LUN a file in a FUSE tree, with a loop device")
    else:
        chosen = None
        chosen_reason = "none: neither the kernel path nor FUSE is available here"
    return PathReport(kernel_ok=kernel_ok, kernel_reason=kernel_reason,
                      fuse_ok=fuse_ok, fuse_reason=fuse_reason,
                      loop_ok=loop_ok, loop_reason=loop_reason,
                      bcc_ok=bcc_ok, bcc_reason=bcc_reason,
                      chosen=chosen, chosen_reason=chosen_reason,
                      kernel_release=os.uname().release)


# --- kernel ------------------------------------------------------------------------

def has_cap_sys_admin() -> bool:
    """CAP_SYS_ADMIN in the effective set (every NETLINK_ISCSI request needs it)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("CapEff:"):
                return bool((int(line.split()[1], 16) >> CAP_SYS_ADMIN) & 1)
    except (OSError, ValueError, IndexError):
        pass
    return os.geteuid() == 0


def netlink_iscsi_errno() -> int | None:
    """None if a NETLINK_ISCSI socket opens; else the errno (EPROTONOSUPPORT: no module)."""
    try:
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_ISCSI)
    except OSError as exc:
        return exc.errno or errno.EIO
    sock.close()
    return None


def _errno_text(err: int) -> str:
    return f"{os.strerror(err)} ({errno.errorcode.get(err, str(err))})"


def modprobe(modules: tuple[str, ...] = MODULES) -> str | None:
    """Load the modules; None on success, else one line saying why not."""
    tool = shutil.which("modprobe") or next(
        (p for p in ("/usr/sbin/modprobe", "/sbin/modprobe") if os.access(p, os.X_OK)), None)
    cmd = f"`modprobe -a {' '.join(modules)}`"
    if tool is None:
        moddir = Path("/lib/modules") / os.uname().release
        where = "" if moddir.is_dir() else f", and {moddir} is missing"
        return f"{cmd} impossible: modprobe is not installed{where}"
    try:
        # -a: every argument is a module (without it the second would be a parameter)
        done = subprocess.run([tool, "-a", *modules], capture_output=True, text=True,
                              timeout=MODPROBE_TIMEOUT, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"{cmd} failed: {exc}"
    if done.returncode == 0:
        return None
    first = next((ln.strip() for ln in done.stderr.splitlines() if ln.strip()),
                 f"exit status {done.returncode}")
    return f"{cmd} failed: {first}"


def probe_kernel(*, sysfs_root: str = "/sys", try_modprobe: bool = True) -> tuple[bool, str]:
    admin = has_cap_sys_admin()
    err = netlink_iscsi_errno()
    handle = transport_handle(sysfs_root)
    modprobe_failure: str | None = None
    tried = False
    if (err is not None or handle is None) and try_modprobe and admin:
        tried = True
        modprobe_failure = modprobe()
        err = netlink_iscsi_errno()
        handle = transport_handle(sysfs_root)

    if err == errno.EPROTONOSUPPORT:
        if kernel_iscsi_loaded(sysfs_root):
            return False, ("NETLINK_ISCSI unavailable although scsi_transport_iscsi is loaded: "
                           "the kernel offers it only in the initial network namespace "
                           "(in a container, use the host's network)")
        text = ("NETLINK_ISCSI unavailable: this kernel has no scsi_transport_iscsi "
                "(EPROTONOSUPPORT)")
        if modprobe_failure is not None:
            text += f"; {modprobe_failure}"
        elif tried:
            text += "; modprobe loaded the modules but the socket still fails"
        else:
            text += ("; not root, so no modprobe" if not admin and try_modprobe
                     else "; modprobe not tried")
        return False, text
    if err is not None:
        return False, f"NETLINK_ISCSI unavailable: {_errno_text(err)}"
    if handle is None:
        text = "iscsi_tcp not loaded (no class/iscsi_transport/tcp in sysfs)"
        if modprobe_failure is not None:
            text = f"iscsi_tcp not loaded and {modprobe_failure}"
        elif not tried:
            text += "; not root, so no modprobe" if not admin and try_modprobe else ""
        return False, text
    if not admin:
        return False, "not root: the kernel path needs CAP_SYS_ADMIN"
    return True, f"iscsi_tcp loaded (transport handle {handle}), NETLINK_ISCSI opens, root"


# --- open-iscsi beside us ---------------------------------------------------------

@dataclass(frozen=True)
class IscsidReport:
    """open-iscsi's iscsid on this machine: running (pids) and enabled (unit files)."""

    running: tuple[int, ...]
    enabled: tuple[str, ...]

    def line(self) -> str:
        if not self.running and not self.enabled:
            return "iscsid: not running, not enabled"
        parts = []
        if self.running:
            parts.append("running (pid " + ", ".join(map(str, self.running)) + ")")
        if self.enabled:
            parts.append("enabled (" + ", ".join(self.enabled) + ")")
        return (f"iscsid: {' and '.join(parts)}; it leaves our sessions alone (we create "
                "them as the kernel's, sysfs creator -1, which its startup sync skips)")

    def to_json(self) -> dict[str, Any]:
        return {"running": list(self.running), "enabled": list(self.enabled)}


def probe_iscsid(*, proc: str = "/proc", systemd_dir: str = "/etc/systemd/system"
                 ) -> IscsidReport:
    running = []
    for entry in Path(proc).iterdir() if Path(proc).is_dir() else ():
        if not entry.name.isdigit():
            continue
        try:
            if (entry / "comm").read_text().strip() == "iscsid":
                running.append(int(entry.name))
        except OSError:  # exited meanwhile, or not ours to read
            continue
    # `systemctl enable` links units into *.wants/; socket activation counts too.
    enabled = sorted({link.name for link in Path(systemd_dir).glob("*.wants/iscsid.*")})
    return IscsidReport(tuple(sorted(running)), tuple(enabled))


# --- FUSE, loop, bcc ---------------------------------------------------------------

def _importable(module: str) -> tuple[bool, str]:
    try:
        mod = importlib.import_module(module)
    except Exception as exc:  # ImportError, or OSError from a missing shared library
        return False, f"{type(exc).__name__}: {exc}".splitlines()[0]
    return True, str(getattr(mod, "__version__", "")).strip()


def probe_fuse() -> tuple[bool, str]:
    problems = []
    if not os.path.exists("/dev/fuse"):
        problems.append("/dev/fuse is missing (modprobe fuse, or run the container with "
                        "--device /dev/fuse)")
    else:
        try:
            os.close(os.open("/dev/fuse", os.O_RDWR))
        except OSError as exc:
            problems.append(f"/dev/fuse does not open: {_errno_text(exc.errno or 0)}")
    ok, detail = _importable("pyfuse3")
    if not ok:
        problems.append(f"pyfuse3 not importable ({detail}; pip install 'iscsi-handoff[fuse]')")
    fusermount = shutil.which("fusermount3")
    if fusermount is None and os.geteuid() != 0:
        problems.append("fusermount3 missing and not root (Debian package fuse3)")
    if problems:
        return False, "; ".join(problems)
    version = f" {detail}" if detail else ""
    mounter = f"fusermount3 at {fusermount}" if fusermount else "root mounts directly"
    return True, f"/dev/fuse opens, pyfuse3{version}, {mounter}"


def probe_loop() -> tuple[bool, str]:
    problems = []
    losetup = shutil.which("losetup") or next(
        (p for p in ("/usr/sbin/losetup", "/sbin/losetup") if os.access(p, os.X_OK)), None)
    if losetup is None:
        problems.append("losetup is not installed (Debian package mount)")
    if not os.path.exists("/dev/loop-control"):
        problems.append("/dev/loop-control is missing (modprobe loop)")
    if problems:
        return False, "; ".join(problems)
    return True, f"losetup at {losetup}, /dev/loop-control present"


def probe_bcc(*, sysfs_root: str = "/sys") -> tuple[bool, str]:
    problems = []
    # Debian installs bcc for the system python3 only; the observer loads it from there.
    if not bcc_findable():
        problems.append("bcc not found (Debian package python3-bpfcc)")
    build = Path("/lib/modules") / os.uname().release / "build"
    if not build.exists():
        problems.append(f"no kernel headers at {build}")
    sys_ = Path(sysfs_root)
    symbols = kallsyms_has(Machine(), ("register_kprobe", "iscsi_if_rx"))
    kprobes = "register_kprobe" in symbols or any(p.exists() for p in (
        sys_ / "bus" / "event_source" / "devices" / "kprobe",
        sys_ / "kernel" / "tracing" / "kprobe_events",
        sys_ / "kernel" / "debug" / "kprobes",
    ))
    if not kprobes:
        problems.append("no kprobes in this kernel (no kprobe PMU, no register_kprobe)")
    if "iscsi_if_rx" not in symbols:
        problems.append("iscsi_if_rx not in /proc/kallsyms (scsi_transport_iscsi not loaded)")
    if problems:
        return False, "; ".join(problems)
    return True, f"bcc, headers at {build}, iscsi_if_rx can be kprobed"
