"""SCSI CDBs, parsers and sense (userland.scsi, userland.sense), checked against SPC-4/SBC-3
layouts byte by byte, on hand-built answers shaped like tgt's, and fed random bytes."""

from __future__ import annotations

import contextlib
import errno
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from userland.errors import ConfigError, ProtocolError, ScsiError
from userland.scsi import (
    Capacity10,
    DeviceType,
    ProvisioningType,
    display_id,
    inquiry_cdb,
    inquiry_vpd_cdb,
    int_to_lun,
    lun_to_int,
    mode_sense10_cdb,
    parse_inquiry,
    parse_mode_sense10_header,
    parse_read_capacity10,
    parse_read_capacity16,
    parse_report_luns,
    parse_vpd_block_limits,
    parse_vpd_device_id,
    parse_vpd_lbp,
    parse_vpd_serial,
    parse_vpd_supported_pages,
    read_capacity10_cdb,
    read_capacity16_cdb,
    read_cdb,
    report_luns_cdb,
    request_sense_cdb,
    sync_cache_cdb,
    unmap,
    unmap_cdb,
    unmap_parameter_list,
    vpd_total_length,
    write_cdb,
)
from userland.scsi import (
    test_unit_ready_cdb as tur_cdb,  # aliased: pytest would collect a test_* name
)
from userland.sense import (
    ENOMEDIUM,
    ScsiStatus,
    ScsiStatusError,
    Sense,
    SenseKey,
    is_retryable,
    parse_sense,
    sense_errno,
    status_error,
    status_ok,
)


def be(data: bytes, start: int, end: int) -> int:
    return int.from_bytes(data[start:end], "big")


# --- CDB builders --------------------------------------------------------------------------

def test_test_unit_ready() -> None:
    assert tur_cdb() == bytes(6)


def test_request_sense() -> None:
    cdb = request_sense_cdb()
    assert len(cdb) == 6
    assert cdb[0] == 0x03
    assert cdb[1] == 0  # DESC=0: fixed format
    assert cdb[4] == 252
    assert request_sense_cdb(18, desc=True)[1] == 0x01
    assert request_sense_cdb(18, desc=True)[4] == 18
    with pytest.raises(ValueError):
        request_sense_cdb(256)


def test_inquiry_standard() -> None:
    cdb = inquiry_cdb()
    assert cdb == bytes([0x12, 0, 0, 0x00, 0xFF, 0])
    cdb = inquiry_cdb(0x1234)
    assert cdb[1] & 0x01 == 0  # EVPD clear
    assert be(cdb, 3, 5) == 0x1234


def test_inquiry_vpd() -> None:
    cdb = inquiry_vpd_cdb(0x83, 0x0400)
    assert len(cdb) == 6
    assert cdb[0] == 0x12
    assert cdb[1] == 0x01  # EVPD
    assert cdb[2] == 0x83  # page code
    assert be(cdb, 3, 5) == 0x0400  # allocation length
    assert cdb[5] == 0  # control
    with pytest.raises(ValueError):
        inquiry_vpd_cdb(0x100)


def test_report_luns() -> None:
    cdb = report_luns_cdb(0x10000)
    assert len(cdb) == 12
    assert cdb[0] == 0xA0
    assert cdb[2] == 0  # select report 0
    assert cdb[1] == cdb[3] == cdb[4] == cdb[5] == 0
    assert be(cdb, 6, 10) == 0x10000
    assert cdb[10] == cdb[11] == 0
    assert report_luns_cdb(16, select_report=2)[2] == 2
    with pytest.raises(ValueError):
        report_luns_cdb(15)  # SPC-4: below 16 the target answers ILLEGAL REQUEST


def test_read_capacity() -> None:
    assert read_capacity10_cdb() == bytes([0x25]) + bytes(9)
    cdb = read_capacity16_cdb()
    assert len(cdb) == 16
    assert cdb[0] == 0x9E
    assert cdb[1] == 0x10  # service action READ CAPACITY(16)
    assert cdb[2:10] == bytes(8)
    assert be(cdb, 10, 14) == 32
    assert cdb[14] == cdb[15] == 0


def test_read10() -> None:
    cdb = read_cdb(0x12345678, 0xFFFF)
    assert len(cdb) == 10
    assert cdb[0] == 0x28
    assert cdb[1] == 0
    assert be(cdb, 2, 6) == 0x12345678
    assert cdb[6] == 0  # group number
    assert be(cdb, 7, 9) == 0xFFFF
    assert cdb[9] == 0


@pytest.mark.parametrize(("lba", "blocks"), [(0x1_0000_0000, 1), (0, 0x10000),
                                             (0xFFFF_FFFF_FFFF_FFFF, 1)])
def test_read16_chosen_when_needed(lba: int, blocks: int) -> None:
    cdb = read_cdb(lba, blocks)
    assert len(cdb) == 16
    assert cdb[0] == 0x88
    assert cdb[1] == 0
    assert be(cdb, 2, 10) == lba
    assert be(cdb, 10, 14) == blocks
    assert cdb[14] == cdb[15] == 0


def test_read10_at_the_edges() -> None:
    assert read_cdb(0xFFFF_FFFF, 1)[0] == 0x28
    assert read_cdb(0, 1) == bytes([0x28, 0, 0, 0, 0, 0, 0, 0, 1, 0])


def test_write10_and_16() -> None:
    cdb = write_cdb(7, 8)
    assert cdb == bytes([0x2A, 0, 0, 0, 0, 7, 0, 0, 8, 0])
    assert write_cdb(7, 8, fua=True)[1] == 0x08
    cdb = write_cdb(0x1_0000_0001, 0x20000, fua=True)
    assert len(cdb) == 16
    assert cdb[0] == 0x8A
    assert cdb[1] == 0x08  # FUA
    assert be(cdb, 2, 10) == 0x1_0000_0001
    assert be(cdb, 10, 14) == 0x20000


@pytest.mark.parametrize(("lba", "blocks"), [(-1, 1), (0, 0), (0, 0x1_0000_0000),
                                             (0xFFFF_FFFF_FFFF_FFFF, 2), (1 << 64, 1)])
def test_read_write_reject_bad_arguments(lba: int, blocks: int) -> None:
    with pytest.raises(ValueError):
        read_cdb(lba, blocks)
    with pytest.raises(ValueError):
        write_cdb(lba, blocks)


def test_sync_cache() -> None:
    cdb = sync_cache_cdb()
    assert cdb == bytes([0x35]) + bytes(9)  # the whole medium
    cdb = sync_cache_cdb(0x100, 0x10, immed=True)
    assert cdb[0] == 0x35
    assert cdb[1] == 0x02  # IMMED
    assert be(cdb, 2, 6) == 0x100
    assert be(cdb, 7, 9) == 0x10
    cdb = sync_cache_cdb(0x2_0000_0000, 5)
    assert len(cdb) == 16
    assert cdb[0] == 0x91
    assert be(cdb, 2, 10) == 0x2_0000_0000
    assert be(cdb, 10, 14) == 5


def test_unmap() -> None:
    params = unmap_parameter_list([(0x10, 8), (0x1_0000_0000, 0xFFFF_FFFF)])
    assert len(params) == 8 + 2 * 16
    assert be(params, 0, 2) == len(params) - 2  # UNMAP data length
    assert be(params, 2, 4) == 32  # block descriptor data length
    assert params[4:8] == bytes(4)
    assert be(params, 8, 16) == 0x10
    assert be(params, 16, 20) == 8
    assert params[20:24] == bytes(4)
    assert be(params, 24, 32) == 0x1_0000_0000
    assert be(params, 32, 36) == 0xFFFF_FFFF

    cdb = unmap_cdb(len(params), anchor=True)
    assert len(cdb) == 10
    assert cdb[0] == 0x42
    assert cdb[1] == 0x01  # ANCHOR
    assert cdb[2:7] == bytes(5)
    assert be(cdb, 7, 9) == 40  # parameter list length
    assert cdb[9] == 0

    cdb2, params2 = unmap([(1, 2)])
    assert be(cdb2, 7, 9) == len(params2) == 24
    assert cdb2[1] == 0
    for bad in ([], [(0, 0)], [(-1, 1)], [(0, 1 << 32)], [(0, 1)] * 4096):
        with pytest.raises(ValueError):
            unmap_parameter_list(bad)


def test_mode_sense10() -> None:
    cdb = mode_sense10_cdb()
    assert len(cdb) == 10
    assert cdb[0] == 0x5A
    assert cdb[1] == 0x08  # DBD
    assert cdb[2] == 0x3F  # PC 0 (current), all pages
    assert cdb[3] == 0
    assert cdb[4:7] == bytes(3)
    assert be(cdb, 7, 9) == 0xFF
    cdb = mode_sense10_cdb(0x08, 0, 0x200, dbd=False, llbaa=True, pc=3)
    assert cdb[1] == 0x10
    assert cdb[2] == 0xC8
    assert be(cdb, 7, 9) == 0x200
    with pytest.raises(ValueError):
        mode_sense10_cdb(0x40)


# --- INQUIRY -------------------------------------------------------------------------------

def tgt_inquiry(device_type: int, product: bytes) -> bytes:
    # shaped like tgt's spc_inquiry(): SPC-3, HiSup, format 2, CMDQUE, version descriptors
    head = bytes([device_type, 0x00, 0x05, 0x12, 66 - 5, 0x00, 0x00, 0x02])
    body = b"IET     " + product + b"0001"
    return head + body + bytes(66 - len(head) - len(body))


def test_inquiry_tgt_controller_lun0() -> None:
    inq = parse_inquiry(tgt_inquiry(0x0C, b"Controller      "))
    assert inq.peripheral_qualifier == 0
    assert inq.device_type == DeviceType.STORAGE_ARRAY_CONTROLLER
    assert inq.vendor == "IET"
    assert inq.product == "Controller"
    assert inq.revision == "0001"
    assert inq.version == 5
    assert inq.response_data_format == 2
    assert inq.hisup and inq.cmdque
    assert not inq.removable
    assert inq.present


def test_inquiry_tgt_disk() -> None:
    inq = parse_inquiry(tgt_inquiry(0x00, b"VIRTUAL-DISK    "))
    assert inq.device_type == DeviceType.DISK
    assert (inq.vendor, inq.product, inq.revision) == ("IET", "VIRTUAL-DISK", "0001")


def test_inquiry_no_lun_and_flags() -> None:
    data = bytearray(tgt_inquiry(0x1F, b"X" * 16))
    data[0] = 0x7F  # qualifier 011b, type 1Fh
    data[1] = 0x80
    data[5] = 0x31  # TPGS 11b, PROTECT
    inq = parse_inquiry(data)
    assert inq.peripheral_qualifier == 3
    assert not inq.present
    assert inq.removable
    assert inq.tpgs == 3 and inq.protect


def test_inquiry_text_is_sanitised() -> None:
    data = bytearray(tgt_inquiry(0, b"\x1b[31mEVIL\x00\x00\x00\x00\x00\x00\x00"))
    assert parse_inquiry(data).product == "?[31mEVIL"


def test_inquiry_truncated_and_inconsistent() -> None:
    data = tgt_inquiry(0, b"VIRTUAL-DISK    ")
    with pytest.raises(ProtocolError, match="vendor/product/revision"):
        parse_inquiry(data[:35])
    with pytest.raises(ProtocolError, match="header"):
        parse_inquiry(data[:4])
    bad = bytearray(data)
    bad[4] = 20
    with pytest.raises(ProtocolError, match="additional length"):
        parse_inquiry(bad)
    assert parse_inquiry(data[:36]).product == "VIRTUAL-DISK"  # 36 bytes are enough


# --- VPD -----------------------------------------------------------------------------------

def vpd(page: int, body: bytes, device_type: int = 0) -> bytes:
    return bytes([device_type, page]) + len(body).to_bytes(2, "big") + body


def test_vpd_supported_pages() -> None:
    page = parse_vpd_supported_pages(vpd(0x00, bytes([0x00, 0x80, 0x83, 0xB0, 0xB2])))
    assert page.pages == (0x00, 0x80, 0x83, 0xB0, 0xB2)


def test_vpd_serial() -> None:
    assert parse_vpd_serial(vpd(0x80, b"beaf11      ")).serial == "beaf11"
    assert parse_vpd_serial(vpd(0x80, b"")).serial == ""


def test_vpd_wrong_page_and_truncation() -> None:
    with pytest.raises(ProtocolError, match="page 0x80"):
        parse_vpd_serial(vpd(0x83, b"x"))
    full = vpd(0x80, b"0123456789")
    assert vpd_total_length(full[:4]) == 14
    with pytest.raises(ProtocolError, match="allocation length 14"):
        parse_vpd_serial(full[:10])
    with pytest.raises(ProtocolError, match="header"):
        parse_vpd_serial(full[:3])
    with pytest.raises(ProtocolError):
        vpd_total_length(b"\0")


def test_vpd_total_length_within_what_an_inquiry_can_ask() -> None:
    """The total sizes the next INQUIRY, whose allocation length is 16 bits (SPC-4 6.6.1)."""
    assert vpd_total_length(b"\0\x83\xff\xfb") == 0xFFFF
    with pytest.raises(ProtocolError, match="page length 65532 is beyond"):
        vpd_total_length(b"\0\x83\xff\xfc")


NAA = bytes.fromhex("6001405a1b2c3d4e5f60718293a4b5c6")


def designator(code_set: int, assoc_type: int, value: bytes, proto: int = 0) -> bytes:
    return bytes([proto << 4 | code_set, assoc_type, 0, len(value)]) + value


def test_vpd_device_id_tgt_like() -> None:
    # tgt: a T10 vendor ID ("IET" + scsi_id) and an NAA IEEE Registered Extended id
    body = (designator(2, 0x01, b"IET     00010001")
            + designator(1, 0x03, NAA)
            + designator(1, 0x94, b"\x00\x00\x00\x01", proto=5))  # PIV, target port, rel port
    page = parse_vpd_device_id(vpd(0x83, body))
    t10, naa, port = page.designators
    assert (t10.code_set, t10.association, t10.designator_type) == (2, 0, 1)
    assert t10.text() == "IET     00010001"
    assert (naa.code_set, naa.designator_type, naa.value) == (1, 3, NAA)
    assert naa.text() == NAA.hex()
    assert port.piv and port.protocol_identifier == 5
    assert port.association == 1 and port.designator_type == 4
    assert page.display_id() == "naa." + NAA.hex()


def test_display_id_preferences() -> None:
    t10 = parse_vpd_device_id(vpd(0x83, designator(2, 0x01, b"IET     00010001")))
    assert t10.display_id() == "t10.IET     00010001"
    eui = designator(1, 0x02, bytes.fromhex("0011223344556677"))
    name = designator(3, 0x08, b"iqn.2024-01.org.example:disk1,L,0x0001\0\0")
    page = parse_vpd_device_id(vpd(0x83, designator(2, 0x01, b"IET 1") + name + eui))
    assert page.display_id() == "eui.0011223344556677"
    page = parse_vpd_device_id(vpd(0x83, designator(2, 0x01, b"IET 1") + name))
    assert page.display_id() == "iqn.2024-01.org.example:disk1,L,0x0001"
    # an NAA of the target port (association 1) does not name the logical unit
    port_naa = parse_vpd_device_id(vpd(0x83, designator(1, 0x13, NAA)))
    assert port_naa.display_id() is None
    assert display_id([]) is None


def test_vpd_device_id_bad_lengths() -> None:
    with pytest.raises(ProtocolError, match="designator length"):
        parse_vpd_device_id(vpd(0x83, bytes([1, 3, 0, 16]) + NAA[:8]))
    with pytest.raises(ProtocolError, match="designator header"):
        parse_vpd_device_id(vpd(0x83, bytes([1, 3])))


def block_limits_page() -> bytes:
    body = bytearray(0x3C)
    body[0] = 0x01  # WSNZ
    body[1] = 0x10  # max COMPARE AND WRITE
    body[2:4] = (8).to_bytes(2, "big")
    body[4:8] = (0x4000).to_bytes(4, "big")
    body[8:12] = (0x400).to_bytes(4, "big")
    body[12:16] = (0).to_bytes(4, "big")
    body[16:20] = (0x20000).to_bytes(4, "big")
    body[20:24] = (0x100).to_bytes(4, "big")
    body[24:28] = (0x800).to_bytes(4, "big")
    body[28:32] = (0x8000_0003).to_bytes(4, "big")  # UGAVALID, alignment 3
    body[32:40] = (0x1_0000).to_bytes(8, "big")
    return vpd(0xB0, bytes(body))


def test_vpd_block_limits() -> None:
    bl = parse_vpd_block_limits(block_limits_page())
    assert bl.wsnz
    assert bl.max_compare_and_write_length == 0x10
    assert bl.optimal_transfer_length_granularity == 8
    assert bl.max_transfer_length == 0x4000
    assert bl.optimal_transfer_length == 0x400
    assert bl.max_prefetch_length == 0
    assert bl.max_unmap_lba_count == 0x20000
    assert bl.max_unmap_block_descriptor_count == 0x100
    assert bl.optimal_unmap_granularity == 0x800
    assert bl.unmap_granularity_alignment == 3
    assert bl.max_write_same_length == 0x1_0000


def test_vpd_block_limits_short_sbc2_page() -> None:
    full = block_limits_page()
    short = vpd(0xB0, full[4:4 + 0x0C])
    bl = parse_vpd_block_limits(short)
    assert bl.max_transfer_length == 0x4000
    assert bl.max_unmap_lba_count == 0 and bl.unmap_granularity_alignment is None
    with pytest.raises(ProtocolError, match="page length 11"):
        parse_vpd_block_limits(vpd(0xB0, full[4:4 + 0x0B]))


def test_vpd_lbp() -> None:
    lbp = parse_vpd_lbp(vpd(0xB2, bytes([0x00, 0xE4 | 0x02, 0x02, 0x00])))
    assert lbp.lbpu and lbp.lbpws and lbp.lbpws10
    assert lbp.lbprz == 1 and lbp.anc_sup and not lbp.dp
    assert lbp.provisioning_type == ProvisioningType.THIN
    lbp = parse_vpd_lbp(vpd(0xB2, bytes([0x00, 0x00, 0x09, 0x00])))
    assert not (lbp.lbpu or lbp.lbpws or lbp.lbpws10)
    assert lbp.minimum_percentage == 1 and lbp.provisioning_type == ProvisioningType.RESOURCE
    with pytest.raises(ProtocolError, match="page length 3"):
        parse_vpd_lbp(vpd(0xB2, bytes(3)))


# --- REPORT LUNS and LUN numbers -----------------------------------------------------------

def report_luns(*raws: bytes, list_length: int | None = None) -> bytes:
    length = 8 * len(raws) if list_length is None else list_length
    return length.to_bytes(4, "big") + bytes(4) + b"".join(raws)


def test_report_luns_tgt_like() -> None:
    lun0 = bytes(8)
    lun1 = bytes([0x00, 0x01]) + bytes(6)
    flat = bytes([0x41, 0x2C]) + bytes(6)  # flat space, LUN 300
    hier = bytes([0x00, 0x01, 0x00, 0x02]) + bytes(4)  # two levels
    luns = parse_report_luns(report_luns(lun0, lun1, flat, hier))
    assert [lun.number for lun in luns.luns] == [0, 1, 300, None]
    assert [lun.method for lun in luns.luns] == [0, 0, 1, 0]
    assert luns.luns[2].raw == flat
    assert luns.luns[2].field == 0x412C << 48
    assert not luns.truncated


def test_report_luns_truncated_by_allocation_length() -> None:
    data = report_luns(bytes(8), bytes([0, 1]) + bytes(6), list_length=24)
    luns = parse_report_luns(data + b"\x00\x02\x00")  # a partial third entry
    assert len(luns.luns) == 2
    assert luns.truncated and luns.needed_length == 32


def test_report_luns_bad() -> None:
    with pytest.raises(ProtocolError, match="header"):
        parse_report_luns(bytes(7))
    with pytest.raises(ProtocolError, match="multiple of 8"):
        parse_report_luns(report_luns(bytes(8), list_length=12))
    assert parse_report_luns(report_luns()).luns == ()


def test_lun_numbers() -> None:
    assert int_to_lun(0) == 0
    assert int_to_lun(5) == 5 << 48
    assert int_to_lun(255) == 0x00FF << 48
    assert int_to_lun(256) == 0x4100 << 48
    assert int_to_lun(16383) == 0x7FFF << 48
    for n in (0, 1, 255, 256, 300, 16383):
        assert lun_to_int(int_to_lun(n).to_bytes(8, "big")) == n
    assert lun_to_int(bytes([0x40, 0x05]) + bytes(6)) == 5  # flat, below 256: still 5
    for bad_n in (-1, 16384):
        with pytest.raises(ConfigError):
            int_to_lun(bad_n)
    for raw in (bytes([0x80, 1]) + bytes(6), bytes([0x01, 1]) + bytes(6),
                bytes([0, 1, 0, 1]) + bytes(4), bytes(7)):
        with pytest.raises(ProtocolError):
            lun_to_int(raw)


# --- READ CAPACITY, MODE SENSE -------------------------------------------------------------

def test_read_capacity10() -> None:
    cap = parse_read_capacity10(bytes.fromhex("0001ffff00000200"))
    assert cap == Capacity10(num_blocks=0x20000, block_size=512, use_16=False)
    assert parse_read_capacity10(bytes.fromhex("ffffffff00001000")).use_16
    with pytest.raises(ProtocolError, match="READ CAPACITY"):
        parse_read_capacity10(bytes(7))
    with pytest.raises(ProtocolError, match="block length 0"):
        parse_read_capacity10(bytes(8))


def test_read_capacity16() -> None:
    data = bytearray(32)
    data[0:8] = (0x1_FFFF_FFFF).to_bytes(8, "big")
    data[8:12] = (512).to_bytes(4, "big")
    data[12] = 0x03  # P_TYPE 1, PROT_EN
    data[13] = 0x03  # 8 logical blocks per physical block
    data[14] = 0xC0 | 0x01  # LBPME, LBPRZ, lowest aligned LBA high bits
    data[15] = 0x02
    cap = parse_read_capacity16(data)
    assert cap.num_blocks == 0x2_0000_0000
    assert cap.block_size == 512
    assert cap.prot_en and cap.p_type == 1
    assert cap.lb_per_pb_exponent == 3 and cap.physical_block_size == 4096
    assert cap.lbpme and cap.lbprz
    assert cap.lowest_aligned_lba == 0x102
    assert parse_read_capacity16(data[:16]) == cap
    with pytest.raises(ProtocolError, match="READ CAPACITY\\(16\\)"):
        parse_read_capacity16(data[:15])


def test_mode_sense10_header() -> None:
    hdr = parse_mode_sense10_header(bytes([0, 0x26, 0, 0x90, 0, 0, 0, 8]) + bytes(32))
    assert hdr.write_protect and hdr.dpofua
    assert hdr.mode_data_length == 0x26 and hdr.block_descriptor_length == 8
    assert not parse_mode_sense10_header(bytes([0, 6, 0, 0x10, 1, 0, 0, 0])).write_protect
    assert parse_mode_sense10_header(bytes([0, 6, 0, 0, 1, 0, 0, 0])).longlba
    with pytest.raises(ProtocolError, match="header"):
        parse_mode_sense10_header(bytes(7))
    with pytest.raises(ProtocolError, match="mode data length 5"):
        parse_mode_sense10_header(bytes([0, 5, 0, 0, 0, 0, 0, 0]))
    with pytest.raises(ProtocolError, match="block descriptor length 8"):
        parse_mode_sense10_header(bytes([0, 6, 0, 0, 0, 0, 0, 8]))


# --- every parser, random bytes ------------------------------------------------------------

PARSERS: list[Callable[[bytes], Any]] = [
    parse_inquiry, parse_vpd_supported_pages, parse_vpd_serial, parse_vpd_device_id,
    parse_vpd_block_limits, parse_vpd_lbp, parse_report_luns, parse_read_capacity10,
    parse_read_capacity16, parse_mode_sense10_header, parse_sense, lun_to_int, vpd_total_length,
]
VPD_PARSERS = [(0x00, parse_vpd_supported_pages), (0x80, parse_vpd_serial),
               (0x83, parse_vpd_device_id), (0xB0, parse_vpd_block_limits),
               (0xB2, parse_vpd_lbp)]


@settings(max_examples=300)
@given(st.binary(max_size=200), st.sampled_from(PARSERS))
def test_random_bytes_raise_only_protocol_error(data: bytes, parser: Callable[[bytes], Any],
                                                ) -> None:
    with contextlib.suppress(ProtocolError):
        parser(data)


@settings(max_examples=300)
@given(st.sampled_from(VPD_PARSERS), st.binary(max_size=120), st.integers(0, 130))
def test_random_vpd_bodies(page_parser: tuple[int, Callable[[bytes], Any]], body: bytes,
                           length: int) -> None:
    page, parser = page_parser
    with contextlib.suppress(ProtocolError):
        parser(bytes([0, page]) + length.to_bytes(2, "big") + body)


@settings(max_examples=300)
@given(st.sampled_from([0x70, 0x71, 0x72, 0x73, 0xF0, 0xF2]), st.binary(max_size=60))
def test_random_sense_bodies(code: int, body: bytes) -> None:
    try:
        sense = parse_sense(bytes([code]) + body)
    except ProtocolError:
        assert len(body) < 3
        return
    assert 0 <= sense_errno(sense) < 256
    status_error(ScsiStatus.CHECK_CONDITION, sense)


# --- sense ---------------------------------------------------------------------------------

def fixed_sense(key: int, asc: int, ascq: int, *, code: int = 0x70,
                info: int | None = None) -> bytes:
    data = bytearray(18)
    data[0] = code | (0x80 if info is not None else 0)
    data[2] = key
    if info is not None:
        data[3:7] = info.to_bytes(4, "big")
    data[7] = 10
    data[12], data[13] = asc, ascq
    return bytes(data)


def descriptor_sense(key: int, asc: int, ascq: int, *, code: int = 0x72,
                     info: int | None = None) -> bytes:
    descriptors = b""
    if info is not None:
        descriptors += bytes([0x00, 0x0A, 0x80, 0]) + info.to_bytes(8, "big")
    return bytes([code, key, asc, ascq, 0, 0, 0, len(descriptors)]) + descriptors


def test_fixed_sense() -> None:
    sense = parse_sense(fixed_sense(0x07, 0x27, 0x00))
    assert sense == Sense(SenseKey.DATA_PROTECT, 0x27, 0x00, False, None, "write protected")
    sense = parse_sense(fixed_sense(0x03, 0x11, 0x00, code=0x71, info=0x1234))
    assert sense.key is SenseKey.MEDIUM_ERROR and sense.deferred
    assert sense.information == 0x1234
    assert sense.description == "unrecovered read error"


def test_fixed_sense_short() -> None:
    # only 8 bytes: ASC/ASCQ absent, the key still counts
    sense = parse_sense(bytes([0x70, 0, 0x06, 0, 0, 0, 0, 0]))
    assert sense.key is SenseKey.UNIT_ATTENTION and (sense.asc, sense.ascq) == (0, 0)
    # additional length says 5: ASC in, ASCQ out
    data = bytearray(fixed_sense(0x05, 0x24, 0x01))
    data[7] = 5
    assert (parse_sense(data).asc, parse_sense(data).ascq) == (0x24, 0)
    with pytest.raises(ProtocolError, match="sense key"):
        parse_sense(bytes([0x70, 0]))
    with pytest.raises(ProtocolError, match="empty"):
        parse_sense(b"")
    with pytest.raises(ProtocolError, match="response code 0x7f"):
        parse_sense(bytes([0x7F]) + bytes(17))


def test_descriptor_sense() -> None:
    sense = parse_sense(descriptor_sense(0x03, 0x11, 0x00, info=0x1_0000_0000))
    assert sense.key is SenseKey.MEDIUM_ERROR and not sense.deferred
    assert (sense.asc, sense.ascq) == (0x11, 0x00)
    assert sense.information == 0x1_0000_0000
    sense = parse_sense(descriptor_sense(0x06, 0x2A, 0x09, code=0x73))
    assert sense.deferred and sense.description == "capacity data has changed"
    assert sense.information is None
    # a descriptor running past the end is dropped, the rest stands
    data = descriptor_sense(0x05, 0x21, 0x00, info=7)
    assert parse_sense(data[:12]).key is SenseKey.ILLEGAL_REQUEST
    assert parse_sense(data[:12]).information is None
    assert parse_sense(data[:4]).asc == 0x21
    with pytest.raises(ProtocolError, match="ASC/ASCQ"):
        parse_sense(data[:3])


@pytest.mark.parametrize(("asc", "ascq", "text"), [
    (0x29, 0x00, "power on, reset, or bus device reset occurred"),
    (0x2A, 0x09, "capacity data has changed"),
    (0x3F, 0x0E, "reported LUNs data has changed"),
    (0x27, 0x00, "write protected"),
    (0x20, 0x00, "invalid command operation code"),
    (0x24, 0x00, "invalid field in CDB"),
    (0x21, 0x00, "logical block address out of range"),
    (0x11, 0x00, "unrecovered read error"),
    (0x04, 0x01, "logical unit is in process of becoming ready"),
    (0x04, 0x7E, "logical unit not ready"),  # unknown ASCQ: the family text
    (0x3A, 0x00, "medium not present"),
    (0x80, 0x01, ""),
])
def test_asc_texts(asc: int, ascq: int, text: str) -> None:
    assert parse_sense(fixed_sense(0x02, asc, ascq)).description == text


ERRNO_TABLE = [
    (0x0, 0x00, 0x00, errno.EIO),  # NO SENSE with CHECK CONDITION: unexplained
    (0x1, 0x17, 0x01, 0),  # RECOVERED ERROR: done
    (0x2, 0x04, 0x01, errno.EIO),
    (0x2, 0x3A, 0x00, ENOMEDIUM),
    (0x3, 0x11, 0x00, errno.EIO),
    (0x4, 0x44, 0x00, errno.EIO),
    (0x5, 0x24, 0x00, errno.EINVAL),
    (0x5, 0x26, 0x00, errno.EINVAL),
    (0x5, 0x20, 0x00, errno.EOPNOTSUPP),
    (0x5, 0x21, 0x00, errno.ENOSPC),
    (0x5, 0x25, 0x00, errno.ENXIO),
    (0x6, 0x29, 0x00, errno.EIO),
    (0x6, 0x3A, 0x00, ENOMEDIUM),
    (0x7, 0x27, 0x00, errno.EROFS),
    (0x7, 0x27, 0x07, errno.ENOSPC),
    (0x8, 0x00, 0x00, errno.EIO),
    (0xB, 0x47, 0x00, errno.EIO),
    (0xD, 0x00, 0x00, errno.ENOSPC),
    (0xE, 0x1D, 0x00, errno.EIO),
    (0xF, 0x00, 0x00, 0),
]


@pytest.mark.parametrize(("key", "asc", "ascq", "expected"), ERRNO_TABLE)
def test_sense_errno(key: int, asc: int, ascq: int, expected: int) -> None:
    assert sense_errno(parse_sense(fixed_sense(key, asc, ascq))) == expected


@pytest.mark.parametrize(("data", "retryable"), [
    (fixed_sense(0x6, 0x29, 0x00), True),
    (fixed_sense(0x6, 0x2A, 0x09), True),
    (fixed_sense(0x6, 0x3F, 0x0E), True),
    (fixed_sense(0xB, 0x47, 0x00), True),
    (fixed_sense(0xB, 0x10, 0x01), False),  # protection information: the data is bad
    (fixed_sense(0x2, 0x04, 0x01), True),
    (fixed_sense(0x2, 0x04, 0x0A), True),
    (fixed_sense(0x2, 0x04, 0x02), False),
    (fixed_sense(0x2, 0x3A, 0x00), False),
    (fixed_sense(0x3, 0x11, 0x00), False),
    (fixed_sense(0x3, 0x0C, 0x00, code=0x71), True),  # deferred: this command never ran
    (fixed_sense(0x5, 0x24, 0x00), False),
    (fixed_sense(0x7, 0x27, 0x00), False),
])
def test_is_retryable(data: bytes, retryable: bool) -> None:
    assert is_retryable(parse_sense(data)) is retryable


# --- status --------------------------------------------------------------------------------

def test_status_values() -> None:
    assert [int(s) for s in ScsiStatus] == [0, 2, 4, 8, 0x18, 0x28, 0x30, 0x40]


def test_status_error_check_condition() -> None:
    err = status_error(ScsiStatus.CHECK_CONDITION, fixed_sense(0x07, 0x27, 0x00))
    assert isinstance(err, ScsiError)
    assert str(err) == "SCSI CHECK CONDITION: DATA PROTECT, write protected (27/00)"
    assert err.errno_value == errno.EROFS and not err.retryable
    assert err.sense is not None and err.sense.key is SenseKey.DATA_PROTECT

    err = status_error(2, parse_sense(fixed_sense(0x06, 0x2A, 0x09)))
    assert str(err) == "SCSI CHECK CONDITION: UNIT ATTENTION, capacity data has changed (2A/09)"
    assert err.retryable and err.errno_value == errno.EIO

    err = status_error(2, fixed_sense(0x03, 0x80, 0x01, code=0x71))
    assert str(err) == "SCSI CHECK CONDITION: deferred MEDIUM ERROR (80/01)"

    err = status_error(2, descriptor_sense(0x05, 0x21, 0x00))
    assert err.errno_value == errno.ENOSPC
    assert "ILLEGAL REQUEST, logical block address out of range (21/00)" in str(err)


def test_status_error_without_usable_sense() -> None:
    err = status_error(ScsiStatus.CHECK_CONDITION, b"")
    assert str(err) == "SCSI CHECK CONDITION without sense data"
    assert err.errno_value == errno.EIO
    err = status_error(ScsiStatus.CHECK_CONDITION, b"\x7f\x00")
    assert "malformed sense data (2 bytes)" in str(err)
    assert err.errno_value == errno.EIO
    # a recovered error passed here anyway still yields a real errno
    assert status_error(2, fixed_sense(0x1, 0, 0)).errno_value == errno.EIO


@pytest.mark.parametrize(("status", "text", "err", "retryable"), [
    (ScsiStatus.BUSY, "SCSI BUSY", errno.EAGAIN, True),
    (ScsiStatus.TASK_SET_FULL, "SCSI TASK SET FULL", errno.EAGAIN, True),
    (ScsiStatus.ACA_ACTIVE, "SCSI ACA ACTIVE", errno.EAGAIN, True),
    (ScsiStatus.RESERVATION_CONFLICT, "SCSI RESERVATION CONFLICT", errno.EBUSY, False),
    (ScsiStatus.TASK_ABORTED, "SCSI TASK ABORTED", errno.EIO, True),
    (0x22, "SCSI status 0x22", errno.EIO, False),
])
def test_status_error_other_statuses(status: int, text: str, err: int, retryable: bool) -> None:
    exc = status_error(status)
    assert isinstance(exc, ScsiStatusError)
    assert (str(exc), exc.errno_value, exc.retryable, exc.status) == (text, err, retryable, status)


def test_status_ok() -> None:
    assert status_ok(ScsiStatus.GOOD) and status_ok(ScsiStatus.CONDITION_MET)
    assert status_ok(2, parse_sense(fixed_sense(0x1, 0x17, 0x01)))
    assert not status_ok(2, parse_sense(fixed_sense(0x5, 0x24, 0)))
    assert not status_ok(2) and not status_ok(ScsiStatus.BUSY)
    with pytest.raises(ValueError):
        status_error(ScsiStatus.GOOD)
