"""A scripted fake target on 127.0.0.1 for the misbehaviours a real tgtd never shows.

Each accepted connection runs ``script(peer)`` in a thread; the script reads the
initiator's PDUs and answers whatever the test wants, malformed or malicious.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable
from types import TracebackType

from userland.keys import decode_text, encode_text
from userland.pdu import PDU_CLASSES, LoginRequest, LoginResponse, Pdu, PduReader

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
                             data=encode_text(pairs))


Script = Callable[[Peer], None]


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
                answers: dict[str, str] | None = None) -> None:
    """Answer every offered key with the first offered value; enter full feature."""
    reply = []
    for key, value in keys.items():
        if key == "MaxRecvDataSegmentLength":
            reply.append((key, "8192"))
        else:
            reply.append((key, (answers or {}).get(key, value.split(",")[0])))
    peer.send(peer.login_response(req, reply, transit=True, nsg=3, tsih=7))


def plain_login(peer: Peer) -> None:
    req, keys = peer.recv_login()
    assert keys["AuthMethod"] == "None" and req.transit and req.nsg == 1
    peer.send(peer.login_response(req, [("AuthMethod", "None"),
                                        ("TargetPortalGroupTag", "1")], transit=True, nsg=1))
    req, keys = peer.recv_login()
    operational(peer, req, keys)
