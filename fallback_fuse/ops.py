"""pyfuse3 operations over the tree: lookups, attributes, storage I/O, links."""

from __future__ import annotations

import errno
import logging
import os
import time
from typing import Any

import pyfuse3

from fallback_fuse.tree import Node, Tree

log = logging.getLogger("iscsi_handoff.fuse")


def _errno_of(exc: BaseException) -> int:
    """OSError and ScsiError (errno_value) carry their errno; anything else is EIO."""
    value = getattr(exc, "errno_value", None) or getattr(exc, "errno", None)
    return value if isinstance(value, int) and value > 0 else errno.EIO


class Operations(pyfuse3.Operations):
    def __init__(self, tree: Tree) -> None:
        super().__init__()
        self.tree = tree
        self.started = time.time_ns()
        self.uid, self.gid = os.getuid(), os.getgid()

    def _node(self, inode: int) -> Node:
        node = self.tree.nodes.get(inode)
        if node is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return node

    def _attr(self, node: Node) -> pyfuse3.EntryAttributes:
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = node.inode
        attr.st_mode = node.mode
        attr.st_nlink = 2 + sum(self.tree.nodes[c].is_dir for c in node.children.values()) \
            if node.is_dir else 1
        attr.st_uid, attr.st_gid = self.uid, self.gid
        if node.storage is not None:
            attr.st_size = node.storage.size
            attr.st_blksize = node.storage.block_size
        elif node.link is not None:
            attr.st_size = len(node.link.encode())
        attr.st_blocks = (attr.st_size + 511) // 512
        attr.st_atime_ns = attr.st_mtime_ns = attr.st_ctime_ns = self.started
        attr.entry_timeout = attr.attr_timeout = 60.0
        return attr

    async def getattr(self, inode: int, ctx: Any = None) -> pyfuse3.EntryAttributes:
        return self._attr(self._node(inode))

    async def lookup(self, parent_inode: int, name: bytes,
                     ctx: Any = None) -> pyfuse3.EntryAttributes:
        parent = self._node(parent_inode)
        text = os.fsdecode(name)
        if text == ".":
            return self._attr(parent)
        if text == "..":
            return self._attr(self._node(parent.parent))
        child = parent.children.get(text)
        if child is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attr(self.tree.nodes[child])

    async def opendir(self, inode: int, ctx: Any) -> int:
        if not self._node(inode).is_dir:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inode

    async def readdir(self, fh: int, start_id: int, token: Any) -> None:
        entries = sorted(self._node(fh).children.items())
        for index, (name, inode) in enumerate(entries[start_id:], start=start_id + 1):
            if not pyfuse3.readdir_reply(token, os.fsencode(name),
                                         self._attr(self.tree.nodes[inode]), index):
                break

    async def readlink(self, inode: int, ctx: Any) -> bytes:
        node = self._node(inode)
        if node.link is None:
            raise pyfuse3.FUSEError(errno.EINVAL)
        return os.fsencode(node.link)

    async def open(self, inode: int, flags: int, ctx: Any) -> pyfuse3.FileInfo:
        node = self._node(inode)
        if node.storage is None:
            raise pyfuse3.FUSEError(errno.EISDIR if node.is_dir else errno.EINVAL)
        if node.read_only and flags & os.O_ACCMODE != os.O_RDONLY:
            raise pyfuse3.FUSEError(errno.EROFS)
        # direct_io: the page cache never holds bytes the target has not acknowledged,
        # and never serves bytes the target no longer has.
        return pyfuse3.FileInfo(fh=inode, direct_io=True, keep_cache=False)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        storage = self._node(fh).storage
        assert storage is not None
        try:
            return bytes(await storage.read(off, size))
        except Exception as exc:
            log.warning("read of %d bytes at %d failed: %s", size, off, exc)
            raise pyfuse3.FUSEError(_errno_of(exc)) from None

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        node = self._node(fh)
        if node.storage is None or node.read_only:
            raise pyfuse3.FUSEError(errno.EROFS)
        try:
            return await node.storage.write(off, buf)
        except Exception as exc:
            log.warning("write of %d bytes at %d failed: %s", len(buf), off, exc)
            raise pyfuse3.FUSEError(_errno_of(exc)) from None

    async def fsync(self, fh: int, datasync: bool) -> None:
        storage = self._node(fh).storage
        if storage is None:
            return
        try:
            await storage.flush()
        except Exception as exc:
            raise pyfuse3.FUSEError(_errno_of(exc)) from None

    async def flush(self, fh: int) -> None:
        return None  # close(2) flushes nothing: data is already on the target

    async def release(self, fh: int) -> None:
        return None

    async def statfs(self, ctx: Any) -> pyfuse3.StatvfsData:
        st = pyfuse3.StatvfsData()
        st.f_bsize = st.f_frsize = 512
        st.f_blocks = sum(s.size for s in self.tree.storages) // 512
        st.f_bfree = st.f_bavail = 0
        st.f_files = len(self.tree.nodes)
        st.f_ffree = st.f_favail = 0
        st.f_namemax = 255
        return st

