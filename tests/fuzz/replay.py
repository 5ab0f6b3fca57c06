"""Recordings turned into what the harnesses feed: PDUs, login configs, session scripts.

A recorded connection is split into PDUs on both sides, in the order they crossed the
wire. Digests start after the final Login Response, as the target's answers in the
login text say. Everything here runs once per corpus load, never per fuzz case.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any
from unittest import mock

from userland.errors import IscsiError
from userland.keys import decode_text
from userland.login.chap import Credentials, Secret, decode_binary
from userland.login.machine import LoginConfig, LoginMachine, LoginResult
from userland.pdu import (
    PDU_CLASSES,
    TARGET_OPCODES,
    DataIn,
    LoginRequest,
    LoginResponse,
    Pdu,
    PduReader,
    ScsiCommand,
    ScsiResponse,
    TextResponse,
)

from .seeds import TO_INITIATOR, TO_TARGET, Recording

INITIATOR_OPCODES = frozenset(op for op in PDU_CLASSES if not op & 0x20)


@dataclass
class Wire:
    """One PDU as it crossed: its direction, its bytes, decoded, and whether in login."""

    direction: str
    raw: bytes
    pdu: Pdu
    login: bool


@dataclass
class Replay:
    rec: Recording
    wires: list[Wire]
    header_digest: bool
    data_digest: bool
    config: LoginConfig | None = None  # None: not one of our own logins
    challenge: tuple[int, bytes] | None = None  # our CHAP_I, CHAP_C: mutual CHAP replays
    login_result: LoginResult | None = None
    problems: list[str] = field(default_factory=list)

    def target_login(self) -> list[LoginResponse]:
        return [w.pdu for w in self.wires
                if w.direction == TO_INITIATOR and isinstance(w.pdu, LoginResponse)]

    @property
    def name(self) -> str:
        return self.rec.name


def _split_stream(data: bytes, allowed: frozenset[int], login_pdus: int | None,
                  header: bool, datad: bool) -> list[tuple[bytes, Pdu]]:
    """Split by PDU, keeping each PDU's exact bytes; digests after ``login_pdus`` PDUs."""
    out: list[tuple[bytes, Pdu]] = []
    pos = 0
    while pos < len(data):
        reader = PduReader(allowed=allowed)
        if login_pdus is not None and len(out) >= login_pdus:
            reader.header_digest, reader.data_digest = header, datad
        if pos + 48 > len(data):
            break
        reader.feed(data[pos:pos + 48])
        try:
            pdu = reader.next_pdu()  # parses the BHS; whole when nothing follows it
            end = pos + 48
            if pdu is None:
                end += reader.bytes_needed()
                if end > len(data):
                    break
                reader.feed(data[pos + 48:end])
                pdu = reader.next_pdu()
        except IscsiError:
            if login_pdus is None:
                break  # the first pass, digests unknown: the login part is enough
            raise
        assert pdu is not None
        out.append((data[pos:end], pdu))
        pos = end
    return out


def _login_len(pdus: list[tuple[bytes, Pdu]]) -> int | None:
    """How many PDUs the login takes (its last one has T=1, NSG=3), None if it never ends."""
    for n, (_, pdu) in enumerate(pdus):
        if isinstance(pdu, LoginRequest | LoginResponse) and pdu.transit and pdu.nsg == 3:
            if isinstance(pdu, LoginResponse) and pdu.status_class != 0:
                return None
            return n + 1
        if not isinstance(pdu, LoginRequest | LoginResponse):
            return n
    return None


def _digests(target_login: list[tuple[bytes, Pdu]]) -> tuple[bool, bool]:
    keys: dict[str, str] = {}
    for _, pdu in target_login:
        if pdu.data:
            try:
                keys.update(decode_text(bytes(pdu.data)))
            except IscsiError:
                continue
    return keys.get("HeaderDigest") == "CRC32C", keys.get("DataDigest") == "CRC32C"


def _interleave(rec: Recording, to_t: list[tuple[bytes, Pdu]], to_i: list[tuple[bytes, Pdu]],
                login_t: int | None, login_i: int | None) -> list[Wire]:
    """Both sides' PDUs in wire order: a run of bytes is whole PDUs (one side waits)."""
    wires: list[Wire] = []
    queues = {TO_TARGET: list(to_t), TO_INITIATOR: list(to_i)}
    counts = {TO_TARGET: 0, TO_INITIATOR: 0}
    limits = {TO_TARGET: login_i, TO_INITIATOR: login_t}
    for direction, data in rec.chunks:
        left = len(data)
        q = queues[direction]
        while left > 0 and q:
            raw, pdu = q.pop(0)
            left -= len(raw)
            limit = limits[direction]
            in_login = limit is None or counts[direction] < limit
            counts[direction] += 1
            wires.append(Wire(direction, raw, pdu, in_login))
    return wires


@contextmanager
def fixed_challenge(challenge: tuple[int, bytes] | None) -> Iterator[None]:
    """Our CHAP_I and CHAP_C as recorded, so a mutual CHAP login replays to its end."""
    if challenge is None:
        yield
        return
    identifier, value = challenge
    fixed = SimpleNamespace(randbelow=lambda n: identifier, token_bytes=lambda n: value)
    with mock.patch("userland.login.chap.new_challenge", return_value=value), \
            mock.patch("userland.login.chap._random", fixed):
        yield


def _creds(pair: Any) -> Credentials:
    return Credentials(str(pair[0]), Secret(str(pair[1]).encode()))


def load_replay(rec: Recording) -> Replay:
    raw_t, raw_i = rec.stream(TO_TARGET), rec.stream(TO_INITIATOR)
    # First without digests, to find where the login ends and what it agreed.
    to_i0 = _split_stream(raw_i, TARGET_OPCODES, None, False, False)
    login_t = _login_len(to_i0)
    header, datad = _digests(to_i0[:login_t] if login_t else to_i0)
    to_i = _split_stream(raw_i, TARGET_OPCODES, login_t, header, datad)
    to_t0 = _split_stream(raw_t, INITIATOR_OPCODES, None, False, False)
    login_i = _login_len(to_t0)
    to_t = _split_stream(raw_t, INITIATOR_OPCODES, login_i, header, datad)
    replay = Replay(rec, _interleave(rec, to_t, to_i, login_t, login_i), header, datad)
    if to_t and isinstance(to_t[0][1], LoginRequest):
        replay.config, replay.challenge = _our_config(rec, to_t, header, datad)
        replay.login_result = _replay_login(replay)
    return replay


def _our_config(rec: Recording, to_t: list[tuple[bytes, Pdu]], header: bool,
                datad: bool) -> tuple[LoginConfig, tuple[int, bytes] | None]:
    first = to_t[0][1]
    assert isinstance(first, LoginRequest)
    sent: dict[str, str] = {}
    for _, pdu in to_t:
        if isinstance(pdu, LoginRequest) and pdu.data:
            for key, value in decode_text(bytes(pdu.data)):
                sent.setdefault(key, value)
    challenge = None
    if "CHAP_C" in sent:
        challenge = (int(sent["CHAP_I"]), decode_binary("CHAP_C", sent["CHAP_C"]))
    chap = sent.get("AuthMethod") == "CHAP"
    return LoginConfig(
        initiator_name=sent["InitiatorName"], target_name=sent.get("TargetName"),
        isid=first.isid, credentials=_creds(rec.meta["chap"]) if chap else None,
        mutual=_creds(rec.meta["mutual"]) if challenge is not None else None,
        header_digest=tuple(sent.get("HeaderDigest", "None").split(",")),
        data_digest=tuple(sent.get("DataDigest", "None").split(",")),
    ), challenge


def _replay_login(replay: Replay) -> LoginResult | None:
    """The recorded login through a fresh LoginMachine: what full feature starts from."""
    assert replay.config is not None
    with fixed_challenge(replay.challenge):
        machine = LoginMachine(replay.config)
        machine.initial_request()
        for resp in replay.target_login():
            try:
                out = machine.receive(resp)
            except IscsiError as exc:  # a refused login ends here, as recorded
                replay.problems.append(f"{type(exc).__name__}: {exc}")
                return None
            if isinstance(out, LoginResult):
                return out
    return None


def target_ffp(replay: Replay) -> list[Wire]:
    return [w for w in replay.wires if not w.login]


def data_segments(replays: list[Replay]) -> list[bytes]:
    """Every text data segment (login and Text PDUs, both directions)."""
    out = []
    for r in replays:
        for w in r.wires:
            if isinstance(w.pdu, LoginRequest | LoginResponse | TextResponse) and w.pdu.data:
                out.append(bytes(w.pdu.data))
    return out


def scsi_payloads(replays: list[Replay]) -> list[tuple[int, bytes, bytes]]:
    """(CDB opcode, CDB, Data-In bytes) of each read command, and sense data (opcode -1)."""
    out: list[tuple[int, bytes, bytes]] = []
    for r in replays:
        cdbs: dict[int, bytes] = {}
        got: dict[int, bytearray] = {}
        for w in r.wires:
            if isinstance(w.pdu, ScsiCommand):
                cdbs[w.pdu.itt] = w.pdu.cdb
                got[w.pdu.itt] = bytearray()
            elif isinstance(w.pdu, DataIn) and w.pdu.itt in got:
                got[w.pdu.itt] += bytes(w.pdu.data)
            elif isinstance(w.pdu, ScsiResponse) and w.pdu.data:
                out.append((-1, b"", bytes(w.pdu.data)))
        for itt, data in got.items():
            if data:
                out.append((cdbs[itt][0], cdbs[itt], bytes(data)))
    return out

