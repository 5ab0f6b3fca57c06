"""Debian's current stock kernel, unpacked under .cache/vm/kernel/<release>/.

The release is read at run time from `linux-image-amd64`'s dependency
(scripts/vm/kernel-version), never pinned: security updates move it. The package is
fetched with `apt-get download` from Debian's mirror, unpacked with `dpkg-deb -x`, and
`depmod -b` writes the modules.dep the package does not ship. A finished tree carries a
`.complete` stamp; a second run finds it and does nothing.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from .common import CACHE, REPO, LabError, Log, cache_lock

KERNEL_VERSION_SCRIPT = REPO / "scripts" / "vm" / "kernel-version"
APT_TIMEOUT = 300.0


@dataclass(frozen=True)
class Kernel:
    release: str  # uname -r in the guest, e.g. 6.1.0-57-amd64
    root: Path  # the unpacked package: boot/, lib/modules/<release>/

    @property
    def vmlinuz(self) -> Path:
        return self.root / "boot" / f"vmlinuz-{self.release}"

    @property
    def modules_dir(self) -> Path:
        return self.root / "lib" / "modules" / self.release

    @property
    def headers_dir(self) -> Path:
        """Where Debian's linux-headers-<release> puts the build tree (bcc needs it)."""
        return Path("/usr/src") / f"linux-headers-{self.release}"


def resolve_release() -> str:
    """The current stock kernel's release, from apt's metadata (offline: no download)."""
    try:
        done = subprocess.run([str(KERNEL_VERSION_SCRIPT)], capture_output=True, text=True,
                              timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise LabError(f"cannot run {KERNEL_VERSION_SCRIPT.name}: {exc}") from exc
    release = done.stdout.strip()
    if done.returncode != 0 or not release:
        why = done.stderr.strip() or f"exit status {done.returncode}"
        raise LabError(f"cannot tell Debian's current kernel: {why}")
    return release


def prepare_kernel(release: str | None = None, *, cache: Path = CACHE,
                   log: Log | None = None) -> Kernel:
    """The unpacked kernel `release` (default: the current one), fetched if not cached."""
    release = release or resolve_release()
    final = cache / "kernel" / release
    kernel = Kernel(release, final)
    if (final / ".complete").exists():
        return kernel
    with cache_lock(cache):
        if (final / ".complete").exists():  # another run finished it while we waited
            return kernel
        for tool in ("apt-get", "dpkg-deb", "depmod"):
            if shutil.which(tool) is None:
                raise LabError(f"{tool} not found: the lab needs apt, dpkg and kmod "
                               "(./scripts/setup installs kmod)")
        tmp = final.with_name(f".{release}.partial")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(final, ignore_errors=True)  # an unfinished tree from a crashed run
        tmp.mkdir(parents=True)
        package = f"linux-image-{release}"
        _say(log, f"downloading {package} from Debian's mirror")
        _run(["apt-get", "download", "-q", package], cwd=tmp,
             what=f"apt-get download {package} (is the mirror reachable? apt-get update?)")
        debs = sorted(tmp.glob(f"{package}_*.deb"))
        if len(debs) != 1:
            raise LabError(f"apt-get download {package} left {len(debs)} .deb files in {tmp}")
        _say(log, f"unpacking {debs[0].name}")
        _run(["dpkg-deb", "-x", str(debs[0]), str(tmp)], what="dpkg-deb -x")
        debs[0].unlink()  # 70 MB we no longer need: the tree is what the lab uses
        _run(["depmod", "-b", str(tmp), release], what=f"depmod -b {tmp} {release}")
        if not (tmp / "boot" / f"vmlinuz-{release}").is_file():
            raise LabError(f"{package} holds no boot/vmlinuz-{release}")
        (tmp / ".complete").write_text(f"{release}\n")
        os.rename(tmp, final)
    return kernel


def _say(log: Log | None, line: str) -> None:
    if log is not None:
        log(f"vmlab: {line}")


def _run(cmd: list[str], *, what: str, cwd: Path | None = None) -> None:
    try:
        done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True,
                              timeout=APT_TIMEOUT, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise LabError(f"{what} failed: {exc}") from exc
    if done.returncode != 0:
        # apt warns about its _apt sandbox when run as root in a root-owned dir: noise.
        lines = [ln for ln in done.stderr.splitlines()
                 if ln.strip() and "unsandboxed" not in ln]
        raise LabError(f"{what} failed (exit {done.returncode}): "
                       f"{lines[-1] if lines else '(no message)'}")
