"""Byte-range reads and writes on a block device: any offset, any length.

A write that covers part of a block reads the block, patches it and writes it back.
Every write holds a lock on its block range for its whole duration, so two writers
touching one block never lose each other's bytes (a read-modify-write racing a plain
write would otherwise write stale bytes back).
"""

from __future__ import annotations

import errno

import trio

from fallback_fuse.device import BlockDevice, Buffer


class RangeLock:
    """Exclusive locks on [start, end) block ranges; disjoint ranges do not wait."""

    def __init__(self) -> None:
        self._held: list[tuple[int, int, trio.Event]] = []

    async def acquire(self, start: int, end: int) -> trio.Event:
        while True:
            for s, e, done in self._held:
                if s < end and start < e:
                    await done.wait()
                    break
            else:
                mine = trio.Event()
                self._held.append((start, end, mine))
                return mine

    def release(self, token: trio.Event) -> None:
        self._held = [h for h in self._held if h[2] is not token]
        token.set()


class Storage:
    def __init__(self, device: BlockDevice) -> None:
        self.device = device
        self.block_size = device.block_size
        self.size = device.num_blocks * device.block_size
        self._locks = RangeLock()

    async def read(self, offset: int, size: int) -> Buffer:
        if offset >= self.size or size <= 0:
            return b""
        size = min(size, self.size - offset)
        bs = self.block_size
        first, last = offset // bs, (offset + size - 1) // bs
        data = await self.device.read_blocks(first, last - first + 1)
        skip = offset - first * bs
        if skip == 0 and len(data) == size:
            return data  # aligned: no copy
        return memoryview(data)[skip:skip + size]

    async def write(self, offset: int, buf: Buffer) -> int:
        if self.device.read_only:
            raise OSError(errno.EROFS, "read-only LUN")
        size = len(buf)
        if size == 0:
            return 0
        if offset + size > self.size:
            raise OSError(errno.ENOSPC, "write beyond the end of the LUN")
        bs = self.block_size
        first, last = offset // bs, (offset + size - 1) // bs
        token = await self._locks.acquire(first, last + 1)
        try:
            head = offset - first * bs
            if head == 0 and size % bs == 0:
                await self.device.write_blocks(first, buf)
                return size
            # Partial blocks at either end: read them, patch, write the whole span.
            span = bytearray((last - first + 1) * bs)
            span[:bs] = await self.device.read_blocks(first, 1)
            if last != first and (offset + size) % bs:
                span[-bs:] = await self.device.read_blocks(last, 1)
            span[head:head + size] = buf
            await self.device.write_blocks(first, span)
            return size
        finally:
            self._locks.release(token)

    async def flush(self) -> None:
        await self.device.synchronize_cache()
