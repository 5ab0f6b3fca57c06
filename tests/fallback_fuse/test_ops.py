"""The tree's layout and the FUSE operations, called directly (no kernel involved)."""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pyfuse3
import pytest
import trio

from fallback_fuse.device import Buffer, LunEntry, LunInfo, MemoryBlockDevice, TargetInfo
from fallback_fuse.errors import errno_of
from fallback_fuse.ops import FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, Operations
from fallback_fuse.tree import ROOT_INODE, Node, Tree, short_name
from userland.errors import ConfigError, ScsiError, SessionFailed

T = TypeVar("T")
CTX = pyfuse3.RequestContext()
IQN = "iqn.2024-01.org.example:multi"


def run(fn: Callable[..., Awaitable[T]], *args: Any) -> T:
    return trio.run(fn, *args)


def lun(n: int, device: Any, serial: str = "") -> LunInfo:
    return LunInfo(n, device, "VENDOR", "PRODUCT", "0001", serial or f"sn{n}")


def sample_tree(**kw: Any) -> Tree:
    return Tree([
        TargetInfo("portal.example", "192.0.2.7", IQN,
                   [lun(1, MemoryBlockDevice(8192)),
                    lun(2, MemoryBlockDevice(4096, read_only=True)),
                    lun(5, MemoryBlockDevice(1 << 16, block_size=4096))]),
        TargetInfo("portal.example", "192.0.2.7", "iqn.2024-01.org.example:other", []),
        TargetInfo("10.0.0.9", "10.0.0.9", "no-colon-name", [lun(0, MemoryBlockDevice(512))]),
    ], **kw)


def walk(tree: Tree, *names: str) -> Node:
    node = tree.nodes[ROOT_INODE]
    for name in names:
        node = tree.nodes[node.children[name]]
    return node


def test_layout_info_files_and_the_first_lun_linked_as_storage() -> None:
    tree = sample_tree()
    assert sorted(walk(tree).children) == ["10.0.0.9", "portal.example"]
    assert sorted(walk(tree, "portal.example").children) == ["multi", "other"]
    folder = walk(tree, "portal.example", "multi")
    assert sorted(folder.children) == ["hostname", "ip", "lun1", "lun2", "lun5", "product",
                                       "serial", "storage", "targetname", "vendor",
                                       "version"]
    assert sorted(walk(tree, "portal.example", "other").children) == \
        ["hostname", "ip", "targetname"]
    for path, text in [(("targetname",), IQN), (("ip",), "192.0.2.7"),
                       (("hostname",), "portal.example"), (("serial",), "sn1"),
                       (("lun2", "serial"), "sn2"), (("lun5", "vendor"), "VENDOR")]:
        node = walk(tree, "portal.example", "multi", *path)
        assert node.content == text.encode() and node.mode == stat.S_IFLNK | 0o777
    top, first = walk(tree, "portal.example", "multi", "storage"), \
        walk(tree, "portal.example", "multi", "lun1", "storage")
    assert top is first and top.nlink == 2 and top.size == 8192
    assert walk(tree, "portal.example", "multi", "lun1", "storage").mode & 0o777 == 0o644
    assert walk(tree, "portal.example", "multi", "lun2", "storage").mode & 0o777 == 0o444
    assert walk(tree, "10.0.0.9", "no-colon-name", "lun0", "storage").size == 512
    assert len(tree.storages) == 4
    assert [str(p) for p in tree.storage_paths][:2] == \
        ["portal.example/multi/lun1/storage", "portal.example/multi/storage"]


def test_a_tree_others_may_enter_keeps_the_disks_to_their_owner() -> None:
    tree = sample_tree(private=True)
    assert walk(tree, "portal.example", "multi", "storage").mode & 0o777 == 0o600
    assert walk(tree, "portal.example", "multi", "lun2", "storage").mode & 0o777 == 0o400


def test_names_and_collisions() -> None:
    assert short_name("iqn.2001-04.com.example:storage.disk2") == "storage.disk2"
    assert short_name("eui.02004567A425678D") == "eui.02004567A425678D"
    assert short_name("iqn.x:") == "iqn.x:"
    assert short_name("iqn.x:..") == "_"
    with pytest.raises(ConfigError, match="both named 'disk'"):
        Tree([TargetInfo("h", "h", "iqn.a:disk", []), TargetInfo("h", "h", "iqn.b:disk", [])])
    with pytest.raises(ConfigError, match="twice"):
        Tree([TargetInfo("h", "h", "iqn.a:disk", [lun(1, MemoryBlockDevice(512))] * 2)])
    Tree([TargetInfo("h1", "h1", "iqn.a:disk", []), TargetInfo("h2", "h2", "iqn.b:disk", [])])


def test_the_first_names_still_work() -> None:
    entry = LunEntry(3, MemoryBlockDevice(512), "V", "P", "R", "S")
    assert entry.number == entry.lun == 3


def fuse_errno(awaitable: Awaitable[Any]) -> int:
    async def call() -> None:
        await awaitable

    with pytest.raises(pyfuse3.FUSEError) as info:
        trio.run(call)
    return info.value.errno


def test_open_rules() -> None:
    tree = sample_tree()
    ops = Operations(tree)
    multi = walk(tree, "portal.example", "multi")
    ro = walk(tree, "portal.example", "multi", "lun2", "storage").inode
    assert fuse_errno(ops.open(ro, os.O_RDWR, CTX)) == errno.EROFS
    assert fuse_errno(ops.open(multi.children["vendor"], os.O_RDONLY, CTX)) == errno.ELOOP
    assert fuse_errno(ops.open(multi.inode, os.O_RDONLY, CTX)) == errno.EISDIR
    assert fuse_errno(ops.lookup(multi.inode, b"nothing", CTX)) == errno.ENOENT
    info = run(ops.open, multi.children["storage"], os.O_RDWR | os.O_TRUNC, CTX)
    assert info.direct_io and not info.keep_cache and ops.open_storage == 1
    run(ops.release, info.fh)
    assert ops.open_storage == 0
    cached = Operations(tree, direct_io=False)
    assert not run(cached.open, multi.children["storage"], os.O_RDONLY, CTX).direct_io
    info = run(ops.open, ro, os.O_RDONLY, CTX)
    assert run(ops.readlink, multi.children["targetname"], CTX) == IQN.encode()
    assert fuse_errno(ops.readlink(multi.inode, CTX)) == errno.EINVAL


def test_attributes() -> None:
    tree = sample_tree()
    ops = Operations(tree)
    multi = walk(tree, "portal.example", "multi")
    attr = run(ops.lookup, multi.inode, b"lun5", CTX)
    assert stat.S_ISDIR(attr.st_mode) and attr.st_nlink == 2
    attr = run(ops.getattr, multi.children["storage"], CTX)
    assert (attr.st_size, attr.st_nlink, attr.st_uid) == (8192, 2, os.getuid())
    assert run(ops.getattr, multi.inode, CTX).st_nlink == 2 + 3


class FailingDevice(MemoryBlockDevice):
    def __init__(self, error: Exception) -> None:
        super().__init__(4096)
        self.error = error

    async def read_blocks(self, lba: int, count: int) -> Buffer:
        raise self.error

    async def write_blocks(self, lba: int, data: Buffer) -> None:
        raise self.error

    async def synchronize_cache(self) -> None:
        raise self.error


@pytest.mark.parametrize(("error", "code"), [
    (ScsiError("MEDIUM ERROR", errno_value=errno.EIO), errno.EIO),
    (ScsiError("DATA PROTECT", errno_value=errno.EROFS), errno.EROFS),
    (ScsiError("LBA OUT OF RANGE", errno_value=errno.EINVAL), errno.EINVAL),
    (OSError(errno.ENOSPC, "space"), errno.ENOSPC),
    (SessionFailed("gone"), errno.EIO),
    (RuntimeError("a bug"), errno.EIO),
])
def test_device_errors_become_fuse_errors(error: Exception, code: int) -> None:
    assert errno_of(error) == code
    ops = Operations(Tree([TargetInfo("h", "h", "iqn.x:t", [lun(1, FailingDevice(error))])]))
    inode = walk(ops.tree, "h", "t", "storage").inode
    assert fuse_errno(ops.read(inode, 0, 10)) == code
    assert fuse_errno(ops.write(inode, 3, b"abc")) == code
    assert fuse_errno(ops.fsync(inode, False)) == code


def test_fsync_is_synchronize_cache() -> None:
    device = MemoryBlockDevice(4096)
    ops = Operations(Tree([TargetInfo("h", "h", "iqn.x:t", [lun(1, device)])]))
    inode = walk(ops.tree, "h", "t", "storage").inode
    assert run(ops.write, inode, 10, b"abc") == 3
    run(ops.fsync, inode, True)
    assert device.syncs == 1 and bytes(device.data[10:13]) == b"abc"


def test_fallocate_punches_holes_only() -> None:
    device = MemoryBlockDevice(4096)
    device.data[:] = b"\x55" * 4096
    plain = MemoryBlockDevice(4096, supports_unmap=False)
    ops = Operations(Tree([TargetInfo("h", "h", "iqn.x:t", [lun(1, device), lun(2, plain)])]))
    inode = walk(ops.tree, "h", "t", "lun1", "storage").inode
    punch = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
    run(ops.fallocate, inode, punch, 1000, 2000)
    assert bytes(device.data) == b"\x55" * 1000 + bytes(2000) + b"\x55" * 1096
    assert device.unmaps == 1
    assert fuse_errno(ops.fallocate(inode, 0, 0, 4096)) == errno.EOPNOTSUPP
    assert fuse_errno(ops.fallocate(inode, FALLOC_FL_KEEP_SIZE, 0, 512)) == errno.EOPNOTSUPP
    other = walk(ops.tree, "h", "t", "lun2", "storage").inode
    assert fuse_errno(ops.fallocate(other, punch, 0, 512)) == errno.EOPNOTSUPP


def test_a_rescan_adds_a_lun_folder_and_resizes_a_storage_file() -> None:
    first = lun(1, MemoryBlockDevice(8192))
    target = TargetInfo("portal.example", "192.0.2.7", IQN, [first])
    tree = Tree([target])
    ops = Operations(tree)

    async def main() -> None:
        host = await ops.lookup(ROOT_INODE, b"portal.example", CTX)
        folder = await ops.lookup(host.st_ino, b"multi", CTX)
        assert folder.st_nlink == 3  # itself, its parent's entry, lun1
        added = lun(7, MemoryBlockDevice(4096))
        folder_inode, node = tree.add_lun(target, added)
        assert folder_inode == folder.st_ino
        assert (await ops.getattr(folder.st_ino, CTX)).st_nlink == 4
        lun7 = await ops.lookup(folder.st_ino, b"lun7", CTX)
        storage = await ops.lookup(lun7.st_ino, b"storage", CTX)
        assert storage.st_ino == node.inode and storage.st_size == 4096
        serial = await ops.lookup(lun7.st_ino, b"serial", CTX)
        assert await ops.readlink(serial.st_ino, CTX) == b"sn7"
        assert str(tree.storage_paths[-1]) == "portal.example/multi/lun7/storage"
        # <target>/storage stays the first LUN's.
        top = await ops.lookup(folder.st_ino, b"storage", CTX)
        assert top.st_size == 8192
        # The device grew: the storage file takes the new size when told.
        device = first.device
        assert isinstance(device, MemoryBlockDevice)
        device.num_blocks *= 2
        found = tree.storage_node(device)
        assert found is not None and found.storage is not None
        assert found.storage.resize() == 16384
        assert (await ops.getattr(top.st_ino, CTX)).st_size == 16384
        with pytest.raises(ConfigError, match="already shows LUN 7"):
            tree.add_lun(target, lun(7, MemoryBlockDevice(4096)))

    run(main)
