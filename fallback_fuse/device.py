"""What the FUSE tree needs from a LUN, and an in-memory LUN for tests and benchmarks.

``userland.lun.Lun`` has the shape of ``BlockDevice``; the tree never imports the
protocol's classes. A device reports failures as ``OSError`` or
``userland.errors.ScsiError`` (whose ``errno_value`` says EROFS, EIO, ENOSPC, ...).
"""

from __future__ import annotations

import errno
import mmap
from dataclasses import dataclass, field
from typing import Protocol

import trio

Buffer = bytes | bytearray | memoryview


class BlockDevice(Protocol):
    """A LUN as whole blocks. Every method may be awaited concurrently with the others.

    A device may also have ``max_transfer_bytes`` (the target's Block Limits);
    ``Storage`` then never asks it for more than that in one call.
    """

    block_size: int
    num_blocks: int
    read_only: bool
    supports_unmap: bool  # and unmapped blocks read back as zeros (punch-hole semantics)

    async def read_blocks(self, lba: int, count: int) -> Buffer: ...

    async def write_blocks(self, lba: int, data: Buffer) -> None: ...

    async def synchronize_cache(self) -> None: ...

    async def unmap(self, lba: int, count: int) -> None: ...


@dataclass
class LunInfo:
    """One disk LUN as the tree shows it: ``lun<lun>/storage`` and its info files."""

    lun: int
    device: BlockDevice
    vendor: str = ""
    product: str = ""
    version: str = ""
    serial: str = ""

    @property
    def number(self) -> int:  # the name iscsi_handoff.fuse_path uses
        return self.lun


@dataclass
class TargetInfo:
    """One target: its folder is MOUNT/<hostname>/<the IQN after its last colon>."""

    hostname: str
    ip: str
    targetname: str
    luns: list[LunInfo] = field(default_factory=list)


# The first names of these classes, still used by iscsi_handoff.fuse_path.
LunEntry = LunInfo
TargetEntry = TargetInfo


class MemoryBlockDevice:
    """A LUN held in memory (a bytearray, or a shared mmap a test can read from outside).

    Each call yields to trio once (or sleeps ``latency`` seconds), as a real device
    would, so concurrent requests really interleave.
    """

    def __init__(self, size: int, *, block_size: int = 512, read_only: bool = False,
                 supports_unmap: bool = True, latency: float = 0.0,
                 buffer: bytearray | mmap.mmap | None = None) -> None:
        if size <= 0 or size % block_size:
            raise ValueError("size must be a positive multiple of the block size")
        if buffer is not None and len(buffer) != size:
            raise ValueError("buffer length must equal size")
        self.block_size = block_size
        self.num_blocks = size // block_size
        self.read_only = read_only
        self.supports_unmap = supports_unmap
        self.latency = latency
        self.data = buffer if buffer is not None else bytearray(size)
        self.syncs = 0
        self.unmaps = 0

    def _span(self, lba: int, count: int) -> slice:
        if lba < 0 or count < 0 or lba + count > self.num_blocks:
            raise OSError(errno.ENOSPC, f"blocks {lba}+{count} beyond the end of the device")
        return slice(lba * self.block_size, (lba + count) * self.block_size)

    async def _delay(self) -> None:
        if self.latency:
            await trio.sleep(self.latency)
        else:
            await trio.lowlevel.checkpoint()

    async def read_blocks(self, lba: int, count: int) -> Buffer:
        span = self._span(lba, count)
        await self._delay()
        return self.data[span]  # a copy: bytearray and mmap slices are new objects

    async def write_blocks(self, lba: int, data: Buffer) -> None:
        if len(data) % self.block_size:
            raise ValueError("write_blocks needs whole blocks")
        span = self._span(lba, len(data) // self.block_size)
        if self.read_only:
            raise OSError(errno.EROFS, "read-only device")
        await self._delay()
        # Through a memoryview: slice-assigning a buffer to a bytearray copies it twice.
        memoryview(self.data)[span] = data

    async def synchronize_cache(self) -> None:
        await self._delay()
        self.syncs += 1

    async def unmap(self, lba: int, count: int) -> None:
        span = self._span(lba, count)
        if self.read_only:
            raise OSError(errno.EROFS, "read-only device")
        if not self.supports_unmap:
            raise OSError(errno.EOPNOTSUPP, "this device does not unmap")
        await self._delay()
        self.data[span] = bytes(span.stop - span.start)
        self.unmaps += 1
