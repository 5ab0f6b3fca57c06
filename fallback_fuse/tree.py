"""The FUSE tree's layout: MOUNT/<host>/<target>/{storage, info links, lunN/}.

Info entries are symbolic links whose target is the value (`ls -l` shows
`vendor -> IET`), as the NetBSD userland initiator showed them.
"""

from __future__ import annotations

import stat
from dataclasses import dataclass, field

from fallback_fuse.device import LunEntry, TargetEntry
from fallback_fuse.storage import Storage

ROOT_INODE = 1


@dataclass
class Node:
    inode: int
    name: str
    mode: int
    parent: int
    children: dict[str, int] = field(default_factory=dict)
    link: str | None = None  # symlink target
    storage: Storage | None = None
    read_only: bool = False

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)


def short_name(targetname: str) -> str:
    """The part of the IQN after its last colon (the whole name if it has none)."""
    return targetname.rpartition(":")[2] or targetname


class Tree:
    def __init__(self, targets: list[TargetEntry]) -> None:
        self.nodes: dict[int, Node] = {}
        self.storages: list[Storage] = []
        self._add(Node(ROOT_INODE, "", stat.S_IFDIR | 0o755, ROOT_INODE))
        for target in targets:
            host = self._dir(ROOT_INODE, target.hostname)
            folder = self._dir(host, short_name(target.targetname))
            if target.luns:
                self._lun_files(folder, target, target.luns[0])
            else:
                self._info_links(folder, target, None)
            for lun in target.luns:
                self._lun_files(self._dir(folder, f"lun{lun.number}"), target, lun)

    def _add(self, node: Node) -> int:
        self.nodes[node.inode] = node
        if node.inode != ROOT_INODE:
            self.nodes[node.parent].children[node.name] = node.inode
        return node.inode

    def _dir(self, parent: int, name: str) -> int:
        existing = self.nodes[parent].children.get(name)
        if existing is not None:
            return existing
        return self._add(Node(len(self.nodes) + 1, name, stat.S_IFDIR | 0o755, parent))

    def _lun_files(self, folder: int, target: TargetEntry, lun: LunEntry) -> None:
        storage = Storage(lun.device)
        self.storages.append(storage)
        ro = lun.device.read_only
        self._add(Node(len(self.nodes) + 1, "storage", stat.S_IFREG | (0o444 if ro else 0o644),
                       folder, storage=storage, read_only=ro))
        self._info_links(folder, target, lun)

    def _info_links(self, folder: int, target: TargetEntry, lun: LunEntry | None) -> None:
        values = {"hostname": target.hostname, "ip": target.ip,
                  "targetname": target.targetname}
        if lun is not None:
            values |= {"vendor": lun.vendor, "product": lun.product,
                       "version": lun.version, "serial": lun.serial}
        for name, value in values.items():
            self._add(Node(len(self.nodes) + 1, name, stat.S_IFLNK | 0o777, folder,
                           link=value or "-"))
