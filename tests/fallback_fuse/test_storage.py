"""Byte-range I/O and the block-range lock on memory devices, without FUSE."""

from __future__ import annotations

import contextlib
import errno
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from fallback_fuse.device import Buffer, MemoryBlockDevice
from fallback_fuse.rangelock import RangeLock
from fallback_fuse.storage import Storage
from userland.errors import ScsiError

T = TypeVar("T")


def run(fn: Callable[..., Awaitable[T]], *args: Any) -> T:
    return trio.run(fn, *args)


class RecordingDevice(MemoryBlockDevice):
    """Remembers every call, to check how requests reach the device."""

    def __init__(self, size: int, **kw: Any) -> None:
        super().__init__(size, **kw)
        self.calls: list[tuple[str, int, int]] = []

    async def read_blocks(self, lba: int, count: int) -> Buffer:
        self.calls.append(("read", lba, count))
        return await super().read_blocks(lba, count)

    async def write_blocks(self, lba: int, data: Buffer) -> None:
        self.calls.append(("write", lba, len(data) // self.block_size))
        await super().write_blocks(lba, data)

    async def unmap(self, lba: int, count: int) -> None:
        self.calls.append(("unmap", lba, count))
        await super().unmap(lba, count)


io_ops = st.lists(st.tuples(st.booleans(), st.integers(0, 1100), st.integers(0, 300)),
                  max_size=30)


@settings(max_examples=150, deadline=None)
@given(block_size=st.sampled_from([1, 16, 512]), ops=io_ops)
def test_any_offset_and_length_matches_a_model(block_size: int,
                                               ops: list[tuple[bool, int, int]]) -> None:
    size = 1024
    device = MemoryBlockDevice(size, block_size=block_size)
    storage = Storage(device)
    model = bytearray(size)
    rng = random.Random(len(ops))

    async def check() -> None:
        for is_write, offset, length in ops:
            if is_write:
                data = rng.randbytes(length)
                if length and offset + length > size:
                    with pytest.raises(OSError) as info:
                        await storage.write(offset, data)
                    assert info.value.errno == errno.ENOSPC
                    continue
                assert await storage.write(offset, data) == length
                model[offset:offset + length] = data
            else:
                assert bytes(await storage.read(offset, length)) == \
                    model[offset:offset + length]
        assert device.data == model

    run(check)


def test_reads_past_the_end_are_short_and_writes_past_it_fail_whole() -> None:
    device = MemoryBlockDevice(4096)
    storage = Storage(device)

    async def check() -> None:
        assert len(await storage.read(4000, 500)) == 96
        assert await storage.read(4096, 10) == b""
        assert await storage.write(4090, b"x" * 6) == 6
        for offset in (4090, 4096, 5000):
            with pytest.raises(OSError) as info:
                await storage.write(offset, b"y" * 7)
            assert info.value.errno == errno.ENOSPC
        assert device.data[4090:] == b"x" * 6

    run(check)


def test_a_read_only_device_refuses_writes_and_holes_with_erofs() -> None:
    storage = Storage(MemoryBlockDevice(4096, read_only=True))

    async def check() -> None:
        for attempt in (storage.write(0, b"x"), storage.punch_hole(0, 512)):
            with pytest.raises(OSError) as info:
                await attempt
            assert info.value.errno == errno.EROFS

    run(check)


def test_requests_are_split_at_the_max_transfer() -> None:
    device = RecordingDevice(1 << 20)
    storage = Storage(device, max_transfer=64 << 10)  # 128 blocks

    async def check() -> None:
        data = random.Random(1).randbytes(300 << 10)
        assert await storage.write(1000, data) == len(data)
        assert bytes(await storage.read(1000, len(data))) == data

    run(check)
    assert max(count for _, _, count in device.calls) <= 128
    writes = [c for c in device.calls if c[0] == "write"]
    # blocks 1..601 (bytes 1000..308200), written once each in order
    assert [lba for _, lba, _ in writes] == [1, 129, 257, 385, 513]
    assert sum(count for _, _, count in writes) == 601


def test_the_device_states_its_own_max_transfer() -> None:
    device = RecordingDevice(1 << 20)
    device.max_transfer_bytes = 8192  # type: ignore[attr-defined]  # as userland.lun.Lun
    assert Storage(device).chunk_blocks == 16


async def _interleaved_writers(storage: Storage, writers: int, piece: int) -> bytes:
    """Each writer owns ``piece`` bytes at its own offset, all inside the same blocks."""
    rng = random.Random(7)
    expected = bytearray(writers * piece)

    async def writer(k: int) -> None:
        for _ in range(5):
            data = rng.randbytes(piece)
            await storage.write(100 + k * piece, data)
            expected[k * piece:(k + 1) * piece] = data

    async with trio.open_nursery() as nursery:
        for k in range(writers):
            nursery.start_soon(writer, k)
    return bytes(expected)


def test_writers_sharing_a_block_lose_no_update() -> None:
    device = MemoryBlockDevice(16384, block_size=4096, latency=0.001)
    storage = Storage(device)

    async def check() -> None:
        expected = await _interleaved_writers(storage, 32, 200)
        assert bytes(device.data[100:100 + len(expected)]) == expected

    run(check)


def test_without_the_lock_updates_are_lost(monkeypatch: pytest.MonkeyPatch) -> None:
    """The test above can fail: with no lock, read-modify-writes overwrite each other."""

    @contextlib.asynccontextmanager
    async def no_lock(self: RangeLock, start: int, end: int, *,
                      exclusive: bool) -> AsyncIterator[None]:
        yield

    monkeypatch.setattr(RangeLock, "hold", no_lock)
    device = MemoryBlockDevice(16384, block_size=4096, latency=0.001)
    storage = Storage(device)

    async def check() -> None:
        expected = await _interleaved_writers(storage, 32, 200)
        assert bytes(device.data[100:100 + len(expected)]) != expected

    run(check)


def test_a_read_never_sees_half_of_a_write() -> None:
    device = MemoryBlockDevice(8192, latency=0.002)
    storage = Storage(device, max_transfer=1024)  # the write goes out in 8 pieces

    async def check() -> None:
        seen: list[bytes] = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(storage.write, 0, b"\xff" * 8192)
            await trio.sleep(0.003)  # the write is under way

            async def reader() -> None:
                seen.append(bytes(await storage.read(0, 8192)))

            nursery.start_soon(reader)
        assert seen == [b"\xff" * 8192]

    run(check)


def test_the_range_lock_serves_in_arrival_order() -> None:
    lock = RangeLock()
    order: list[str] = []

    async def take(name: str, exclusive: bool, hold_for: float) -> None:
        async with lock.hold(0, 10, exclusive=exclusive):
            order.append(name)
            await trio.sleep(hold_for)

    async def check() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(take, "reader1", False, 0.02)
            await trio.sleep(0.001)
            nursery.start_soon(take, "writer", True, 0.01)
            await trio.sleep(0.001)
            nursery.start_soon(take, "reader2", False, 0.0)  # must not overtake the writer
            await trio.sleep(0.001)
            nursery.start_soon(take, "writer2", True, 0.0)
        assert order == ["reader1", "writer", "reader2", "writer2"]
        assert len(lock) == 0

    run(check)


def test_disjoint_ranges_do_not_wait_and_a_cancelled_waiter_lets_go() -> None:
    lock = RangeLock()

    async def check() -> None:
        async with lock.hold(0, 10, exclusive=True):
            with trio.fail_after(0.1):
                async with lock.hold(10, 20, exclusive=True):
                    pass
            with trio.move_on_after(0.01):
                async with lock.hold(5, 6, exclusive=False):
                    raise AssertionError("got a lock that is held")
            assert len(lock) == 1
        assert len(lock) == 0

    run(check)


def test_punch_hole_zeroes_partial_ends_and_unmaps_whole_blocks() -> None:
    device = RecordingDevice(8192, block_size=512)
    device.data[:] = b"\xaa" * 8192
    storage = Storage(device)

    async def check() -> None:
        await storage.punch_hole(100, 2000)  # 100..2100: blocks 1-3 whole
        await storage.punch_hole(8000, 1000)  # past the end: clipped
        await storage.punch_hole(3000, 10)  # inside one block: zeroed by writing

    run(check)
    expected = bytearray(b"\xaa" * 8192)
    expected[100:2100] = bytes(2000)
    expected[8000:] = bytes(192)
    expected[3000:3010] = bytes(10)
    assert device.data == expected
    assert [c for c in device.calls if c[0] == "unmap"] == [("unmap", 1, 3)]


def test_punch_hole_needs_unmap_support() -> None:
    storage = Storage(MemoryBlockDevice(4096, supports_unmap=False))
    with pytest.raises(OSError) as info:
        run(storage.punch_hole, 0, 4096)
    assert info.value.errno == errno.EOPNOTSUPP


def test_sync_reaches_the_device_and_clears_dirty() -> None:
    device = MemoryBlockDevice(4096)
    storage = Storage(device)

    async def check() -> None:
        assert not storage.dirty
        await storage.write(1, b"x")
        assert storage.dirty
        await storage.sync()
        assert not storage.dirty and device.syncs == 1

    run(check)


class FailingDevice(MemoryBlockDevice):
    def __init__(self, error: BaseException, short: bool = False) -> None:
        super().__init__(4096)
        self.error, self.short = error, short

    async def read_blocks(self, lba: int, count: int) -> Buffer:
        if self.short:
            return b"\0" * (count * self.block_size - 1)
        raise self.error


def test_device_errors_pass_through_and_a_short_device_read_is_eio() -> None:
    with pytest.raises(ScsiError):
        run(Storage(FailingDevice(ScsiError("MEDIUM ERROR"))).read, 0, 10)
    with pytest.raises(OSError) as info:
        run(Storage(FailingDevice(OSError(), short=True)).read, 0, 10)
    assert info.value.errno == errno.EIO
