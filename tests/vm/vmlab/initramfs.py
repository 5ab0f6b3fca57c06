"""The guest's initramfs: busybox-static, init.sh as /init, and the module closure.

Built into .cache/vm/initramfs/<release>-<key>.cpio.gz, where the key hashes every
input (this file, init.sh, busybox, the modules and the wanted list): a change to any of
them builds a new one, an unchanged set reuses the old one. The cpio (newc) is written
here rather than by cpio(1) so that /dev/console can be a device node without root.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import lzma
import os
import shutil
import struct
import subprocess
from dataclasses import dataclass
from pathlib import Path

from .common import CACHE, LabError, cache_lock
from .kernel import Kernel
from .modules import BOOT_CRITICAL, WANTED, LoadPlan, plan

INIT_SCRIPT = Path(__file__).with_name("init.sh")
BUSYBOX_CANDIDATES = ("/bin/busybox", "/usr/bin/busybox")
KEEP = 4  # older initramfs images kept per release (others may still be booting one)


@dataclass(frozen=True)
class Initramfs:
    path: Path
    plan: LoadPlan


def build_initramfs(kernel: Kernel, *, cache: Path = CACHE,
                    wanted: tuple[str, ...] = WANTED) -> Initramfs:
    load = plan(kernel.modules_dir, wanted)
    busybox = find_busybox()
    key = _input_key(kernel, load, busybox, wanted)
    out = cache / "initramfs" / f"{kernel.release}-{key}.cpio.gz"
    if out.exists():
        return Initramfs(out, load)
    with cache_lock(cache):
        if not out.exists():
            out.parent.mkdir(parents=True, exist_ok=True)
            tmp = out.with_name(f".{out.name}.partial")
            with tmp.open("wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb",
                                                      compresslevel=6, mtime=0) as gz:
                _write_archive(gz, kernel, load, busybox, wanted)
            os.rename(tmp, out)
            _prune(out)
    return Initramfs(out, load)


def find_busybox() -> Path:
    """A statically linked busybox (Debian `busybox-static`): the initramfs has no libc."""
    for candidate in BUSYBOX_CANDIDATES:
        path = Path(candidate)
        if path.is_file() and os.access(path, os.X_OK):
            if not _is_static(path):
                raise LabError(f"{path} is dynamically linked: install busybox-static "
                               "(./scripts/setup does)")
            return path
    raise LabError("busybox not found: install busybox-static (./scripts/setup does)")


def _is_static(path: Path) -> bool:
    """No PT_INTERP program header: the ELF needs no dynamic loader."""
    with path.open("rb") as f:
        head = f.read(64)
        if head[:4] != b"\x7fELF" or head[4] != 2:  # 64-bit ELF only (amd64)
            return False
        phoff, = struct.unpack_from("<Q", head, 32)
        phentsize, phnum = struct.unpack_from("<HH", head, 54)
        f.seek(phoff)
        table = f.read(phentsize * phnum)
    return all(struct.unpack_from("<I", table, i * phentsize)[0] != 3  # PT_INTERP
               for i in range(phnum))


def _input_key(kernel: Kernel, load: LoadPlan, busybox: Path,
               wanted: tuple[str, ...]) -> str:
    h = hashlib.sha256()
    for part in (Path(__file__), INIT_SCRIPT, busybox):
        h.update(part.read_bytes())
    h.update(kernel.release.encode())
    h.update("\n".join(wanted).encode())
    for rel in load.order:
        st = (kernel.modules_dir / rel).stat()
        h.update(f"{rel} {st.st_size} {st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def _write_archive(out: io.BufferedIOBase | gzip.GzipFile, kernel: Kernel, load: LoadPlan,
                   busybox: Path, wanted: tuple[str, ...]) -> None:
    cpio = _Newc(out)
    # etc/target: target_core_mod looks for its db_root there at load time (else it
    # complains on the console)
    for d in ("bin", "dev", "etc", "etc/target", "etc/vmlab", "modules", "proc", "sys",
              "run", "newroot"):
        cpio.directory(d)
    cpio.node("dev/console", major=5, minor=1)  # init's stdin/stdout before devtmpfs
    cpio.file("init", INIT_SCRIPT.read_bytes(), mode=0o755)
    cpio.file("bin/busybox", busybox.read_bytes(), mode=0o755)
    made: set[str] = set()
    listed: list[str] = []
    for rel in load.order:
        plain = _strip_compression(rel)
        parent = ""
        for part in Path(plain).parent.parts:
            parent = f"{parent}/{part}" if parent else part
            if parent not in made:
                cpio.directory(f"modules/{parent}")
                made.add(parent)
        cpio.file(f"modules/{plain}", _module_bytes(kernel.modules_dir / rel), mode=0o644)
        listed.append(plain)
    critical = [name for name in wanted if name in BOOT_CRITICAL and name not in load.builtin]
    for name, lines in (("modules.list", listed), ("modules.absent", load.absent),
                        ("modules.critical", critical)):
        cpio.file(f"etc/vmlab/{name}", "".join(f"{x}\n" for x in lines).encode(), mode=0o644)
    cpio.trailer()


def _strip_compression(rel: str) -> str:
    for suffix in (".xz", ".zst", ".gz"):
        if rel.endswith(suffix):
            return rel[: -len(suffix)]
    return rel


def _module_bytes(path: Path) -> bytes:
    """The module uncompressed: busybox's insmod may not read .ko.xz/.ko.zst."""
    name = path.name
    if name.endswith(".xz"):
        return lzma.decompress(path.read_bytes())
    if name.endswith(".gz"):
        return gzip.decompress(path.read_bytes())
    if name.endswith(".zst"):
        if shutil.which("zstd") is None:
            raise LabError(f"{name} is zstd-compressed and zstd is not installed")
        return subprocess.run(["zstd", "-dc", str(path)], capture_output=True,
                              check=True, timeout=60).stdout
    return path.read_bytes()


class _Newc:
    """A cpio archive in the kernel's "newc" format (see the kernel's
    Documentation/driver-api/early-userspace/buffer-format.rst)."""

    def __init__(self, out: io.BufferedIOBase | gzip.GzipFile) -> None:
        self._out = out
        self._ino = 1

    def directory(self, name: str) -> None:
        self._entry(name, 0o040755, b"", nlink=2)

    def file(self, name: str, data: bytes, *, mode: int) -> None:
        self._entry(name, 0o100000 | mode, data)

    def node(self, name: str, *, major: int, minor: int) -> None:
        self._entry(name, 0o020600, b"", rdev=(major, minor))

    def trailer(self) -> None:
        self._entry("TRAILER!!!", 0, b"", ino=0)

    def _entry(self, name: str, mode: int, data: bytes, *, nlink: int = 1,
               rdev: tuple[int, int] = (0, 0), ino: int | None = None) -> None:
        raw_name = name.encode() + b"\0"
        if ino is None:
            ino, self._ino = self._ino, self._ino + 1
        fields = (ino, mode, 0, 0, nlink, 0, len(data), 0, 0, rdev[0], rdev[1],
                  len(raw_name), 0)
        header = b"070701" + b"".join(b"%08X" % f for f in fields)
        self._out.write(header + raw_name + _pad(len(header) + len(raw_name)))
        self._out.write(data + _pad(len(data)))


def _pad(n: int) -> bytes:
    return b"\0" * (-n % 4)


def _prune(keep: Path) -> None:
    """Drop all but the newest KEEP images of this release (every input change adds one)."""
    release = keep.name.rsplit("-", 1)[0]
    images = sorted(keep.parent.glob(f"{release}-*.cpio.gz"),
                    key=lambda p: p.stat().st_mtime, reverse=True)
    for old in images[KEEP:]:
        if old != keep:
            old.unlink(missing_ok=True)
