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

from iscsi_handoff.pathchoice import PathReport, probe_paths
from userland.errors import ConfigError, PathUnavailable


@dataclass(frozen=True)
class Decision:
    path: str  # "kernel" or "fuse"
    mountpoint: Path | None  # fuse only
    loop: bool  # fuse only: attach /dev/loopN
    notice: str | None  # the one line a user sees when we chose for them


def default_mountpoint() -> Path:
    """Where the fallback mounts when the user named no place: per user, not shared.

    ISCSI_HANDOFF_RUN_DIR moves it (tests, or a system with no /run).
    """
    override = os.environ.get("ISCSI_HANDOFF_RUN_DIR")
    if override:
        return Path(override) / "fuse"
    if os.geteuid() == 0:
        return Path("/run/iscsi-handoff/fuse")
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    base = Path(runtime) if runtime else Path(f"/tmp/iscsi-handoff-{os.getuid()}")
    return base / "iscsi-handoff" / "fuse"


def prepare_mountpoint(path: Path) -> Path:
    """Create the default mount point (private to its owner) if it is not there."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    return path


def decide(*, force_kernel: bool, fuse_mount: Path | None, loop: bool,
           probe: Callable[[], PathReport] = probe_paths) -> Decision:
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
    mountpoint = default_mountpoint()
    notice = (f"kernel path unavailable ({report.kernel_reason}); using the FUSE fallback "
              f"at {mountpoint}" + (" with a loop device" if with_loop else
                                    f" without a loop device ({report.loop_reason})"
                                    if not report.loop_ok else
                                    " without a loop device (not root)"))
    return Decision("fuse", mountpoint, with_loop, notice)
