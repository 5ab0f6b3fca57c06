"""Our userland session without FUSE: trio tasks keeping `queue_depth` commands in flight."""

from __future__ import annotations

import time

import trio

from bench.points import Point, Result
from userland.login.machine import LoginConfig, new_isid
from userland.lun import Lun
from userland.portal import Portal
from userland.runner import SessionRunner


async def _measure(runner: SessionRunner, point: Point, seconds: float) -> Result:
    lun = Lun(runner, 1)
    await lun.probe()
    blocks = point.block_size // lun.block_size
    span = lun.num_blocks - blocks
    payload = bytes(point.block_size)
    count = 0
    next_lba = 0
    deadline = time.perf_counter() + seconds

    async def worker() -> None:
        nonlocal count, next_lba
        while time.perf_counter() < deadline:
            lba = next_lba
            next_lba = (next_lba + blocks) % span  # sequential, as iscsi-perf reads
            if point.write:
                await lun.write_blocks(lba, payload)
            else:
                await lun.read_blocks(lba, blocks)
            count += 1

    started = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for _ in range(point.queue_depth):
            nursery.start_soon(worker)
    return Result.of("iscsi-handoff session", point, count, time.perf_counter() - started)


def run_session(portal: str, target: str, point: Point, seconds: float) -> Result:
    async def main() -> Result:
        config = LoginConfig(initiator_name="iqn.2024-01.org.iscsi-handoff:bench",
                             target_name=target, isid=new_isid())
        runner = SessionRunner(Portal.parse(portal), config, queue_depth=max(32, point.queue_depth))
        async with trio.open_nursery() as nursery:
            await runner.start(nursery)
            try:
                return await _measure(runner, point, seconds)
            finally:
                await runner.close()

    return trio.run(main)
