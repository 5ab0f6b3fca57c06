"""What the FUSE tree needs from a LUN, and an in-memory one for tests and benchmarks.

``userland.lun.Lun`` has this shape; the tree never imports the protocol's classes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

Buffer = bytes | bytearray | memoryview


class BlockDevice(Protocol):
    block_size: int
    num_blocks: int
    read_only: bool
    supports_unmap: bool

    async def read_blocks(self, lba: int, count: int) -> Buffer: ...

    async def write_blocks(self, lba: int, data: Buffer) -> None: ...

    async def synchronize_cache(self) -> None: ...

    async def unmap(self, lba: int, count: int) -> None: ...


@dataclass
class LunEntry:
    """One disk LUN as the tree shows it."""

    number: int
    device: BlockDevice
    vendor: str = ""
    product: str = ""
    version: str = ""
    serial: str = ""


@dataclass
class TargetEntry:
    """One target: its folder is MOUNT/<hostname>/<name after the IQN's last colon>."""

    hostname: str
    ip: str
    targetname: str
    luns: list[LunEntry] = field(default_factory=list)


class MemoryBlockDevice:
    """A LUN held in memory: the FUSE ceiling in benchmarks, a stand-in in tests."""

    def __init__(self, size: int, *, block_size: int = 512, read_only: bool = False) -> None:
        if size % block_size:
            raise ValueError("size must be a multiple of the block size")
        self.block_size = block_size
        self.num_blocks = size // block_size
        self.read_only = read_only
        self.supports_unmap = True
        self.data = bytearray(size)
        self.syncs = 0

    def _span(self, lba: int, count: int) -> slice:
        if lba < 0 or count < 0 or lba + count > self.num_blocks:
            raise OSError(28, "blocks beyond the end of the device")
        return slice(lba * self.block_size, (lba + count) * self.block_size)

    async def read_blocks(self, lba: int, count: int) -> Buffer:
        return bytes(self.data[self._span(lba, count)])

    async def write_blocks(self, lba: int, data: Buffer) -> None:
        if self.read_only:
            raise OSError(30, "read-only device")
        self.data[self._span(lba, len(data) // self.block_size)] = data

    async def synchronize_cache(self) -> None:
        self.syncs += 1

    async def unmap(self, lba: int, count: int) -> None:
        span = self._span(lba, count)
        self.data[span] = bytes(span.stop - span.start)
