"""Which kernel modules the guest loads, and in what order (from modules.dep).

The initramfs carries the closure of WANTED and insmods it in order, each module after
everything it depends on. A wanted module this kernel lacks is reported, not fatal,
unless it is one the guest cannot boot without (BOOT_CRITICAL).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

# In load order. Why each one:
WANTED: tuple[str, ...] = (
    "virtio_pci", "virtio_blk",                 # the 9p transport's PCI device (blk: spare)
    "9pnet_virtio", "9p", "overlay",            # host root over 9p under a tmpfs overlay
    "ext4", "crc32c_generic",                   # mkfs + mount on an iSCSI disk
    "crct10dif_generic", "crc64_rocksoft_generic",  # sd_mod's T10 PI checksums, generic
    "scsi_transport_iscsi", "iscsi_tcp", "sd_mod",  # the kernel data path under test
    "sg",                                       # SCSI generic, for sg3 tools
    "fuse", "loop",                             # the FUSE fallback, inside the guest too
    "inet_diag", "tcp_diag",                    # `ss -K` (cut a connection: recovery)
    "configfs", "target_core_mod", "target_core_file", "target_core_iblock",
    "iscsi_target_mod",                         # LIO, a second real target
)
BOOT_CRITICAL: frozenset[str] = frozenset({"virtio_pci", "9pnet_virtio", "9p", "overlay"})

_SUFFIXES = (".ko", ".ko.xz", ".ko.zst", ".ko.gz")


def module_name(relpath: str) -> str:
    """kernel/lib/crc64-rocksoft.ko.xz -> crc64_rocksoft (the kernel's own spelling)."""
    base = relpath.rsplit("/", 1)[-1]
    for suffix in _SUFFIXES:
        if base.endswith(suffix):
            base = base[: -len(suffix)]
            break
    return base.replace("-", "_")


@dataclass
class LoadPlan:
    """order: module files (relative to the modules dir) in load order; absent: wanted
    names this kernel has neither as a module nor built in; builtin: wanted names built in."""

    order: list[str] = field(default_factory=list)
    absent: list[str] = field(default_factory=list)
    builtin: list[str] = field(default_factory=list)

    @property
    def names(self) -> list[str]:
        return [module_name(p) for p in self.order]


def plan(modules_dir: Path, wanted: tuple[str, ...] = WANTED) -> LoadPlan:
    """The load order of `wanted` and its dependencies in `modules_dir` (after depmod)."""
    deps: dict[str, list[str]] = {}
    by_name: dict[str, str] = {}
    for line in (modules_dir / "modules.dep").read_text().splitlines():
        path, sep, rest = line.partition(":")
        if not sep:
            continue
        deps[path] = rest.split()
        by_name[module_name(path)] = path
    builtin_file = modules_dir / "modules.builtin"
    builtin = {module_name(p) for p in builtin_file.read_text().split()} \
        if builtin_file.exists() else set()

    result = LoadPlan()
    seen: set[str] = set()

    def visit(path: str) -> None:
        if path in seen:
            return
        seen.add(path)
        # modules.dep lists every dependency, direct or not; visiting each one first
        # puts the deepest ones first whatever order the line lists them in.
        for dep in deps.get(path, []):
            visit(dep)
        result.order.append(path)

    for name in wanted:
        key = name.replace("-", "_")
        if key in by_name:
            visit(by_name[key])
        elif key in builtin:
            result.builtin.append(key)
        else:
            result.absent.append(key)
    return result
