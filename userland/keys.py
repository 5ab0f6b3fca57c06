"""Text keys (RFC 7143 sections 6, 12 and 13): the codec, continuation, negotiation.

Sans-IO, in three layers:

- the codec: ``key=value\\0`` pairs to bytes and back, strictly by section 6.1
  (``encode_text``, ``decode_text``);
- continuation: a text may span PDUs, split anywhere, the C bit set on all but the last
  (``TextAssembler`` on receive, ``split_text`` on send);
- negotiation, initiator side: ``Negotiator`` keeps one connection's login, checks every
  answer of the target against what we offered and the key's result function (6.2),
  answers the target's own proposals, and gives the ``Negotiated`` result.

``KEYS`` lists every key of section 13, AuthMethod and the CHAP keys of section 12, with
the kind of negotiation, default, range, sender, stage and scope the RFC gives each.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType

from userland.errors import ConfigError, NegotiationError, ProtocolError
from userland.printable import escape

Pair = tuple[str, str]

MAX_KEY_LENGTH = 63  # 6.1: a key name is at most 63 characters (ASCII: bytes)
MAX_VALUE_LENGTH = 255  # 6.1: a simple-value, "if not otherwise specified"
MAX_NAME_LENGTH = 223  # 4.2.7.1: an iSCSI name is at most 223 bytes
MAX_CHAP_BINARY = 1024  # 12.1.3: CHAP_C and CHAP_R, in bytes once decoded
MAX_NUMBER = 2**64 - 1  # 6.1: a numerical-value is less than 2**64
# 6.1: a peer must take at least 8192 bytes of key=value text in one negotiation, and
# at least 64 KiB where authentication items are long. More than that from a target
# is refused rather than buffered without end.
MAX_TEXT_BYTES = 65536
DEFAULT_MAX_RECV_DATA_SEGMENT_LENGTH = 8192  # 13.12

REJECT = "Reject"
IRRELEVANT = "Irrelevant"
NOT_UNDERSTOOD = "NotUnderstood"
# 6.2: these three answer a key; a proposal that carries one is a protocol error.
ANSWER_CONSTANTS = frozenset({REJECT, IRRELEVANT, NOT_UNDERSTOOD})
YES, NO = "Yes", "No"

_STANDARD_LABEL = re.compile(r"[A-Z][A-Za-z0-9.\-+@_]*")  # 6.1 standard-label
_PUBLIC_EXTENSION = re.compile(r"X#[A-Za-z0-9.\-+@_]+")  # 13.23 X#IANA-registered-string
_DECIMAL = re.compile(r"0|[1-9][0-9]*")  # 6.1 decimal-constant
_HEX = re.compile(r"0[xX][0-9A-Fa-f]+")  # 6.1 hex-constant
_BASE64 = re.compile(r"0[bB][A-Za-z0-9+/=]+")  # 6.1 base64-constant


# -- what each key is (sections 12 and 13)


class KeyKind(enum.Enum):
    LIST = "list"  # 6.2.1: the acceptor answers the first offered value it supports
    NUMERIC_MIN = "minimum"  # 6.2.2, result function Minimum: answer <= offer
    NUMERIC_MAX = "maximum"  # 6.2.2, result function Maximum: answer >= offer
    BOOL_AND = "and"  # 6.2.2: offer No -> the outcome is No, no answer needed
    BOOL_OR = "or"  # 6.2.2: offer Yes -> the outcome is Yes, no answer needed
    DECLARATIVE = "declarative"  # a text the sender states; nobody answers it
    NUMERIC_DECLARATIVE = "numeric-declarative"  # the same, a number in a range
    AUTHENTICATION = "authentication"  # CHAP_*: exchanged by userland/login/chap.py
    OBSOLETE = "obsolete"  # 13.26: the marker keys, answered Reject
    EXTENSION = "extension"  # 13.22/13.23: X- and X# keys this code does not know


class Sender(enum.Enum):
    INITIATOR = "initiator"
    TARGET = "target"
    BOTH = "both"


class Use(enum.Enum):
    """The RFC's "Use": when a key may be sent."""

    IO = "initialize only"  # in the login of any connection
    LO = "leading only"  # in the login of a session's first connection only
    ALL = "all"  # in login and in full feature phase
    FFPO = "full feature only"


class Phase(enum.Enum):
    """The login stage a key belongs to."""

    SECURITY = "security"  # the security negotiation stage only (AuthMethod, CHAP_*)
    OPERATIONAL = "operational"  # the operational negotiation stage
    ANY = "any"  # the RFC's "Any-Stage": security or operational
    FULL_FEATURE = "full-feature"  # a Text request after login (SendTargets)


class Scope(enum.Enum):
    SESSION = "session-wide"
    CONNECTION = "connection"


@dataclass(frozen=True)
class KeySpec:
    name: str
    kind: KeyKind
    section: str  # where RFC 7143 defines it
    default: str = ""
    lo: int | None = None
    hi: int | None = None
    values: tuple[str, ...] = ()  # the values the RFC defines, for list and text keys
    sender: Sender = Sender.BOTH
    use: Use = Use.LO
    phase: Phase = Phase.OPERATIONAL
    scope: Scope = Scope.SESSION
    irrelevant_in_discovery: bool = False
    max_len: int = MAX_VALUE_LENGTH  # bytes; each item of a list; binary: once decoded
    binary: bool = False  # a binary-value: its limit counts decoded bytes (6.1)
    items: bool = False  # a list-of-values although not a LIST negotiation

    @property
    def leading_only(self) -> bool:
        return self.use is Use.LO

    @property
    def declarative(self) -> bool:
        return self.kind in (KeyKind.DECLARATIVE, KeyKind.NUMERIC_DECLARATIVE)


_K = KeyKind
_SEGMENT = (512, 2**24 - 1)  # 13.12-13.14: lengths from 512 to 2**24-1


def _table(*specs: KeySpec) -> Mapping[str, KeySpec]:
    return MappingProxyType({spec.name: spec for spec in specs})


KEYS: Mapping[str, KeySpec] = _table(
    # 12.1: the security stage's main key. The RFC lists KRB5, SRP, CHAP and None
    # (7143 dropped SPKM1/SPKM2); it names no default, "None" is what not negotiating means.
    KeySpec("AuthMethod", _K.LIST, "12.1", default="None",
            values=("KRB5", "SRP", "CHAP", "None"), use=Use.IO, phase=Phase.SECURITY,
            scope=Scope.CONNECTION),
    # 12.1.3: CHAP; these travel only inside the CHAP exchange (userland/login/chap.py).
    KeySpec("CHAP_A", _K.AUTHENTICATION, "12.1.3", use=Use.IO, phase=Phase.SECURITY,
            scope=Scope.CONNECTION, items=True),
    KeySpec("CHAP_I", _K.AUTHENTICATION, "12.1.3", lo=0, hi=255, use=Use.IO,
            phase=Phase.SECURITY, scope=Scope.CONNECTION),
    KeySpec("CHAP_C", _K.AUTHENTICATION, "12.1.3", use=Use.IO, phase=Phase.SECURITY,
            scope=Scope.CONNECTION, max_len=MAX_CHAP_BINARY, binary=True),
    KeySpec("CHAP_N", _K.AUTHENTICATION, "12.1.3", use=Use.IO, phase=Phase.SECURITY,
            scope=Scope.CONNECTION),
    KeySpec("CHAP_R", _K.AUTHENTICATION, "12.1.3", use=Use.IO, phase=Phase.SECURITY,
            scope=Scope.CONNECTION, max_len=MAX_CHAP_BINARY, binary=True),
    # 13.1: digests, per connection; CRC32C and None are the two every peer implements.
    KeySpec("HeaderDigest", _K.LIST, "13.1", default="None", values=("CRC32C", "None"),
            use=Use.IO, scope=Scope.CONNECTION),
    KeySpec("DataDigest", _K.LIST, "13.1", default="None", values=("CRC32C", "None"),
            use=Use.IO, scope=Scope.CONNECTION),
    # 13.2
    KeySpec("MaxConnections", _K.NUMERIC_MIN, "13.2", default="1", lo=1, hi=65535,
            irrelevant_in_discovery=True),
    # 13.3: a Text request in full feature phase; "All" only on a discovery session.
    KeySpec("SendTargets", _K.DECLARATIVE, "13.3", sender=Sender.INITIATOR,
            use=Use.FFPO, phase=Phase.FULL_FEATURE),
    # 13.4: the initiator declares it at login; a target sends it only in a SendTargets
    # answer, never in a Login Response.
    KeySpec("TargetName", _K.DECLARATIVE, "13.4", use=Use.IO, phase=Phase.ANY,
            max_len=MAX_NAME_LENGTH),
    # 13.5
    KeySpec("InitiatorName", _K.DECLARATIVE, "13.5", sender=Sender.INITIATOR, use=Use.IO,
            phase=Phase.ANY, max_len=MAX_NAME_LENGTH),
    # 13.6 / 13.7: iSCSI-local-name-value, any UTF-8 but NUL
    KeySpec("TargetAlias", _K.DECLARATIVE, "13.6", sender=Sender.TARGET, use=Use.ALL,
            phase=Phase.ANY),
    KeySpec("InitiatorAlias", _K.DECLARATIVE, "13.7", sender=Sender.INITIATOR,
            use=Use.ALL, phase=Phase.ANY),
    # 13.8: domainname[:port][,portal-group-tag]; may be repeated (a SendTargets answer,
    # a redirect).
    KeySpec("TargetAddress", _K.DECLARATIVE, "13.8", sender=Sender.TARGET, use=Use.ALL,
            phase=Phase.ANY),
    # 13.9: a 16-bit number the target declares in its first Login Response.
    KeySpec("TargetPortalGroupTag", _K.NUMERIC_DECLARATIVE, "13.9", lo=0, hi=65535,
            sender=Sender.TARGET, use=Use.IO, phase=Phase.ANY),
    # 13.10
    KeySpec("InitialR2T", _K.BOOL_OR, "13.10", default=YES, irrelevant_in_discovery=True),
    # 13.11
    KeySpec("ImmediateData", _K.BOOL_AND, "13.11", default=YES,
            irrelevant_in_discovery=True),
    # 13.12: each side declares what it receives; per connection, also in full feature.
    KeySpec("MaxRecvDataSegmentLength", _K.NUMERIC_DECLARATIVE, "13.12",
            default=str(DEFAULT_MAX_RECV_DATA_SEGMENT_LENGTH), lo=_SEGMENT[0],
            hi=_SEGMENT[1], use=Use.ALL, scope=Scope.CONNECTION),
    # 13.13
    KeySpec("MaxBurstLength", _K.NUMERIC_MIN, "13.13", default="262144", lo=_SEGMENT[0],
            hi=_SEGMENT[1], irrelevant_in_discovery=True),
    # 13.14: also Irrelevant when InitialR2T=Yes and ImmediateData=No; never above
    # MaxBurstLength.
    KeySpec("FirstBurstLength", _K.NUMERIC_MIN, "13.14", default="65536", lo=_SEGMENT[0],
            hi=_SEGMENT[1], irrelevant_in_discovery=True),
    # 13.15: the one key with result function Maximum.
    KeySpec("DefaultTime2Wait", _K.NUMERIC_MAX, "13.15", default="2", lo=0, hi=3600),
    # 13.16
    KeySpec("DefaultTime2Retain", _K.NUMERIC_MIN, "13.16", default="20", lo=0, hi=3600),
    # 13.17
    KeySpec("MaxOutstandingR2T", _K.NUMERIC_MIN, "13.17", default="1", lo=1, hi=65535,
            irrelevant_in_discovery=True),
    # 13.18
    KeySpec("DataPDUInOrder", _K.BOOL_OR, "13.18", default=YES,
            irrelevant_in_discovery=True),
    # 13.19: with ErrorRecoveryLevel > 0 and Yes here, MaxOutstandingR2T must be 1.
    KeySpec("DataSequenceInOrder", _K.BOOL_OR, "13.19", default=YES,
            irrelevant_in_discovery=True),
    # 13.20
    KeySpec("ErrorRecoveryLevel", _K.NUMERIC_MIN, "13.20", default="0", lo=0, hi=2),
    # 13.21
    KeySpec("SessionType", _K.DECLARATIVE, "13.21", default="Normal",
            values=("Discovery", "Normal"), sender=Sender.INITIATOR, phase=Phase.ANY),
    # 13.22: private extension keys, X-reversed.vendor.dns_name.do_something. Unknown
    # ones are answered NotUnderstood.
    KeySpec("X-", _K.EXTENSION, "13.22", use=Use.ALL, phase=Phase.ANY, binary=True),
    # 13.23: public extension keys, X#IANA-registered-string. Unknown ones likewise.
    KeySpec("X#", _K.EXTENSION, "13.23", use=Use.ALL, phase=Phase.ANY, binary=True),
    # 13.24
    KeySpec("TaskReporting", _K.LIST, "13.24", default="RFC3720",
            values=("RFC3720", "ResponseFence", "FastAbort"), irrelevant_in_discovery=True),
    # 13.25 (the key itself is RFC 7144 section 4.1): level 1 is RFC 7143.
    KeySpec("iSCSIProtocolLevel", _K.NUMERIC_MIN, "13.25", default="1", lo=0, hi=31,
            irrelevant_in_discovery=True),
    # 13.26: obsolete. Received, IFMarker/OFMarker SHOULD and IFMarkInt/OFMarkInt MUST be
    # answered Reject; we never send them.
    KeySpec("OFMarker", _K.OBSOLETE, "13.26", default=NO, use=Use.IO,
            scope=Scope.CONNECTION),
    KeySpec("IFMarker", _K.OBSOLETE, "13.26", default=NO, use=Use.IO,
            scope=Scope.CONNECTION),
    KeySpec("OFMarkInt", _K.OBSOLETE, "13.26", use=Use.IO, scope=Scope.CONNECTION),
    KeySpec("IFMarkInt", _K.OBSOLETE, "13.26", use=Use.IO, scope=Scope.CONNECTION),
    # 13.27: a declarative list naming each node's implementation.
    KeySpec("X#NodeArchitecture", _K.DECLARATIVE, "13.27", items=True),
)

# List values this implementation can act on, where fewer than the RFC defines.
SUPPORTED: Mapping[str, tuple[str, ...]] = MappingProxyType({
    "AuthMethod": ("CHAP", "None"),  # no KRB5, no SRP
    "HeaderDigest": ("CRC32C", "None"),
    "DataDigest": ("CRC32C", "None"),
    "TaskReporting": ("RFC3720",),  # no ResponseFence or FastAbort semantics
})

# How we answer a key the target proposes when we did not offer it: the value we
# would have offered (lists: what we accept). Minimum keys at their top and Maximum
# keys at their bottom accept the target's number as it is.
INITIATOR_STANCE: Mapping[str, str] = MappingProxyType({
    "AuthMethod": "CHAP,None",
    "HeaderDigest": "None,CRC32C",
    "DataDigest": "None,CRC32C",
    "MaxConnections": "1",  # one connection per session
    "InitialR2T": NO,  # OR: the target's value stands
    "ImmediateData": YES,  # AND: the target's value stands
    "MaxBurstLength": str(_SEGMENT[1]),
    "FirstBurstLength": str(_SEGMENT[1]),
    "DefaultTime2Wait": "0",
    "DefaultTime2Retain": "3600",
    "MaxOutstandingR2T": "65535",
    "DataPDUInOrder": YES,  # OR: data in order, always safe for us
    "DataSequenceInOrder": YES,
    "ErrorRecoveryLevel": "0",  # the session does no ERL 1 or 2 recovery
    "TaskReporting": "RFC3720",
    "iSCSIProtocolLevel": "1",  # RFC 7143 only, none of RFC 7144
})


def spec_for(key: str) -> KeySpec | None:
    """The key's spec; an unknown X- or X# key gets its extension format's spec."""
    spec = KEYS.get(key)
    if spec is not None:
        return spec
    if key.startswith("X-"):
        return KEYS["X-"]
    if key.startswith("X#"):
        return KEYS["X#"]
    return None


# -- values


def parse_number(value: str) -> int | None:
    """A 6.1 numerical-value (decimal-constant or hex-constant below 2**64), else None."""
    if len(value) > 80:  # no valid constant is this long; spares int() huge strings
        return None
    if _DECIMAL.fullmatch(value):
        number = int(value)
    elif _HEX.fullmatch(value):
        number = int(value[2:], 16)
    else:
        return None
    return number if number <= MAX_NUMBER else None


def _binary_size(value: str) -> int | None:
    """Bytes a hex- or base64-constant decodes to (6.1), or None for other text."""
    if _HEX.fullmatch(value):
        return (len(value) - 1) // 2  # digits after "0x", rounded up to whole bytes
    if _BASE64.fullmatch(value):
        return (len(value) - 2) * 3 // 4
    return None


def _size(value: str, binary: bool) -> int:
    size = len(value.encode("utf-8", "surrogatepass"))
    if binary:
        decoded = _binary_size(value)
        if decoded is not None:
            size = min(size, decoded)
    return size


def _key_problem(key: str) -> str | None:
    if not key:
        return "a key=value pair with an empty key"
    if len(key.encode("utf-8", "surrogatepass")) > MAX_KEY_LENGTH:
        return f"key {key[:40]!r}... is longer than {MAX_KEY_LENGTH} bytes (RFC 7143 6.1)"
    known = KEYS.get(key)
    if known is not None and known.kind is not KeyKind.EXTENSION:
        return None  # iSCSIProtocolLevel: the RFC's own key breaks the capital-letter rule
    if _STANDARD_LABEL.fullmatch(key) or _PUBLIC_EXTENSION.fullmatch(key):
        return None
    return (f"key {key!r} is not a key name (RFC 7143 6.1: a capital letter, then letters, "
            "digits, '.', '-', '+', '@' or '_')")


def _value_problem(key: str, value: str) -> str | None:
    if "\0" in value:
        return f"value of {key} contains a NUL byte"
    spec = spec_for(key)
    if spec is None:  # unknown: the general limit of 6.1, for each item of a list
        limit, binary, per_item, where = MAX_VALUE_LENGTH, True, True, "6.1"
    else:
        limit, binary, where = spec.max_len, spec.binary, spec.section
        per_item = spec.items or spec.kind in (KeyKind.LIST, KeyKind.EXTENSION)
    for item in value.split(",") if per_item else [value]:
        size = _size(item, binary)
        if size > limit:
            what = "an item of the value" if per_item else "the value"
            return (f"{what} of {key} is {size} bytes, beyond its limit of {limit} "
                    f"(RFC 7143 {where})")
    return None


# -- the codec (6.1)


def encode_text(pairs: Sequence[Pair]) -> bytes:
    """``key=value\\0`` for each pair. Our own bad keys or values are a ConfigError."""
    out = bytearray()
    for key, value in pairs:
        problem = _key_problem(key) or _value_problem(key, value)
        if problem is not None:
            raise ConfigError(f"cannot send text: {problem}")
        try:
            out += f"{key}={value}\0".encode()
        except UnicodeEncodeError:
            raise ConfigError(f"cannot send the value of {key}: not valid Unicode") from None
    return bytes(out)


def decode_text(data: bytes) -> list[Pair]:
    """Pairs from one whole text (a logical text data segment), strictly by 6.1.

    Every pair ends in one NUL; NULs after the last pair (padding) are tolerated, an
    empty pair between two others is not. A key name is what precedes the first '=';
    the value, which may hold more '=', runs up to the NUL.
    """
    body = bytes(data).rstrip(b"\0")
    if not body:
        return []
    if len(body) == len(data):
        raise ProtocolError("bad text: it ends inside a key=value pair (no NUL after the "
                            "last one, RFC 7143 6.1)")
    pairs: list[Pair] = []
    offset = 0
    for raw in body.split(b"\0"):
        if not raw:
            raise ProtocolError(f"bad text: an empty key=value pair at byte {offset}")
        try:
            item = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ProtocolError(f"bad text: not UTF-8 (byte {offset + exc.start})") from None
        key, sep, value = item.partition("=")
        if not sep:
            raise ProtocolError(f"bad text: a key=value pair without '=' at byte {offset}: "
                                f"{item[:40]!r}")
        problem = _key_problem(key) or _value_problem(key, value)
        if problem is not None:
            raise ProtocolError(f"bad text: {problem}")
        pairs.append((key, value))
        offset += len(raw) + 1
    return pairs


class TextAssembler:
    """Joins the data of continued PDUs (C bit, 6.1) into one text, then decodes it.

    A pair may be split anywhere, even inside a UTF-8 character. ``feed`` returns None
    while C=1 and the pairs on the PDU with C=0. The whole text is bounded by
    ``max_bytes``; a target sending more gets a ProtocolError, not our memory.
    """

    def __init__(self, max_bytes: int = MAX_TEXT_BYTES) -> None:
        if max_bytes < 1:
            raise ValueError("max_bytes must be positive")
        self.max_bytes = max_bytes
        self._parts: list[bytes] = []
        self._size = 0
        self._continuing = False

    @property
    def in_progress(self) -> bool:
        """True after a PDU with C=1, until the PDU that ends the text."""
        return self._continuing

    def reset(self) -> None:
        self._parts, self._size, self._continuing = [], 0, False

    def feed(self, data: bytes, continue_bit: bool) -> list[Pair] | None:
        size = self._size + len(data)
        if size > self.max_bytes:
            self.reset()
            raise ProtocolError(f"text continued over PDUs (C bit) grew past "
                                f"{self.max_bytes} bytes")
        self._parts.append(bytes(data))
        self._size = size
        if continue_bit:
            self._continuing = True
            return None
        text = b"".join(self._parts)
        self.reset()
        return decode_text(text)


class TextStream:
    """Pairs out of a long text as they arrive, for answers too big to hold (SendTargets).

    ``feed`` takes each PDU's data and returns the pairs completed by it, each checked
    by 6.1 at once; only the unfinished pair at the end is kept. C=1 (``cont``) lets a
    pair run into the next PDU; C=0 means the PDU ended on a pair boundary (F=0, C=0
    in 11.11: a complete set of pairs, more to come when we ask). The total is bounded
    by ``max_bytes``; a target sending more gets a ProtocolError that says so.
    """

    def __init__(self, max_bytes: int) -> None:
        if max_bytes < 1:
            raise ValueError("max_bytes must be positive")
        self.max_bytes = max_bytes
        self.total = 0
        self._tail = b""

    def feed(self, data: bytes, cont: bool) -> list[Pair]:
        self.total += len(data)
        if self.total > self.max_bytes:
            self._tail = b""
            raise ProtocolError(f"text answer longer than {self.max_bytes} bytes; refused "
                                "past that bound")
        buf = self._tail + bytes(data)
        end = buf.rfind(b"\0") + 1  # up to the last complete pair
        self._tail = buf[end:]
        if len(self._tail) > MAX_KEY_LENGTH + 1 + 2 * MAX_CHAP_BINARY + 2:
            # No key=value we accept is this long (6.1): do not keep buffering it.
            raise ProtocolError(f"bad text: a key=value pair of more than {len(self._tail)} "
                                "bytes")
        if not cont and self._tail:
            raise ProtocolError("bad text: a Text Response without the C bit ends inside a "
                                "key=value pair (RFC 7143 6.1, 11.11)")
        return decode_text(buf[:end]) if end else []

    def finish(self) -> None:
        if self._tail:
            raise ProtocolError("bad text: it ends inside a key=value pair")


def split_text(data: bytes, max_data_segment_length: int) -> list[bytes]:
    """Chunks of at most ``max_data_segment_length`` bytes, split anywhere (6.1).

    Send all but the last with C=1. Empty text gives one empty chunk: one PDU.
    """
    if max_data_segment_length < 1:
        raise ValueError(f"max_data_segment_length {max_data_segment_length} is not "
                         "positive")
    if not data:
        return [b""]
    n = max_data_segment_length
    return [bytes(data[i:i + n]) for i in range(0, len(data), n)]


# -- negotiation (6.2, 6.3, 13)


@dataclass
class Negotiated:
    """The operational result of one login."""

    header_digest: str
    data_digest: str
    max_connections: int
    initial_r2t: bool
    immediate_data: bool
    max_recv_data_segment_length: int  # what we declared: we receive at most this
    max_xmit_data_segment_length: int  # what the target declared: we send at most this
    max_burst_length: int
    first_burst_length: int
    default_time2wait: int
    default_time2retain: int
    max_outstanding_r2t: int
    data_pdu_in_order: bool
    data_sequence_in_order: bool
    error_recovery_level: int
    target_portal_group_tag: int | None
    target_alias: str | None
    iscsi_protocol_level: int
    task_reporting: str
    # key -> "default": nobody set it, or it was answered Reject/Irrelevant/NotUnderstood;
    # "initiator": our value stands (the target took our offer, or we answered its
    # proposal with another value); "target": the target's value stands (it answered
    # another of the values we allowed, proposed it, or declared it); "both": the
    # target proposed exactly what we would have offered.
    chosen_by: dict[str, str] = field(default_factory=dict)


# The keys whose result ``Negotiated`` carries, for chosen_by; the target's declared
# MaxRecvDataSegmentLength shows as MaxXmitDataSegmentLength.
RESULT_KEYS: tuple[str, ...] = (
    "HeaderDigest", "DataDigest", "MaxConnections", "InitialR2T", "ImmediateData",
    "MaxRecvDataSegmentLength", "MaxXmitDataSegmentLength", "MaxBurstLength",
    "FirstBurstLength", "DefaultTime2Wait", "DefaultTime2Retain", "MaxOutstandingR2T",
    "DataPDUInOrder", "DataSequenceInOrder", "ErrorRecoveryLevel", "TargetPortalGroupTag",
    "TargetAlias", "iSCSIProtocolLevel", "TaskReporting",
)
SESSION_TYPES = ("Normal", "Discovery")


def _shown(value: str) -> str:
    """A target's value as it may appear in our errors and logs (no control characters)."""
    return escape(value, limit=80)


def _optional_answer(spec: KeySpec, value: str) -> bool:
    """6.2.2: AND offered No and OR offered Yes decide the outcome; no answer needed."""
    return ((spec.kind is KeyKind.BOOL_AND and value == NO)
            or (spec.kind is KeyKind.BOOL_OR and value == YES))


def _yes_no(flag: bool) -> str:
    return YES if flag else NO


class Negotiator:
    """The initiator's side of one connection's login negotiation (sans-IO).

    ``offer`` what we propose or declare, send ``take_offers()``, feed each text the
    target sends to ``receive`` and send back what it returns; ``result()`` at the end.
    Every violation of the target's is a NegotiationError naming the key and value.
    """

    def __init__(self, *, session_type: str = "Normal", leading: bool = True,
                 stance: Mapping[str, str] | None = None) -> None:
        if session_type not in SESSION_TYPES:
            raise ConfigError(f"SessionType {session_type!r} is not Normal or Discovery")
        self.session_type = session_type
        self.leading = leading  # False: a further connection of a session (no LO keys)
        self._stance = dict(INITIATOR_STANCE)
        for key, value in (stance or {}).items():
            spec = KEYS.get(key)
            if spec is None:
                raise ConfigError(f"stance for unknown key {key!r}")
            self._stance[key] = self._check_ours(spec, value)
        self._pending: dict[str, str] = {}  # offered, not yet sent
        self._sent: dict[str, str] = {}  # sent by us, the value as sent
        self._awaiting: set[str] = set()  # sent and needing the target's answer
        self._seen: dict[str, str] = {}  # every key the target sent, first value
        self._agreed: dict[str, str] = {}  # negotiated values, canonical text
        self._chosen: dict[str, str] = {}
        self._recv_dsl: int | None = None
        self._xmit_dsl: int | None = None
        self._tpgt: int | None = None
        self._alias: str | None = None
        self.target_addresses: list[str] = []
        self.target_declarations: dict[str, str] = {}  # other target declarations
        self.not_understood: list[str] = []  # the target's keys we answered NotUnderstood
        self.warnings: list[str] = []  # tolerated oddities of the target, for -v logs

    # -- what we send

    def offer(self, key: str, value: str) -> None:
        """Propose (or declare) ``key=value``; sent by the next ``take_offers``."""
        spec = KEYS.get(key)
        if spec is None or spec.kind is KeyKind.EXTENSION:
            raise ConfigError(f"cannot offer {key}: not a key this initiator negotiates")
        if spec.sender is Sender.TARGET:
            raise ConfigError(f"cannot offer {key}: only a target sends it "
                              f"(RFC 7143 {spec.section})")
        if spec.kind is KeyKind.AUTHENTICATION:
            raise ConfigError(f"cannot offer {key}: CHAP keys go through the CHAP exchange")
        if spec.kind is KeyKind.OBSOLETE:
            raise ConfigError(f"cannot offer {key}: obsolete (RFC 7143 13.26)")
        if spec.use is Use.FFPO:
            raise ConfigError(f"cannot offer {key} at login: it belongs to a Text request "
                              f"in full feature phase (RFC 7143 {spec.section})")
        if self.session_type == "Discovery" and spec.irrelevant_in_discovery:
            raise ConfigError(f"cannot offer {key} on a discovery session: it is irrelevant "
                              f"there (RFC 7143 {spec.section})")
        if not self.leading and spec.leading_only:
            raise ConfigError(f"cannot offer {key} on a further connection: it is "
                              f"leading-only (RFC 7143 {spec.section})")
        if key in self._pending or key in self._sent:
            raise ConfigError(f"{key} offered twice; RFC 7143 6.3 forbids negotiating a "
                              "key again")
        canonical = self._check_ours(spec, value)
        if key == "SessionType" and canonical != self.session_type:
            raise ConfigError(f"SessionType={canonical} on a {self.session_type} session")
        if key in self._seen and not spec.declarative:
            self.warnings.append(f"{key} was settled by the target's proposal "
                                 f"({key}={self._seen[key]}); not offered again")
            return
        self._pending[key] = canonical

    def _check_ours(self, spec: KeySpec, value: str) -> str:
        """Our value, canonical (numbers in decimal); a ConfigError says what is wrong."""
        key = spec.name
        problem = _value_problem(key, value)
        if problem is not None:
            raise ConfigError(f"cannot offer {key}: {problem}")
        if value in ANSWER_CONSTANTS or (spec.kind is KeyKind.LIST
                                         and ANSWER_CONSTANTS & set(value.split(","))):
            raise ConfigError(f"cannot offer {key}={value}: Reject, Irrelevant and "
                              "NotUnderstood only answer a key (RFC 7143 6.2)")
        if spec.kind is KeyKind.LIST:
            allowed = SUPPORTED.get(key, spec.values)
            for item in value.split(","):
                if item not in allowed:
                    raise ConfigError(f"cannot offer {key}={value}: {item!r} is not one of "
                                      f"{','.join(allowed)}")
            return value
        if spec.kind in (KeyKind.NUMERIC_MIN, KeyKind.NUMERIC_MAX,
                         KeyKind.NUMERIC_DECLARATIVE):
            number = parse_number(value)
            if number is None or not self._in_range(spec, number):
                raise ConfigError(f"cannot offer {key}={value}: not a number in "
                                  f"{spec.lo}..{spec.hi} (RFC 7143 {spec.section})")
            return str(number)
        if spec.kind in (KeyKind.BOOL_AND, KeyKind.BOOL_OR):
            if value not in (YES, NO):
                raise ConfigError(f"cannot offer {key}={value}: Yes or No")
            return value
        if spec.values and value not in spec.values:
            raise ConfigError(f"cannot offer {key}={value}: one of {','.join(spec.values)}")
        return value

    def take_offers(self) -> list[Pair]:
        """The offers not yet sent, in the order made; from now on they are sent."""
        if not self._pending:
            return []
        self._check_our_offers()
        out = list(self._pending.items())
        self._pending = {}
        for key, value in out:
            spec = KEYS[key]
            self._sent[key] = value
            if spec.declarative:
                if key == "MaxRecvDataSegmentLength":
                    self._recv_dsl = int(value)
                    self._chosen[key] = "initiator"
            elif _optional_answer(spec, value):
                self._settle(key, value, "initiator")  # the outcome, answered or not
            else:
                self._awaiting.add(key)
        return out

    def _ours(self, key: str) -> str:
        for source in (self._pending, self._agreed, self._sent):
            if key in source:
                return source[key]
        return KEYS[key].default

    def _check_our_offers(self) -> None:
        """Offers that could only end in a result the RFC forbids are our mistake."""
        pending = self._pending
        if self.session_type == "Normal":
            if "FirstBurstLength" in pending or "MaxBurstLength" in pending:
                first, most = int(self._ours("FirstBurstLength")), int(
                    self._ours("MaxBurstLength"))
                if first > most:
                    raise ConfigError(f"cannot offer FirstBurstLength={first} above "
                                      f"MaxBurstLength={most} (RFC 7143 13.14)")
            if pending.keys() & {"ErrorRecoveryLevel", "DataSequenceInOrder",
                                 "MaxOutstandingR2T"}:
                erl = int(self._ours("ErrorRecoveryLevel"))
                r2t = int(self._ours("MaxOutstandingR2T"))
                if erl > 0 and self._ours("DataSequenceInOrder") == YES and r2t != 1:
                    raise ConfigError(f"cannot offer MaxOutstandingR2T={r2t} with "
                                      f"ErrorRecoveryLevel={erl} and DataSequenceInOrder="
                                      "Yes; it must then be 1 (RFC 7143 13.19)")

    def outstanding(self) -> set[str]:
        """Keys we sent that still need the target's answer.

        Declarations need none, nor do an AND key offered No or an OR key offered Yes
        (6.2.2): their outcome is already ours.
        """
        return set(self._awaiting)

    # -- what the target sends

    def receive(self, pairs: Sequence[Pair]) -> list[Pair]:
        """Take the target's keys; return the answers we must send back."""
        replies: list[Pair] = []
        for key, value in pairs:
            reply = self._receive_one(key, value)
            if reply is not None:
                replies.append((key, reply))
        return replies

    def _receive_one(self, key: str, value: str) -> str | None:
        spec = spec_for(key)
        if spec is not None and spec.kind is KeyKind.AUTHENTICATION:
            # No value in the text: it may be a CHAP response.
            raise NegotiationError(f"target sent {key} outside the CHAP exchange of the "
                                   "security stage (RFC 7143 12.1.3)")
        if key != "TargetAddress":  # 13.8: the one key a target may repeat
            if key in self._seen:
                raise NegotiationError(
                    f"target sent {key} twice ({key}={_shown(self._seen[key])}, then {key}="
                    f"{_shown(value)}); RFC 7143 6.3 forbids negotiating or declaring a key again")
            self._seen[key] = value
        if key in self._sent and value in ANSWER_CONSTANTS:
            self._answered_constant(key, value)
            return None
        if spec is None or spec.kind is KeyKind.EXTENSION:
            if value in ANSWER_CONSTANTS:
                raise self._never_offered(key, value)
            self.not_understood.append(key)  # 6.2: a key we do not know
            return NOT_UNDERSTOOD
        if spec.sender is Sender.INITIATOR:
            raise NegotiationError(f"target sent {key}={_shown(value)}, a key only an initiator "
                                   f"sends (RFC 7143 {spec.section})")
        if key == "TargetName":
            raise NegotiationError(f"target sent TargetName={_shown(value)} in a login; a target "
                                   "sends it only in a SendTargets answer (RFC 7143 13.4)")
        if spec.phase is Phase.SECURITY and key not in self._sent:
            raise NegotiationError(f"target sent {key}={_shown(value)} outside the security "
                                   f"stage (RFC 7143 {spec.section})")
        if not self.leading and spec.leading_only:
            raise NegotiationError(f"target sent {key}={_shown(value)} on a further connection of "
                                   f"the session; it is leading-only (RFC 7143 "
                                   f"{spec.section})")
        if spec.kind is KeyKind.OBSOLETE:
            if value in ANSWER_CONSTANTS:
                raise self._never_offered(key, value)
            return REJECT  # 13.26
        if spec.declarative:
            self._declared(spec, value)
            return None
        if key in self._sent:
            self._answer(spec, value)
            return None
        if value in ANSWER_CONSTANTS:
            raise self._never_offered(key, value)
        return self._proposal(spec, value)

    @property
    def target_portal_group_tag(self) -> int | None:
        """13.9: the tag the target declared so far, or None."""
        return self._tpgt

    def answer_to(self, key: str) -> str | None:
        """What the target sent for ``key`` (its first value), or None if nothing."""
        return self._seen.get(key)

    @staticmethod
    def _never_offered(key: str, value: str) -> NegotiationError:
        return NegotiationError(f"target answered {key}={_shown(value)}, but we never offered "
                                f"{key} (RFC 7143 6.2: {_shown(value)} only answers a key)")

    def _answered_constant(self, key: str, value: str) -> None:
        """Reject, Irrelevant, NotUnderstood to our key: its current value holds (6.2)."""
        spec = KEYS[key]
        self._awaiting.discard(key)
        if value == NOT_UNDERSTOOD:  # 6.2: standard keys MUST NOT be answered so
            self.warnings.append(f"target answered {key}=NotUnderstood to a key RFC 7143 "
                                 f"{spec.section} defines; the default holds")
        if spec.declarative:
            return  # our declaration stands: it tells what we accept
        self._agreed.pop(key, None)
        self._chosen[key] = "default"

    def _answer(self, spec: KeySpec, value: str) -> None:
        """The target's answer to our offer, checked against the offer (6.2)."""
        key, offer = spec.name, self._sent[spec.name]
        self._awaiting.discard(key)
        if spec.kind is KeyKind.LIST:
            offered = offer.split(",")
            if value not in offered:
                raise NegotiationError(f"target answered {key}={_shown(value)}, outside what we "
                                       f"offered ({offer})")
            self._settle(key, value, "initiator" if value == offered[0] else "target")
        elif spec.kind in (KeyKind.NUMERIC_MIN, KeyKind.NUMERIC_MAX):
            number = self._number(spec, value, "answered")
            ours = int(offer)
            if spec.kind is KeyKind.NUMERIC_MIN and number > ours:
                raise NegotiationError(f"target answered {key}={_shown(value)}, above our offer "
                                       f"{key}={offer} (result function Minimum, RFC 7143 "
                                       f"{spec.section})")
            if spec.kind is KeyKind.NUMERIC_MAX and number < ours:
                raise NegotiationError(f"target answered {key}={_shown(value)}, below our offer "
                                       f"{key}={offer} (result function Maximum, RFC 7143 "
                                       f"{spec.section})")
            self._settle(key, str(number), "initiator" if number == ours else "target")
        else:  # BOOL_AND, BOOL_OR
            if value not in (YES, NO):
                raise NegotiationError(f"target answered {key}={_shown(value)}, not Yes or No "
                                       "(RFC 7143 6.1)")
            if _optional_answer(spec, offer) and value != offer:
                function = "AND" if spec.kind is KeyKind.BOOL_AND else "OR"
                raise NegotiationError(f"target answered {key}={_shown(value)} to our {key}={offer}"
                                       f"; the result function {function} makes it {offer} "
                                       f"(RFC 7143 {spec.section})")
            self._settle(key, value, "initiator" if value == offer else "target")

    def _proposal(self, spec: KeySpec, value: str) -> str | None:
        """A key the target originates: our answer, or None where none is due."""
        key = spec.name
        stance = self._pending.pop(key, None)
        if stance is not None:
            self.warnings.append(f"target proposed {key}={_shown(value)} before our offer went "
                                 "out; answered it instead")
        else:
            stance = self._stance.get(key, spec.default)
        if self.session_type == "Discovery" and spec.irrelevant_in_discovery:
            return IRRELEVANT  # 13: "Irrelevant when: SessionType=Discovery"
        if spec.kind is KeyKind.LIST:
            theirs = value.split(",")
            if ANSWER_CONSTANTS & set(theirs):
                raise NegotiationError(f"target proposed {key}={_shown(value)}; Reject, Irrelevant "
                                       "and NotUnderstood only answer a key (RFC 7143 6.2)")
            ours = stance.split(",")
            pick = next((item for item in theirs if item in ours), None)
            if pick is None:  # 6.2.1: none of theirs is acceptable
                self.warnings.append(f"rejected the target's {key}={_shown(value)}")
                return REJECT
            by = "initiator" if pick != theirs[0] else "both" if pick == ours[0] else "target"
            self._settle(key, pick, by)
            return pick
        if spec.kind in (KeyKind.NUMERIC_MIN, KeyKind.NUMERIC_MAX):
            number = parse_number(value)
            if number is None or not self._in_range(spec, number):
                # 6.2.2: a value not admissible MAY be answered Reject
                self.warnings.append(f"rejected the target's {key}={_shown(value)}: not a "
                                     f"number in {spec.lo}..{spec.hi}")
                return REJECT
            mine = int(stance)
            best = min if spec.kind is KeyKind.NUMERIC_MIN else max
            answer = best(number, mine)
            by = "initiator" if answer != number else "both" if answer == mine else "target"
            self._settle(key, str(answer), by)
            return str(answer)
        # BOOL_AND, BOOL_OR
        if value not in (YES, NO):
            self.warnings.append(f"rejected the target's {key}={_shown(value)}: not Yes or No")
            return REJECT
        if _optional_answer(spec, value):  # 6.2.2: the outcome is theirs, no answer due
            self._settle(key, value, "both" if stance == value else "target")
            return None
        if spec.kind is KeyKind.BOOL_AND:
            reply = _yes_no(value == YES and stance == YES)
        else:
            reply = _yes_no(value == YES or stance == YES)
        by = "initiator" if reply != value else "both" if reply == stance else "target"
        self._settle(key, reply, by)
        return reply

    def _declared(self, spec: KeySpec, value: str) -> None:
        key = spec.name
        if spec.kind is KeyKind.NUMERIC_DECLARATIVE:
            number = self._number(spec, value, "declared")
            if key == "MaxRecvDataSegmentLength":  # the most the target takes from us
                self._xmit_dsl = number
                self._chosen["MaxXmitDataSegmentLength"] = "target"
            else:  # TargetPortalGroupTag
                self._tpgt = number
                self._chosen[key] = "target"
        elif key == "TargetAlias":
            self._alias = value
            self._chosen[key] = "target"
        elif key == "TargetAddress":
            if not value:
                raise NegotiationError("target sent an empty TargetAddress (RFC 7143 13.8)")
            self.target_addresses.append(value)
        else:  # X#NodeArchitecture
            self.target_declarations[key] = value

    def _number(self, spec: KeySpec, value: str, verb: str) -> int:
        number = parse_number(value)
        if number is None or not self._in_range(spec, number):
            raise NegotiationError(f"target {verb} {spec.name}={_shown(value)}, not a number in "
                                   f"{spec.lo}..{spec.hi} (RFC 7143 {spec.section})")
        return number

    @staticmethod
    def _in_range(spec: KeySpec, number: int) -> bool:
        lo = 0 if spec.lo is None else spec.lo
        hi = MAX_NUMBER if spec.hi is None else spec.hi
        return lo <= number <= hi

    def _settle(self, key: str, value: str, by: str) -> None:
        self._agreed[key] = value
        self._chosen[key] = by

    # -- the outcome

    def result(self) -> Negotiated:
        """The negotiated values: agreed ones, defaults for the rest (13)."""
        for key in sorted(self._awaiting):  # 6.2 wants an answer; the default holds
            note = (f"target never answered {key}={self._sent[key]}; the default "
                    f"{KEYS[key].default} holds")
            if note not in self.warnings:
                self.warnings.append(note)

        def get(key: str) -> str:
            return self._agreed.get(key, KEYS[key].default)

        chosen = {key: self._chosen.get(key, "default") for key in RESULT_KEYS}
        initial_r2t, immediate = get("InitialR2T") == YES, get("ImmediateData") == YES
        most, first = int(get("MaxBurstLength")), int(get("FirstBurstLength"))
        if first > most:  # 13.14: FirstBurstLength MUST NOT exceed MaxBurstLength
            irrelevant = initial_r2t and not immediate  # 13.14: no unsolicited data
            if "FirstBurstLength" in self._agreed and not irrelevant:
                raise NegotiationError(f"target's answers leave FirstBurstLength={first} "
                                       f"above MaxBurstLength={most} (RFC 7143 13.14)")
            note = f"FirstBurstLength {first} lowered to MaxBurstLength {most} (13.14)"
            if note not in self.warnings:
                self.warnings.append(note)
            first = most
        erl, r2t = int(get("ErrorRecoveryLevel")), int(get("MaxOutstandingR2T"))
        sequence_in_order = get("DataSequenceInOrder") == YES
        if erl > 0 and sequence_in_order and r2t != 1:
            raise NegotiationError(f"negotiated MaxOutstandingR2T={r2t} with "
                                   f"ErrorRecoveryLevel={erl} and DataSequenceInOrder=Yes; "
                                   "it must then be 1 (RFC 7143 13.19)")
        default_dsl = DEFAULT_MAX_RECV_DATA_SEGMENT_LENGTH
        return Negotiated(
            header_digest=get("HeaderDigest"),
            data_digest=get("DataDigest"),
            max_connections=int(get("MaxConnections")),
            initial_r2t=initial_r2t,
            immediate_data=immediate,
            max_recv_data_segment_length=self._recv_dsl or default_dsl,
            max_xmit_data_segment_length=self._xmit_dsl or default_dsl,
            max_burst_length=most,
            first_burst_length=first,
            default_time2wait=int(get("DefaultTime2Wait")),
            default_time2retain=int(get("DefaultTime2Retain")),
            max_outstanding_r2t=r2t,
            data_pdu_in_order=get("DataPDUInOrder") == YES,
            data_sequence_in_order=sequence_in_order,
            error_recovery_level=erl,
            target_portal_group_tag=self._tpgt,
            target_alias=self._alias,
            iscsi_protocol_level=int(get("iSCSIProtocolLevel")),
            task_reporting=get("TaskReporting"),
            chosen_by=chosen,
        )

