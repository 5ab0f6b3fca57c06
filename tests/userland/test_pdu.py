"""PDU encode/decode: every opcode round-trips; bad bytes only ever raise ProtocolError."""

from __future__ import annotations

import contextlib
import dataclasses
import struct
from typing import Any

import pytest
from crc32c import crc32c
from hypothesis import given, settings
from hypothesis import strategies as st

from userland.errors import DigestError, ProtocolError
from userland.pdu import (
    BHS_LEN,
    PDU_CLASSES,
    R2T,
    DataIn,
    LoginRequest,
    LoginResponse,
    NopIn,
    Opcode,
    Pdu,
    PduReader,
    Reject,
    ScsiCommand,
    ScsiResponse,
    decode,
    digest,
    sn_add,
    sn_le,
    sn_lt,
)

ALL_OPCODES = frozenset(PDU_CLASSES)

_U32 = st.integers(0, 0xFFFFFFFF)


def _field_strategy(cls: type[Pdu], f: dataclasses.Field[object]) -> st.SearchStrategy[object]:
    """A value that fits the field's wire width."""
    codes = {name: code for name, _, code in cls._LAYOUT}
    name = f.name
    if name == "data":
        return st.binary(max_size=300)
    if name == "ahs":
        return st.integers(0, 3).map(lambda n: bytes(range(4 * n)))
    if name == "itt":
        return _U32
    if name in codes:
        code = codes[name]
        if code.endswith("s"):
            return st.binary(min_size=int(code[:-1]), max_size=int(code[:-1]))
        return st.integers(0, (1 << (8 * struct.calcsize(code))) - 1)
    if f.type in ("bool", bool):
        return st.booleans()
    # flag sub-fields stored in byte 1
    limits = {"attr": 7, "function": 0x7F, "reason": 0x7F, "snack_type": 0x0F,
              "csg": 1, "nsg": 3}
    return st.integers(0, limits[name])


def _valid(pdu: Pdu) -> bool:
    """Exclude flag combinations the decoder rightly refuses."""
    if isinstance(pdu, LoginResponse | LoginRequest) and pdu.transit and pdu.cont:
        return False
    if isinstance(pdu, LoginResponse) and pdu.transit and pdu.nsg == 2:
        return False
    if isinstance(pdu, ScsiResponse) and pdu.overflow and pdu.underflow:
        return False
    if isinstance(pdu, DataIn) and pdu.has_status and not pdu.final:
        return False
    if isinstance(pdu, R2T) and (pdu.ttt == 0xFFFFFFFF or pdu.desired_data_transfer_length == 0):
        return False
    from userland.pdu import TextResponse
    return not (isinstance(pdu, TextResponse) and pdu.final and pdu.cont)


@st.composite
def any_pdu(draw: st.DrawFn) -> Pdu:
    cls = draw(st.sampled_from(sorted(PDU_CLASSES.values(), key=lambda c: c.OPCODE)))
    kwargs: dict[str, Any] = {f.name: draw(_field_strategy(cls, f))
                              for f in dataclasses.fields(cls)}
    pdu = cls(**kwargs)
    return pdu if _valid(pdu) else draw(any_pdu())


@pytest.mark.parametrize("cls", list(PDU_CLASSES.values()), ids=lambda c: c.__name__)
def test_every_opcode_has_a_48_byte_layout(cls: type[Pdu]) -> None:
    bhs = cls().encode_bhs()
    assert len(bhs) == BHS_LEN
    assert bhs[0] & 0x3F == cls.OPCODE


@settings(max_examples=400)
@given(any_pdu(), st.booleans(), st.booleans())
def test_round_trip_every_opcode(pdu: Pdu, hdig: bool, ddig: bool) -> None:
    wire = pdu.encode(header_digest=hdig, data_digest=ddig)
    assert len(wire) % 4 == 0
    back = decode(wire, header_digest=hdig, data_digest=ddig, allowed=ALL_OPCODES)
    assert type(back) is type(pdu)
    assert back == pdu


@settings(max_examples=300)
@given(st.lists(any_pdu(), min_size=1, max_size=5), st.integers(1, 97))
def test_stream_reader_splits_at_any_boundary(pdus: list[Pdu], step: int) -> None:
    wire = b"".join(p.encode() for p in pdus)
    reader = PduReader(allowed=ALL_OPCODES)
    out: list[Pdu] = []
    for i in range(0, len(wire), step):
        reader.feed(wire[i:i + step])
        while (p := reader.next_pdu()) is not None:
            out.append(p)
    assert out == pdus
    assert reader.buffered == 0


@settings(max_examples=2000)
@given(st.binary(min_size=0, max_size=400), st.booleans(), st.booleans())
def test_random_bytes_raise_only_protocol_error(blob: bytes, hdig: bool, ddig: bool) -> None:
    with contextlib.suppress(ProtocolError):
        decode(blob, header_digest=hdig, data_digest=ddig, max_data_segment_length=256)


@settings(max_examples=500)
@given(any_pdu(), st.integers(0, 10_000), st.integers(0, 255))
def test_corrupted_pdu_raises_only_protocol_error(pdu: Pdu, pos: int, flip: int) -> None:
    wire = bytearray(pdu.encode(header_digest=True, data_digest=True))
    wire[pos % len(wire)] ^= flip
    with contextlib.suppress(ProtocolError):
        decode(bytes(wire), header_digest=True, data_digest=True, allowed=ALL_OPCODES)


def test_crc32c_matches_rfc_7143_vector() -> None:
    # RFC 7143 B.4: 32 bytes of zeros -> CRC aa 36 91 8a (as sent on the wire)
    assert digest(bytes(32)) == bytes.fromhex("aa36918a")
    assert digest(bytes([0xFF] * 32)) == bytes.fromhex("43aba862")
    assert digest(bytes(range(32))) == bytes.fromhex("4e79dd46")


def test_header_digest_mismatch_names_the_problem() -> None:
    wire = bytearray(NopIn(itt=7, data=b"ping").encode(header_digest=True))
    wire[BHS_LEN] ^= 1
    with pytest.raises(DigestError, match="header digest"):
        decode(bytes(wire), header_digest=True)


def test_data_digest_covers_padding() -> None:
    pdu = DataIn(itt=1, data=b"abcde")  # 3 bytes of padding
    wire = pdu.encode(data_digest=True)
    assert len(wire) == BHS_LEN + 8 + 4
    assert wire[-4:] == struct.pack("<I", crc32c(b"abcde\0\0\0"))
    bad = bytearray(wire)
    bad[-5] ^= 0xFF  # a padding byte
    with pytest.raises(DigestError, match="data digest"):
        decode(bytes(bad), data_digest=True)


def test_data_segment_beyond_our_limit_is_refused() -> None:
    wire = DataIn(itt=1, data=bytes(1024)).encode()
    with pytest.raises(ProtocolError, match="MaxRecvDataSegmentLength 512"):
        decode(wire, max_data_segment_length=512)


def test_unknown_and_initiator_opcodes_are_refused_from_a_target() -> None:
    wire = bytearray(NopIn().encode())
    wire[0] = 0x1C  # not an opcode at all
    with pytest.raises(ProtocolError, match="opcode 0x1c"):
        decode(bytes(wire))
    with pytest.raises(ProtocolError, match="opcode 0x01"):
        decode(ScsiCommand().encode())


def test_truncated_and_overlong_pdus() -> None:
    wire = NopIn(data=b"12345678").encode()
    with pytest.raises(ProtocolError, match="expected"):
        decode(wire[:-1])
    with pytest.raises(ProtocolError, match="expected"):
        decode(wire + b"\0\0\0\0")
    with pytest.raises(ProtocolError, match="shorter than a BHS"):
        decode(wire[:20])


def test_scsi_command_fields_on_the_wire() -> None:
    cdb = bytes([0x28, 0, 0, 0, 0, 8, 0, 0, 1, 0]) + bytes(6)
    pdu = ScsiCommand(read=True, itt=0x1234, lun=1 << 48, expected_data_transfer_length=512,
                      cmd_sn=5, exp_stat_sn=9, cdb=cdb)
    wire = pdu.encode()
    assert wire[0] == 0x01 and wire[1] == 0x80 | 0x40 | 0x01
    assert wire[8:16] == (1 << 48).to_bytes(8, "big")
    assert wire[16:20] == bytes.fromhex("00001234")
    assert struct.unpack(">III", wire[20:32]) == (512, 5, 9)
    assert wire[32:48] == cdb


def test_login_request_flags_and_isid() -> None:
    pdu = LoginRequest(transit=True, csg=1, nsg=3, isid=bytes.fromhex("800102030405"), tsih=7)
    wire = pdu.encode()
    assert wire[0] == 0x43  # immediate + opcode 3
    assert wire[1] == 0x80 | (1 << 2) | 3
    assert wire[8:14] == bytes.fromhex("800102030405") and wire[14:16] == b"\0\x07"


def test_scsi_response_sense_length_checked() -> None:
    resp = ScsiResponse(status=2, data=b"\x00\x12" + bytes(18))
    assert len(resp.sense()) == 18
    with pytest.raises(ProtocolError, match="SenseLength"):
        ScsiResponse(status=2, data=b"\x00\x40" + bytes(4)).sense()


def test_reject_carries_the_rejected_header() -> None:
    rejected = ScsiCommand(itt=0xABCD).encode_bhs()
    assert Reject(reason=4, data=rejected).rejected_itt() == 0xABCD


def test_opcodes_are_rfc_values() -> None:
    assert {int(o) for o in Opcode} == {0x00, 0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x10, 0x20,
                                        0x21, 0x22, 0x23, 0x24, 0x25, 0x26, 0x31, 0x32, 0x3F}


def test_serial_number_arithmetic_wraps() -> None:
    assert sn_lt(0xFFFFFFFF, 0) and not sn_lt(0, 0xFFFFFFFF)
    assert sn_le(5, 5) and sn_add(0xFFFFFFFF, 2) == 1
