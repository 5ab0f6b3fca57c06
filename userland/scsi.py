"""SCSI commands for a disk (SPC-4, SBC-3): CDB builders and parsers of what comes back.

Sans-IO: the session carries each CDB in a SCSI Command PDU (padding it to 16 bytes) and
gives back the Data-In bytes; nothing here sends, waits or reads a clock.

Builders return the real CDB (6, 10, 12 or 16 bytes) and raise ``ValueError`` for an
argument that cannot be encoded (a bug in the caller). Parsers are strict about lengths:
a buffer too short for a field, or a length field that contradicts the buffer, raises
``ProtocolError`` naming the field; nothing else escapes them (tests feed random bytes).
Text fields are stripped of spaces and NULs, and any byte outside printable ASCII becomes
'?', so a target cannot put terminal escapes into our output.

Sense data, status codes and the errno map are in ``userland.sense``.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from userland.errors import ConfigError, ProtocolError
from userland.untrusted import from_target

Buffer = bytes | bytearray | memoryview


class Op(enum.IntEnum):
    TEST_UNIT_READY = 0x00
    REQUEST_SENSE = 0x03
    INQUIRY = 0x12
    READ_CAPACITY_10 = 0x25
    READ_10 = 0x28
    WRITE_10 = 0x2A
    SYNCHRONIZE_CACHE_10 = 0x35
    UNMAP = 0x42
    MODE_SENSE_10 = 0x5A
    READ_16 = 0x88
    WRITE_16 = 0x8A
    SYNCHRONIZE_CACHE_16 = 0x91
    SERVICE_ACTION_IN_16 = 0x9E
    REPORT_LUNS = 0xA0


SA_READ_CAPACITY_16 = 0x10

VPD_SUPPORTED_PAGES = 0x00
VPD_UNIT_SERIAL_NUMBER = 0x80
VPD_DEVICE_IDENTIFICATION = 0x83
VPD_BLOCK_LIMITS = 0xB0
VPD_LOGICAL_BLOCK_PROVISIONING = 0xB2

READ_CAPACITY_16_LEN = 32
SENSE_ALLOC_LEN = 252  # the most sense SPC-4 allows

_U16 = 0xFFFF
_U32 = 0xFFFF_FFFF
_U64 = 0xFFFF_FFFF_FFFF_FFFF


class DeviceType(enum.IntEnum):
    """Peripheral device types (SPC-4 table 141) an initiator of disks tells apart."""

    DISK = 0x00
    TAPE = 0x01
    CD_DVD = 0x05
    STORAGE_ARRAY_CONTROLLER = 0x0C  # tgt's LUN 0
    ENCLOSURE = 0x0D
    UNKNOWN = 0x1F  # with qualifier 011b: no logical unit here


def _check(name: str, value: int, maximum: int, minimum: int = 0) -> None:
    if not minimum <= value <= maximum:
        raise ValueError(f"{name} {value} outside {minimum}..{maximum}")


# --- CDB builders --------------------------------------------------------------------------

def test_unit_ready_cdb() -> bytes:
    """TEST UNIT READY (SPC-4 6.47): six zero bytes."""
    return bytes(6)


def request_sense_cdb(alloc_len: int = SENSE_ALLOC_LEN, *, desc: bool = False) -> bytes:
    """REQUEST SENSE (SPC-4 6.39): DESC in byte 1 bit 0, allocation length in byte 4."""
    _check("allocation length", alloc_len, 0xFF)
    return struct.pack(">BB2xBx", Op.REQUEST_SENSE, int(desc), alloc_len)


def inquiry_cdb(alloc_len: int = 0xFF) -> bytes:
    """Standard INQUIRY (SPC-4 6.6). The default keeps byte 3 zero, which SPC-2 targets,
    reading only byte 4 as the allocation length, require."""
    _check("allocation length", alloc_len, _U16, 5)
    return struct.pack(">BBBHx", Op.INQUIRY, 0, 0, alloc_len)


def inquiry_vpd_cdb(page: int, alloc_len: int = 0xFF) -> bytes:
    """INQUIRY with EVPD=1 for one VPD page; the page length is in bytes 2-3 of the answer
    (``vpd_total_length``) should the first allocation length be too small."""
    _check("VPD page code", page, 0xFF)
    _check("allocation length", alloc_len, _U16, 4)
    return struct.pack(">BBBHx", Op.INQUIRY, 1, page, alloc_len)


def report_luns_cdb(alloc_len: int = 4096, select_report: int = 0) -> bytes:
    """REPORT LUNS (SPC-4 6.33): SELECT REPORT in byte 2, allocation length in bytes 6-9
    (at least 16, or the target rejects the command)."""
    _check("allocation length", alloc_len, _U32, 16)
    _check("select report", select_report, 0xFF)
    return struct.pack(">BxB3xI2x", Op.REPORT_LUNS, select_report, alloc_len)


def read_capacity10_cdb() -> bytes:
    """READ CAPACITY (10) (SBC-3 5.15): ten zero-ish bytes (LBA and PMI are obsolete)."""
    return struct.pack(">B9x", Op.READ_CAPACITY_10)


def read_capacity16_cdb(alloc_len: int = READ_CAPACITY_16_LEN) -> bytes:
    """READ CAPACITY (16) (SBC-3 5.16): SERVICE ACTION IN(16) 0x9E, service action 0x10,
    allocation length in bytes 10-13."""
    _check("allocation length", alloc_len, _U32)
    return struct.pack(">BBQI2x", Op.SERVICE_ACTION_IN_16, SA_READ_CAPACITY_16, 0, alloc_len)


def _fits10(lba: int, blocks: int) -> bool:
    return lba <= _U32 and blocks <= _U16


def _rw_cdb(op10: int, op16: int, name: str, lba: int, blocks: int, flags: int) -> bytes:
    _check(f"{name} LBA", lba, _U64)
    _check(f"{name} block count", blocks, _U32, 1)
    if lba + blocks - 1 > _U64:
        raise ValueError(f"{name} of {blocks} blocks at LBA {lba} runs past the last LBA")
    if _fits10(lba, blocks):
        # op, flags, LBA 2-5, group 6, transfer length 7-8, control 9
        return struct.pack(">BBIBHx", op10, flags, lba, 0, blocks)
    # op, flags, LBA 2-9, transfer length 10-13, group 14, control 15
    return struct.pack(">BBQIBx", op16, flags, lba, blocks, 0)


def read_cdb(lba: int, blocks: int) -> bytes:
    """READ(10), or READ(16) when lba > 0xFFFFFFFF or blocks > 0xFFFF (SBC-3 5.8, 5.10)."""
    return _rw_cdb(Op.READ_10, Op.READ_16, "READ", lba, blocks, 0)


def write_cdb(lba: int, blocks: int, fua: bool = False) -> bytes:
    """WRITE(10) or WRITE(16) (SBC-3 5.32, 5.34); FUA is byte 1 bit 3."""
    return _rw_cdb(Op.WRITE_10, Op.WRITE_16, "WRITE", lba, blocks, 0x08 if fua else 0)


def sync_cache_cdb(lba: int = 0, blocks: int = 0, *, immed: bool = False) -> bytes:
    """SYNCHRONIZE CACHE(10) or (16) (SBC-3 5.22, 5.23); blocks 0 means 'to the last LBA'.
    IMMED is byte 1 bit 1."""
    _check("SYNCHRONIZE CACHE LBA", lba, _U64)
    _check("SYNCHRONIZE CACHE block count", blocks, _U32)
    flags = 0x02 if immed else 0
    if _fits10(lba, blocks):
        return struct.pack(">BBIBHx", Op.SYNCHRONIZE_CACHE_10, flags, lba, 0, blocks)
    return struct.pack(">BBQIBx", Op.SYNCHRONIZE_CACHE_16, flags, lba, blocks, 0)


UNMAP_HEADER_LEN = 8
UNMAP_DESCRIPTOR_LEN = 16
UNMAP_MAX_DESCRIPTORS = (_U16 - UNMAP_HEADER_LEN) // UNMAP_DESCRIPTOR_LEN


def unmap_cdb(param_list_len: int, *, anchor: bool = False) -> bytes:
    """UNMAP (SBC-3 5.28): ANCHOR byte 1 bit 0, parameter list length in bytes 7-8."""
    _check("UNMAP parameter list length", param_list_len, _U16)
    return struct.pack(">BB4xBHx", Op.UNMAP, int(anchor), 0, param_list_len)


def unmap_parameter_list(ranges: Sequence[tuple[int, int]]) -> bytes:
    """The UNMAP parameter list (SBC-3 5.28.2) for (lba, count) ranges: an 8-byte header
    (UNMAP data length, block descriptor data length) then one 16-byte descriptor each
    (LBA 0-7, count 8-11, 4 reserved). Splitting by the Block Limits is the caller's job."""
    if not 1 <= len(ranges) <= UNMAP_MAX_DESCRIPTORS:
        raise ValueError(f"UNMAP of {len(ranges)} ranges, 1..{UNMAP_MAX_DESCRIPTORS} fit")
    body = bytearray()
    for lba, count in ranges:
        _check("UNMAP LBA", lba, _U64)
        _check("UNMAP block count", count, _U32, 1)
        body += struct.pack(">QI4x", lba, count)
    header = struct.pack(">HH4x", len(body) + 6, len(body))
    return header + bytes(body)


def unmap(ranges: Sequence[tuple[int, int]], *, anchor: bool = False) -> tuple[bytes, bytes]:
    """CDB and Data-Out of one UNMAP."""
    params = unmap_parameter_list(ranges)
    return unmap_cdb(len(params), anchor=anchor), params


def mode_sense10_cdb(page: int = 0x3F, subpage: int = 0, alloc_len: int = 0xFF, *,
                     dbd: bool = True, llbaa: bool = False, pc: int = 0) -> bytes:
    """MODE SENSE(10) (SPC-4 6.12): LLBAA byte 1 bit 4, DBD bit 3; PC (bits 7-6) and page
    code in byte 2; subpage in byte 3; allocation length in bytes 7-8. The default asks for
    all pages without block descriptors; the header alone carries write protect."""
    _check("mode page code", page, 0x3F)
    _check("mode subpage code", subpage, 0xFF)
    _check("page control", pc, 3)
    _check("allocation length", alloc_len, _U16)
    byte1 = (0x10 if llbaa else 0) | (0x08 if dbd else 0)
    return struct.pack(">BBBB3xHx", Op.MODE_SENSE_10, byte1, pc << 6 | page, subpage, alloc_len)


# --- parser helpers ------------------------------------------------------------------------

def _text(raw: bytes) -> str:
    raw = raw.strip(b" \0")
    return "".join(chr(c) if 0x20 <= c < 0x7F else "?" for c in raw)


def _need(data: bytes, n: int, what: str) -> None:
    if len(data) < n:
        raise ProtocolError(f"{what}: {len(data)} bytes, at least {n} needed")


# --- standard INQUIRY ----------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Inquiry:
    """Standard INQUIRY data (SPC-4 6.6.2)."""

    peripheral_qualifier: int  # 0 connected, 1 not connected now, 3 no LU at this LUN
    device_type: int  # see DeviceType
    removable: bool
    version: int  # 5 SPC-3, 6 SPC-4
    response_data_format: int
    hisup: bool
    tpgs: int  # ALUA support, 0 none
    protect: bool
    cmdque: bool
    vendor: str
    product: str
    revision: str

    @property
    def present(self) -> bool:
        """A logical unit is there and usable through this port."""
        return self.peripheral_qualifier == 0 and self.device_type != DeviceType.UNKNOWN


INQUIRY_STANDARD_LEN = 36


@from_target
def parse_inquiry(buf: Buffer) -> Inquiry:
    """Standard INQUIRY data: only the first 36 bytes are read (more are fine)."""
    data = bytes(buf)
    _need(data, 5, "INQUIRY header")
    additional = data[4]
    if additional + 5 < INQUIRY_STANDARD_LEN:
        raise ProtocolError(f"INQUIRY: additional length {additional} leaves no room for "
                            "vendor, product and revision (31 needed)")
    _need(data, INQUIRY_STANDARD_LEN, "INQUIRY vendor/product/revision")
    return Inquiry(
        peripheral_qualifier=data[0] >> 5,
        device_type=data[0] & 0x1F,
        removable=bool(data[1] & 0x80),
        version=data[2],
        response_data_format=data[3] & 0x0F,
        hisup=bool(data[3] & 0x10),
        tpgs=(data[5] >> 4) & 0x03,
        protect=bool(data[5] & 0x01),
        cmdque=bool(data[7] & 0x02),
        vendor=_text(data[8:16]),
        product=_text(data[16:32]),
        revision=_text(data[32:36]),
    )


# --- VPD pages -----------------------------------------------------------------------------

@from_target
def vpd_total_length(buf: Buffer) -> int:
    """Bytes the whole VPD page takes (header included): the allocation length to ask.

    INQUIRY's allocation length is 16 bits (SPC-4 6.6.1): a page longer than that can
    never be read whole, so it is refused here rather than sizing the next request."""
    data = bytes(buf)
    _need(data, 4, "VPD page header")
    total = 4 + int.from_bytes(data[2:4], "big")
    if total > _U16:
        raise ProtocolError(f"VPD page 0x{data[1]:02x}: page length {total - 4} is beyond "
                            f"the {_U16} bytes an INQUIRY can return")
    return total


def _vpd(buf: Buffer, page: int, minimum: int) -> bytes:
    """The page, header included, cut at its page length; checked against what was asked."""
    data = bytes(buf)
    what = f"VPD page 0x{page:02x}"
    _need(data, 4, f"{what} header")
    if data[1] != page:
        raise ProtocolError(f"{what}: the answer is page 0x{data[1]:02x}")
    length = int.from_bytes(data[2:4], "big")
    if 4 + length > len(data):
        raise ProtocolError(f"{what}: page length {length} beyond the {len(data) - 4} bytes "
                            f"received (ask again with allocation length {4 + length})")
    if length < minimum:
        raise ProtocolError(f"{what}: page length {length}, at least {minimum} expected")
    return data[:4 + length]


@dataclass(frozen=True, slots=True)
class VpdSupportedPages:
    pages: tuple[int, ...]


@from_target
def parse_vpd_supported_pages(buf: Buffer) -> VpdSupportedPages:
    """VPD 0x00 (SPC-4 7.8.16): one byte per supported page code."""
    return VpdSupportedPages(tuple(_vpd(buf, VPD_SUPPORTED_PAGES, 0)[4:]))


@dataclass(frozen=True, slots=True)
class VpdUnitSerialNumber:
    serial: str


@from_target
def parse_vpd_serial(buf: Buffer) -> VpdUnitSerialNumber:
    """VPD 0x80 (SPC-4 7.8.18): the product serial number in ASCII."""
    return VpdUnitSerialNumber(_text(_vpd(buf, VPD_UNIT_SERIAL_NUMBER, 0)[4:]))


class CodeSet(enum.IntEnum):
    BINARY = 1
    ASCII = 2
    UTF8 = 3


class Association(enum.IntEnum):
    LOGICAL_UNIT = 0
    TARGET_PORT = 1
    TARGET_DEVICE = 2


class DesignatorType(enum.IntEnum):
    """SPC-4 table 459."""

    VENDOR_SPECIFIC = 0x0
    T10_VENDOR_ID = 0x1
    EUI64 = 0x2
    NAA = 0x3
    RELATIVE_TARGET_PORT = 0x4
    TARGET_PORT_GROUP = 0x5
    LOGICAL_UNIT_GROUP = 0x6
    MD5_LOGICAL_UNIT = 0x7
    SCSI_NAME_STRING = 0x8
    PROTOCOL_SPECIFIC_PORT = 0x9
    UUID = 0xA


@dataclass(frozen=True, slots=True)
class Designator:
    """One designation descriptor of VPD 0x83 (SPC-4 7.8.6.1)."""

    protocol_identifier: int  # meaningful only when piv is set
    code_set: int  # see CodeSet
    piv: bool
    association: int  # see Association
    designator_type: int  # see DesignatorType
    value: bytes

    def text(self) -> str:
        """The value shown: hex for binary, printable text for ASCII/UTF-8."""
        if self.code_set == CodeSet.BINARY:
            return self.value.hex()
        return _text(self.value)


@dataclass(frozen=True, slots=True)
class VpdDeviceIdentification:
    designators: tuple[Designator, ...]

    def display_id(self) -> str | None:
        return display_id(self.designators)


@from_target
def parse_vpd_device_id(buf: Buffer) -> VpdDeviceIdentification:
    """VPD 0x83 (SPC-4 7.8.6): a list of 4-byte headed designation descriptors."""
    page = _vpd(buf, VPD_DEVICE_IDENTIFICATION, 0)
    found = []
    pos = 4
    while pos < len(page):
        if pos + 4 > len(page):
            raise ProtocolError(f"VPD page 0x83: designator header at offset {pos} cut short "
                                f"by the page length")
        length = page[pos + 3]
        if pos + 4 + length > len(page):
            raise ProtocolError(f"VPD page 0x83: designator length {length} at offset {pos} "
                                "beyond the page length")
        found.append(Designator(
            protocol_identifier=page[pos] >> 4,
            code_set=page[pos] & 0x0F,
            piv=bool(page[pos + 1] & 0x80),
            association=(page[pos + 1] >> 4) & 0x03,
            designator_type=page[pos + 1] & 0x0F,
            value=page[pos + 4:pos + 4 + length],
        ))
        pos += 4 + length
    return VpdDeviceIdentification(tuple(found))


def _id_rank(d: Designator) -> int | None:
    """Higher is preferred: NAA, EUI-64 (longer first), SCSI name string, T10 vendor ID.
    Roughly the order Linux uses for the sysfs wwid."""
    if d.association != Association.LOGICAL_UNIT:
        return None
    binary = d.code_set == CodeSet.BINARY
    if d.designator_type == DesignatorType.NAA and binary and len(d.value) in (8, 16):
        return 40 + len(d.value)
    if d.designator_type == DesignatorType.EUI64 and binary and len(d.value) in (8, 12, 16):
        return 20 + len(d.value)
    textual = d.code_set in (CodeSet.ASCII, CodeSet.UTF8)
    if d.designator_type == DesignatorType.SCSI_NAME_STRING and textual and _text(d.value):
        return 10
    if d.designator_type == DesignatorType.T10_VENDOR_ID and textual and _text(d.value):
        return 1
    return None


def display_id(designators: Iterable[Designator]) -> str | None:
    """The logical unit's id for display: 'naa.<hex>', 'eui.<hex>', the SCSI name string
    (already 'iqn.'/'naa.'/'eui.' prefixed) or 't10.<vendor id>'; None if there is none."""
    ranked = [(rank, d) for d in designators if (rank := _id_rank(d)) is not None]
    if not ranked:
        return None
    best = max(ranked, key=lambda rd: rd[0])[1]
    if best.designator_type == DesignatorType.NAA:
        return "naa." + best.value.hex()
    if best.designator_type == DesignatorType.EUI64:
        return "eui." + best.value.hex()
    if best.designator_type == DesignatorType.T10_VENDOR_ID:
        return "t10." + _text(best.value)
    return _text(best.value)


@dataclass(frozen=True, slots=True)
class VpdBlockLimits:
    """VPD 0xB0 (SBC-3 6.5.3), in logical blocks; 0 means the target sets no limit.
    Fields past a short (SBC-2 era, page length 0x0C) page read as 0."""

    wsnz: bool
    max_compare_and_write_length: int
    optimal_transfer_length_granularity: int
    max_transfer_length: int
    optimal_transfer_length: int
    max_prefetch_length: int
    max_unmap_lba_count: int
    max_unmap_block_descriptor_count: int
    optimal_unmap_granularity: int
    unmap_granularity_alignment: int | None  # None unless UGAVALID
    max_write_same_length: int


@from_target
def parse_vpd_block_limits(buf: Buffer) -> VpdBlockLimits:
    page = _vpd(buf, VPD_BLOCK_LIMITS, 0x0C)

    def field(offset: int, size: int) -> int:
        if offset + size > len(page):
            return 0
        return int.from_bytes(page[offset:offset + size], "big")

    alignment = field(32, 4)
    return VpdBlockLimits(
        wsnz=bool(page[4] & 0x01),
        max_compare_and_write_length=page[5],
        optimal_transfer_length_granularity=field(6, 2),
        max_transfer_length=field(8, 4),
        optimal_transfer_length=field(12, 4),
        max_prefetch_length=field(16, 4),
        max_unmap_lba_count=field(20, 4),
        max_unmap_block_descriptor_count=field(24, 4),
        optimal_unmap_granularity=field(28, 4),
        unmap_granularity_alignment=alignment & 0x7FFF_FFFF if alignment & 0x8000_0000 else None,
        max_write_same_length=field(36, 8),
    )


class ProvisioningType(enum.IntEnum):
    FULL = 0  # or not reported
    RESOURCE = 1
    THIN = 2


@dataclass(frozen=True, slots=True)
class VpdLogicalBlockProvisioning:
    """VPD 0xB2 (SBC-3 6.5.4)."""

    threshold_exponent: int
    lbpu: bool  # UNMAP supported
    lbpws: bool  # WRITE SAME(16) with UNMAP supported
    lbpws10: bool  # WRITE SAME(10) with UNMAP supported
    lbprz: int  # 3 bits in SBC-4, one in SBC-3: nonzero when unmapped blocks read as zero
    anc_sup: bool
    dp: bool  # a provisioning group descriptor follows
    minimum_percentage: int
    provisioning_type: int  # see ProvisioningType
    threshold_percentage: int


@from_target
def parse_vpd_lbp(buf: Buffer) -> VpdLogicalBlockProvisioning:
    page = _vpd(buf, VPD_LOGICAL_BLOCK_PROVISIONING, 4)
    return VpdLogicalBlockProvisioning(
        threshold_exponent=page[4],
        lbpu=bool(page[5] & 0x80),
        lbpws=bool(page[5] & 0x40),
        lbpws10=bool(page[5] & 0x20),
        lbprz=(page[5] >> 2) & 0x07,
        anc_sup=bool(page[5] & 0x02),
        dp=bool(page[5] & 0x01),
        minimum_percentage=page[6] >> 3,
        provisioning_type=page[6] & 0x07,
        threshold_percentage=page[7],
    )


# --- LUNs ----------------------------------------------------------------------------------

LUN_METHOD_PERIPHERAL = 0b00
LUN_METHOD_FLAT = 0b01
LUN_METHOD_LOGICAL_UNIT = 0b10
LUN_METHOD_EXTENDED = 0b11
MAX_FLAT_LUN = 0x3FFF
# A LUN list longer than this is implausible (SAM-5 flat space holds 16384 LUNs); the
# target's length is checked against it before it sizes a second REPORT LUNS.
MAX_REPORT_LUNS_LENGTH = 8 * 65536


def _lun_number(raw: bytes) -> int | None:
    """The LUN of a single-level peripheral (bus 0) or flat space LUN (SAM-5 4.7)."""
    if any(raw[2:]):
        return None  # a second level: hierarchical, not a number we can name
    method = raw[0] >> 6
    if method == LUN_METHOD_PERIPHERAL:
        return raw[1] if raw[0] & 0x3F == 0 else None
    if method == LUN_METHOD_FLAT:
        return (raw[0] & 0x3F) << 8 | raw[1]
    return None


@dataclass(frozen=True, slots=True)
class Lun:
    """One entry of REPORT LUNS. ``raw`` is sent back as is (``field`` for the PDU)."""

    raw: bytes
    method: int  # address method of the first level, LUN_METHOD_*
    number: int | None  # None when not single-level peripheral/flat

    @property
    def field(self) -> int:
        """The iSCSI LUN field of a PDU (pdu.py keeps it as a 64-bit integer)."""
        return int.from_bytes(self.raw, "big")


@dataclass(frozen=True, slots=True)
class ReportLuns:
    luns: tuple[Lun, ...]
    list_length: int  # as the target reported it, in bytes

    @property
    def truncated(self) -> bool:
        """The allocation length cut the list: ask again with ``needed_length``."""
        return len(self.luns) * 8 < self.list_length

    @property
    def needed_length(self) -> int:
        return 8 + self.list_length


@from_target
def parse_report_luns(buf: Buffer) -> ReportLuns:
    """REPORT LUNS parameter data (SPC-4 6.33.2): LUN list length, 4 reserved, 8 per LUN.
    A list cut by the allocation length is not an error (see ``truncated``); a length
    past ``MAX_REPORT_LUNS_LENGTH`` is, since ``needed_length`` sizes the next request."""
    data = bytes(buf)
    _need(data, 8, "REPORT LUNS header")
    list_length = int.from_bytes(data[:4], "big")
    if list_length % 8:
        raise ProtocolError(f"REPORT LUNS: LUN list length {list_length} is not a multiple of 8")
    if list_length > MAX_REPORT_LUNS_LENGTH:
        raise ProtocolError(f"REPORT LUNS: LUN list length {list_length} bytes "
                            f"({list_length // 8} LUNs) is beyond the "
                            f"{MAX_REPORT_LUNS_LENGTH // 8} LUNs we accept")
    count = min(list_length, len(data) - 8) // 8
    luns = []
    for i in range(count):
        raw = data[8 + 8 * i:16 + 8 * i]
        luns.append(Lun(raw, raw[0] >> 6, _lun_number(raw)))
    return ReportLuns(tuple(luns), list_length)


@from_target
def lun_to_int(raw8: Buffer) -> int:
    """The LUN number of an 8-byte single-level peripheral or flat space LUN."""
    raw = bytes(raw8)
    if len(raw) != 8:
        raise ProtocolError(f"LUN: {len(raw)} bytes, 8 expected")
    number = _lun_number(raw)
    if number is None:
        raise ProtocolError(f"LUN {raw.hex()}: address method {raw[0] >> 6} or a second level "
                            "we cannot express as a number")
    return number


def int_to_lun(n: int) -> int:
    """The iSCSI LUN field (64-bit, pdu.py) for LUN n: peripheral addressing below 256
    (``n << 48``), flat space addressing (``0x4000 | n`` in the top 16 bits) up to 16383."""
    if 0 <= n <= 0xFF:
        return n << 48
    if 0x100 <= n <= MAX_FLAT_LUN:
        return (0x4000 | n) << 48
    raise ConfigError(f"LUN {n} out of range 0..{MAX_FLAT_LUN}")


# --- READ CAPACITY -------------------------------------------------------------------------

# Plausible logical block lengths (SBC-4 allows 512..; 4160 and 520 exist; nothing real
# is near 1 MiB), and a size a file offset can hold (off_t: 2**63 - 1 bytes).
MAX_BLOCK_SIZE = 1 << 20
MAX_CAPACITY_BYTES = 2**63 - 1


def _check_capacity(what: str, num_blocks: int, block_size: int) -> None:
    if not 1 <= block_size <= MAX_BLOCK_SIZE:
        raise ProtocolError(f"{what}: logical block length {block_size} is implausible "
                            f"(1..{MAX_BLOCK_SIZE} accepted)")
    if num_blocks * block_size > MAX_CAPACITY_BYTES:
        raise ProtocolError(f"{what}: {num_blocks} blocks of {block_size} bytes is beyond "
                            "the 8 EiB a file offset can address")


@dataclass(frozen=True, slots=True)
class Capacity10:
    """READ CAPACITY(10) data (SBC-3 5.15.2). When ``use_16`` is set the target has more
    than 2**32 blocks: num_blocks is only a lower bound, ask READ CAPACITY(16)."""

    num_blocks: int
    block_size: int
    use_16: bool


@from_target
def parse_read_capacity10(buf: Buffer) -> Capacity10:
    data = bytes(buf)
    _need(data, 8, "READ CAPACITY(10) data")
    last, block_size = struct.unpack_from(">II", data)
    _check_capacity("READ CAPACITY(10)", last + 1, block_size)
    return Capacity10(last + 1, block_size, last == _U32)


@dataclass(frozen=True, slots=True)
class Capacity16:
    """READ CAPACITY(16) data (SBC-3 5.16.2)."""

    num_blocks: int
    block_size: int
    prot_en: bool
    p_type: int
    lbpme: bool  # logical block provisioning (UNMAP) enabled
    lbprz: bool  # unmapped blocks read as zero
    lb_per_pb_exponent: int  # 2**this logical blocks per physical block
    lowest_aligned_lba: int

    @property
    def physical_block_size(self) -> int:
        return self.block_size << self.lb_per_pb_exponent


@from_target
def parse_read_capacity16(buf: Buffer) -> Capacity16:
    """Reads bytes 0-15; the rest of the 32 are reserved and may be absent."""
    data = bytes(buf)
    _need(data, 16, "READ CAPACITY(16) data")
    last, block_size = struct.unpack_from(">QI", data)
    _check_capacity("READ CAPACITY(16)", last + 1, block_size)
    return Capacity16(
        num_blocks=last + 1,
        block_size=block_size,
        prot_en=bool(data[12] & 0x01),
        p_type=(data[12] >> 1) & 0x07,
        lbpme=bool(data[14] & 0x80),
        lbprz=bool(data[14] & 0x40),
        lb_per_pb_exponent=data[13] & 0x0F,
        lowest_aligned_lba=(data[14] & 0x3F) << 8 | data[15],
    )


# --- MODE SENSE(10) ------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class ModeHeader10:
    """The MODE SENSE(10) mode parameter header (SPC-4 7.5.5, SBC-3 6.4.1)."""

    mode_data_length: int
    medium_type: int
    write_protect: bool  # device-specific parameter bit 7
    dpofua: bool  # device-specific parameter bit 4: DPO and FUA supported
    longlba: bool
    block_descriptor_length: int


@from_target
def parse_mode_sense10_header(buf: Buffer) -> ModeHeader10:
    """The 8-byte header; pages after it may be cut by the allocation length."""
    data = bytes(buf)
    _need(data, 8, "MODE SENSE(10) header")
    mode_data_length, medium, specific, flags, bd_length = struct.unpack_from(">HBBBxH", data)
    if mode_data_length < 6:
        raise ProtocolError(f"MODE SENSE(10): mode data length {mode_data_length} shorter than "
                            "the rest of its own header (6)")
    if bd_length > mode_data_length - 6:
        raise ProtocolError(f"MODE SENSE(10): block descriptor length {bd_length} beyond the "
                            f"mode data length {mode_data_length}")
    return ModeHeader10(
        mode_data_length=mode_data_length,
        medium_type=medium,
        write_protect=bool(specific & 0x80),
        dpofua=bool(specific & 0x10),
        longlba=bool(flags & 0x01),
        block_descriptor_length=bd_length,
    )
