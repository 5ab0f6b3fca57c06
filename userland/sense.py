"""SCSI status and sense data (SAM-5, SPC-4 4.5): decoding, texts, errno, retry advice.

The session hands us the status byte of a SCSI Response and the sense bytes of its data
segment (``ScsiResponse.sense()``). ``parse_sense`` decodes fixed (0x70/0x71) and
descriptor (0x72/0x73) sense; ``status_error`` makes the one ``ScsiError`` a caller raises.

Sense is decoded leniently past the sense key: it explains an error that is already
happening, and refusing a short or odd buffer would turn a clear "write protected" into a
protocol error. Only a buffer without a usable response code or sense key raises
``ProtocolError``.
"""

from __future__ import annotations

import enum
import errno
from dataclasses import dataclass

from userland.errors import ProtocolError, ScsiError
from userland.untrusted import from_target

Buffer = bytes | bytearray | memoryview

# ENOMEDIUM is Linux's; a BSD has no such errno, ENXIO ("device not configured") is closest.
ENOMEDIUM: int = getattr(errno, "ENOMEDIUM", errno.ENXIO)


class ScsiStatus(enum.IntEnum):
    """The status byte of a SCSI Response (SAM-5 5.3)."""

    GOOD = 0x00
    CHECK_CONDITION = 0x02
    CONDITION_MET = 0x04
    BUSY = 0x08
    RESERVATION_CONFLICT = 0x18
    TASK_SET_FULL = 0x28
    ACA_ACTIVE = 0x30
    TASK_ABORTED = 0x40


class SenseKey(enum.IntEnum):
    """SPC-4 table 48."""

    NO_SENSE = 0x0
    RECOVERED_ERROR = 0x1
    NOT_READY = 0x2
    MEDIUM_ERROR = 0x3
    HARDWARE_ERROR = 0x4
    ILLEGAL_REQUEST = 0x5
    UNIT_ATTENTION = 0x6
    DATA_PROTECT = 0x7
    BLANK_CHECK = 0x8
    VENDOR_SPECIFIC = 0x9
    COPY_ABORTED = 0xA
    ABORTED_COMMAND = 0xB
    OBSOLETE_C = 0xC  # was EQUAL
    VOLUME_OVERFLOW = 0xD
    MISCOMPARE = 0xE
    COMPLETED = 0xF

    @property
    def text(self) -> str:
        return "OBSOLETE (0xC)" if self is SenseKey.OBSOLETE_C else self.name.replace("_", " ")


# ASC/ASCQ texts (SPC-4 table D.1, the ones an initiator of disks meets).
ASC_TEXTS: dict[tuple[int, int], str] = {
    (0x00, 0x00): "no additional sense information",
    (0x04, 0x00): "logical unit not ready, cause not reportable",
    (0x04, 0x01): "logical unit is in process of becoming ready",
    (0x04, 0x02): "logical unit not ready, initializing command required",
    (0x04, 0x03): "logical unit not ready, manual intervention required",
    (0x04, 0x04): "logical unit not ready, format in progress",
    (0x04, 0x07): "logical unit not ready, operation in progress",
    (0x04, 0x09): "logical unit not ready, self-test in progress",
    (0x04, 0x0A): "logical unit not accessible, asymmetric access state transition",
    (0x04, 0x0B): "logical unit not accessible, target port in standby state",
    (0x04, 0x0C): "logical unit not accessible, target port in unavailable state",
    (0x04, 0x11): "logical unit not ready, notify (enable spinup) required",
    (0x08, 0x00): "logical unit communication failure",
    (0x0C, 0x00): "write error",
    (0x10, 0x01): "logical block guard check failed",
    (0x10, 0x02): "logical block application tag check failed",
    (0x10, 0x03): "logical block reference tag check failed",
    (0x11, 0x00): "unrecovered read error",
    (0x14, 0x01): "record not found",
    (0x1A, 0x00): "parameter list length error",
    (0x1D, 0x00): "miscompare during verify operation",
    (0x20, 0x00): "invalid command operation code",
    (0x21, 0x00): "logical block address out of range",
    (0x24, 0x00): "invalid field in CDB",
    (0x25, 0x00): "logical unit not supported",
    (0x26, 0x00): "invalid field in parameter list",
    (0x27, 0x00): "write protected",
    (0x27, 0x01): "hardware write protected",
    (0x27, 0x02): "logical unit software write protected",
    (0x27, 0x07): "space allocation failed write protect",
    (0x28, 0x00): "not ready to ready change, medium may have changed",
    (0x29, 0x00): "power on, reset, or bus device reset occurred",
    (0x29, 0x01): "power on occurred",
    (0x29, 0x02): "SCSI bus reset occurred",
    (0x29, 0x03): "bus device reset function occurred",
    (0x29, 0x04): "device internal reset",
    (0x29, 0x07): "I_T nexus loss occurred",
    (0x2A, 0x01): "mode parameters changed",
    (0x2A, 0x03): "reservations preempted",
    (0x2A, 0x04): "reservations released",
    (0x2A, 0x05): "registrations preempted",
    (0x2A, 0x06): "asymmetric access state changed",
    (0x2A, 0x09): "capacity data has changed",
    (0x2C, 0x00): "command sequence error",
    (0x2F, 0x00): "commands cleared by another initiator",
    (0x30, 0x00): "incompatible medium installed",
    (0x31, 0x00): "medium format corrupted",
    (0x38, 0x07): "thin provisioning soft threshold reached",
    (0x3A, 0x00): "medium not present",
    (0x3A, 0x01): "medium not present, tray closed",
    (0x3A, 0x02): "medium not present, tray open",
    (0x3E, 0x01): "logical unit failure",
    (0x3E, 0x02): "timeout on logical unit",
    (0x3F, 0x00): "target operating conditions have changed",
    (0x3F, 0x01): "microcode has been changed",
    (0x3F, 0x03): "inquiry data has changed",
    (0x3F, 0x0E): "reported LUNs data has changed",
    (0x44, 0x00): "internal target failure",
    (0x47, 0x00): "SCSI parity error",
    (0x4B, 0x00): "data phase error",
    (0x4E, 0x00): "overlapped commands attempted",
    (0x55, 0x03): "insufficient resources",
    (0x5D, 0x00): "failure prediction threshold exceeded",
}

# When the exact pair is unknown, the ASC alone still says something.
ASC_FAMILY_TEXTS: dict[int, str] = {
    0x04: "logical unit not ready",
    0x0C: "write error",
    0x10: "protection information check failed",
    0x11: "read error",
    0x27: "write protected",
    0x29: "power on, reset, or bus device reset occurred",
    0x2A: "parameters changed",
    0x3A: "medium not present",
    0x3F: "target operating conditions have changed",
}


def asc_text(asc: int, ascq: int) -> str:
    """The text of an ASC/ASCQ pair; '' when we know neither the pair nor its family."""
    text = ASC_TEXTS.get((asc, ascq))
    if text is not None:
        return text
    return ASC_FAMILY_TEXTS.get(asc, "")


@dataclass(frozen=True, slots=True)
class Sense:
    """Decoded sense data. ``information`` is None unless the target marked it valid."""

    key: SenseKey
    asc: int
    ascq: int
    deferred: bool
    information: int | None
    description: str

    def summary(self) -> str:
        """'DATA PROTECT, write protected (27/00)'."""
        key = f"deferred {self.key.text}" if self.deferred else self.key.text
        code = f"({self.asc:02X}/{self.ascq:02X})"
        if self.description:
            return f"{key}, {self.description} {code}"
        return f"{key} {code}"


@from_target
def parse_sense(buf: Buffer) -> Sense:
    """Decode fixed (0x70/0x71) or descriptor (0x72/0x73) format sense data."""
    data = bytes(buf)
    if not data:
        raise ProtocolError("sense data: empty")
    code = data[0] & 0x7F
    if code in (0x70, 0x71):
        return _parse_fixed(data, deferred=code == 0x71)
    if code in (0x72, 0x73):
        return _parse_descriptor(data, deferred=code == 0x73)
    raise ProtocolError(f"sense data: response code 0x{code:02x} is neither fixed nor descriptor")


def _make(key: int, asc: int, ascq: int, deferred: bool, information: int | None) -> Sense:
    return Sense(SenseKey(key), asc, ascq, deferred, information, asc_text(asc, ascq))


def _parse_fixed(data: bytes, *, deferred: bool) -> Sense:
    # SPC-4 4.5.3: 0 VALID|code, 2 key, 3..6 INFORMATION, 7 additional length, 12 ASC, 13 ASCQ
    if len(data) < 3:
        raise ProtocolError(f"fixed sense: {len(data)} bytes, the sense key is in byte 2")
    end = len(data)
    if len(data) >= 8:
        # Some targets send fewer bytes than they declare, some more: trust the smaller.
        end = min(end, 8 + data[7])
    asc = data[12] if end > 12 else 0
    ascq = data[13] if end > 13 else 0
    information = None
    if data[0] & 0x80 and end >= 7:
        information = int.from_bytes(data[3:7], "big")
    return _make(data[2] & 0x0F, asc, ascq, deferred, information)


def _parse_descriptor(data: bytes, *, deferred: bool) -> Sense:
    # SPC-4 4.5.2: 1 key, 2 ASC, 3 ASCQ, 7 additional length, descriptors from byte 8
    if len(data) < 4:
        raise ProtocolError(f"descriptor sense: {len(data)} bytes, ASC/ASCQ are in bytes 2-3")
    information = None
    if len(data) >= 8:
        end = min(len(data), 8 + data[7])
        pos = 8
        while pos + 2 <= end:
            dtype, dlen = data[pos], data[pos + 1]
            if pos + 2 + dlen > end:
                break  # a descriptor cut short: what came before it still stands
            body = data[pos + 2:pos + 2 + dlen]
            # Information descriptor (SPC-4 4.5.2.2): VALID in byte 2, 8-byte value at 4..11
            if dtype == 0x00 and dlen >= 0x0A and body[0] & 0x80:
                information = int.from_bytes(body[2:10], "big")
            pos += 2 + dlen
    return _make(data[1] & 0x0F, data[2], data[3], deferred, information)


# --- errno ---------------------------------------------------------------------------------
#
# What a user of the FUSE file (or of the loop device on it) should see. The loop driver
# turns every error into EIO except EOPNOTSUPP (which switches discard off), so the finer
# values below matter to programs using the FUSE file directly.
#
# - RECOVERED ERROR and COMPLETED mean the command did its work: 0, not an error.
# - DATA PROTECT is EROFS ("Read-only file system"), except 27/07 (a thin pool is full),
#   which is ENOSPC, as Linux reports it.
# - ILLEGAL REQUEST is EINVAL, with three sharper cases:
#   20/00 (opcode not supported, e.g. UNMAP on a target without it) is EOPNOTSUPP, so
#   fallocate(PUNCH_HOLE) fails the way callers expect and loop stops sending discards;
#   25/00 (no such LUN) is ENXIO;
#   21/00 (LBA out of range) is ENOSPC. A block device answers a write past its end with
#   ENOSPC and a read there with end of file; the FUSE layer clamps reads to the capacity
#   it knows, so a 21/00 means the capacity shrank under us, and "No space left on device"
#   is what dd would print on a real disk. EINVAL would wrongly blame the caller's
#   arguments; EIO would hide that the device is simply smaller now.
# - VOLUME OVERFLOW is ENOSPC.
# - ASC 3A (medium not present) is ENOMEDIUM whatever the key.
# - Everything else (NOT READY, MEDIUM ERROR, HARDWARE ERROR, UNIT ATTENTION and ABORTED
#   COMMAND once retries are spent, BLANK CHECK, MISCOMPARE, NO SENSE with CHECK
#   CONDITION, vendor specific) is EIO. Linux reports medium errors as ENODATA; we keep EIO,
#   the errno every tool explains as an I/O error.

_KEY_ERRNO: dict[SenseKey, int] = {
    SenseKey.RECOVERED_ERROR: 0,
    SenseKey.COMPLETED: 0,
    SenseKey.DATA_PROTECT: errno.EROFS,
    SenseKey.ILLEGAL_REQUEST: errno.EINVAL,
    SenseKey.VOLUME_OVERFLOW: errno.ENOSPC,
}

_ASC_ERRNO: dict[tuple[SenseKey, int, int], int] = {
    (SenseKey.DATA_PROTECT, 0x27, 0x07): errno.ENOSPC,
    (SenseKey.ILLEGAL_REQUEST, 0x20, 0x00): errno.EOPNOTSUPP,
    (SenseKey.ILLEGAL_REQUEST, 0x21, 0x00): errno.ENOSPC,
    (SenseKey.ILLEGAL_REQUEST, 0x25, 0x00): errno.ENXIO,
}


def sense_errno(sense: Sense) -> int:
    """The errno for this sense; 0 when the command in fact succeeded (recovered error)."""
    if sense.key not in (SenseKey.RECOVERED_ERROR, SenseKey.COMPLETED) and sense.asc == 0x3A:
        return ENOMEDIUM
    exact = _ASC_ERRNO.get((sense.key, sense.asc, sense.ascq))
    if exact is not None:
        return exact
    return _KEY_ERRNO.get(sense.key, errno.EIO)


def is_retryable(sense: Sense) -> bool:
    """Whether the same command, sent again unchanged, may well succeed."""
    if sense.deferred:
        # The error belongs to an earlier command (a write the cache failed to flush);
        # this one was not executed. Linux retries it too; the caller should log the sense.
        return True
    if sense.key is SenseKey.UNIT_ATTENTION:
        # 29/xx reset, 2A/09 capacity changed, 3F/0E LUNs changed...: the target reports
        # the event once and then runs commands. The caller may act on it first.
        return True
    if sense.key is SenseKey.ABORTED_COMMAND:
        # ...but not a protection information check (10/xx): the data itself is bad.
        return sense.asc != 0x10
    if sense.key is SenseKey.NOT_READY and sense.asc == 0x04:
        # 04/01 becoming ready; 04/0A an ALUA transition that ends on its own.
        return sense.ascq in (0x01, 0x0A)
    return False


class ScsiStatusError(ScsiError):
    """A command ended with a status other than GOOD/CONDITION MET."""

    def __init__(self, message: str, errno_value: int, *, status: int, sense: Sense | None,
                 retryable: bool) -> None:
        super().__init__(message, errno_value)
        self.status = status
        self.sense = sense
        self.retryable = retryable


def status_ok(status: int, sense: Sense | None = None) -> bool:
    """GOOD, CONDITION MET, or a CHECK CONDITION whose sense says the work was done."""
    if status in (ScsiStatus.GOOD, ScsiStatus.CONDITION_MET):
        return True
    return status == ScsiStatus.CHECK_CONDITION and sense is not None and sense_errno(sense) == 0


def status_error(status: int, sense: Sense | Buffer | None = None) -> ScsiStatusError:
    """The error for a non-GOOD status, e.g. 'SCSI CHECK CONDITION: DATA PROTECT, write
    protected (27/00)' with errno EROFS. ``sense`` may be raw bytes from the response."""
    if status in (ScsiStatus.GOOD, ScsiStatus.CONDITION_MET):
        raise ValueError(f"status 0x{status:02x} is not an error")
    try:
        name = ScsiStatus(status).name.replace("_", " ")
    except ValueError:
        name = f"status 0x{status:02x}"
    decoded: Sense | None = None
    if isinstance(sense, Sense):
        decoded = sense
    elif sense:
        try:
            decoded = parse_sense(sense)
        except ProtocolError:
            return ScsiStatusError(f"SCSI {name} with malformed sense data ({len(sense)} bytes)",
                                   errno.EIO, status=status, sense=None, retryable=False)
    if status == ScsiStatus.CHECK_CONDITION:
        if decoded is None:
            return ScsiStatusError(f"SCSI {name} without sense data", errno.EIO,
                                   status=status, sense=None, retryable=False)
        return ScsiStatusError(f"SCSI {name}: {decoded.summary()}",
                               sense_errno(decoded) or errno.EIO, status=status, sense=decoded,
                               retryable=is_retryable(decoded))
    if status in (ScsiStatus.BUSY, ScsiStatus.TASK_SET_FULL, ScsiStatus.ACA_ACTIVE):
        # The target is short of resources (or another I_T nexus holds an ACA, which we never
        # set): try again later.
        err, retryable = errno.EAGAIN, True
    elif status == ScsiStatus.RESERVATION_CONFLICT:
        # Another initiator holds a reservation; retrying will not help until it lets go.
        err, retryable = errno.EBUSY, False
    elif status == ScsiStatus.TASK_ABORTED:
        # Another initiator's task management aborted ours (TAS=1): send it again.
        err, retryable = errno.EIO, True
    else:
        err, retryable = errno.EIO, False
    return ScsiStatusError(f"SCSI {name}", err, status=status, sense=decoded,
                           retryable=retryable)
