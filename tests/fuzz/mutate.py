"""Mutations over seeds, AFL "havoc" style: bytes, iSCSI header fields, text keys, PDUs.

Deterministic for a given ``random.Random``: a failing case is found again from the run's
seed and case number. Every mutation keeps sizes small (a few KiB at most added), so the
memory a case uses comes from the code under test, not from the input.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Sequence
from typing import Any

from userland.pdu import Pdu

INTERESTING8 = (0, 1, 0x7F, 0x80, 0xFF, 0x40, 0x3F, 0x20)
INTERESTING32 = (0, 1, 2, 3, 4, 8, 47, 48, 49, 255, 256, 511, 512, 4096, 8191, 8192, 65532,
                 65535, 65536, 0xFFFFFF, 0x1000000, 0x7FFFFFF8, 0x7FFFFFFF, 0x80000000,
                 0xFFFFFFF8, 0xFFFFFFFE, 0xFFFFFFFF)
INTERESTING64 = (0, 1, 0xFFFFFFFF, 1 << 32, (1 << 63) - 1, 1 << 63, (1 << 64) - 1)
# Values a target might put in a key: edge numbers, every constant of 6.1/6.2, junk.
VALUES = ("", "0", "1", "-1", "00", "0x", "0x0", "0X10", "0b", "0b101", "0bAAAA", "0xZZ",
          "512", "511", "16777215", "16777216", "18446744073709551615",
          "18446744073709551616", "9" * 100, "Yes", "No", "yes", "None", "CRC32C",
          "CRC32C,None", "None,CRC32C", "CHAP", "None,CHAP", "KRB5", "Reject", "Irrelevant",
          "NotUnderstood", "5", "7", "5,7", "256", "3600", "3601", "2", "Normal",
          "Discovery", "127.0.0.1:3260,1", "[::1]:3260,1", "host:99999", ":3260", ",1",
          "iqn.2026-12.lab.fuzz:x", "iqn.", "naa.1", "\x1b[31mred", "a" * 300, "x,,y",
          "=", "==", "\u00e9", "0x" + "ab" * 1100)
KEYS = ("AuthMethod", "CHAP_A", "CHAP_I", "CHAP_C", "CHAP_N", "CHAP_R", "HeaderDigest",
        "DataDigest", "MaxConnections", "TargetName", "TargetAlias", "TargetAddress",
        "TargetPortalGroupTag", "InitialR2T", "ImmediateData", "MaxRecvDataSegmentLength",
        "MaxBurstLength", "FirstBurstLength", "DefaultTime2Wait", "DefaultTime2Retain",
        "MaxOutstandingR2T", "DataPDUInOrder", "DataSequenceInOrder", "ErrorRecoveryLevel",
        "SessionType", "InitiatorName", "SendTargets", "OFMarker", "IFMarkInt",
        "X-com.example.vendor", "X#NodeArchitecture", "TaskReporting", "iSCSIProtocolLevel",
        "Unknown", "lowercase", "")


class Mutator:
    def __init__(self, rng: random.Random, pool: Sequence[bytes] = ()) -> None:
        self.rng = rng
        self.pool = list(pool)  # other seeds, for splicing

    # -- bytes

    def bytes_(self, data: bytes, rounds: int | None = None,
               boundaries: Sequence[int] = ()) -> bytes:
        """1-8 stacked byte mutations; ``boundaries``: where PDUs start (for BHS fields)."""
        buf = bytearray(data)
        r = self.rng
        for _ in range(rounds or r.choice((1, 1, 2, 2, 3, 4, 8))):
            op = r.randrange(12)
            if op == 0 and buf:  # flip a bit
                i = r.randrange(len(buf))
                buf[i] ^= 1 << r.randrange(8)
            elif op == 1 and buf:  # a random byte
                buf[r.randrange(len(buf))] = r.randrange(256)
            elif op == 2 and buf:  # an interesting byte
                buf[r.randrange(len(buf))] = r.choice(INTERESTING8)
            elif op == 3 and len(buf) >= 4:  # an interesting 32-bit word, big-endian
                i = r.randrange(len(buf) - 3)
                buf[i:i + 4] = r.choice(INTERESTING32).to_bytes(4, "big")
            elif op in (4, 5) and boundaries:  # a BHS field of one PDU
                self._bhs_field(buf, r.choice(boundaries))
            elif op == 6 and buf:  # delete a range
                i = r.randrange(len(buf))
                del buf[i:i + r.choice((1, 2, 4, 8, 48, r.randrange(1, 512)))]
            elif op == 7 and buf:  # duplicate a range
                i = r.randrange(len(buf))
                n = r.choice((1, 4, 48, r.randrange(1, 256)))
                buf[i:i] = buf[i:i + n]
            elif op == 8:  # insert random bytes
                i = r.randrange(len(buf) + 1)
                buf[i:i] = r.randbytes(r.choice((1, 3, 4, 48, r.randrange(1, 128))))
            elif op == 9 and self.pool:  # splice in part of another seed
                other = r.choice(self.pool)
                if other:
                    a = r.randrange(len(other))
                    piece = other[a:a + r.randrange(1, 256)]
                    i = r.randrange(len(buf) + 1)
                    buf[i:i + r.randrange(len(piece) + 1)] = piece
            elif op == 10 and buf:  # truncate
                del buf[r.randrange(len(buf)):]
            elif op == 11 and buf:  # fill a range with one byte
                i = r.randrange(len(buf))
                n = r.randrange(1, 64)
                buf[i:i + n] = bytes([r.choice(INTERESTING8)]) * min(n, len(buf) - i)
        return bytes(buf)

    def _bhs_field(self, buf: bytearray, start: int) -> None:
        r = self.rng
        if start + 48 > len(buf):
            return
        where = r.choice((0, 1, 2, 3, 4, 5, 8, 16, 20, 24, 28, 32, 36, 40, 44))
        if where in (0, 1, 2, 3, 4):  # opcode, flags, response/status, AHS length
            buf[start + where] = r.choice((*INTERESTING8, r.randrange(256)))
        elif where == 5:  # DataSegmentLength (3 bytes)
            n = r.choice((*INTERESTING32, r.randrange(1 << 24))) & 0xFFFFFF
            buf[start + 5:start + 8] = n.to_bytes(3, "big")
        elif where == 8:  # LUN / ISID+TSIH
            buf[start + 8:start + 16] = r.choice(INTERESTING64).to_bytes(8, "big")
        else:
            buf[start + where:start + where + 4] = r.choice(INTERESTING32).to_bytes(4, "big")

    # -- key=value text

    def text(self, data: bytes) -> bytes:
        """Structured changes to a key=value text, then sometimes bytes on top."""
        r = self.rng
        pairs = [p for p in bytes(data).split(b"\0") if p]
        for _ in range(r.choice((1, 1, 2, 3))):
            op = r.randrange(7)
            if op == 0 and pairs:  # another value for one key
                i = r.randrange(len(pairs))
                key = pairs[i].partition(b"=")[0]
                pairs[i] = key + b"=" + r.choice(VALUES).encode("utf-8", "surrogatepass")
            elif op == 1:  # a key=value pair added anywhere
                pair = f"{r.choice(KEYS)}={r.choice(VALUES)}".encode()
                pairs.insert(r.randrange(len(pairs) + 1), pair)
            elif op == 2 and pairs:  # a pair repeated (6.3 forbids it)
                i = r.randrange(len(pairs))
                pairs.insert(r.randrange(len(pairs) + 1), pairs[i])
            elif op == 3 and pairs:  # a pair dropped
                del pairs[r.randrange(len(pairs))]
            elif op == 4 and len(pairs) > 1:  # two pairs swapped
                i, j = r.randrange(len(pairs)), r.randrange(len(pairs))
                pairs[i], pairs[j] = pairs[j], pairs[i]
            elif op == 5 and pairs:  # the key renamed
                i = r.randrange(len(pairs))
                pairs[i] = r.choice(KEYS).encode() + b"=" + pairs[i].partition(b"=")[2]
            elif op == 6 and pairs and r.random() < 0.5:  # the '=' lost, or a NUL more
                i = r.randrange(len(pairs))
                pairs[i] = pairs[i].replace(b"=", b"", 1) if r.random() < 0.5 \
                    else pairs[i] + b"\0"
        out = b"\0".join(pairs) + (b"\0" if pairs and r.random() < 0.9 else b"")
        if r.random() < 0.1:
            out = self.bytes_(out, rounds=1)
        return out

    # -- PDU objects

    def pdu(self, pdu: Pdu) -> Pdu:
        """A copy with one field (or the data segment) changed."""
        r = self.rng
        names = [f.name for f in dataclasses.fields(pdu) if f.name != "ahs"]
        name = r.choice(names)
        value = getattr(pdu, name)
        new: object
        if name == "data":
            data = bytes(value)
            choice = r.randrange(4)
            if choice == 0 and b"=" in data:
                new = self.text(data)
            elif choice == 1:
                new = self.bytes_(data) if data else r.randbytes(r.randrange(1, 64))
            elif choice == 2:
                new = b""
            else:
                new = data * r.choice((2, 3)) if data else bytes(r.choice((8, 48, 512)))
            new = bytes(new)[:1 << 16]
        elif isinstance(value, bool):
            new = not value
        elif isinstance(value, bytes):
            new = self.bytes_(value, rounds=1)[:len(value)].ljust(len(value), b"\0")
        elif isinstance(value, int):
            width = 64 if name == "lun" else 8 if name in (
                "response", "status", "reason", "async_event", "async_vcode",
                "status_class", "status_detail", "version_max", "version_active",
                "version_min") else 16 if name in ("tsih", "cid", "parameter1", "parameter2",
                                                   "parameter3", "time2wait",
                                                   "time2retain") else 32
            choice = r.randrange(4)
            if choice == 0:
                new = value + r.choice((-2, -1, 1, 2, 16))
            elif choice == 1:
                new = r.choice(INTERESTING64 if width == 64 else INTERESTING32)
            elif choice == 2:
                new = r.getrandbits(width)
            else:
                new = r.choice(INTERESTING8)
            new = new % (1 << width)
            if name in ("csg", "nsg"):
                new = new & 3
            elif name in ("function", "reason") and isinstance(pdu.data, bytes):
                new = new & 0x7F
        else:
            return pdu
        try:
            changes: dict[str, Any] = {name: new}
            return dataclasses.replace(pdu, **changes)
        except (TypeError, ValueError):
            return pdu

    def sequence(self, items: list[object], pool: Sequence[object] = ()) -> list[object]:
        """Drop, repeat, swap, or bring in an item from elsewhere (a PDU, an event)."""
        r = self.rng
        items = list(items)
        op = r.randrange(5)
        if op == 0 and items:
            del items[r.randrange(len(items))]
        elif op == 1 and items:
            i = r.randrange(len(items))
            items.insert(r.randrange(len(items) + 1), items[i])
        elif op == 2 and len(items) > 1:
            i, j = r.randrange(len(items)), r.randrange(len(items))
            items[i], items[j] = items[j], items[i]
        elif op == 3 and pool:
            items.insert(r.randrange(len(items) + 1), r.choice(pool))
        elif op == 4 and items:
            del items[r.randrange(len(items)):]
        return items
