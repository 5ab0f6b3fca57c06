"""A scripted fake target on 127.0.0.1 for the misbehaviours a real tgtd never shows.

Each accepted connection runs ``script(peer)`` in a thread; the script reads the
initiator's PDUs and answers whatever the test wants, malformed or malicious.

``hostile(LoginPlan(...), text=...)`` builds such a script from a plan: a login that
misbehaves at a chosen step (repeated keys, a bad CHAP_I, a missing or changed TPGT,
digests answered Reject or never answered, control characters in values), then a
SendTargets answer given as a sequence of Text Response PDUs (split with C=1, split
with F=0 C=0, endless, or listing a thousand targets).
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from types import TracebackType

from userland.keys import decode_text
from userland.pdu import (
    PDU_CLASSES,
    RESERVED_TAG,
    LoginRequest,
    LoginResponse,
    LogoutRequest,
    LogoutResponse,
    Pdu,
    PduReader,
    TextRequest,
    TextResponse,
)

ALL = frozenset(PDU_CLASSES)


class Peer:
    """The target's side of one connection."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.reader = PduReader(allowed=ALL)
        self.stat_sn = 100
        # 13.9: a target names its portal group in the first Login Response of a normal
        # session; login_response adds it there unless the script sets this to None.
        self.tpgt: int | None = 1
        self._normal_session = False
        self._responded = False

    def recv(self) -> Pdu:
        while (pdu := self.reader.next_pdu()) is None:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("initiator closed")
            self.reader.feed(chunk)
        return pdu

    def recv_login(self) -> tuple[LoginRequest, dict[str, str]]:
        pdu = self.recv()
        assert isinstance(pdu, LoginRequest), pdu
        keys = dict(decode_text(bytes(pdu.data)))
        if "TargetName" in keys:
            self._normal_session = True
        return pdu, keys

    def send(self, pdu: Pdu) -> None:
        self.sock.sendall(pdu.encode())

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def login_response(self, req: LoginRequest, pairs: list[tuple[str, str]], *,
                       transit: bool = False, nsg: int = 0, status: tuple[int, int] = (0, 0),
                       tsih: int = 0) -> LoginResponse:
        """A well-formed answer to ``req`` carrying ``pairs``; the caller may spoil it."""
        first, self._responded = not self._responded, True
        if (first and self._normal_session and self.tpgt is not None and status == (0, 0)
                and all(k != "TargetPortalGroupTag" for k, _ in pairs)):
            pairs = [*pairs, ("TargetPortalGroupTag", str(self.tpgt))]
        self.stat_sn += 1
        return LoginResponse(transit=transit, csg=req.csg, nsg=nsg if transit else 0,
                             isid=req.isid, tsih=tsih, itt=req.itt, stat_sn=self.stat_sn,
                             exp_cmd_sn=req.cmd_sn, max_cmd_sn=req.cmd_sn + 31,
                             status_class=status[0], status_detail=status[1],
                             data=raw_text(pairs))


Script = Callable[[Peer], None]


def raw_text(pairs: Iterable[tuple[str, str]]) -> bytes:
    """key=value\0 as given: a hostile target is not held to the limits we check."""
    return b"".join(f"{key}={value}\0".encode() for key, value in pairs)


class FakeTarget:
    def __init__(self, script: Script) -> None:
        self.script = script
        self.errors: list[BaseException] = []
        self.connections = 0
        self._server = socket.create_server(("127.0.0.1", 0))
        self._server.settimeout(0.1)
        self.port = self._server.getsockname()[1]
        self._threads: list[threading.Thread] = []
        self._stop = threading.Event()
        self._accepter = threading.Thread(target=self._accept, daemon=True)

    @property
    def portal(self) -> str:
        return f"127.0.0.1:{self.port}"

    def __enter__(self) -> FakeTarget:
        self._accepter.start()
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._stop.set()
        self._server.close()
        self._accepter.join(5)
        for t in self._threads:
            t.join(5)

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                sock, _ = self._server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.connections += 1
            t = threading.Thread(target=self._run, args=(sock,), daemon=True)
            self._threads.append(t)
            t.start()

    def _run(self, sock: socket.socket) -> None:
        with sock:
            try:
                self.script(Peer(sock))
            except (ConnectionError, OSError):
                pass  # the initiator hung up: often the point of the test
            except BaseException as exc:  # surfaced by the test through .errors
                self.errors.append(exc)


def operational(peer: Peer, req: LoginRequest, keys: dict[str, str],
                answers: dict[str, str | None] | None = None,
                extra: Iterable[tuple[str, str]] = ()) -> None:
    """Answer every offered key with the first offered value; enter full feature.

    ``answers`` overrides a key's answer; None leaves the key unanswered. ``extra``
    pairs are appended as they are (a repeated key, a TPGT declared again...).
    """
    reply = []
    for key, value in keys.items():
        answer = (answers or {}).get(key, value.split(",")[0])
        if key == "MaxRecvDataSegmentLength":
            reply.append((key, "8192"))
        elif answer is not None:
            reply.append((key, answer))
    reply.extend(extra)
    peer.send(peer.login_response(req, reply, transit=True, nsg=3, tsih=7))


def plain_login(peer: Peer) -> None:
    req, keys = peer.recv_login()
    assert keys["AuthMethod"] == "None" and req.transit and req.nsg == 1
    peer.send(peer.login_response(req, [("AuthMethod", "None"),
                                        ("TargetPortalGroupTag", "1")], transit=True, nsg=1))
    req, keys = peer.recv_login()
    operational(peer, req, keys)


# -- scripted misbehaviour at login and in Text exchanges

Pair = tuple[str, str]
CONTINUE_TTT = 0x55


@dataclass
class LoginPlan:
    """How a hostile target logs in; the defaults make a well-behaved one."""

    first: list[Pair] = field(default_factory=lambda: [("AuthMethod", "None")])
    tpgt: int | None = 1  # declared in the first response of a normal session
    chap: list[Pair] | None = None  # with CHAP: the challenge pairs to send
    answers: dict[str, str | None] = field(default_factory=dict)  # operational overrides
    extra: list[Pair] = field(default_factory=list)  # appended to the final response


def login_as(peer: Peer, plan: LoginPlan) -> None:
    """One login by ``plan``, up to full feature phase (or to the initiator hanging up)."""
    peer.tpgt = plan.tpgt
    req, keys = peer.recv_login()
    if plan.chap is None:
        peer.send(peer.login_response(req, plan.first, transit=True, nsg=1))
    else:
        peer.send(peer.login_response(req, plan.first))
        req, keys = peer.recv_login()
        assert "CHAP_A" in keys, keys
        peer.send(peer.login_response(req, plan.chap))
        req, keys = peer.recv_login()  # our CHAP_N/CHAP_R: accepted without a check
        peer.send(peer.login_response(req, [], transit=True, nsg=1))
    req, keys = peer.recv_login()
    operational(peer, req, keys, plan.answers, plan.extra)


def text_pdus(pairs: Iterable[Pair], *, chunk: int = 65536) -> Iterator[tuple[bytes, bool]]:
    """``pairs`` as Text Response data split every ``chunk`` bytes, anywhere (C=1)."""
    buf = bytearray()
    for key, value in pairs:
        buf += f"{key}={value}\0".encode()
        while len(buf) > chunk:
            yield bytes(buf[:chunk]), True
            del buf[:chunk]
    yield bytes(buf), False


def serve_text(peer: Peer, pdus: Iterable[tuple[bytes, bool]], *,
               set_boundaries: bool = False) -> None:
    """Answer one Text Request with ``pdus`` (data, C bit); F=1 on the last only.

    ``set_boundaries``: every PDU but the last has F=0 and C=0, so each must end on a
    pair boundary (RFC 7143 11.11: the target waits for an empty Text Request).
    """
    req = peer.recv()
    assert isinstance(req, TextRequest), req
    it = iter(pdus)
    data, cont = next(it)
    for following in it:
        peer.stat_sn += 1
        peer.send(TextResponse(final=False, cont=cont and not set_boundaries, itt=req.itt,
                               ttt=CONTINUE_TTT, stat_sn=peer.stat_sn,
                               exp_cmd_sn=req.cmd_sn + 1, max_cmd_sn=req.cmd_sn + 32,
                               data=data))
        req = peer.recv()
        assert isinstance(req, TextRequest) and req.ttt == CONTINUE_TTT and not req.data
        data, cont = following
    peer.stat_sn += 1
    peer.send(TextResponse(final=True, cont=False, itt=req.itt, ttt=RESERVED_TAG,
                           stat_sn=peer.stat_sn, exp_cmd_sn=req.cmd_sn + 1,
                           max_cmd_sn=req.cmd_sn + 32, data=data))


def answer_logout(peer: Peer) -> None:
    logout = peer.recv()
    assert isinstance(logout, LogoutRequest), logout
    peer.stat_sn += 1
    peer.send(LogoutResponse(itt=logout.itt, stat_sn=peer.stat_sn,
                             exp_cmd_sn=logout.cmd_sn, max_cmd_sn=logout.cmd_sn + 32))


def target_list(names: Iterable[str], address: str = "127.0.0.1:3260,1") -> Iterator[Pair]:
    for name in names:
        yield ("TargetName", name)
        yield ("TargetAddress", address)


def many_targets(total_bytes: int, width: int = 200) -> Iterator[Pair]:
    """A SendTargets answer of about ``total_bytes`` (16 MiB, say), made as it is sent;
    names are padded to ``width`` characters, so bytes, not the count, run out first."""
    sent, i = 0, 0
    while sent < total_bytes:
        pairs = list(target_list([f"iqn.2024-01.org.example:t{i:09d}".ljust(width, "x")]))
        sent += sum(len(k) + len(v) + 2 for k, v in pairs)
        i += 1
        yield from pairs


def hostile(plan: LoginPlan | None = None, *,
            text: Callable[[], Iterable[tuple[bytes, bool]]] | None = None,
            set_boundaries: bool = False) -> Script:
    """A script: log in by ``plan``; then, given ``text``, answer SendTargets with its
    PDUs; then answer a Logout. Without ``text`` it answers only the Logout."""
    def script(peer: Peer) -> None:
        login_as(peer, plan or LoginPlan())
        if text is not None:
            serve_text(peer, text(), set_boundaries=set_boundaries)
        answer_logout(peer)
    return script
