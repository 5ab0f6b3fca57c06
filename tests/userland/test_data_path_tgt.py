"""The userland data path (trio session runner + SCSI LUN) against a real tgtd.

Every byte written is read back and compared, also with tgt's backing file itself,
under each negotiation shape that changes how Data-Out is cut (R2T-driven, big
unsolicited bursts, CRC32C digests), and through connection cuts and a tgtd restart.
"""

from __future__ import annotations

import hashlib
import os
import random
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import trio

from iscsi_handoff.tgtlab import LunSpec, Tgt
from userland.errors import ScsiError, SessionFailed
from userland.login.machine import LoginConfig, new_isid
from userland.lun import Lun, report_luns
from userland.portal import Portal
from userland.runner import SessionRunner

from cutting_proxy import CuttingProxy
from tgt_fixtures import tgt  # noqa: F401  (fixture)

pytestmark = pytest.mark.tgt

IQN = "iqn.2024-01.org.iscsi-handoff.test:data"
R2T_PATHS = {"InitialR2T": "Yes", "ImmediateData": "No", "MaxRecvDataSegmentLength": "4096",
             "MaxBurstLength": "16384", "FirstBurstLength": "8192"}
BIG_BURSTS = {"InitialR2T": "No", "ImmediateData": "Yes",
              "MaxRecvDataSegmentLength": "262144", "MaxBurstLength": "1048576",
              "FirstBurstLength": "1048576"}
DIGESTS = {"HeaderDigest": "CRC32C", "DataDigest": "CRC32C"}


def config(target: str = IQN) -> LoginConfig:
    return LoginConfig(initiator_name="iqn.2024-01.org.iscsi-handoff:pytest",
                       target_name=target, isid=new_isid(),
                       header_digest=("None", "CRC32C"), data_digest=("None", "CRC32C"))


def with_session(portal: str, body: Callable[[SessionRunner], Awaitable[None]], *,
                 target: str = IQN, **runner_kw: float) -> SessionRunner:
    runner = SessionRunner(Portal.parse(portal), config(target), **runner_kw)  # type: ignore[arg-type]

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await runner.start(nursery)
            try:
                await body(runner)
            finally:
                await runner.close()

    trio.run(main)
    return runner


async def probed(runner: SessionRunner, number: int = 1) -> Lun:
    lun = Lun(runner, number)
    await lun.probe()
    return lun


@pytest.mark.parametrize("params", [R2T_PATHS, BIG_BURSTS, DIGESTS, {}],
                         ids=["r2t-paths", "big-bursts", "crc32c", "tgt-defaults"])
def test_unaligned_io_matches_the_backing_file(tgt: Tgt, params: dict[str, str]) -> None:  # noqa: F811
    target = tgt.add_target(IQN, luns=[LunSpec(size=32 << 20)], params=params)
    backing = Path(target.lun_paths[0])
    rng = random.Random(7)
    model = bytearray(32 << 20)  # what the LUN must hold afterwards

    async def body(runner: SessionRunner) -> None:
        lun = await probed(runner)
        assert lun.num_blocks * lun.block_size == 32 << 20
        neg = runner.session.params if runner.session else None
        assert neg is not None
        if params is DIGESTS:
            assert neg.header_digest == "CRC32C" and neg.data_digest == "CRC32C"
        if params is R2T_PATHS:
            assert neg.initial_r2t and not neg.immediate_data
            assert neg.max_xmit_data_segment_length == 4096
        for size in (512, 4096, 65536, 300 * 1024, 1 << 20, 3 * (1 << 20) + 512):
            lba = rng.randrange(0, lun.num_blocks - size // 512)
            data = rng.randbytes(size)
            await lun.write_blocks(lba, data)
            model[lba * 512:lba * 512 + size] = data
            assert await lun.read_blocks(lba, size // 512) == data
        await lun.synchronize_cache()

    with_session(tgt.portal, body)
    assert hashlib.sha256(backing.read_bytes()).digest() == hashlib.sha256(model).digest()


def test_three_disk_luns_and_a_read_only_one(tgt: Tgt) -> None:  # noqa: F811
    tgt.add_target(IQN, luns=[LunSpec(size=8 << 20), LunSpec(size=16 << 20),
                              LunSpec(size=24 << 20, readonly=True)])

    async def body(runner: SessionRunner) -> None:
        assert await report_luns(runner) == [0, 1, 2, 3]
        sizes = []
        for n in (1, 2, 3):
            lun = await probed(runner, n)
            sizes.append(lun.num_blocks * lun.block_size)
        assert sizes == [8 << 20, 16 << 20, 24 << 20]
        ro = await probed(runner, 3)
        assert ro.read_only
        with pytest.raises(ScsiError) as info:
            await ro.write_blocks(0, bytes(512))
        assert info.value.errno_value == 30  # EROFS, from DATA PROTECT sense
        controller = Lun(runner, 0)
        inq = await controller.command(bytes([0x12, 0, 0, 0, 255, 0]), read_length=255)
        assert inq.data[0] & 0x1F == 0x0C  # tgt's LUN 0 is a controller

    with_session(tgt.portal, body)


def test_sixteen_concurrent_readers_and_writers(tgt: Tgt) -> None:  # noqa: F811
    tgt.add_target(IQN, luns=[LunSpec(size=32 << 20)], params=BIG_BURSTS)
    expected = bytearray(32 << 20)

    async def body(runner: SessionRunner) -> None:
        lun = await probed(runner)
        locks = [trio.Lock() for _ in range(64)]  # overlapping ranges are serialized

        async def worker(k: int) -> None:
            rng = random.Random(k)
            for _ in range(25):
                region = rng.randrange(64) if k % 2 else k  # odd workers overlap
                base = region * (512 << 10)
                offset = base + rng.randrange(0, 256) * 512
                size = rng.randrange(1, 257) * 512
                async with locks[region]:
                    if rng.random() < 0.5:
                        data = rng.randbytes(size)
                        await lun.write_blocks(offset // 512, data)
                        expected[offset:offset + size] = data
                    else:
                        got = await lun.read_blocks(offset // 512, size // 512)
                        assert got == expected[offset:offset + size]

        async with trio.open_nursery() as nursery:
            for k in range(16):
                nursery.start_soon(worker, k)
        everything = await lun.read_blocks(0, lun.num_blocks)
        assert hashlib.sha256(everything).digest() == hashlib.sha256(expected).digest()

    with_session(tgt.portal, body)


def test_twenty_cuts_during_a_verified_256_mib_write(tgt: Tgt) -> None:  # noqa: F811
    tgt.add_target(IQN, luns=[LunSpec(size=256 << 20)], params=BIG_BURSTS)
    chunk = 1 << 20
    with CuttingProxy(("127.0.0.1", tgt.port), seed=3) as proxy:
        async def body(runner: SessionRunner) -> None:
            lun = await probed(runner)
            proxy.cut_randomly(6 << 20, 14 << 20)

            async def writer(k: int) -> None:
                for i in range(k, 256, 4):
                    await lun.write_blocks(i * chunk // 512, _pattern(i, chunk))

            async with trio.open_nursery() as nursery:
                for k in range(4):
                    nursery.start_soon(writer, k)
            proxy.stop_cutting()
            for i in range(256):
                assert await lun.read_blocks(i * chunk // 512, chunk // 512) == \
                    _pattern(i, chunk), f"MiB {i} differs"

        runner = with_session(proxy.portal, body, replacement_timeout=60)
    assert proxy.cuts >= 20, proxy.cuts
    assert runner.recoveries >= 20


def _pattern(i: int, size: int) -> bytes:
    return hashlib.sha256(i.to_bytes(4, "big")).digest() * (size // 32)


def test_tgtd_restart_mid_write_resumes(tgt: Tgt) -> None:  # noqa: F811
    target = tgt.add_target(IQN, luns=[LunSpec(size=64 << 20)], params=BIG_BURSTS)
    backing = Path(target.lun_paths[0])

    async def body(runner: SessionRunner) -> None:
        lun = await probed(runner)
        done = trio.Event()

        async def restarter() -> None:
            await trio.sleep(0.3)
            await trio.to_thread.run_sync(tgt.restart)
            done.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(restarter)
            for i in range(48):
                await lun.write_blocks(i * 2048, _pattern(i, 1 << 20))
        assert done.is_set()
        for i in range(48):
            assert await lun.read_blocks(i * 2048, 2048) == _pattern(i, 1 << 20)

    runner = with_session(tgt.portal, body, replacement_timeout=60)
    assert runner.recoveries >= 1
    with backing.open("rb") as f:
        assert f.read(1 << 20) == _pattern(0, 1 << 20)


def test_tgtd_gone_for_good_fails_in_time(tgt: Tgt) -> None:  # noqa: F811
    tgt.add_target(IQN, luns=[LunSpec(size=16 << 20)])
    outcome: dict[str, float] = {}

    async def body(runner: SessionRunner) -> None:
        lun = await probed(runner)
        await trio.to_thread.run_sync(tgt.stop)
        started = time.monotonic()
        with pytest.raises(SessionFailed, match="not recovered within 5 s"):
            for i in range(1000):
                await lun.write_blocks(i, os.urandom(512))
        outcome["elapsed"] = time.monotonic() - started
        with pytest.raises(SessionFailed):
            await lun.read_blocks(0, 1)  # new I/O fails at once, no hang

    with_session(tgt.portal, body, replacement_timeout=5, nop_interval=1, nop_timeout=1)
    assert outcome["elapsed"] < 5 + 5
