"""The kernel's iSCSI state as sysfs shows it: transport, sessions, connections, disks.

Read only, with the sysfs root a parameter so tests can build a fake tree. The layout
(scsi_transport_iscsi, iscsi_tcp, sd) on a Linux host:

    class/iscsi_transport/tcp/handle                 u64, once iscsi_tcp is loaded
    class/iscsi_session/session<sid>                 -> devices/platform/host<H>/session<sid>/
                                                        iscsi_session/session<sid>
        targetname tpgt initiatorname ifacename state recovery_tmo username ...
        device                                       -> .../host<H>/session<sid>
            target<H>:0:<T>/<H>:0:<T>:<L>/           one SCSI device per LUN
                vendor model state block/<sdX>/size  (size in 512-byte sectors)
    class/iscsi_connection/connection<sid>:<cid>     -> .../session<sid>/connection<sid>:<cid>/
                                                        iscsi_connection/connection<sid>:<cid>
        persistent_address persistent_port address port exp_statsn state ...
    class/scsi_host/host<H>/scan                     write "- - -" to scan every LUN

Sessions made by open-iscsi's iscsid and by us look the same here. Attributes a
transport does not support, or that were never set, read as an error or "(null)":
both become None. The password attributes are never opened (`_read_attr` refuses).
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from userland.errors import EXIT_IO, EXIT_UNAVAILABLE, IscsiError

DEFAULT_ROOT = "/sys"
SECTOR = 512  # block/<sdX>/size counts 512-byte sectors whatever the logical block size

_SESSION_RE = re.compile(r"session(\d+)")
_CONNECTION_RE = re.compile(r"connection(\d+):(\d+)")
_TARGET_RE = re.compile(r"target(\d+):(\d+):(\d+)")
_HCTL_RE = re.compile(r"(\d+):(\d+):(\d+):(\d+)")
_HOST_RE = re.compile(r"host(\d+)")

SysfsRoot = str | os.PathLike[str]


class SysfsError(IscsiError):
    """Writing to sysfs failed (a missing SCSI host, no permission)."""

    exit_code = EXIT_UNAVAILABLE


class DisksTimeout(IscsiError):
    """The session's disks did not show up in sysfs in time."""

    exit_code = EXIT_IO

    def __init__(self, message: str, found: list[DiskInfo]) -> None:
        super().__init__(message)
        self.found = found


@dataclass(frozen=True)
class DiskInfo:
    """One block device of a session: a SCSI disk LUN that sd attached."""

    lun: int
    name: str  # "sdb"
    dev: str  # "/dev/sdb"
    size_bytes: int | None
    vendor: str | None
    model: str | None
    hctl: str  # "2:0:0:1", the SCSI address host:channel:target:lun
    state: str | None  # the scsi_device's state: running, blocked, offline, ...
    by_path: str | None  # udev's /dev/disk/by-path/ip-...-iscsi-...-lun-N, if the link exists


@dataclass(frozen=True)
class ConnectionInfo:
    cid: int
    persistent_address: str | None
    persistent_port: int | None
    address: str | None
    port: int | None
    state: str | None  # up, down, failed, bound (kernels from 5.13 on)
    exp_statsn: int | None


@dataclass(frozen=True)
class SessionInfo:
    sid: int
    host_no: int | None
    target_name: str | None
    tpgt: int | None
    initiator_name: str | None
    iface_name: str | None
    state: str | None  # LOGGED_IN, FAILED, FREE
    recovery_tmo: int | None
    username: str | None  # None as well when not root: the kernel gives EACCES
    connections: tuple[ConnectionInfo, ...]
    disks: tuple[DiskInfo, ...]

    @property
    def portal(self) -> str | None:
        """address:port of the leading connection, as udev's by-path names it."""
        return _portal_of(self.connections)


# --- reading attributes --------------------------------------------------------------

def _is_secret(name: str) -> bool:
    return "password" in name


def _read_attr(directory: Path, name: str) -> str | None:
    """One attribute's text, without the trailing newline; None if absent or unset."""
    if _is_secret(name):
        raise ValueError(f"refusing to read the secret attribute {name!r}")
    try:
        fd = os.open(directory / name, os.O_RDONLY)
    except OSError:
        return None
    try:
        data = os.read(fd, 8192)
    except OSError:  # EACCES (username as non-root), ENOSYS/EINVAL from the transport
        return None
    finally:
        os.close(fd)
    text = data.decode("utf-8", errors="replace").rstrip("\n")
    if text in ("", "(null)"):
        return None
    return text


def _read_int(directory: Path, name: str) -> int | None:
    text = _read_attr(directory, name)
    if text is None:
        return None
    try:
        return int(text.strip(), 0)
    except ValueError:
        return None


def _listdir(path: Path) -> list[str]:
    try:
        return sorted(os.listdir(path))
    except OSError:
        return []


# --- transport -----------------------------------------------------------------------

def kernel_iscsi_loaded(root: SysfsRoot = DEFAULT_ROOT) -> bool:
    """True once scsi_transport_iscsi is in the kernel (its classes exist in sysfs)."""
    base = Path(root)
    return (base / "class" / "iscsi_session").is_dir() or (
        base / "class" / "iscsi_transport").is_dir()


def transport_handle(root: SysfsRoot = DEFAULT_ROOT) -> int | None:
    """iscsi_tcp's transport handle for NETLINK_ISCSI requests; None if not loaded."""
    return _read_int(Path(root) / "class" / "iscsi_transport" / "tcp", "handle")


# --- sessions ------------------------------------------------------------------------

def session_ids(root: SysfsRoot = DEFAULT_ROOT) -> list[int]:
    sids = []
    for name in _listdir(Path(root) / "class" / "iscsi_session"):
        m = _SESSION_RE.fullmatch(name)
        if m:
            sids.append(int(m.group(1)))
    return sorted(sids)


def list_sessions(root: SysfsRoot = DEFAULT_ROOT, *, dev_root: SysfsRoot = "/dev"
                  ) -> list[SessionInfo]:
    """Every iSCSI session the kernel holds, ours or open-iscsi's, by sid."""
    sessions = []
    for sid in session_ids(root):
        info = get_session(root, sid, dev_root=dev_root)
        if info is not None:  # gone between the listing and the read
            sessions.append(info)
    return sessions


def get_session(root: SysfsRoot, sid: int, *, dev_root: SysfsRoot = "/dev"
                ) -> SessionInfo | None:
    sdir = _session_dir(root, sid)
    if not sdir.is_dir():
        return None
    connections = _connections(root, sid)
    target_name = _read_attr(sdir, "targetname")
    return SessionInfo(
        sid=sid,
        host_no=_host_no(sdir),
        target_name=target_name,
        tpgt=_read_int(sdir, "tpgt"),
        initiator_name=_read_attr(sdir, "initiatorname"),
        iface_name=_read_attr(sdir, "ifacename"),
        state=_read_attr(sdir, "state"),
        recovery_tmo=_read_int(sdir, "recovery_tmo"),
        username=_read_attr(sdir, "username"),
        connections=connections,
        disks=tuple(_disks(sdir, target_name, connections, Path(dev_root))),
    )


def session_disks(root: SysfsRoot, sid: int, *, dev_root: SysfsRoot = "/dev"
                  ) -> list[DiskInfo]:
    """The block devices of one session, by LUN; [] while none (or no such session)."""
    sdir = _session_dir(root, sid)
    if not sdir.is_dir():
        return []
    return _disks(sdir, _read_attr(sdir, "targetname"), _connections(root, sid),
                  Path(dev_root))


def _session_dir(root: SysfsRoot, sid: int) -> Path:
    return Path(root) / "class" / "iscsi_session" / f"session{sid}"


def _session_device(sdir: Path) -> Path | None:
    """The session's own device directory, .../host<H>/session<sid>."""
    dev = sdir / "device"
    if dev.is_dir():
        return dev
    try:  # no device link: class/.../session<sid> is .../session<sid>/iscsi_session/session<sid>
        parent = sdir.resolve(strict=True).parent.parent
    except OSError:
        return None
    return parent if _SESSION_RE.fullmatch(parent.name) else None


def _host_no(sdir: Path) -> int | None:
    """The SCSI host the session sits on: the host<H> directory above session<sid>."""
    for path in (sdir / "device", sdir):
        try:
            real = path.resolve(strict=True)
        except OSError:
            continue
        for part in reversed(real.parts):
            m = _HOST_RE.fullmatch(part)
            if m:
                return int(m.group(1))
    device = _session_device(sdir)
    if device is not None:  # the target<H>:0:<T> directories carry it too
        for name in _listdir(device):
            m = _TARGET_RE.fullmatch(name)
            if m:
                return int(m.group(1))
    return None


def _connections(root: SysfsRoot, sid: int) -> tuple[ConnectionInfo, ...]:
    base = Path(root) / "class" / "iscsi_connection"
    conns = []
    for name in _listdir(base):
        m = _CONNECTION_RE.fullmatch(name)
        if not m or int(m.group(1)) != sid:
            continue
        cdir = base / name
        conns.append(ConnectionInfo(
            cid=int(m.group(2)),
            persistent_address=_read_attr(cdir, "persistent_address"),
            persistent_port=_read_int(cdir, "persistent_port"),
            address=_read_attr(cdir, "address"),
            port=_read_int(cdir, "port"),
            state=_read_attr(cdir, "state"),
            exp_statsn=_read_int(cdir, "exp_statsn"),
        ))
    return tuple(sorted(conns, key=lambda c: c.cid))


def _leading(connections: Iterable[ConnectionInfo]) -> ConnectionInfo | None:
    conns = list(connections)
    for c in conns:
        if c.cid == 0:
            return c
    return conns[0] if conns else None


def _portal_of(connections: Iterable[ConnectionInfo]) -> str | None:
    c = _leading(connections)
    if c is None:
        return None
    address = c.persistent_address or c.address
    port = c.persistent_port if c.persistent_port is not None else c.port
    if address is None or port is None:
        return None
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


# --- disks ---------------------------------------------------------------------------

def by_path_name(address: str, port: int, target_name: str, lun: int) -> str:
    """The name udev's path_id gives an iSCSI disk (connection <sid>:0's persistent values)."""
    if lun < 256:
        lun_part = f"lun-{lun}"
    else:  # path_id's form for LUNs beyond peripheral addressing
        lun_part = f"lun-0x{lun & 0xFFFF:04x}{(lun >> 16) & 0xFFFF:04x}00000000"
    return f"ip-{address}:{port}-iscsi-{target_name}-{lun_part}"


def _block_names(sdev: Path) -> list[str]:
    names = _listdir(sdev / "block")
    if names:
        return names
    # CONFIG_SYSFS_DEPRECATED kernels: a "block:sdb" link instead of block/sdb
    return [n.split(":", 1)[1] for n in _listdir(sdev) if n.startswith("block:")]


def _block_dir(sdev: Path, name: str) -> Path:
    path = sdev / "block" / name
    return path if path.is_dir() else sdev / f"block:{name}"


def _disks(sdir: Path, target_name: str | None, connections: tuple[ConnectionInfo, ...],
           dev_root: Path) -> list[DiskInfo]:
    device = _session_device(sdir)
    if device is None:
        return []
    lead = _leading(connections)
    disks = []
    for tname in _listdir(device):
        if not _TARGET_RE.fullmatch(tname):
            continue
        for sname in _listdir(device / tname):
            m = _HCTL_RE.fullmatch(sname)
            if not m:
                continue
            sdev = device / tname / sname
            lun = int(m.group(4))
            for block in _block_names(sdev):
                sectors = _read_int(_block_dir(sdev, block), "size")
                by_path = None
                if (lead is not None and lead.persistent_address is not None
                        and lead.persistent_port is not None and target_name is not None):
                    link = dev_root / "disk" / "by-path" / by_path_name(
                        lead.persistent_address, lead.persistent_port, target_name, lun)
                    by_path = str(link) if os.path.lexists(link) else None
                vendor = _read_attr(sdev, "vendor")
                model = _read_attr(sdev, "model")
                disks.append(DiskInfo(
                    lun=lun, name=block, dev=str(dev_root / block),
                    size_bytes=None if sectors is None else sectors * SECTOR,
                    vendor=vendor.strip() if vendor else None,
                    model=model.strip() if model else None,
                    hctl=sname, state=_read_attr(sdev, "state"), by_path=by_path))
    return sorted(disks, key=lambda d: (d.lun, d.name))


# --- acting ----------------------------------------------------------------------------

def scan_host(root: SysfsRoot, host_no: int) -> None:
    """Ask the SCSI host to scan every channel, target and LUN ("- - -")."""
    path = Path(root) / "class" / "scsi_host" / f"host{host_no}" / "scan"
    try:
        fd = os.open(path, os.O_WRONLY)  # no O_CREAT: a missing host is an error
    except FileNotFoundError:
        raise SysfsError(f"SCSI host {host_no} is not in sysfs ({path} is missing)") from None
    except PermissionError:
        raise SysfsError(f"cannot scan SCSI host {host_no}: writing {path} needs root") from None
    try:
        os.write(fd, b"- - -")
    except OSError as exc:
        raise SysfsError(f"scanning SCSI host {host_no} failed: "
                         f"{os.strerror(exc.errno or 0)}") from None
    finally:
        os.close(fd)


def wait_for_disks(root: SysfsRoot, sid: int, *, expected_luns: set[int] | None = None,
                   timeout: float = 10.0, clock: Callable[[], float] = time.monotonic,
                   sleep: Callable[[float], None] = time.sleep, poll_interval: float = 0.05,
                   dev_root: SysfsRoot = "/dev") -> list[DiskInfo]:
    """Poll until the session's disks are in sysfs; return them by LUN.

    With ``expected_luns`` every one of those LUNs must have a block device; without,
    the first disk to appear is enough. A disk counts once its size reads. Raises
    DisksTimeout (with what was found) after ``timeout`` seconds.
    """
    deadline = clock() + timeout
    while True:
        # a block directory whose size is not readable yet is still being added
        disks = [d for d in session_disks(root, sid, dev_root=dev_root)
                 if d.size_bytes is not None]
        have = {d.lun for d in disks}
        if (expected_luns is None and disks) or (
                expected_luns is not None and expected_luns <= have):
            return disks
        now = clock()
        if now >= deadline:
            raise DisksTimeout(_timeout_text(root, sid, expected_luns, disks, timeout), disks)
        sleep(max(0.0, min(poll_interval, deadline - now)))


def _timeout_text(root: SysfsRoot, sid: int, expected: set[int] | None,
                  found: list[DiskInfo], timeout: float) -> str:
    if not _session_dir(root, sid).is_dir():
        return f"session {sid} is not in sysfs (waited {timeout:g} s for its disks)"
    seen = ", ".join(f"LUN {d.lun} as {d.name}" for d in found) or "none"
    if expected is None:
        return f"session {sid}: no disk appeared within {timeout:g} s"
    missing = ", ".join(str(n) for n in sorted(expected - {d.lun for d in found}))
    return (f"session {sid}: LUN {missing} did not appear as a disk within {timeout:g} s "
            f"(found: {seen})")
