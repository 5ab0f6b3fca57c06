"""A SCSI disk LUN reached through a running session: probe, read, write, flush, unmap.

It has the shape of ``fallback_fuse.device.BlockDevice`` without importing it (arrows
point down only). Commands that end in a retryable condition (UNIT ATTENTION after a
login or a target restart, BUSY, TASK SET FULL) are tried again a bounded number of times.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import trio

from userland import scsi
from userland.errors import ProtocolError, ScsiError
from userland.runner import SessionRunner
from userland.sense import ScsiStatus, SenseKey, parse_sense, status_error
from userland.task import Task

log = logging.getLogger("iscsi_handoff.scsi")

RETRIES = 5
DEFAULT_MAX_TRANSFER = 8 << 20  # when the target states no limit (VPD B0)
DISK = 0x00  # SCSI peripheral device type: direct-access block device


@dataclass
class LunInfo:
    number: int
    vendor: str = ""
    product: str = ""
    version: str = ""
    serial: str = ""
    device_id: str | None = None
    device_type: int = 0


class Lun:
    def __init__(self, runner: SessionRunner, number: int) -> None:
        self.runner = runner
        self.number = number
        self.lun_field = scsi.int_to_lun(number)
        self.info = LunInfo(number)
        self.block_size = 512
        self.num_blocks = 0
        self.read_only = False
        self.supports_unmap = False
        self.max_transfer_bytes = DEFAULT_MAX_TRANSFER
        self.max_unmap_blocks = 0

    # -- one command

    async def command(self, cdb: bytes, *, read_length: int = 0,
                      write_data: bytes | bytearray | memoryview | None = None) -> Task:
        """Run a CDB to GOOD status, retrying what SCSI says to retry."""
        for attempt in range(RETRIES + 1):
            task = Task(lun=self.lun_field, cdb=cdb, read_length=read_length,
                        write_data=write_data)
            await self.runner.execute(task)
            if task.response != 0:
                raise ScsiError(f"LUN {self.number}: target failed the command "
                                f"(iSCSI response {task.response})")
            if task.status == ScsiStatus.GOOD or _recovered(task):
                if write_data is not None and task.residual:
                    # The target took fewer (or wanted more) bytes than we sent.
                    took = len(write_data) - task.residual
                    raise ScsiError(f"LUN {self.number}: the target took {took} of "
                                    f"{len(write_data)} bytes written")
                return task
            error = status_error(task.status or 0, task.sense)
            if not error.retryable or attempt == RETRIES:
                raise error
            log.info("LUN %d: %s; retrying", self.number, error)
            if task.status in (ScsiStatus.BUSY, ScsiStatus.TASK_SET_FULL):
                await trio.sleep(0.05 * (attempt + 1))
        raise AssertionError("unreachable")

    # -- discovery of what the LUN is

    async def probe(self) -> None:
        await self.command(scsi.test_unit_ready_cdb())  # eats the UNIT ATTENTION after login
        inq = scsi.parse_inquiry((await self.command(scsi.inquiry_cdb(),
                                                     read_length=255)).data)
        self.info.vendor, self.info.product = inq.vendor, inq.product
        self.info.version, self.info.device_type = inq.revision, inq.device_type
        if inq.device_type != DISK:
            return  # a controller (tgt's LUN 0) or other device: nothing to read or write
        pages = await self._vpd_pages()
        if scsi.VPD_UNIT_SERIAL_NUMBER in pages:
            data = await self._vpd(scsi.VPD_UNIT_SERIAL_NUMBER)
            self.info.serial = scsi.parse_vpd_serial(data).serial
        if scsi.VPD_DEVICE_IDENTIFICATION in pages:
            data = await self._vpd(scsi.VPD_DEVICE_IDENTIFICATION)
            self.info.device_id = scsi.parse_vpd_device_id(data).display_id()
        await self._capacity()
        if scsi.VPD_BLOCK_LIMITS in pages:
            limits = scsi.parse_vpd_block_limits(await self._vpd(scsi.VPD_BLOCK_LIMITS))
            if limits.max_transfer_length:
                self.max_transfer_bytes = min(self.max_transfer_bytes,
                                              limits.max_transfer_length * self.block_size)
            self.max_unmap_blocks = limits.max_unmap_lba_count
        if scsi.VPD_LOGICAL_BLOCK_PROVISIONING in pages:
            lbp = scsi.parse_vpd_lbp(await self._vpd(scsi.VPD_LOGICAL_BLOCK_PROVISIONING))
            self.supports_unmap = self.supports_unmap and lbp.lbpu
        mode = await self.command(scsi.mode_sense10_cdb(), read_length=255)
        self.read_only = scsi.parse_mode_sense10_header(mode.data).write_protect

    async def read_capacity(self) -> int:
        """READ CAPACITY again (a rescan: the target may have resized the LUN); the
        size in bytes."""
        await self._capacity()
        return self.num_blocks * self.block_size

    async def _vpd_pages(self) -> frozenset[int]:
        try:
            data = await self._vpd(scsi.VPD_SUPPORTED_PAGES)
        except ScsiError:
            return frozenset()  # VPD is optional for SPC-2 devices
        return frozenset(scsi.parse_vpd_supported_pages(data).pages)

    async def _vpd(self, page: int) -> bytes:
        data = await self._inquiry_vpd(page, 255)
        # A long page (0x83 on some targets): ask for all of it. vpd_total_length refuses
        # a length beyond INQUIRY's 16 bits, so the target cannot size more than 64 KiB.
        need = scsi.vpd_total_length(data)
        if need > len(data):
            data = await self._inquiry_vpd(page, need)
        return data

    async def _inquiry_vpd(self, page: int, length: int) -> bytes:
        task = await self.command(scsi.inquiry_vpd_cdb(page, length), read_length=length)
        # What the target sent, not the zeros past it: the parsers check the page length.
        return bytes(task.data[:max(length - max(task.residual, 0), 0)])

    async def _capacity(self) -> None:
        try:
            task = await self.command(scsi.read_capacity16_cdb(), read_length=32)
            cap16 = scsi.parse_read_capacity16(task.data)
            self.num_blocks, self.block_size = cap16.num_blocks, cap16.block_size
            self.supports_unmap = cap16.lbpme
            self._check_capacity()
            return
        except ScsiError as exc:  # READ CAPACITY(16) is optional before SBC-3
            log.info("LUN %d: READ CAPACITY(16) failed (%s); using (10)", self.number, exc)
        cap10 = scsi.parse_read_capacity10(
            (await self.command(scsi.read_capacity10_cdb(), read_length=8)).data)
        self.num_blocks, self.block_size = cap10.num_blocks, cap10.block_size
        self._check_capacity()

    def _check_capacity(self) -> None:
        """What a loop device and the page cache can take: the parser (scsi.py) already
        refused a size beyond a file offset; here a block size the tree can serve."""
        size = self.block_size
        if size < 512 or size > 65536 or size & (size - 1):
            raise ProtocolError(f"LUN {self.number}: READ CAPACITY gave an implausible "
                                f"block size of {size} bytes")

    # -- block I/O

    def _check_range(self, lba: int, count: int) -> None:
        if lba < 0 or count < 0 or lba + count > self.num_blocks:
            raise ScsiError(f"LUN {self.number}: blocks {lba}+{count} beyond the "
                            f"{self.num_blocks} the LUN has", errno_value=28)

    @property
    def _chunk_blocks(self) -> int:
        return max(1, self.max_transfer_bytes // self.block_size)

    async def read_blocks(self, lba: int, count: int) -> bytearray:
        self._check_range(lba, count)
        if count <= self._chunk_blocks:
            return await self._read(lba, count)
        out = bytearray()
        for start in range(lba, lba + count, self._chunk_blocks):
            out += await self._read(start, min(self._chunk_blocks, lba + count - start))
        return out

    async def _read(self, lba: int, count: int) -> bytearray:
        length = count * self.block_size
        task = await self.command(scsi.read_cdb(lba, count), read_length=length)
        if task.residual > 0 or task.received != length:
            raise ProtocolError(f"LUN {self.number}: READ of {length} bytes returned "
                                f"{task.received}")
        return task.data

    async def write_blocks(self, lba: int, data: bytes | bytearray | memoryview) -> None:
        if len(data) % self.block_size:
            raise ValueError("write_blocks needs whole blocks")
        count = len(data) // self.block_size
        self._check_range(lba, count)
        view = memoryview(data)
        step = self._chunk_blocks
        for first in range(0, count, step):
            n = min(step, count - first)
            piece = view[first * self.block_size:(first + n) * self.block_size]
            await self.command(scsi.write_cdb(lba + first, n), write_data=piece)

    async def synchronize_cache(self) -> None:
        await self.command(scsi.sync_cache_cdb())

    async def unmap(self, lba: int, count: int) -> None:
        self._check_range(lba, count)
        if not self.supports_unmap:
            raise ScsiError(f"LUN {self.number}: the target does not support UNMAP",
                            errno_value=95)
        step = self.max_unmap_blocks or count
        for start in range(lba, lba + count, step):
            cdb, params = scsi.unmap([(start, min(step, lba + count - start))])
            await self.command(cdb, write_data=params)


def _recovered(task: Task) -> bool:
    """CHECK CONDITION with RECOVERED ERROR: the command did its work (SPC-4 4.5.6)."""
    if task.status != ScsiStatus.CHECK_CONDITION or not task.sense:
        return False
    try:
        return parse_sense(task.sense).key == SenseKey.RECOVERED_ERROR
    except ProtocolError:
        return False


async def report_luns(runner: SessionRunner) -> list[int]:
    """LUN numbers from REPORT LUNS (sent to LUN 0, which every target has)."""
    probe = Lun(runner, 0)
    task = await probe.command(scsi.report_luns_cdb(), read_length=4096)
    answer = scsi.parse_report_luns(task.data)
    if answer.truncated:
        task = await probe.command(scsi.report_luns_cdb(answer.needed_length),
                                   read_length=answer.needed_length)
        answer = scsi.parse_report_luns(task.data)
    return [lun.number for lun in answer.luns if lun.number is not None]

