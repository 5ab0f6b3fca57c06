"""Which data path one `login` takes: the kernel's iscsi_tcp, or the FUSE fallback.

`--kernel` and `--fuse MOUNT` force a path; otherwise the kernel path is taken when it
works here and the FUSE fallback (with `--loop`, so the user still gets a block device)
when it does not, with one line saying why.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from iscsi_handoff import registry, sysstate
from iscsi_handoff.pathchoice import PathReport, probe_paths
from userland.errors import ConfigError, PathUnavailable


@dataclass(frozen=True)
class Decision:
    path: str  # "kernel" or "fuse"
    mountpoint: Path | None  # fuse only
    loop: bool  # fuse only: attach /dev/loopN
    notice: str | None  # the one line a user sees when we chose for them


def default_mountpoint() -> Path:
    """The folder under which the fallback mounts when the user named no place: per
    user, not shared (/run/iscsi-handoff/fuse for root; ISCSI_HANDOFF_RUN_DIR moves it)."""
    return registry.fuse_dir()


def session_mountpoint(host: str, target: str, isid: bytes,
                       parent: Path | None = None) -> Path:
    """Each session its own folder: <parent>/<host>-<IQN after its last colon>, or, when
    that one is taken (a mount, or not empty: a --force second session), with -<ISID>."""
    parent = parent if parent is not None else default_mountpoint()
    short = (target.rpartition(":")[2] or target).replace("/", "_")
    name = f"{host.replace('/', '_')}-{short}".lstrip(".") or "session"
    first = parent / name
    if not _taken(first):
        return first
    return parent / f"{name}-{isid.hex()}"


def _taken(path: Path) -> bool:
    try:
        return os.path.ismount(path) or any(path.iterdir())
    except FileNotFoundError:
        return False
    except OSError:
        return True  # a dead FUSE mount answers ENOTCONN: certainly not free


def prepare_mountpoint(path: Path) -> bool:
    """Create a session's default mount point, private to its owner; True when it is
    ours to remove when the session ends: made now, or an empty folder an earlier keeper
    made there and could not remove (killed while logging in)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
    try:
        path.mkdir(mode=0o700)
    except FileExistsError:
        return not _taken(path)
    except OSError as exc:
        raise ConfigError(f"cannot make the mount point {path}: {exc.strerror}") from None
    return True


def decide(*, force_kernel: bool, fuse_mount: Path | None, loop: bool,
           probe: Callable[[], PathReport] = probe_paths,
           default_mount: Path | None = None) -> Decision:
    if force_kernel and fuse_mount is not None:
        raise ConfigError("--kernel and --fuse choose different paths: give one")
    if fuse_mount is not None:
        return Decision("fuse", fuse_mount, loop, None)
    if loop and force_kernel:
        raise ConfigError("--loop belongs to the FUSE path; --kernel gives /dev/sdX itself")
    report = probe()
    if report.kernel_ok:
        return Decision("kernel", None, False, None)
    if force_kernel:
        raise PathUnavailable(f"the kernel path is unavailable: {report.kernel_reason} "
                              "(iscsi-handoff doctor says more)")
    if not report.fuse_ok:
        raise PathUnavailable(f"no data path here: kernel: {report.kernel_reason}; "
                              f"FUSE: {report.fuse_reason}")
    # A block device is what login promises; loop needs root and /dev/loop-control.
    with_loop = report.loop_ok and os.geteuid() == 0
    mountpoint = default_mount if default_mount is not None else default_mountpoint()
    notice = (f"kernel path unavailable ({report.kernel_reason}); using the FUSE fallback "
              f"at {mountpoint}" + (" with a loop device" if with_loop else
                                    f" without a loop device ({report.loop_reason})"
                                    if not report.loop_ok else
                                    " without a loop device (not root)"))
    return Decision("fuse", mountpoint, with_loop, notice)


PYFUSE3_MISSING = ("the FUSE fallback needs pyfuse3, which is not installed: "
                   "pip install 'iscsi-handoff[fuse]' (it builds against libfuse3: "
                   "apt install fuse3 libfuse3-dev pkg-config)")


def check_fuse_prerequisites(*, loop: bool) -> None:
    """What the FUSE path needs, checked before any login, each with the next step."""
    try:
        import pyfuse3  # noqa: F401
    except ImportError:
        raise PathUnavailable(PYFUSE3_MISSING) from None
    if loop and os.geteuid() != 0:
        raise PathUnavailable("--loop needs root (losetup attaches the storage file): run it "
                              "as root, or leave out --loop and use the storage file itself")


def check_mountpoint(path: Path, *, force: bool) -> None:
    """No stacking: never over another mount, nor over files someone keeps there."""
    if not path.is_dir():
        raise ConfigError(f"mount point {path} is not a directory")
    if force:
        return
    top = sysstate.top_mount(os.path.realpath(path))
    if top is not None:
        raise ConfigError(f"{path} is a mount point already ({top.fstype} from {top.source}):"
                          " give another --fuse folder (or --force to mount over it)")
    try:
        taken = any(path.iterdir())
    except OSError as exc:
        raise ConfigError(f"cannot look into {path}: {exc.strerror}") from None
    if taken:
        raise ConfigError(f"{path} is not empty: give an empty folder (or --force to hide "
                          "what is in it while mounted)")
