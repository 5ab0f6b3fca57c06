"""The tree's layout, built at mount time; a rescan may add LUN folders, nothing is removed.

    MOUNT/<host>/<target>/storage              the target's first disk LUN
    MOUNT/<host>/<target>/{hostname,ip,targetname,vendor,product,version,serial}
    MOUNT/<host>/<target>/lun<N>/storage       every disk LUN, with the same info files

``<target>`` is the IQN after its last colon. Info entries are symbolic links whose
target is the value, as the NetBSD initiator showed them: ``ls -l`` prints every value at
a glance and ``readlink`` gives one to a script. ``<target>/storage`` is a hard link to
``lun<N>/storage`` of the first LUN: one inode, so one page cache and one lock table.
"""

from __future__ import annotations

import stat
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import PurePosixPath

from fallback_fuse.device import LunInfo, TargetInfo
from fallback_fuse.storage import Storage
from userland.errors import ConfigError

ROOT_INODE = 1
INFO_NAMES = ("hostname", "ip", "targetname", "vendor", "product", "version", "serial")


@dataclass(eq=False)
class Node:
    inode: int
    mode: int
    children: dict[str, int] = field(default_factory=dict)  # directories only
    storage: Storage | None = None  # a LUN's storage file
    content: bytes | None = None  # an info entry: its symlink target
    nlink: int = 0  # directory entries naming it (files; ops counts directories)

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    @property
    def size(self) -> int:
        if self.storage is not None:
            return self.storage.size
        return len(self.content) if self.content is not None else 0


def short_name(targetname: str) -> str:
    """The part of the IQN after its last colon (the whole name if it has none)."""
    return _safe(targetname.rpartition(":")[2] or targetname)


def _safe(name: str) -> str:
    """A single path component: no slash, not empty, not '.' or '..'."""
    name = name.replace("/", "_").replace("\0", "_")
    return "_" if name in ("", ".", "..") else name


class Tree:
    def __init__(self, targets: Sequence[TargetInfo], *, private: bool = False) -> None:
        """``private``: storage files 0600 (0400 read-only), for a mount others can enter."""
        self.nodes: dict[int, Node] = {ROOT_INODE: Node(ROOT_INODE, stat.S_IFDIR | 0o755)}
        self.storages: list[Storage] = []
        self.storage_paths: list[PurePosixPath] = []  # relative to the mount point
        self.created_ns = time.time_ns()
        self._rw_mode = 0o600 if private else 0o644
        for target in targets:
            self._add_target(target)

    def _add_target(self, target: TargetInfo) -> None:
        host = self._dir(ROOT_INODE, _safe(target.hostname))
        name = short_name(target.targetname)
        if name in self.nodes[host].children:
            raise ConfigError(f"two targets on {target.hostname} are both named {name!r} "
                              f"after their last colon ({target.targetname})")
        folder = self._dir(host, name)
        path = PurePosixPath(_safe(target.hostname), name)
        values = {"hostname": target.hostname, "ip": target.ip,
                  "targetname": target.targetname}
        if not target.luns:
            self._info_files(folder, values)
            return
        for index, lun in enumerate(target.luns):
            sub = f"lun{lun.lun}"
            if sub in self.nodes[folder].children:
                raise ConfigError(f"{target.targetname} lists LUN {lun.lun} twice")
            lun_dir = self._dir(folder, sub)
            storage = self._storage(lun_dir, lun)
            self._info_files(lun_dir, values | self._lun_values(lun))
            self.storage_paths.append(path / sub / "storage")
            if index == 0:
                self._link(folder, "storage", storage)
                self._info_files(folder, values | self._lun_values(lun))
                self.storage_paths.append(path / "storage")

    def add_lun(self, target: TargetInfo, lun: LunInfo) -> tuple[int, Node]:
        """A LUN found by a rescan: ``lun<N>/`` with its storage and info files under the
        target's folder (``<target>/storage`` stays the first LUN's). Returns the target
        folder's inode (its entries changed) and the new storage node."""
        host = self.nodes[ROOT_INODE].children[_safe(target.hostname)]
        folder = self.nodes[host].children[short_name(target.targetname)]
        sub = f"lun{lun.lun}"
        if sub in self.nodes[folder].children:
            raise ConfigError(f"{target.targetname} already shows LUN {lun.lun}")
        lun_dir = self._dir(folder, sub)
        storage = self._storage(lun_dir, lun)
        values = {"hostname": target.hostname, "ip": target.ip,
                  "targetname": target.targetname}
        self._info_files(lun_dir, values | self._lun_values(lun))
        self.storage_paths.append(PurePosixPath(_safe(target.hostname),
                                                short_name(target.targetname), sub, "storage"))
        return folder, storage

    def storage_node(self, device: object) -> Node | None:
        """The storage file serving ``device``."""
        for node in self.nodes.values():
            if node.storage is not None and node.storage.device is device:
                return node
        return None

    @staticmethod
    def _lun_values(lun: LunInfo) -> dict[str, str]:
        return {"vendor": lun.vendor, "product": lun.product, "version": lun.version,
                "serial": lun.serial}

    def _new(self, parent: int, name: str, mode: int, *, storage: Storage | None = None,
             content: bytes | None = None) -> Node:
        node = Node(len(self.nodes) + 1, mode, storage=storage, content=content)
        self.nodes[node.inode] = node
        self._link(parent, name, node)
        return node

    def _link(self, parent: int, name: str, node: Node) -> None:
        self.nodes[parent].children[name] = node.inode
        node.nlink += 1

    def _dir(self, parent: int, name: str) -> int:
        existing = self.nodes[parent].children.get(name)
        if existing is not None:
            return existing
        return self._new(parent, name, stat.S_IFDIR | 0o755).inode

    def _storage(self, folder: int, lun: LunInfo) -> Node:
        storage = Storage(lun.device)
        self.storages.append(storage)
        mode = self._rw_mode & ~0o222 if lun.device.read_only else self._rw_mode
        return self._new(folder, "storage", stat.S_IFREG | mode, storage=storage)

    def _info_files(self, folder: int, values: dict[str, str]) -> None:
        for name in INFO_NAMES:
            if name in values:
                # A symlink's target may not be empty: show an absent value as "-".
                content = (values[name] or "-").encode()
                self._new(folder, name, stat.S_IFLNK | 0o777, content=content)

    def directory_count(self, node: Node) -> int:
        """Subdirectories of a directory, for its link count."""
        return sum(self.nodes[child].is_dir for child in node.children.values())
