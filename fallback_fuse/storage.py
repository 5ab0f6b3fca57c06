"""Byte-range reads and writes on a block device: any offset, any length.

A write that covers part of a block reads that block, patches it and writes it back,
holding an exclusive lock on its block range throughout, so two writers sharing a
block never lose each other's bytes. Reads hold a shared lock: they never see half of
a write. Requests go to the device in pieces of at most its maximum transfer.
A read past the end is short; a write that does not fit fails whole with ENOSPC (a
short write would be honest too, but the kernel turns a short O_DIRECT write on FUSE
into EIO).
"""

from __future__ import annotations

import errno

from fallback_fuse.device import BlockDevice, Buffer
from fallback_fuse.rangelock import RangeLock

DEFAULT_MAX_TRANSFER = 1 << 20  # what FUSE sends at most in one request anyway
UNMAP_CHUNK = 64 << 20  # bounds one unmap call (and a memory device's zero buffer)


class Storage:
    def __init__(self, device: BlockDevice, *, max_transfer: int | None = None) -> None:
        self.device = device
        self.block_size = device.block_size
        self.size = device.num_blocks * device.block_size
        # userland.lun.Lun states the target's limit (VPD Block Limits) this way.
        limit = max_transfer or getattr(device, "max_transfer_bytes", 0) or DEFAULT_MAX_TRANSFER
        self.chunk_blocks = max(1, limit // self.block_size)
        self.dirty = False  # written since the last synchronize_cache
        self._locks = RangeLock()

    def resize(self) -> int:
        """Take the device's size again (after a rescan read a new capacity)."""
        self.size = self.device.num_blocks * self.device.block_size
        return self.size

    @property
    def read_only(self) -> bool:
        return self.device.read_only

    def _blocks(self, offset: int, size: int) -> tuple[int, int]:
        """The block range [first, end) that bytes [offset, offset + size) touch."""
        bs = self.block_size
        return offset // bs, -(-(offset + size) // bs)

    async def read(self, offset: int, size: int) -> Buffer:
        if offset < 0 or size < 0:
            raise OSError(errno.EINVAL, "negative offset or size")
        size = min(size, self.size - offset)
        if size <= 0:
            return b""
        first, end = self._blocks(offset, size)
        async with self._locks.hold(first, end, exclusive=False):
            data = await self._read_blocks(first, end - first)
        skip = offset - first * self.block_size
        if skip == 0 and len(data) == size:
            return data  # aligned: no copy
        return memoryview(data)[skip:skip + size]

    async def write(self, offset: int, data: Buffer) -> int:
        """Write ``data`` at ``offset``; returns how many bytes were written."""
        self._check_writable(offset)
        if not data:
            return 0
        if offset + len(data) > self.size:
            raise OSError(errno.ENOSPC, "write past the end of the LUN")
        first, end = self._blocks(offset, len(data))
        async with self._locks.hold(first, end, exclusive=True):
            await self._patch(offset, data)
        return len(data)

    async def punch_hole(self, offset: int, length: int) -> None:
        """Make [offset, offset + length) read back as zeros, unmapping whole blocks.

        Partial blocks at either end are zeroed by writing; the whole blocks between
        are unmapped, which needs a device whose unmapped blocks read back as zeros.
        """
        self._check_writable(offset)
        if not self.device.supports_unmap:
            raise OSError(errno.EOPNOTSUPP, "the LUN does not support UNMAP")
        stop = min(offset + max(length, 0), self.size)
        if offset >= stop:
            return
        bs = self.block_size
        first, end = self._blocks(offset, stop - offset)
        full_first, full_end = -(-offset // bs), stop // bs
        async with self._locks.hold(first, end, exclusive=True):
            if full_first >= full_end:  # no whole block inside: just zeros
                await self._patch(offset, bytes(stop - offset))
                return
            if offset < full_first * bs:
                await self._patch(offset, bytes(full_first * bs - offset))
            if stop > full_end * bs:
                await self._patch(full_end * bs, bytes(stop - full_end * bs))
            step = max(1, UNMAP_CHUNK // bs)
            for lba in range(full_first, full_end, step):
                await self.device.unmap(lba, min(step, full_end - lba))
            self.dirty = True

    async def sync(self) -> None:
        """SYNCHRONIZE CACHE: what the target acknowledged reaches its media."""
        self.dirty = False  # a write landing during the sync sets it again
        try:
            await self.device.synchronize_cache()
        except BaseException:
            self.dirty = True
            raise

    def _check_writable(self, offset: int) -> None:
        if self.read_only:
            raise OSError(errno.EROFS, "read-only LUN")
        if offset < 0:
            raise OSError(errno.EINVAL, "negative offset")

    async def _patch(self, offset: int, data: Buffer) -> None:
        """Write bytes at any offset; the caller holds the exclusive lock on its blocks."""
        bs = self.block_size
        first, end = self._blocks(offset, len(data))
        head = offset - first * bs
        tail = end * bs - (offset + len(data))
        if head or tail:
            # Partial blocks at either end: read them, patch, write the whole span once.
            span = bytearray((end - first) * bs)
            if head:
                span[:bs] = await self._read_blocks(first, 1)
            if tail and not (head and end - first == 1):
                span[-bs:] = await self._read_blocks(end - 1, 1)
            span[head:head + len(data)] = data
            data = span
        await self._write_blocks(first, data)
        self.dirty = True

    async def _read_blocks(self, lba: int, count: int) -> Buffer:
        step = self.chunk_blocks
        if count <= step:
            return self._checked(await self.device.read_blocks(lba, count), count)
        out = bytearray(count * self.block_size)
        for start in range(lba, lba + count, step):
            n = min(step, lba + count - start)
            at = (start - lba) * self.block_size
            out[at:at + n * self.block_size] = self._checked(
                await self.device.read_blocks(start, n), n)
        return out

    async def _write_blocks(self, lba: int, data: Buffer) -> None:
        view = memoryview(data)
        piece = self.chunk_blocks * self.block_size
        for at in range(0, len(view), piece):
            await self.device.write_blocks(lba + at // self.block_size, view[at:at + piece])

    def _checked(self, data: Buffer, count: int) -> Buffer:
        if len(data) != count * self.block_size:
            raise OSError(errno.EIO, f"device returned {len(data)} bytes for {count} blocks")
        return data
