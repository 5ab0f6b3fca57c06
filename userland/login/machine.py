"""The initiator's login state machine (RFC 7143 sections 6.3, 11.12, 11.13): sans-IO.

Feed it Login Responses, it gives the next Login Request, a redirect, or the result.
It reads no clock and touches no socket, so the kernel path (blocking socket, then
handed to the kernel) and the FUSE path (trio) log in through the very same code.

Stages: Security (AuthMethod, CHAP) -> Operational (the keys of section 13) -> Full
Feature. Login PDUs are immediate: every one carries the same CmdSN and ITT; ExpStatSN
follows the target's StatSN, which advances with each response.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from userland.errors import AuthenticationError, ConfigError, NegotiationError, ProtocolError
from userland.keys import (
    Negotiated,
    Negotiator,
    TextAssembler,
    decode_text,
    encode_text,
    split_text,
)
from userland.login.chap import ChapExchange, Credentials, check_secrets
from userland.login.status import REDIRECT_CLASS, status_error
from userland.pdu import LoginRequest, LoginResponse, Stage, sn_add
from userland.printable import escape

Pair = tuple[str, str]

# What we offer on a normal session unless told otherwise: the values open-iscsi uses,
# which the Linux kernel's iscsi_tcp accepts after a handoff.
NORMAL_OFFERS: tuple[Pair, ...] = (
    ("MaxConnections", "1"),
    ("InitialR2T", "No"),
    ("ImmediateData", "Yes"),
    ("MaxRecvDataSegmentLength", "262144"),
    ("MaxBurstLength", "16776192"),
    ("FirstBurstLength", "262144"),
    ("DefaultTime2Wait", "2"),
    ("DefaultTime2Retain", "0"),
    ("MaxOutstandingR2T", "1"),
    ("DataPDUInOrder", "Yes"),
    ("DataSequenceInOrder", "Yes"),
    ("ErrorRecoveryLevel", "0"),
)
DISCOVERY_OFFERS: tuple[Pair, ...] = (
    ("MaxRecvDataSegmentLength", "262144"),
    ("DefaultTime2Wait", "2"),
    ("DefaultTime2Retain", "0"),
)
# Login PDUs travel before MaxRecvDataSegmentLength is agreed: 8192 is the default.
LOGIN_SEGMENT = 8192
MAX_ROUND_TRIPS = 32  # a target that never lets us transit must not loop us forever
SECRET_KEYS = frozenset({"CHAP_R", "CHAP_C"})
# 13.8: the one key a target may send more than once (a list of addresses).
REPEATABLE_KEYS = frozenset({"TargetAddress"})
# Where an expected TargetPortalGroupTag came from: a user's typo is a usage error (2),
# a target contradicting its own discovery answer or redirect is a protocol error (7).
TPGT_FROM_USER = "user"


def new_isid() -> bytes:
    """A random-format ISID (RFC 7143 11.12.5: T=10b), unique per session we create."""
    return bytes([0x80]) + os.urandom(5)


def redact(pairs: Sequence[Pair]) -> list[Pair]:
    """Key pairs fit for -v logs: CHAP responses and challenges hidden."""
    return [(k, "<redacted>" if k in SECRET_KEYS else v) for k, v in pairs]


@dataclass(frozen=True)
class LoginConfig:
    initiator_name: str
    target_name: str | None  # None: a discovery session
    isid: bytes
    tsih: int = 0
    cid: int = 0
    credentials: Credentials | None = None
    mutual: Credentials | None = None
    chap_algorithms: tuple[int, ...] = (5,)
    header_digest: tuple[str, ...] = ("None",)
    data_digest: tuple[str, ...] = ("None",)
    offers: tuple[Pair, ...] | None = None  # None: NORMAL_OFFERS or DISCOVERY_OFFERS
    initial_cmd_sn: int = 1
    exp_stat_sn: int = 0
    initiator_alias: str | None = None
    # The portal group tag we expect (from --portal HOST:PORT,TPGT, SendTargets or a
    # redirect); None: take what the target says. Where it came from, for the error.
    expected_tpgt: int | None = None
    expected_tpgt_from: str = TPGT_FROM_USER

    @property
    def session_type(self) -> str:
        return "Normal" if self.target_name else "Discovery"


def config_for_redirect(config: LoginConfig, target_address: str,
                        tpgt: int | None) -> LoginConfig:
    """The config to log in with at a redirect's address: its TPGT is now the one due."""
    if config.target_name is None:
        return config
    return replace(config, expected_tpgt=tpgt,
                   expected_tpgt_from=f"the redirect to {escape(target_address, limit=80)}")


def config_pinned(config: LoginConfig, tpgt: int | None) -> LoginConfig:
    """The config for a relogin of a session: the target must keep the portal group tag
    its first login declared (a recovery that lands in another group is refused)."""
    if config.target_name is None or tpgt is None or config.expected_tpgt is not None:
        return config
    return replace(config, expected_tpgt=tpgt, expected_tpgt_from="the session's first login")


@dataclass
class LoginResult:
    """What full feature phase starts from."""

    negotiated: Negotiated
    isid: bytes
    tsih: int
    cid: int
    cmd_sn: int  # the next CmdSN to use: ExpCmdSN of the final response
    exp_stat_sn: int  # the final response's StatSN + 1
    max_cmd_sn: int
    auth_method: str
    warnings: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Redirected:
    """Status 0x0101/0x0102: log in again at ``target_address`` (host:port[,tpgt])."""

    target_address: str
    permanent: bool


class LoginMachine:
    def __init__(self, config: LoginConfig) -> None:
        self.config = config
        self.warnings = check_secrets(config.credentials, config.mutual)
        self.negotiator = Negotiator(session_type=config.session_type)
        self._stage = Stage.SECURITY
        self._exp_stat_sn = config.exp_stat_sn
        self._round_trips = 0
        self._assembler = TextAssembler()
        self._pending_chunks: list[bytes] = []
        self._next_transit = False
        self._next_nsg = 0
        self._chap: ChapExchange | None = None
        self._chap_step = "none"  # none -> method -> algorithm -> response -> done
        self._security_keys_seen: set[str] = set()  # AuthMethod and CHAP_* from the target
        self._first_text_done = False
        self.auth_method = "None"
        self.transcript: list[tuple[str, list[Pair]]] = []

    # -- requests

    def initial_request(self) -> LoginRequest:
        cfg = self.config
        pairs: list[Pair] = [("InitiatorName", cfg.initiator_name)]
        if cfg.initiator_alias:
            pairs.append(("InitiatorAlias", cfg.initiator_alias))
        if cfg.target_name:
            pairs.append(("TargetName", cfg.target_name))
        pairs.append(("SessionType", cfg.session_type))
        if cfg.credentials is not None:
            self._chap = ChapExchange(cfg.credentials, cfg.chap_algorithms, cfg.mutual)
            self._chap_step = "method"
            pairs.append(("AuthMethod", "CHAP"))
            return self._request(pairs, transit=False)
        pairs.append(("AuthMethod", "None"))
        return self._request(pairs, transit=True, nsg=Stage.OPERATIONAL)

    def _request(self, pairs: Sequence[Pair], *, transit: bool, nsg: int = 0) -> LoginRequest:
        self.transcript.append(("sent", redact(pairs)))
        chunks = split_text(encode_text(pairs), LOGIN_SEGMENT) if pairs else [b""]
        self._pending_chunks = chunks[1:]
        self._next_transit, self._next_nsg = transit, nsg
        return self._pdu(chunks[0], cont=bool(self._pending_chunks), transit=transit, nsg=nsg)

    def _pdu(self, data: bytes, *, cont: bool, transit: bool, nsg: int) -> LoginRequest:
        cfg = self.config
        return LoginRequest(
            transit=transit and not cont, cont=cont, csg=self._stage,
            nsg=nsg if transit and not cont else 0, isid=cfg.isid, tsih=cfg.tsih,
            itt=0, cid=cfg.cid, cmd_sn=cfg.initial_cmd_sn, exp_stat_sn=self._exp_stat_sn,
            data=data)

    # -- responses

    def receive(self, resp: LoginResponse) -> LoginRequest | LoginResult | Redirected:
        self._round_trips += 1
        if self._round_trips > MAX_ROUND_TRIPS:
            raise ProtocolError(f"login did not finish in {MAX_ROUND_TRIPS} round trips")
        if resp.status_class == REDIRECT_CLASS:
            return self._redirect(resp)
        if resp.status_class != 0:
            raise status_error(resp.status_class, resp.status_detail,
                               target=self.config.target_name or "",
                               had_credentials=self.config.credentials is not None)
        self._check_header(resp)
        self._exp_stat_sn = sn_add(resp.stat_sn, 1)

        if self._pending_chunks:  # the target took a piece of our long text
            if resp.data or resp.transit:
                raise ProtocolError("Login Response: target answered before our text ended")
            chunk = self._pending_chunks.pop(0)
            return self._pdu(chunk, cont=bool(self._pending_chunks),
                             transit=self._next_transit, nsg=self._next_nsg)
        pairs = self._assembler.feed(bytes(resp.data), resp.cont)
        if pairs is None:  # more of the target's text to come: ask for it
            return self._pdu(b"", cont=False, transit=False, nsg=0)
        self.transcript.append(("received", redact(pairs)))
        self._check_repeats(pairs)
        first, self._first_text_done = not self._first_text_done, True

        if self._stage == Stage.SECURITY:
            outcome = self._security(resp, pairs)
        else:
            outcome = self._operational(resp, pairs)
        if first:
            self._check_tpgt()
        return outcome

    def _check_repeats(self, pairs: Sequence[Pair]) -> None:
        """6.3: a key is declared or negotiated once per login; a repeat is refused.

        The Negotiator sees the operational keys across the whole login; the security
        keys (AuthMethod, CHAP_*) are handled here, so they are counted here too.
        """
        seen: set[str] = set()
        for key, _ in pairs:
            if key in REPEATABLE_KEYS:
                continue
            if key in seen:
                raise NegotiationError(f"target sent {key} twice in one Login Response; "
                                       "RFC 7143 6.3 forbids declaring or negotiating a key "
                                       "more than once")
            if key in self._security_keys_seen:
                raise NegotiationError(f"target sent {key} again in a later Login Response; "
                                       "RFC 7143 6.3 forbids negotiating a key twice")
            seen.add(key)
        self._security_keys_seen |= {k for k in seen
                                     if k == "AuthMethod" or k.startswith("CHAP_")}

    def _check_tpgt(self) -> None:
        """13.9: the first Login Response of a normal session carries the portal group tag.

        It must be there, and it must be the one we were told (the user's --portal
        HOST:PORT,TPGT, the SendTargets answer, the redirect).
        """
        cfg = self.config
        if cfg.target_name is None:
            return  # 13.9: returned "when TargetName is given by the initiator"
        tag = self.negotiator.target_portal_group_tag
        if tag is None:
            raise NegotiationError("target did not send TargetPortalGroupTag in its first "
                                   "Login Response (RFC 7143 13.9)")
        if cfg.expected_tpgt is not None and tag != cfg.expected_tpgt:
            if cfg.expected_tpgt_from == TPGT_FROM_USER:
                raise ConfigError(f"the portal was given with portal group tag "
                                  f"{cfg.expected_tpgt}, but the target serves it in group "
                                  f"{tag}; give ,{tag} or leave the tag out")
            raise ProtocolError(f"target answered TargetPortalGroupTag={tag}, but "
                                f"{cfg.expected_tpgt_from} said {cfg.expected_tpgt} "
                                "(RFC 7143 13.9)")

    def _check_header(self, resp: LoginResponse) -> None:
        if resp.isid != self.config.isid:
            raise ProtocolError("Login Response: ISID differs from ours")
        if resp.version_active != 0:
            raise ProtocolError(f"Login Response: VersionActive {resp.version_active} "
                                "is not 0")
        if resp.csg != self._stage:
            raise ProtocolError(f"Login Response: CSG {resp.csg} while we are in stage "
                                f"{int(self._stage)}")

    def _check_transit(self, resp: LoginResponse) -> None:
        # Checked after the keys: a downgrade to AuthMethod=None with T=1 is first of all
        # an authentication problem, and should be reported as one.
        if resp.transit and (not self._next_transit or resp.nsg != self._next_nsg):
            raise ProtocolError(f"Login Response: target moved to stage {resp.nsg} "
                                "we did not ask for")

    def _redirect(self, resp: LoginResponse) -> Redirected:
        pairs = decode_text(bytes(resp.data))
        address = dict(pairs).get("TargetAddress")
        if not address:
            raise ProtocolError("login redirect without a TargetAddress")
        return Redirected(address, permanent=resp.status_detail == 0x02)

    def _security(self, resp: LoginResponse,
                  pairs: list[Pair]) -> LoginRequest | LoginResult | Redirected:
        keys = dict(pairs)
        method = keys.pop("AuthMethod", None)
        others = [(k, v) for k, v in pairs if k != "AuthMethod" and not k.startswith("CHAP_")]
        replies = self.negotiator.receive(others)  # TargetPortalGroupTag, TargetAlias...
        if method is not None:
            self._check_auth_method(method)
        self._check_transit(resp)
        if self._chap is not None and self._chap_step != "done":
            return self._chap_next(resp, keys, replies)
        if resp.transit:
            return self._enter(resp.nsg)
        # The target wants another round in Security: ask again to move on.
        return self._request(replies, transit=True, nsg=Stage.OPERATIONAL)

    def _check_auth_method(self, method: str) -> None:
        if self.config.credentials is not None:
            if method == "CHAP":
                self.auth_method = "CHAP"
                return
            if method == "None":
                raise AuthenticationError(
                    "target offered no authentication (AuthMethod=None) while CHAP "
                    "credentials were given; refusing to log in unauthenticated")
            raise AuthenticationError(f"target refused CHAP (answered AuthMethod="
                                      f"{escape(method, limit=40)})")
        if method != "None":
            raise AuthenticationError(
                f"the target requires authentication (answered AuthMethod="
                f"{escape(method, limit=40)}) and no "
                "credentials were given (use --chap-user with --chap-secret-file)")

    def _chap_next(self, resp: LoginResponse, keys: dict[str, str],
                   replies: list[Pair]) -> LoginRequest | LoginResult | Redirected:
        assert self._chap is not None
        if self._chap_step == "method":
            if self.auth_method != "CHAP":
                raise ProtocolError("target did not answer AuthMethod")
            self._chap_step = "algorithm"
            return self._request([*replies, *self._chap.offer()], transit=False)
        if self._chap_step == "algorithm":
            if keys.get("CHAP_A") in (None, "Reject"):
                offered = ",".join(map(str, self.config.chap_algorithms))
                raise AuthenticationError(f"target accepts none of the CHAP algorithms we "
                                          f"offered (CHAP_A={offered}); see --chap-algs")
            answer = self._chap.answer_challenge(keys)
            self._chap_step = "response"
            return self._request([*replies, *answer], transit=True, nsg=Stage.OPERATIONAL)
        # step "response": the target accepted ours; with mutual CHAP it answers ours.
        self._chap.verify_target(keys)
        self._chap_step = "done"
        if resp.transit:
            return self._enter(resp.nsg)
        return self._request(replies, transit=True, nsg=Stage.OPERATIONAL)

    def _enter(self, stage: int) -> LoginRequest | LoginResult:
        self._stage = Stage(stage)
        if self._stage == Stage.FULL_FEATURE:
            raise ProtocolError("target skipped the operational stage we asked for")
        cfg = self.config
        self.negotiator.offer("HeaderDigest", ",".join(cfg.header_digest))
        self.negotiator.offer("DataDigest", ",".join(cfg.data_digest))
        default = NORMAL_OFFERS if cfg.target_name else DISCOVERY_OFFERS
        for key, value in cfg.offers if cfg.offers is not None else default:
            self.negotiator.offer(key, value)
        return self._request(self.negotiator.take_offers(), transit=True,
                             nsg=Stage.FULL_FEATURE)

    def _operational(self, resp: LoginResponse,
                     pairs: list[Pair]) -> LoginRequest | LoginResult:
        replies = self.negotiator.receive(pairs)
        replies += self.negotiator.take_offers()
        self._check_transit(resp)
        if resp.transit:
            if replies:
                names = ", ".join(k for k, _ in replies)
                raise ProtocolError(f"target entered full feature phase with keys still "
                                    f"under negotiation ({names})")
            return self._finish(resp)
        return self._request(replies, transit=True, nsg=Stage.FULL_FEATURE)

    def _finish(self, resp: LoginResponse) -> LoginResult:
        negotiated = self.negotiator.result()
        self._check_required_digests(negotiated)
        if self.config.tsih == 0 and resp.tsih == 0:
            raise ProtocolError("final Login Response carries TSIH 0")
        if self.config.tsih and resp.tsih != self.config.tsih:
            raise ProtocolError("final Login Response changed the TSIH of our session")
        return LoginResult(
            negotiated=negotiated, isid=self.config.isid, tsih=resp.tsih,
            cid=self.config.cid, cmd_sn=resp.exp_cmd_sn, exp_stat_sn=self._exp_stat_sn,
            max_cmd_sn=resp.max_cmd_sn, auth_method=self.auth_method,
            warnings=[*self.warnings, *self.negotiator.warnings])

    def _check_required_digests(self, negotiated: Negotiated) -> None:
        """A digest the user required (CRC32C alone) must be what we got.

        A target that answers Reject or NotUnderstood, or never answers, leaves the
        default None (6.2): that is a failed login, never a silent session without it.
        """
        for key, offered, got in (
                ("HeaderDigest", self.config.header_digest, negotiated.header_digest),
                ("DataDigest", self.config.data_digest, negotiated.data_digest)):
            if "None" in offered or got in offered:
                continue
            answer = self.negotiator.answer_to(key)
            how = ("never answered it" if answer is None
                   else f"answered {key}={escape(answer, limit=40)}")
            raise NegotiationError(f"{key}={','.join(offered)} was required and the target "
                                   f"{how}; refusing a session without it")
