"""iSCSI PDUs (RFC 7143 section 11): the 48-byte BHS, AHS, data segment, padding, digests.

Each opcode is a dataclass. Its BHS fields beyond the common ones are declared in a
small table (name, offset, struct code), compiled once into one ``struct.Struct`` per
opcode, so encoding and decoding a header is a single pack/unpack call. The flags byte
(byte 1) has a per-opcode meaning and is mapped by each class's ``_flags_*`` pair.

Decoding is strict: any length, opcode, reserved-value or digest problem raises
``ProtocolError`` naming the field. Nothing else escapes (tests feed random bytes).
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass, fields
from typing import Any, ClassVar

from crc32c import crc32c

from userland.errors import DigestError, ProtocolError

BHS_LEN = 48
DIGEST_LEN = 4
MAX_DATA_SEGMENT = (1 << 24) - 1
RESERVED_TAG = 0xFFFFFFFF

Buffer = bytes | bytearray | memoryview


class Opcode(enum.IntEnum):
    # initiator -> target
    NOP_OUT = 0x00
    SCSI_COMMAND = 0x01
    TASK_MGMT_REQUEST = 0x02
    LOGIN_REQUEST = 0x03
    TEXT_REQUEST = 0x04
    DATA_OUT = 0x05
    LOGOUT_REQUEST = 0x06
    SNACK_REQUEST = 0x10
    # target -> initiator
    NOP_IN = 0x20
    SCSI_RESPONSE = 0x21
    TASK_MGMT_RESPONSE = 0x22
    LOGIN_RESPONSE = 0x23
    TEXT_RESPONSE = 0x24
    DATA_IN = 0x25
    LOGOUT_RESPONSE = 0x26
    R2T = 0x31
    ASYNC_MESSAGE = 0x32
    REJECT = 0x3F


def pad_len(n: int) -> int:
    """Bytes of padding after a data segment of n bytes (to a 4-byte boundary)."""
    return -n & 3


def digest(data: Buffer) -> bytes:
    """CRC32C as it goes on the wire (least significant byte first, RFC 7143 B.4)."""
    return struct.pack("<I", crc32c(data))


# ---------------------------------------------------------------------------
# The PDU classes


@dataclass(slots=True)
class Pdu:
    """Common BHS fields. Subclasses add their own via ``_LAYOUT``."""

    OPCODE: ClassVar[Opcode]
    # (field name, BHS offset, struct code) for fields beyond byte 0, 1, 4..7 and 16..19.
    _LAYOUT: ClassVar[tuple[tuple[str, int, str], ...]] = ()
    _STRUCT: ClassVar[struct.Struct]
    _NAMES: ClassVar[tuple[str, ...]]

    immediate: bool = False
    itt: int = RESERVED_TAG
    ahs: bytes = b""
    data: Buffer = b""

    def _flags_pack(self) -> int:
        return 0x80

    @classmethod
    def _flags_unpack(cls, flags: int) -> dict[str, Any]:
        return {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        # No zero-argument super() here: dataclass(slots=True) recreates the class,
        # which breaks its __class__ cell. object.__init_subclass__ does nothing anyway.
        cls._compile()

    @classmethod
    def _compile(cls) -> None:
        # One big-endian struct over the whole BHS: opcode, flags, then the class's
        # fields by offset, with the common length word at 4 and ITT at 16.
        layout = sorted([*cls._LAYOUT, ("_len_word", 4, "I"), ("itt", 16, "I")],
                        key=lambda f: f[1])
        fmt = ">BB"
        pos = 2
        names: list[str] = []
        for name, offset, code in layout:
            if offset < pos:
                raise TypeError(f"{cls.__name__}: field {name} overlaps at {offset}")
            fmt += "x" * (offset - pos)
            fmt += code
            pos = offset + struct.calcsize(">" + code)
            names.append(name)
        fmt += "x" * (BHS_LEN - pos)
        cls._STRUCT = struct.Struct(fmt)
        assert cls._STRUCT.size == BHS_LEN, cls.__name__
        cls._NAMES = tuple(names)

    # -- encoding

    def encode_bhs(self, data_len: int | None = None) -> bytes:
        """The 48-byte BHS. ``data_len`` overrides len(self.data) (for scatter sends)."""
        dlen = len(self.data) if data_len is None else data_len
        if dlen > MAX_DATA_SEGMENT:
            raise ValueError("data segment longer than 2^24-1")
        if len(self.ahs) % 4 or len(self.ahs) > 255 * 4:
            raise ValueError("AHS must be a multiple of 4 bytes, at most 1020")
        values = []
        for name in self._NAMES:
            if name == "_len_word":
                values.append((len(self.ahs) // 4) << 24 | dlen)
            else:
                values.append(getattr(self, name))
        byte0 = int(self.OPCODE) | (0x40 if self.immediate else 0)
        return self._STRUCT.pack(byte0, self._flags_pack(), *values)

    def encode(self, *, header_digest: bool = False, data_digest: bool = False) -> bytes:
        """The whole PDU as bytes. Copies the data; the data path uses ``encode_parts``."""
        return b"".join(self.encode_parts(header_digest=header_digest,
                                          data_digest=data_digest))

    def encode_parts(self, *, header_digest: bool = False,
                     data_digest: bool = False) -> list[Buffer]:
        """The PDU as a list of buffers for ``sendmsg``: the data segment is not copied."""
        header = self.encode_bhs() + self.ahs
        parts: list[Buffer] = [header]
        if header_digest:
            parts.append(digest(header))
        if self.data:
            parts.append(self.data)
            padding = b"\0" * pad_len(len(self.data))
            if padding:
                parts.append(padding)
            if data_digest:
                crc = crc32c(self.data)
                if padding:
                    crc = crc32c(padding, crc)
                parts.append(struct.pack("<I", crc))
        return parts

    # -- decoding

    @classmethod
    def from_bhs(cls, bhs: Buffer, ahs: bytes, data: Buffer) -> Pdu:
        byte0, flags, *values = cls._STRUCT.unpack(bhs)
        kwargs: dict[str, Any] = {"immediate": bool(byte0 & 0x40), "ahs": ahs, "data": data}
        for name, value in zip(cls._NAMES, values, strict=True):
            if name != "_len_word":
                kwargs[name] = value
        kwargs.update(cls._flags_unpack(flags))
        pdu = cls(**kwargs)
        pdu._validate()
        return pdu

    def _validate(self) -> None:
        """Per-opcode checks beyond the layout (reserved tags, flag combinations)."""

    def describe(self) -> str:
        """One line for -v logs: opcode and fields, data as a length (never its bytes)."""
        skip = {"ahs", "data"}
        parts = [f"{f.name}={getattr(self, f.name)!r}" for f in fields(self)
                 if f.name not in skip and not f.name.startswith("_")]
        return f"{type(self).__name__}({', '.join(parts)}, data={len(self.data)}B)"


def _bit(flags: int, mask: int) -> bool:
    return bool(flags & mask)


# -- initiator PDUs


@dataclass(slots=True)
class NopOut(Pdu):
    OPCODE: ClassVar[Opcode] = Opcode.NOP_OUT
    _LAYOUT = (("lun", 8, "Q"), ("ttt", 20, "I"), ("cmd_sn", 24, "I"), ("exp_stat_sn", 28, "I"))
    lun: int = 0
    ttt: int = RESERVED_TAG
    cmd_sn: int = 0
    exp_stat_sn: int = 0


@dataclass(slots=True)
class ScsiCommand(Pdu):
    OPCODE: ClassVar[Opcode] = Opcode.SCSI_COMMAND
    _LAYOUT = (("lun", 8, "Q"), ("expected_data_transfer_length", 20, "I"),
               ("cmd_sn", 24, "I"), ("exp_stat_sn", 28, "I"), ("cdb", 32, "16s"))
    final: bool = True
    read: bool = False
    write: bool = False
    attr: int = 1  # SIMPLE task attribute
    lun: int = 0
    expected_data_transfer_length: int = 0
    cmd_sn: int = 0
    exp_stat_sn: int = 0
    cdb: bytes = bytes(16)

    def _flags_pack(self) -> int:
        return ((0x80 if self.final else 0) | (0x40 if self.read else 0)
                | (0x20 if self.write else 0) | (self.attr & 0x07))

    @classmethod
    def _flags_unpack(cls, flags: int) -> dict[str, Any]:
        return {"final": _bit(flags, 0x80), "read": _bit(flags, 0x40),
                "write": _bit(flags, 0x20), "attr": flags & 0x07}


class TmfFunction(enum.IntEnum):
    ABORT_TASK = 1
    ABORT_TASK_SET = 2
    CLEAR_ACA = 3
    CLEAR_TASK_SET = 4
    LOGICAL_UNIT_RESET = 5
    TARGET_WARM_RESET = 6
    TARGET_COLD_RESET = 7
    TASK_REASSIGN = 8


@dataclass(slots=True)
class TaskMgmtRequest(Pdu):
    OPCODE: ClassVar[Opcode] = Opcode.TASK_MGMT_REQUEST
    _LAYOUT = (("lun", 8, "Q"), ("rtt", 20, "I"), ("cmd_sn", 24, "I"),
               ("exp_stat_sn", 28, "I"), ("ref_cmd_sn", 32, "I"), ("exp_data_sn", 36, "I"))
    function: int = TmfFunction.ABORT_TASK
    lun: int = 0
    rtt: int = RESERVED_TAG
    cmd_sn: int = 0
    exp_stat_sn: int = 0
    ref_cmd_sn: int = 0
    exp_data_sn: int = 0

    def _flags_pack(self) -> int:
        return 0x80 | (self.function & 0x7F)

    @classmethod
    def _flags_unpack(cls, flags: int) -> dict[str, Any]:
        return {"function": flags & 0x7F}


class Stage(enum.IntEnum):
    SECURITY = 0
    OPERATIONAL = 1
    FULL_FEATURE = 3


def _login_flags(transit: bool, cont: bool, csg: int, nsg: int) -> int:
    return (0x80 if transit else 0) | (0x40 if cont else 0) | (csg & 3) << 2 | (nsg & 3)


def _login_flags_unpack(flags: int) -> dict[str, Any]:
    return {"transit": _bit(flags, 0x80), "cont": _bit(flags, 0x40),
            "csg": (flags >> 2) & 3, "nsg": flags & 3}


@dataclass(slots=True)
class LoginRequest(Pdu):
    OPCODE: ClassVar[Opcode] = Opcode.LOGIN_REQUEST
    _LAYOUT = (("version_max", 2, "B"), ("version_min", 3, "B"), ("isid", 8, "6s"),
               ("tsih", 14, "H"), ("cid", 20, "H"), ("cmd_sn", 24, "I"),
               ("exp_stat_sn", 28, "I"))
    immediate: bool = True
    transit: bool = False
    cont: bool = False
    csg: int = Stage.SECURITY
    nsg: int = 0
    version_max: int = 0
    version_min: int = 0
    isid: bytes = bytes(6)
    tsih: int = 0
    cid: int = 0
    cmd_sn: int = 0
    exp_stat_sn: int = 0

    def _flags_pack(self) -> int:
        return _login_flags(self.transit, self.cont, self.csg, self.nsg)

    @classmethod
    def _flags_unpack(cls, flags: int) -> dict[str, Any]:
        return _login_flags_unpack(flags)


@dataclass(slots=True)
class TextRequest(Pdu):
    OPCODE: ClassVar[Opcode] = Opcode.TEXT_REQUEST
    _LAYOUT = (("lun", 8, "Q"), ("ttt", 20, "I"), ("cmd_sn", 24, "I"), ("exp_stat_sn", 28, "I"))
    final: bool = True
    cont: bool = False
    lun: int = 0
    ttt: int = RESERVED_TAG
    cmd_sn: int = 0
    exp_stat_sn: int = 0

    def _flags_pack(self) -> int:
        return (0x80 if self.final else 0) | (0x40 if self.cont else 0)

    @classmethod
    def _flags_unpack(cls, flags: int) -> dict[str, Any]:
        return {"final": _bit(flags, 0x80), "cont": _bit(flags, 0x40)}


@dataclass(slots=True)
class DataOut(Pdu):
    OPCODE: ClassVar[Opcode] = Opcode.DATA_OUT
    _LAYOUT = (("lun", 8, "Q"), ("ttt", 20, "I"), ("exp_stat_sn", 28, "I"),
               ("data_sn", 36, "I"), ("buffer_offset", 40, "I"))
    final: bool = False
    lun: int = 0
    ttt: int = RESERVED_TAG
    exp_stat_sn: int = 0
    data_sn: int = 0
    buffer_offset: int = 0

    def _flags_pack(self) -> int:
        return 0x80 if self.final else 0

    @classmethod
    def _flags_unpack(cls, flags: int) -> dict[str, Any]:
        return {"final": _bit(flags, 0x80)}


class LogoutReason(enum.IntEnum):
    CLOSE_SESSION = 0
    CLOSE_CONNECTION = 1
    REMOVE_FOR_RECOVERY = 2


@dataclass(slots=True)
class LogoutRequest(Pdu):
    OPCODE: ClassVar[Opcode] = Opcode.LOGOUT_REQUEST
    _LAYOUT = (("cid", 20, "H"), ("cmd_sn", 24, "I"), ("exp_stat_sn", 28, "I"))
    immediate: bool = True
    reason: int = LogoutReason.CLOSE_SESSION
    cid: int = 0
    cmd_sn: int = 0
    exp_stat_sn: int = 0

    def _flags_pack(self) -> int:
        return 0x80 | (self.reason & 0x7F)

    @classmethod
    def _flags_unpack(cls, flags: int) -> dict[str, Any]:
        return {"reason": flags & 0x7F}


@dataclass(slots=True)
class SnackRequest(Pdu):
    OPCODE: ClassVar[Opcode] = Opcode.SNACK_REQUEST
    _LAYOUT = (("lun", 8, "Q"), ("ttt", 20, "I"), ("exp_stat_sn", 28, "I"),
               ("beg_run", 40, "I"), ("run_length", 44, "I"))
    snack_type: int = 0
    lun: int = 0
    ttt: int = RESERVED_TAG
    exp_stat_sn: int = 0
    beg_run: int = 0
    run_length: int = 0

    def _flags_pack(self) -> int:
        return 0x80 | (self.snack_type & 0x0F)

    @classmethod
    def _flags_unpack(cls, flags: int) -> dict[str, Any]:
        return {"snack_type": flags & 0x0F}


# -- target PDUs: all carry StatSN, ExpCmdSN, MaxCmdSN at 24, 28, 32

_SN = (("stat_sn", 24, "I"), ("exp_cmd_sn", 28, "I"), ("max_cmd_sn", 32, "I"))


@dataclass(slots=True)
class NopIn(Pdu):
    OPCODE: ClassVar[Opcode] = Opcode.NOP_IN
    _LAYOUT = (("lun", 8, "Q"), ("ttt", 20, "I"), *_SN)
    lun: int = 0
    ttt: int = RESERVED_TAG
    stat_sn: int = 0
    exp_cmd_sn: int = 0
    max_cmd_sn: int = 0


@dataclass(slots=True)
class ScsiResponse(Pdu):
    OPCODE: ClassVar[Opcode] = Opcode.SCSI_RESPONSE
    _LAYOUT = (("response", 2, "B"), ("status", 3, "B"), ("snack_tag", 20, "I"), *_SN,
               ("exp_data_sn", 36, "I"), ("bidi_read_residual_count", 40, "I"),
               ("residual_count", 44, "I"))
    bidi_overflow: bool = False
    bidi_underflow: bool = False
    overflow: bool = False
    underflow: bool = False
    response: int = 0
    status: int = 0
    snack_tag: int = 0
    stat_sn: int = 0
    exp_cmd_sn: int = 0
    max_cmd_sn: int = 0
    exp_data_sn: int = 0
    bidi_read_residual_count: int = 0
    residual_count: int = 0

    def _flags_pack(self) -> int:
        return (0x80 | (0x10 if self.bidi_overflow else 0) | (0x08 if self.bidi_underflow else 0)
                | (0x04 if self.overflow else 0) | (0x02 if self.underflow else 0))

    @classmethod
    def _flags_unpack(cls, flags: int) -> dict[str, Any]:
        return {"bidi_overflow": _bit(flags, 0x10), "bidi_underflow": _bit(flags, 0x08),
                "overflow": _bit(flags, 0x04), "underflow": _bit(flags, 0x02)}

    def _validate(self) -> None:
        if self.overflow and self.underflow:
            raise ProtocolError("SCSI Response: both O and U residual flags set")

    def sense(self) -> bytes:
        """The sense data of a CHECK CONDITION (the data segment's length-prefixed part)."""
        if len(self.data) < 2:
            return b""
        n = int.from_bytes(self.data[:2], "big")
        if n > len(self.data) - 2:
            raise ProtocolError(f"SCSI Response: SenseLength {n} beyond the data segment")
        return bytes(self.data[2:2 + n])


@dataclass(slots=True)
class TaskMgmtResponse(Pdu):
    OPCODE: ClassVar[Opcode] = Opcode.TASK_MGMT_RESPONSE
    _LAYOUT = (("response", 2, "B"), *_SN)
    response: int = 0
    stat_sn: int = 0
    exp_cmd_sn: int = 0
    max_cmd_sn: int = 0


@dataclass(slots=True)
class LoginResponse(Pdu):
    OPCODE: ClassVar[Opcode] = Opcode.LOGIN_RESPONSE
    _LAYOUT = (("version_max", 2, "B"), ("version_active", 3, "B"), ("isid", 8, "6s"),
               ("tsih", 14, "H"), *_SN, ("status_class", 36, "B"), ("status_detail", 37, "B"))
    transit: bool = False
    cont: bool = False
    csg: int = Stage.SECURITY
    nsg: int = 0
    version_max: int = 0
    version_active: int = 0
    isid: bytes = bytes(6)
    tsih: int = 0
    stat_sn: int = 0
    exp_cmd_sn: int = 0
    max_cmd_sn: int = 0
    status_class: int = 0
    status_detail: int = 0

    def _flags_pack(self) -> int:
        return _login_flags(self.transit, self.cont, self.csg, self.nsg)

    @classmethod
    def _flags_unpack(cls, flags: int) -> dict[str, Any]:
        return _login_flags_unpack(flags)

    def _validate(self) -> None:
        if self.transit and self.cont:
            raise ProtocolError("Login Response: T and C bits both set")
        if self.csg == 2 or (self.transit and self.nsg == 2):
            raise ProtocolError("Login Response: reserved stage 2 in CSG/NSG")


@dataclass(slots=True)
class TextResponse(Pdu):
    OPCODE: ClassVar[Opcode] = Opcode.TEXT_RESPONSE
    _LAYOUT = (("lun", 8, "Q"), ("ttt", 20, "I"), *_SN)
    final: bool = True
    cont: bool = False
    lun: int = 0
    ttt: int = RESERVED_TAG
    stat_sn: int = 0
    exp_cmd_sn: int = 0
    max_cmd_sn: int = 0

    def _flags_pack(self) -> int:
        return (0x80 if self.final else 0) | (0x40 if self.cont else 0)

    @classmethod
    def _flags_unpack(cls, flags: int) -> dict[str, Any]:
        return {"final": _bit(flags, 0x80), "cont": _bit(flags, 0x40)}

    def _validate(self) -> None:
        if self.final and self.cont:
            raise ProtocolError("Text Response: F and C bits both set")


@dataclass(slots=True)
class DataIn(Pdu):
    OPCODE: ClassVar[Opcode] = Opcode.DATA_IN
    _LAYOUT = (("status", 3, "B"), ("lun", 8, "Q"), ("ttt", 20, "I"), *_SN,
               ("data_sn", 36, "I"), ("buffer_offset", 40, "I"), ("residual_count", 44, "I"))
    final: bool = False
    ack: bool = False
    overflow: bool = False
    underflow: bool = False
    has_status: bool = False
    status: int = 0
    lun: int = 0
    ttt: int = RESERVED_TAG
    stat_sn: int = 0
    exp_cmd_sn: int = 0
    max_cmd_sn: int = 0
    data_sn: int = 0
    buffer_offset: int = 0
    residual_count: int = 0

    def _flags_pack(self) -> int:
        return ((0x80 if self.final else 0) | (0x40 if self.ack else 0)
                | (0x04 if self.overflow else 0) | (0x02 if self.underflow else 0)
                | (0x01 if self.has_status else 0))

    @classmethod
    def _flags_unpack(cls, flags: int) -> dict[str, Any]:
        return {"final": _bit(flags, 0x80), "ack": _bit(flags, 0x40),
                "overflow": _bit(flags, 0x04), "underflow": _bit(flags, 0x02),
                "has_status": _bit(flags, 0x01)}

    def _validate(self) -> None:
        if self.has_status and not self.final:
            raise ProtocolError("Data-In: S bit set without the F bit")


@dataclass(slots=True)
class LogoutResponse(Pdu):
    OPCODE: ClassVar[Opcode] = Opcode.LOGOUT_RESPONSE
    _LAYOUT = (("response", 2, "B"), *_SN, ("time2wait", 40, "H"), ("time2retain", 42, "H"))
    response: int = 0
    stat_sn: int = 0
    exp_cmd_sn: int = 0
    max_cmd_sn: int = 0
    time2wait: int = 0
    time2retain: int = 0


@dataclass(slots=True)
class R2T(Pdu):
    OPCODE: ClassVar[Opcode] = Opcode.R2T
    _LAYOUT = (("lun", 8, "Q"), ("ttt", 20, "I"), *_SN, ("r2t_sn", 36, "I"),
               ("buffer_offset", 40, "I"), ("desired_data_transfer_length", 44, "I"))
    lun: int = 0
    ttt: int = 0
    stat_sn: int = 0
    exp_cmd_sn: int = 0
    max_cmd_sn: int = 0
    r2t_sn: int = 0
    buffer_offset: int = 0
    desired_data_transfer_length: int = 0

    def _validate(self) -> None:
        if self.ttt == RESERVED_TAG:
            raise ProtocolError("R2T: reserved Target Transfer Tag 0xffffffff")
        if self.desired_data_transfer_length == 0:
            raise ProtocolError("R2T: Desired Data Transfer Length 0")


class AsyncEvent(enum.IntEnum):
    SCSI_ASYNC_EVENT = 0
    LOGOUT_REQUESTED = 1
    CONNECTION_DROPPED = 2
    SESSION_DROPPED = 3
    NEGOTIATION_REQUESTED = 4
    TASK_TERMINATION = 5
    VENDOR_SPECIFIC = 255


@dataclass(slots=True)
class AsyncMessage(Pdu):
    OPCODE: ClassVar[Opcode] = Opcode.ASYNC_MESSAGE
    _LAYOUT = (("lun", 8, "Q"), *_SN, ("async_event", 36, "B"), ("async_vcode", 37, "B"),
               ("parameter1", 38, "H"), ("parameter2", 40, "H"), ("parameter3", 42, "H"))
    lun: int = 0
    stat_sn: int = 0
    exp_cmd_sn: int = 0
    max_cmd_sn: int = 0
    async_event: int = 0
    async_vcode: int = 0
    parameter1: int = 0
    parameter2: int = 0
    parameter3: int = 0


class RejectReason(enum.IntEnum):
    DATA_DIGEST_ERROR = 0x02
    SNACK_REJECT = 0x03
    PROTOCOL_ERROR = 0x04
    COMMAND_NOT_SUPPORTED = 0x05
    IMMEDIATE_COMMAND_REJECT = 0x06
    TASK_IN_PROGRESS = 0x07
    INVALID_DATA_ACK = 0x08
    INVALID_PDU_FIELD = 0x09
    LONG_OPERATION_REJECT = 0x0A
    NEGOTIATION_RESET = 0x0B
    WAITING_FOR_LOGOUT = 0x0C


@dataclass(slots=True)
class Reject(Pdu):
    OPCODE: ClassVar[Opcode] = Opcode.REJECT
    _LAYOUT = (("reason", 2, "B"), *_SN, ("data_sn", 36, "I"))
    reason: int = 0
    stat_sn: int = 0
    exp_cmd_sn: int = 0
    max_cmd_sn: int = 0
    data_sn: int = 0

    def rejected_itt(self) -> int | None:
        """The ITT of the PDU the target rejected (its header is our data segment)."""
        if len(self.data) < BHS_LEN:
            return None
        return int.from_bytes(self.data[16:20], "big")


PDU_CLASSES: dict[int, type[Pdu]] = {
    cls.OPCODE: cls
    for cls in (NopOut, ScsiCommand, TaskMgmtRequest, LoginRequest, TextRequest, DataOut,
                LogoutRequest, SnackRequest, NopIn, ScsiResponse, TaskMgmtResponse,
                LoginResponse, TextResponse, DataIn, LogoutResponse, R2T, AsyncMessage, Reject)
}
TARGET_OPCODES = frozenset(op for op in PDU_CLASSES if op & 0x20)


# ---------------------------------------------------------------------------
# Decoding


@dataclass(slots=True)
class Header:
    """What the first 48 bytes say about the rest of the PDU."""

    cls: type[Pdu]
    bhs: bytes
    ahs_len: int
    data_len: int

    def rest_len(self, *, header_digest: bool, data_digest: bool) -> int:
        """Bytes still to read after the BHS: AHS, header digest, data, padding, data digest."""
        n = self.ahs_len + (DIGEST_LEN if header_digest else 0)
        if self.data_len:
            n += self.data_len + pad_len(self.data_len) + (DIGEST_LEN if data_digest else 0)
        return n


def parse_bhs(bhs: Buffer, *, max_data_segment_length: int = MAX_DATA_SEGMENT,
              allowed: frozenset[int] = TARGET_OPCODES) -> Header:
    """Check the BHS and say how long the PDU is. Raises ProtocolError naming the field."""
    if len(bhs) != BHS_LEN:
        raise ProtocolError(f"BHS is {len(bhs)} bytes, not 48")
    opcode = bhs[0] & 0x3F
    if opcode not in allowed or opcode not in PDU_CLASSES:
        raise ProtocolError(f"opcode 0x{opcode:02x} is not one we accept here")
    if bhs[0] & 0x80:
        raise ProtocolError("byte 0 bit 7 (reserved) is set")
    ahs_len = bhs[4] * 4
    data_len = int.from_bytes(bhs[5:8], "big")
    if data_len > max_data_segment_length:
        raise ProtocolError(f"DataSegmentLength {data_len} exceeds our "
                            f"MaxRecvDataSegmentLength {max_data_segment_length}")
    return Header(PDU_CLASSES[opcode], bytes(bhs), ahs_len, data_len)


def decode_rest(header: Header, rest: Buffer, *, header_digest: bool = False,
                data_digest: bool = False) -> Pdu:
    """Build the PDU from its header and the ``rest_len`` bytes that follow the BHS."""
    need = header.rest_len(header_digest=header_digest, data_digest=data_digest)
    if len(rest) != need:
        raise ProtocolError(f"PDU body is {len(rest)} bytes, expected {need}")
    view = memoryview(rest)
    pos = header.ahs_len
    ahs = bytes(view[:pos])
    if header_digest:
        got = bytes(view[pos:pos + DIGEST_LEN])
        if got != digest(header.bhs + ahs):
            raise DigestError(f"header digest mismatch on {header.cls.__name__}")
        pos += DIGEST_LEN
    data: Buffer = b""
    if header.data_len:
        data = view[pos:pos + header.data_len]
        padded_end = pos + header.data_len + pad_len(header.data_len)
        if data_digest:
            got = bytes(view[padded_end:padded_end + DIGEST_LEN])
            if got != digest(view[pos:padded_end]):
                raise DigestError(f"data digest mismatch on {header.cls.__name__}")
    try:
        return header.cls.from_bhs(header.bhs, ahs, data)
    except ProtocolError:
        raise
    except (ValueError, TypeError) as exc:  # a field value no class accepts
        raise ProtocolError(f"{header.cls.__name__}: {exc}") from None


def decode(buf: Buffer, *, header_digest: bool = False, data_digest: bool = False,
           max_data_segment_length: int = MAX_DATA_SEGMENT,
           allowed: frozenset[int] = TARGET_OPCODES) -> Pdu:
    """Decode exactly one whole PDU (tests, the fake target). Streams use PduReader."""
    if len(buf) < BHS_LEN:
        raise ProtocolError(f"PDU of {len(buf)} bytes is shorter than a BHS")
    header = parse_bhs(buf[:BHS_LEN], max_data_segment_length=max_data_segment_length,
                       allowed=allowed)
    return decode_rest(header, buf[BHS_LEN:], header_digest=header_digest,
                       data_digest=data_digest)


class PduReader:
    """Sans-IO stream splitter: feed bytes, take whole PDUs out.

    Digest settings change only between PDUs (they take effect after login), so the
    caller flips ``header_digest``/``data_digest`` when the login says so.
    """

    def __init__(self, *, max_data_segment_length: int = MAX_DATA_SEGMENT,
                 allowed: frozenset[int] = TARGET_OPCODES) -> None:
        self.header_digest = False
        self.data_digest = False
        self.max_data_segment_length = max_data_segment_length
        self.allowed = allowed
        self._buf = bytearray()
        self._header: Header | None = None

    def feed(self, data: Buffer) -> None:
        self._buf += data

    def bytes_needed(self) -> int:
        """How many more bytes complete the next PDU (or its BHS)."""
        if self._header is None:
            return max(BHS_LEN - len(self._buf), 0)
        need = self._header.rest_len(header_digest=self.header_digest,
                                     data_digest=self.data_digest)
        return max(BHS_LEN + need - len(self._buf), 0)

    def next_pdu(self) -> Pdu | None:
        if self._header is None:
            if len(self._buf) < BHS_LEN:
                return None
            self._header = parse_bhs(self._buf[:BHS_LEN],
                                     max_data_segment_length=self.max_data_segment_length,
                                     allowed=self.allowed)
        need = self._header.rest_len(header_digest=self.header_digest,
                                     data_digest=self.data_digest)
        if len(self._buf) < BHS_LEN + need:
            return None
        rest = bytes(self._buf[BHS_LEN:BHS_LEN + need])
        del self._buf[:BHS_LEN + need]
        header, self._header = self._header, None
        return decode_rest(header, rest, header_digest=self.header_digest,
                           data_digest=self.data_digest)

    @property
    def buffered(self) -> int:
        return len(self._buf)


# Serial number arithmetic (RFC 1982, 32 bits) for CmdSN/StatSN comparisons.
def sn_lt(a: int, b: int) -> bool:
    return a != b and ((b - a) & 0xFFFFFFFF) < 0x80000000


def sn_le(a: int, b: int) -> bool:
    return a == b or sn_lt(a, b)


def sn_add(a: int, n: int) -> int:
    return (a + n) & 0xFFFFFFFF

