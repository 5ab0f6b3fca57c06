"""CHAP for iSCSI (RFC 7143 section 12.1.3; RFC 1994): one-way and mutual.

Algorithms by CHAP_A number: 5 MD5 (RFC 1994), and the newer 6 SHA-1, 7 SHA-256,
8 SHA3-256 that Linux LIO and others accept. A response is H(id || secret || challenge).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
import secrets as _random
from collections import deque
from dataclasses import dataclass

from userland.errors import AuthenticationError, ConfigError, ProtocolError
from userland.printable import escape

CHAP_ALGORITHMS: dict[int, str] = {5: "md5", 6: "sha1", 7: "sha256", 8: "sha3_256"}
ALGORITHM_NAMES: dict[str, int] = {"md5": 5, "sha1": 6, "sha-1": 6, "sha256": 7,
                                   "sha-256": 7, "sha3-256": 8, "sha3_256": 8}
MAX_CHALLENGE = 1024  # RFC 7143 12.1.3: challenges of up to 1024 bytes
MIN_SECRET_WARN = 12  # RFC 7143 12.1.3: secrets SHOULD be at least 96 bits


class Secret:
    """A CHAP secret that never shows itself in repr, str, logs or tracebacks."""

    __slots__ = ("_value",)

    def __init__(self, value: bytes) -> None:
        if not value:
            raise ConfigError("a CHAP secret must not be empty")
        self._value = value

    def reveal(self) -> bytes:
        return self._value

    def __repr__(self) -> str:
        return "Secret(<redacted>)"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and hmac.compare_digest(self._value, other._value)

    def __hash__(self) -> int:
        return hash(Secret)

    def __len__(self) -> int:
        return len(self._value)


@dataclass(frozen=True)
class Credentials:
    """A user name and its secret: ours towards the target, or the target's towards us."""

    user: str
    secret: Secret

    def __post_init__(self) -> None:
        if not self.user:
            raise ConfigError("a CHAP user name must not be empty")


def parse_algorithms(text: str) -> tuple[int, ...]:
    """`--chap-algs md5,sha256` or numbers `5,7` -> (5, 7), in the user's order."""
    out: list[int] = []
    for item in text.split(","):
        item = item.strip().lower()
        num = int(item) if item.isdigit() else ALGORITHM_NAMES.get(item)
        if num not in CHAP_ALGORITHMS:
            known = ", ".join(sorted(ALGORITHM_NAMES))
            raise ConfigError(f"unknown CHAP algorithm {item!r} (known: {known})")
        if num not in out:
            out.append(num)
    if not out:
        raise ConfigError("--chap-algs needs at least one algorithm")
    return tuple(out)


def encode_binary(value: bytes) -> str:
    """Binary values go out in hex with the 0x prefix (RFC 7143 section 6.1)."""
    return "0x" + value.hex()


# RFC 7143 6.1: hex-constant and base64-constant, nothing else (no spaces, no sign).
_HEX_BODY = re.compile(r"[0-9A-Fa-f]+")
_BASE64_BODY = re.compile(r"(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?")
_DECIMAL = re.compile(r"0|[1-9][0-9]{0,2}")  # CHAP_I and CHAP_A: small decimal numbers


def decode_binary(key: str, text: str, *, max_bytes: int = MAX_CHALLENGE) -> bytes:
    """0x hex (any case, odd length left-padded) or 0b base64 (RFC 7143 6.1), strictly.

    The length is checked on the text before anything is decoded: a target cannot make
    us decode more than ``max_bytes``.
    """
    prefix, body = text[:2].lower(), text[2:]
    if prefix == "0x" and _HEX_BODY.fullmatch(body):
        if (len(body) + 1) // 2 > max_bytes:
            raise ProtocolError(f"{key}: {(len(body) + 1) // 2} bytes exceeds {max_bytes}")
        return bytes.fromhex(body if len(body) % 2 == 0 else "0" + body)
    if prefix == "0b" and body and _BASE64_BODY.fullmatch(body):
        if len(body) // 4 * 3 > max_bytes + 2:
            raise ProtocolError(f"{key}: about {len(body) // 4 * 3} bytes exceeds "
                                f"{max_bytes}")
        try:
            value = base64.b64decode(body, validate=True)
        except (ValueError, binascii.Error):
            pass
        else:
            if len(value) > max_bytes:
                raise ProtocolError(f"{key}: {len(value)} bytes exceeds {max_bytes}")
            return value
    raise ProtocolError(f"{key}: not a valid 0x (hex) or 0b (base64) binary value "
                        "(RFC 7143 6.1)")


def parse_small_decimal(key: str, text: str, maximum: int) -> int:
    """CHAP_I and CHAP_A: a decimal number 0..maximum; no sign, space, 0x or 0b."""
    if not _DECIMAL.fullmatch(text) or int(text) > maximum:
        raise ProtocolError(f"target sent {key}={escape(text, limit=40)}: not a decimal "
                            f"number in 0..{maximum} (RFC 7143 12.1.3)")
    return int(text)


def chap_response(algorithm: int, identifier: int, secret: Secret, challenge: bytes) -> bytes:
    h = hashlib.new(CHAP_ALGORITHMS[algorithm])
    h.update(bytes([identifier]))
    h.update(secret.reveal())
    h.update(challenge)
    return h.digest()


# Challenges we have sent, so that a target cannot reflect one of ours back to us
# (on this or a parallel connection) and have us compute its answer.
_sent_challenges: deque[bytes] = deque(maxlen=256)


def new_challenge(algorithm: int, avoid: bytes) -> bytes:
    """A fresh random challenge, never equal to the target's own (RFC 7143 12.1.3)."""
    size = max(16, hashlib.new(CHAP_ALGORITHMS[algorithm]).digest_size)
    while True:
        challenge = _random.token_bytes(size)
        if challenge != avoid:
            _sent_challenges.append(challenge)
            return challenge


def check_target_challenge(challenge: bytes) -> None:
    if not challenge:
        raise ProtocolError("CHAP_C: empty challenge from the target")
    if len(challenge) > MAX_CHALLENGE:
        raise ProtocolError(f"CHAP_C: challenge of {len(challenge)} bytes exceeds 1024")
    if challenge in _sent_challenges:
        raise AuthenticationError(
            "target sent back a CHAP challenge we issued (reflection attack); refusing")


def check_secrets(ours: Credentials | None, theirs: Credentials | None) -> list[str]:
    """Refuse configurations RFC 7143 forbids; return warnings for weak ones."""
    warnings: list[str] = []
    if theirs is not None and ours is None:
        raise ConfigError("mutual CHAP needs the initiator's own CHAP credentials too")
    if ours is not None and theirs is not None and ours.secret == theirs.secret:
        raise ConfigError("the initiator and target CHAP secrets must differ (RFC 7143 12.1.3)")
    for label, cred in (("initiator", ours), ("target", theirs)):
        if cred is not None and len(cred.secret) < MIN_SECRET_WARN:
            warnings.append(f"the {label} CHAP secret is shorter than {MIN_SECRET_WARN} bytes;"
                            " some targets refuse it and it is easy to guess")
    return warnings


class ChapExchange:
    """The initiator's half of one CHAP exchange, fed the target's keys (sans-IO)."""

    def __init__(self, credentials: Credentials, algorithms: tuple[int, ...],
                 mutual: Credentials | None = None) -> None:
        self.credentials = credentials
        self.algorithms = algorithms
        self.mutual = mutual
        self.algorithm: int | None = None
        self._our_id = 0
        self._our_challenge = b""

    def offer(self) -> list[tuple[str, str]]:
        return [("CHAP_A", ",".join(str(a) for a in self.algorithms))]

    def answer_challenge(self, keys: dict[str, str]) -> list[tuple[str, str]]:
        """The target sent CHAP_A, CHAP_I, CHAP_C: compute our CHAP_N/CHAP_R (and challenge)."""
        for key in ("CHAP_A", "CHAP_I", "CHAP_C"):
            if key not in keys:
                raise ProtocolError(f"target's CHAP challenge lacks {key}")
        algorithm = parse_small_decimal("CHAP_A", keys["CHAP_A"], 255)
        identifier = parse_small_decimal("CHAP_I", keys["CHAP_I"], 255)
        if algorithm not in self.algorithms:
            offered = ",".join(map(str, self.algorithms))
            raise ProtocolError(f"target chose CHAP_A={algorithm}, outside what we offered "
                                f"({offered})")
        challenge = decode_binary("CHAP_C", keys["CHAP_C"])
        check_target_challenge(challenge)
        self.algorithm = algorithm
        reply = [("CHAP_N", self.credentials.user),
                 ("CHAP_R", encode_binary(chap_response(algorithm, identifier,
                                                        self.credentials.secret, challenge)))]
        if self.mutual is not None:
            self._our_id = _random.randbelow(256)
            self._our_challenge = new_challenge(algorithm, avoid=challenge)
            reply += [("CHAP_I", str(self._our_id)),
                      ("CHAP_C", encode_binary(self._our_challenge))]
        return reply

    def verify_target(self, keys: dict[str, str]) -> None:
        """Mutual CHAP: the target's CHAP_N/CHAP_R must prove it knows its secret."""
        if self.mutual is None or self.algorithm is None:
            return
        name, response = keys.get("CHAP_N"), keys.get("CHAP_R")
        if name is None or response is None:
            raise AuthenticationError("target did not answer our CHAP challenge "
                                      "(mutual CHAP not configured on the target?)")
        expected = chap_response(self.algorithm, self._our_id, self.mutual.secret,
                                 self._our_challenge)
        if name != self.mutual.user or not hmac.compare_digest(
                decode_binary("CHAP_R", response), expected):
            raise AuthenticationError("target failed mutual CHAP authentication "
                                      "(wrong target user name or secret)")
