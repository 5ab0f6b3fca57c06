"""The fuzz targets: each makes one case from a Random and runs it against userland.

A case may end with any ``IscsiError`` (the project's one tree): that is a target being
refused properly. Anything else escaping ``run`` is a finding, and so is a broken
invariant (an ``InvariantBroken``, raised here). Making a case never raises.
"""

from __future__ import annotations

import contextlib
import itertools
import random
import struct
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from userland import scsi, sense
from userland.discovery.sendtargets import parse_send_targets
from userland.errors import IscsiError
from userland.keys import Negotiator, TextAssembler, decode_text, encode_text, parse_number
from userland.login.chap import ChapExchange, Credentials, Secret
from userland.login.machine import (
    DISCOVERY_OFFERS,
    NORMAL_OFFERS,
    LoginConfig,
    LoginMachine,
    LoginResult,
    Redirected,
)
from userland.pdu import (
    R2T,
    RESERVED_TAG,
    AsyncMessage,
    DataIn,
    LoginRequest,
    LoginResponse,
    LogoutRequest,
    NopIn,
    NopOut,
    Pdu,
    PduReader,
    Reject,
    ScsiCommand,
    ScsiResponse,
    TaskMgmtRequest,
    TaskMgmtResponse,
    decode,
)
from userland.portal import Portal
from userland.session import ConnectionFailed, LogoutRequested, Session, TaskDone, TmfDone
from userland.task import Task

from .mutate import Mutator
from .replay import Replay, data_segments, fixed_challenge, scsi_payloads
from .seeds import TO_INITIATOR, TO_TARGET

MAX_TASK_BYTES = 1 << 16  # what a mutated script may ask a task to read or write
PORTAL = Portal.parse("127.0.0.1:3260", what="fuzz")


class InvariantBroken(AssertionError):
    """The code under test accepted something and left itself in an impossible state."""


@dataclass
class Case:
    target: str
    describe: Callable[[], str]  # called only for a finding: inputs can be large
    run: Callable[[], str | None]  # how the case ended, when it says (for the figures)
    size: int  # input bytes, for the memory bound


def _encode_all(pdus: list[Pdu], header: bool, data: bool) -> bytes | None:
    try:
        return b"".join(p.encode(header_digest=header, data_digest=data) for p in pdus)
    except (struct.error, ValueError, OverflowError):
        return None  # a mutated field our own encoder cannot pack: not a case


def _boundaries(pdus: list[bytes]) -> list[int]:
    out, pos = [], 0
    for raw in pdus:
        out.append(pos)
        pos += len(raw)
    return out


# -- the PDU decoder ------------------------------------------------------------------------


class DecoderTarget:
    name = "pdu-decoder"

    def __init__(self, replays: list[Replay]) -> None:
        # (raw PDUs as recorded, decoded, header digest, data digest, initiator's side)
        self.seeds: list[tuple[list[bytes], list[Pdu], bool, bool, bool]] = []
        for r in replays:
            for direction in (TO_INITIATOR, TO_TARGET):
                for login in (True, False):
                    ws = [w for w in r.wires if w.direction == direction and w.login == login]
                    if ws:
                        on = not login
                        self.seeds.append(([w.raw for w in ws], [w.pdu for w in ws],
                                           on and r.header_digest, on and r.data_digest,
                                           direction == TO_TARGET))
        self.pool = [b"".join(s[0]) for s in self.seeds]

    def make(self, rng: random.Random) -> Case | None:
        m = Mutator(rng, self.pool)
        raws, pdus, hd, dd, initiators = rng.choice(self.seeds)
        if rng.random() < 0.5:  # bytes, digests as recorded
            stream = m.bytes_(b"".join(raws), boundaries=_boundaries(raws))
        else:  # fields, re-encoded (digests right), sometimes bytes on top
            pdus = list(pdus)
            for _ in range(rng.choice((1, 1, 2, 4))):
                if pdus and rng.random() < 0.8:
                    i = rng.randrange(len(pdus))
                    pdus[i] = m.pdu(pdus[i])
                else:
                    pdus = m.sequence(pdus)  # type: ignore[arg-type,assignment]
            hd, dd = (hd, dd) if rng.random() < 0.8 else (not hd, not dd)
            encoded = _encode_all(pdus, hd, dd)
            if encoded is None:
                return None
            stream = m.bytes_(encoded, rounds=1) if rng.random() < 0.3 else encoded
        # Our PduReader takes target opcodes only; the initiator's side of a recording
        # goes through with every opcode allowed, as a target would decode it.
        allowed = not initiators and rng.random() < 0.9
        max_dsl = rng.choice((8192, 262144, (1 << 24) - 1))
        # Feeding in small pieces finds split-header bugs; a long stream goes in bigger ones.
        chunk = max(rng.choice((1, 7, 48, 49, 4096, 1 << 20)), len(stream) // 64)

        def run() -> str:
            return _decode_stream(stream, hd, dd, max_dsl, chunk, all_opcodes=not allowed)

        return Case(self.name, lambda: f"stream={stream.hex()} hd={hd} dd={dd} max_dsl={max_dsl} "
                    f"chunk={chunk} all_opcodes={not allowed}", run, len(stream))


def _decode_stream(stream: bytes, hd: bool, dd: bool, max_dsl: int, chunk: int,
                   all_opcodes: bool = False) -> str:
    kwargs: dict[str, Any] = {"max_data_segment_length": max_dsl}
    if all_opcodes:
        kwargs["allowed"] = frozenset(range(64))
    reader = PduReader(**kwargs)
    reader.header_digest, reader.data_digest = hd, dd
    pos = n = 0
    try:
        while True:
            pdu = reader.next_pdu()
            if pdu is None:
                if pos >= len(stream):
                    break
                reader.feed(stream[pos:pos + chunk])
                pos += chunk
                continue
            _use(pdu)
            n += 1
        outcome = "whole stream decoded"
    except IscsiError as exc:
        outcome = f"{type(exc).__name__} after {min(n, 3)}{'+' if n > 3 else ''} PDUs"
    with contextlib.suppress(IscsiError):  # the one-PDU path too
        _use(decode(stream, header_digest=hd, data_digest=dd, max_data_segment_length=max_dsl))
    return outcome


def _use(pdu: Pdu) -> None:
    """What a caller does with a decoded PDU: log it, read its parts, send it on."""
    pdu.describe()
    if isinstance(pdu, ScsiResponse):
        pdu.sense()
    if isinstance(pdu, Reject):
        pdu.rejected_itt()
    pdu.encode()


# -- text keys --------------------------------------------------------------------------------


class KeysTarget:
    name = "text-keys"

    def __init__(self, replays: list[Replay]) -> None:
        self.seeds = data_segments(replays)

    def make(self, rng: random.Random) -> Case | None:
        m = Mutator(rng, self.seeds)
        data = rng.choice(self.seeds)
        for _ in range(rng.choice((1, 1, 2, 3))):
            data = m.text(data) if rng.random() < 0.9 else m.bytes_(data)
        cuts = sorted(rng.randrange(len(data) + 1) for _ in range(rng.randrange(4)))
        discovery = rng.random() < 0.3
        leading = rng.random() < 0.9
        max_bytes = rng.choice((64, 8192, 65536))

        def run() -> str:
            return _keys_case(data, cuts, discovery, leading, max_bytes)

        return Case(self.name, lambda: f"text={data!r} cuts={cuts} discovery={discovery} "
                    f"leading={leading} max_bytes={max_bytes}", run, len(data))


def _keys_case(data: bytes, cuts: list[int], discovery: bool, leading: bool,
               max_bytes: int) -> str:
    steps: list[Callable[[], object]] = []
    try:
        pairs = decode_text(data)
    except IscsiError:
        pairs = None
    assembler = TextAssembler(max_bytes=max_bytes)
    bounds = [0, *cuts, len(data)]

    def assemble() -> None:
        for n, (a, b) in enumerate(itertools.pairwise(bounds)):
            got = assembler.feed(data[a:b], continue_bit=n < len(bounds) - 2)
            if got is not None and got != pairs:
                raise InvariantBroken(f"TextAssembler gave {got!r}, decode_text {pairs!r}")

    steps.append(assemble)
    if pairs is not None:
        p = pairs

        def negotiate() -> None:
            neg = Negotiator(session_type="Discovery" if discovery else "Normal",
                             leading=leading)
            for key, value in (DISCOVERY_OFFERS if discovery else NORMAL_OFFERS):
                neg.offer(key, value)
            neg.offer("HeaderDigest", "CRC32C,None")
            neg.take_offers()
            neg.receive(p)
            neg.take_offers()
            neg.result()

        def send_targets() -> None:
            for t in parse_send_targets(p, discovery_portal=PORTAL):
                str(t.portals)

        def chap() -> None:
            ours = Credentials("fuzz-user", Secret(b"fuzz-secret-0123"))
            theirs = Credentials("fuzz-target", Secret(b"fuzz-target-secret-4567"))
            exchange = ChapExchange(ours, (5, 7), theirs)
            keys = dict(p)
            exchange.answer_challenge(keys)
            # 12.1.3: CHAP_I is a number, and 6.1 numbers are decimal or hex constants
            if parse_number(keys["CHAP_I"]) is None:
                raise InvariantBroken(f"CHAP_I={keys['CHAP_I']!r} accepted, not an RFC "
                                      "7143 6.1 number")
            exchange.verify_target(keys)

        steps += [negotiate, send_targets, chap]
    passed = 0
    for step in steps:
        try:
            step()
            passed += 1
        except IscsiError:
            pass
    return f"{passed} of 4 steps accepted" if pairs is not None else "text refused"


# -- SCSI parsers ------------------------------------------------------------------------------

# What neither tgt nor LIO sent in the recordings: descriptor-format sense with an
# Information descriptor (SPC-4 4.5.2), and a VPD 0x83 page with EUI-64, NAA 16-byte,
# SCSI name string and T10 vendor designators.
SCSI_SYNTHETIC = [
    bytes([0x72, 0x05, 0x24, 0x00, 0, 0, 0, 0x0C, 0x00, 0x0A, 0x80, 0])
    + (1 << 40).to_bytes(8, "big"),
    bytes([0x73, 0x03, 0x11, 0x00, 0, 0, 0, 0x00]),
    bytes([0x00, 0x83, 0x00, 0x44])
    + bytes([0x01, 0x02, 0x00, 0x08]) + bytes(range(8))
    + bytes([0x01, 0x03, 0x00, 0x10]) + bytes(range(16))
    + bytes([0x03, 0x08, 0x00, 0x10]) + b"iqn.2026-12.x:y\0"
    + bytes([0x02, 0x01, 0x00, 0x0C]) + b"VENDOR  id01",
]

PARSERS: tuple[Callable[[bytes], object], ...] = (
    scsi.parse_inquiry, scsi.vpd_total_length, scsi.parse_vpd_supported_pages,
    scsi.parse_vpd_serial, scsi.parse_vpd_device_id, scsi.parse_vpd_block_limits,
    scsi.parse_vpd_lbp, scsi.parse_report_luns, scsi.parse_read_capacity10,
    scsi.parse_read_capacity16, scsi.parse_mode_sense10_header, sense.parse_sense,
)


class ScsiTarget:
    name = "scsi-parsers"

    def __init__(self, replays: list[Replay]) -> None:
        self.seeds = [payload for _, _, payload in scsi_payloads(replays)] + SCSI_SYNTHETIC

    def make(self, rng: random.Random) -> Case | None:
        m = Mutator(rng, self.seeds)
        data = m.bytes_(rng.choice(self.seeds))
        status = rng.choice((0, 2, 8, 0x18, 0x28, rng.randrange(256)))

        def run() -> None:
            _scsi_case(data, status)

        return Case(self.name, lambda: f"data={data.hex()} status={status}", run, len(data))


def _scsi_case(data: bytes, status: int) -> None:
    for parser in PARSERS:
        try:
            result = parser(data)
        except IscsiError:
            continue
        if isinstance(result, scsi.VpdDeviceIdentification):
            result.display_id()
            for d in result.designators:
                d.text()
        elif isinstance(result, scsi.ReportLuns):
            if result.truncated:  # userland/lun.py asks again for the whole list
                scsi.report_luns_cdb(result.needed_length)
            for lun in result.luns[:16]:
                _ = lun.field
                with contextlib.suppress(IscsiError):
                    scsi.lun_to_int(lun.raw)
        elif isinstance(result, scsi.Capacity16):
            _ = result.physical_block_size
        elif isinstance(result, sense.Sense):
            result.summary()
            sense.sense_errno(result)
            sense.is_retryable(result)
        elif isinstance(result, scsi.Inquiry):
            _ = result.present
        elif (parser is scsi.vpd_total_length and isinstance(result, int)
              and len(data) > 1 and result > len(data)):
            scsi.inquiry_vpd_cdb(data[1], result)  # as userland/lun.py _vpd asks again
    try:
        if not sense.status_ok(status):
            str(sense.status_error(status, data))
    except IscsiError:
        pass
    with contextlib.suppress(IscsiError):
        ScsiResponse(status=status, data=data).sense()


# -- the login machine ------------------------------------------------------------------------


class LoginTarget:
    name = "login-machine"

    def __init__(self, replays: list[Replay]) -> None:
        self.seeds = [r for r in replays if r.config is not None and r.target_login()]
        self.pool: list[Pdu] = [w.pdu for r in self.seeds for w in r.wires
                                if isinstance(w.pdu, LoginResponse)]
        # Redirects, which no recorded login held (status class 1, RFC 7143 11.13.5).
        self.pool += [LoginResponse(status_class=1, status_detail=d, stat_sn=0,
                                    data=encode_text([("TargetAddress", a)]))
                      for d, a in ((1, "127.0.0.1:3261,1"), (2, "[::1]:3260"),
                                   (1, "example.invalid"))]

    def make(self, rng: random.Random) -> Case | None:
        m = Mutator(rng, [])
        replay = rng.choice(self.seeds)
        assert replay.config is not None
        config = replay.config
        if rng.random() < 0.15:  # the same target, another configuration of ours
            other = rng.choice(self.seeds).config
            assert other is not None
            config = replace(config, credentials=other.credentials, mutual=other.mutual,
                             header_digest=other.header_digest, data_digest=other.data_digest)
        responses: list[Pdu] = list(replay.target_login())
        for _ in range(rng.choice((1, 1, 2, 3, 5))):
            if responses and rng.random() < 0.75:
                i = rng.randrange(len(responses))
                responses[i] = m.pdu(responses[i])
            else:
                responses = m.sequence(responses, self.pool)  # type: ignore[arg-type,assignment]
        raw: bytes | None = None
        if rng.random() < 0.25:  # as bytes on the wire, the login's 8 KiB limit applies
            encoded = _encode_all(responses, False, False)
            if encoded is None:
                return None
            raw = m.bytes_(encoded)
        challenge = replay.challenge

        def run() -> str:
            return _login_case(config, challenge, responses, raw)

        def describe() -> str:
            what = raw.hex() if raw is not None else [p.describe() for p in responses]
            return (f"replay={replay.name} chap={config.credentials is not None} "
                    f"mutual={config.mutual is not None} responses={what}")

        return Case(self.name, describe, run,
                    sum(len(p.data) + 48 for p in responses))


def _login_case(config: LoginConfig, challenge: tuple[int, bytes] | None,
                responses: list[Pdu], raw: bytes | None) -> str:
    if raw is not None:
        reader = PduReader(max_data_segment_length=8192)
        reader.feed(raw)
        responses = []
        try:
            while (pdu := reader.next_pdu()) is not None:
                responses.append(pdu)
        except IscsiError:
            pass
    with fixed_challenge(challenge):
        machine = LoginMachine(config)
        request = machine.initial_request()
        request.encode()
        continued = False
        for resp in responses:
            if not isinstance(resp, LoginResponse):
                return "not a Login Response"  # login/run.py: a ProtocolError
            try:
                out = machine.receive(resp)
            except IscsiError as exc:
                return type(exc).__name__
            continued = continued or resp.cont
            if not continued and resp.status_class == 0:
                _check_no_repeated_key(resp)
            if isinstance(out, LoginRequest):
                _check_request(out, config)
                out.encode()
                continue
            if isinstance(out, Redirected):
                try:
                    Portal.parse(out.target_address, what="redirect TargetAddress")
                except IscsiError:
                    return "redirect refused"
                return "redirected"
            _check_result(out)
            return "logged in"
    return "login unfinished"


def _check_no_repeated_key(resp: LoginResponse) -> None:
    """6.3: a key is sent once per negotiation (TargetAddress, 13.8, may repeat)."""
    keys = [k for k, _ in decode_text(bytes(resp.data)) if k != "TargetAddress"]
    repeated = sorted({k for k in keys if keys.count(k) > 1})
    if repeated:
        raise InvariantBroken(f"Login Response accepted with {', '.join(repeated)} twice "
                              "(RFC 7143 6.3)")


def _check_request(req: LoginRequest, config: LoginConfig) -> None:
    if req.isid != config.isid or req.itt != 0 or req.cmd_sn != config.initial_cmd_sn:
        raise InvariantBroken(f"login request changed ISID/ITT/CmdSN: {req.describe()}")
    if req.transit and req.cont:
        raise InvariantBroken("login request with both T and C set")


def _check_result(result: LoginResult) -> None:
    neg = result.negotiated
    if not 512 <= neg.max_xmit_data_segment_length <= (1 << 24) - 1:
        raise InvariantBroken(f"MaxXmitDataSegmentLength {neg.max_xmit_data_segment_length}")
    if neg.first_burst_length > neg.max_burst_length:
        raise InvariantBroken("FirstBurstLength above MaxBurstLength after login")
    if neg.header_digest not in ("None", "CRC32C") or neg.data_digest not in ("None", "CRC32C"):
        raise InvariantBroken(f"digests {neg.header_digest}/{neg.data_digest}")
    Session(result)


# -- the full feature session ----------------------------------------------------------------

Event = tuple[Any, ...]


class SessionTarget:
    name = "session-machine"

    def __init__(self, replays: list[Replay]) -> None:
        self.seeds: list[tuple[Replay, list[Event]]] = []
        self.pool: list[Event] = [("tick", 0.6), ("tick", 6.0), ("tick", 60.0), ("abort", 0),
                                  ("abort", 5), ("reissue", 0), ("restart",), ("fail_all",)]
        for r in replays:
            if r.login_result is None:
                continue
            script = _script(r)
            self.seeds.append((r, script))
            self.pool += [e for e in script if e[0] == "pdu"]
        self.pool += [("pdu", p) for p in _synthetic_ffp()]

    def make(self, rng: random.Random) -> Case | None:
        m = Mutator(rng, [])
        replay, script = rng.choice(self.seeds)
        assert replay.login_result is not None
        events = list(script)
        for _ in range(rng.choice((1, 1, 2, 3, 4, 8))):
            roll = rng.random()
            pdu_at = [i for i, e in enumerate(events) if e[0] == "pdu"]
            if roll < 0.6 and pdu_at:
                i = rng.choice(pdu_at)
                events[i] = ("pdu", m.pdu(events[i][1]))
            elif roll < 0.7 and pdu_at:  # as bytes: what the decoder makes of it
                i = rng.choice(pdu_at)
                encoded = _encode_all([events[i][1]], False, False)
                if encoded is not None:
                    events[i] = ("bytes", m.bytes_(encoded, boundaries=[0]))
            elif roll < 0.8:
                sub = [i for i, e in enumerate(events) if e[0] == "submit"]
                if sub:
                    i = rng.choice(sub)
                    _, lun, cdb, rlen, wlen, itt = events[i]
                    rlen = rng.choice((0, 1, 512, rlen, MAX_TASK_BYTES))
                    wlen = rng.choice((0, 1, 512, wlen, MAX_TASK_BYTES))
                    events[i] = ("submit", lun, cdb, rlen, wlen, itt)
            else:
                events = m.sequence(events, self.pool)  # type: ignore[arg-type,assignment]
        depth = rng.choice((1, 2, 32))
        restart = rng.random() < 0.5
        result = replay.login_result
        if rng.random() < 0.3:  # what another target might have agreed to at login
            neg = replace(result.negotiated, initial_r2t=rng.random() < 0.5,
                          immediate_data=rng.random() < 0.5,
                          first_burst_length=rng.choice((512, 4096, 65536)),
                          max_burst_length=rng.choice((512, 8192, 262144)),
                          max_xmit_data_segment_length=rng.choice((512, 4096, 262144)),
                          data_pdu_in_order=rng.random() < 0.8)
            result = replace(result, negotiated=neg)
        placed = rng.random() < 0.5

        def run() -> str:
            return _session_case(result, events, depth, restart, placed)

        return Case(self.name, lambda: f"replay={replay.name} depth={depth} restart={restart} "
                    f"placed={placed} negotiated={result.negotiated} "
                    f"events={_describe_events(events)}", run,
                    sum(len(e[1].data) + 48 for e in events if e[0] == "pdu"))


def _synthetic_ffp() -> list[Pdu]:
    """What no recorded exchange held but a target may send: Async events, a target
    ping, Rejects, TMF answers, an R2T and a NOP-In out of the blue. ITT 1 is the first
    command of a script, as recorded."""
    sn: Any = {"stat_sn": 2, "exp_cmd_sn": 2, "max_cmd_sn": 40}
    command = ScsiCommand(itt=1, cmd_sn=1).encode_bhs()
    out: list[Pdu] = [AsyncMessage(async_event=e, parameter1=p1, parameter2=2,
                                   parameter3=p3, **sn)
                      for e, p1, p3 in ((0, 0, 0), (1, 0, 5), (1, 0, 0), (2, 1, 2),
                                        (3, 0, 2), (4, 0, 0), (5, 0, 0), (255, 9, 9))]
    out.append(AsyncMessage(async_event=0, data=b"\0\x12" + bytes([0x70, 0, 6]) + bytes(15),
                            **sn))
    out += [Reject(reason=r, data=command, **sn) for r in (0x04, 0x05, 0x06, 0x09)]
    out += [NopIn(ttt=7, itt=RESERVED_TAG, data=b"ping", **sn),
            NopIn(ttt=RESERVED_TAG, itt=RESERVED_TAG, **sn),
            TaskMgmtResponse(itt=TMF_TAG, response=0, **sn),
            TaskMgmtResponse(itt=TMF_TAG, response=5, **sn),
            R2T(itt=1, ttt=5, r2t_sn=0, buffer_offset=0, desired_data_transfer_length=512,
                **sn)]
    return out


def _describe_events(events: list[Event]) -> list[str]:
    out = []
    for e in events:
        if e[0] == "pdu":
            out.append(f"pdu {e[1].describe()} data={bytes(e[1].data).hex()}")
        elif e[0] == "bytes":
            out.append(f"bytes {e[1].hex()}")
        else:
            out.append(repr(e))
    return out


def _script(replay: Replay) -> list[Event]:
    events: list[Event] = []
    for w in replay.wires:
        if w.login:
            continue
        p = w.pdu
        if w.direction == TO_TARGET:
            if isinstance(p, ScsiCommand):
                wlen = p.expected_data_transfer_length if p.write else 0
                rlen = p.expected_data_transfer_length if p.read else 0
                events.append(("submit", p.lun, p.cdb, rlen, wlen, p.itt))
            elif isinstance(p, NopOut) and p.itt != RESERVED_TAG:
                events.append(("ping", p.itt))
            elif isinstance(p, LogoutRequest):
                events.append(("logout", p.itt))
            elif isinstance(p, TaskMgmtRequest):
                events.append(("abort", 0))
        else:
            events.append(("pdu", p))
    return events


TMF_TAG = 0x7EEEEEEE  # the ITT synthetic TMF responses carry: our last abort's ITT


def _session_case(result: LoginResult, events: list[Event], depth: int,
                  restart: bool, placed: bool = False) -> str:
    session = Session(result, queue_depth=depth, nop_interval=5.0, nop_timeout=5.0, now=0.0)
    params = session.params
    hd, dd = params.header_digest == "CRC32C", params.data_digest == "CRC32C"
    now = 0.0
    tasks: dict[int, Task] = {}  # recorded ITT -> our task
    fixed: dict[int, int] = {}  # recorded ITT -> ITT of our ping or logout
    all_tasks: list[Task] = []

    def outgoing() -> list[Pdu]:
        out = session.take_outgoing()
        for pdu in out:
            pdu.encode(header_digest=hd, data_digest=dd)
        _check_session(session, depth, all_tasks)
        return out

    def feed(pdu: Pdu) -> bool:
        """False when the connection is gone for good in this case."""
        itt = pdu.itt
        if itt in tasks:
            itt = tasks[itt].itt
        elif itt in fixed:
            itt = fixed[itt]
        if itt != pdu.itt:
            pdu = replace(pdu, itt=itt)
        put = False
        if placed and isinstance(pdu, DataIn):  # as the transport receives in place
            view = session.data_in_buffer(pdu.itt, pdu.buffer_offset, len(pdu.data))
            if view is not None:
                view[:] = pdu.data
                put = True
        for ev in session.receive(pdu, now, placed=put):
            if isinstance(ev, ConnectionFailed):
                if not restart:
                    return False
                session.restart(result, now)
            elif isinstance(ev, LogoutRequested):
                session.logout()
            elif isinstance(ev, TmfDone) and ev.response in (0, 1):
                session.reissue(ev.rtt)
            elif isinstance(ev, TaskDone):
                _check_done(ev.task)
        return True

    for ev in events:
        kind = ev[0]
        if kind == "submit":
            _, lun, cdb, rlen, wlen, itt = ev
            task = Task(lun, cdb, read_length=rlen,
                        write_data=bytes(wlen) if wlen else None)
            session.submit(task)
            tasks[itt] = task
            all_tasks.append(task)
        elif kind in ("ping", "logout"):
            if kind == "ping":
                now += session.nop_interval + 0.1
                session.last_rx = now - session.nop_interval  # idle long enough to ping
                session.tick(now)
            else:
                session.logout()
            for pdu in outgoing():
                if isinstance(pdu, NopOut | LogoutRequest) and pdu.itt != RESERVED_TAG:
                    fixed[ev[1]] = pdu.itt
            continue
        elif kind == "pdu":
            now += 0.001
            if not feed(ev[1]):
                outgoing()
                return "connection failed"
        elif kind == "bytes":
            reader = PduReader(max_data_segment_length=params.max_recv_data_segment_length)
            reader.feed(ev[1])
            try:
                decoded = reader.next_pdu()
            except IscsiError:
                return "undecodable PDU"  # the transport fails the connection
            if decoded is not None and not feed(decoded):
                outgoing()
                return "connection failed"
        elif kind == "tick":
            now += ev[1]
            for fail in session.tick(now):
                if isinstance(fail, ConnectionFailed) and restart:
                    session.restart(result, now)
        elif kind == "abort" and session.tasks:
            live = list(session.tasks.values())
            session.abort(live[ev[1] % len(live)])
            for pdu in outgoing():
                if isinstance(pdu, TaskMgmtRequest):
                    fixed[TMF_TAG] = pdu.itt
            continue
        elif kind == "reissue" and session.tasks:
            session.reissue(next(iter(session.tasks)))
        elif kind == "restart":
            session.restart(result, now)
        elif kind == "fail_all":
            for task in session.fail_all("fuzz: replacement timeout"):
                if not task.done or task.error is None:
                    raise InvariantBroken("fail_all left a task without an error")
        outgoing()
    done = sum(t.done for t in all_tasks)
    return f"script ran: {done}/{len(all_tasks)} tasks done" if all_tasks else "script ran"


def _check_done(task: Task) -> None:
    """A read that ends GOOD holds every byte asked for, less the residual it reports:
    otherwise the caller is handed bytes the target never sent (SAM-5 5.4.2, RFC 7143
    11.4.5)."""
    if task.error is not None or task.status != 0 or not task.read_length:
        return
    expected = task.read_length - max(task.residual, 0)
    if task.received != expected:
        raise InvariantBroken(f"read of {task.read_length} bytes ended GOOD with "
                              f"{task.received} bytes received and residual {task.residual}")


def _check_session(session: Session, depth: int, tasks: list[Task]) -> None:
    if len(session.tasks) > depth:
        raise InvariantBroken(f"{len(session.tasks)} live tasks, queue depth {depth}")
    for itt, task in session.tasks.items():
        if itt == RESERVED_TAG or task.itt != itt:
            raise InvariantBroken(f"live task under ITT {itt:#x} says ITT {task.itt:#x}")
    for task in tasks:
        if task.received > max(task.read_length, 0) or len(task.data) > task.read_length:
            raise InvariantBroken(f"task received {task.received} of {task.read_length} "
                                  f"bytes (buffer {len(task.data)})")


TARGETS = (DecoderTarget, KeysTarget, ScsiTarget, LoginTarget, SessionTarget)
