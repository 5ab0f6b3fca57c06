"""Blocking full-feature exchanges for short sessions: Text (SendTargets) and Logout.

Discovery and `login --check` need one or two requests after login, one at a time;
the data path has its own concurrent session. This keeps CmdSN/StatSN by the rules
(RFC 7143 sections 4.2.2, 11.10, 11.14) and answers the target's NOP-In pings.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence

from userland.connection import Connection
from userland.errors import LoginRejected, ProtocolError
from userland.keys import TextStream, encode_text
from userland.login.machine import LoginResult
from userland.pdu import (
    RESERVED_TAG,
    AsyncMessage,
    LogoutRequest,
    LogoutResponse,
    NopIn,
    NopOut,
    Pdu,
    Reject,
    TextRequest,
    TextResponse,
    sn_add,
    sn_lt,
)

log = logging.getLogger("iscsi_handoff.session")
MAX_TEXT_ROUNDS = 16384  # a loop guard on continued Text Responses
MAX_TEXT_BYTES = 1 << 20  # SendTargets of thousands of targets, but bounded
Pair = tuple[str, str]


def deadline_from(timeout: float | None, deadline: float | None) -> float:
    """One absolute deadline: the caller's, or ``timeout`` seconds from now."""
    if deadline is not None:
        return deadline
    if timeout is None:
        raise ValueError("give a timeout or a deadline")
    return time.monotonic() + timeout
LOGOUT_REASONS = {0: "closed", 1: "CID not found", 2: "recovery not supported",
                  3: "cleanup failed"}


class Exchange:
    def __init__(self, conn: Connection, login: LoginResult) -> None:
        self.conn = conn
        self.cmd_sn = login.cmd_sn
        self.exp_stat_sn = login.exp_stat_sn
        self.max_cmd_sn = login.max_cmd_sn
        self._itt = 0
        conn.reader.max_data_segment_length = login.negotiated.max_recv_data_segment_length

    def _next_itt(self) -> int:
        self._itt = (self._itt + 1) % RESERVED_TAG
        return self._itt

    def _note_status(self, pdu: Pdu) -> None:
        stat_sn = getattr(pdu, "stat_sn", None)
        if stat_sn is not None and not isinstance(pdu, NopIn | AsyncMessage | Reject):
            self.exp_stat_sn = sn_add(stat_sn, 1)
        max_cmd_sn = getattr(pdu, "max_cmd_sn", None)
        if max_cmd_sn is not None and not sn_lt(max_cmd_sn, self.max_cmd_sn):
            self.max_cmd_sn = max_cmd_sn

    def _receive(self, itt: int, deadline: float, waiting_for: str) -> Pdu:
        """The next PDU for ``itt``, answering pings and noting status on the way."""
        while True:
            pdu = self.conn.receive(deadline=deadline, waiting_for=waiting_for)
            self._note_status(pdu)
            if isinstance(pdu, NopIn):
                if pdu.ttt != RESERVED_TAG:  # the target pings us: echo it back
                    self.conn.send(NopOut(immediate=True, itt=RESERVED_TAG, ttt=pdu.ttt,
                                          lun=pdu.lun, cmd_sn=self.cmd_sn,
                                          exp_stat_sn=self.exp_stat_sn, data=pdu.data),
                                   deadline=deadline)
                continue
            if isinstance(pdu, AsyncMessage):
                log.info("target sent Async Message event %d", pdu.async_event)
                continue
            if isinstance(pdu, Reject):
                raise ProtocolError(f"target rejected our {waiting_for} request "
                                    f"(reason 0x{pdu.reason:02x})")
            if pdu.itt != itt:
                raise ProtocolError(f"{type(pdu).__name__} for ITT {pdu.itt:#x}, "
                                    f"expected {itt:#x}")
            return pdu

    def text(self, pairs: list[Pair], *, timeout: float | None = None,
             deadline: float | None = None,
             consume: Callable[[Sequence[Pair]], None] | None = None,
             max_bytes: int = MAX_TEXT_BYTES) -> list[Pair]:
        """One Text exchange, following the target's continuation (11.10, 11.11).

        The answer is decoded as it arrives: with ``consume``, each PDU's complete pairs
        go to it at once and nothing is kept here (the return is empty); without, they
        are collected and returned. A Response with C=1 continues inside a pair; one with
        F=0 and C=0 ends on a pair boundary; either way the target waits for our empty
        Text Request with its Target Transfer Tag, until F=1.
        """
        deadline = deadline_from(timeout, deadline)
        itt = self._next_itt()
        stream = TextStream(max_bytes)
        collected: list[Pair] = []
        sink = consume if consume is not None else collected.extend
        data, ttt = encode_text(pairs), RESERVED_TAG
        for _ in range(MAX_TEXT_ROUNDS):
            request = TextRequest(final=True, itt=itt, ttt=ttt, cmd_sn=self.cmd_sn,
                                  exp_stat_sn=self.exp_stat_sn, data=data)
            self.cmd_sn = sn_add(self.cmd_sn, 1)
            self.conn.send(request, deadline=deadline)
            resp = self._receive(itt, deadline, "a Text Response")
            if not isinstance(resp, TextResponse):
                raise ProtocolError(f"expected a Text Response, got {type(resp).__name__}")
            if resp.final and resp.cont:
                raise ProtocolError("Text Response with both F and C set (RFC 7143 11.11)")
            got = stream.feed(bytes(resp.data), resp.cont)
            if got:
                sink(got)
            if resp.final:
                stream.finish()
                return collected
            if resp.ttt == RESERVED_TAG:  # 11.11.4: F=0 needs a tag for us to continue
                raise ProtocolError("Text Response with F=0 and no Target Transfer Tag to "
                                    "continue with (RFC 7143 11.11.4)")
            data, ttt = b"", resp.ttt
        raise ProtocolError(f"Text Response still continued after {MAX_TEXT_ROUNDS} PDUs")

    def logout(self, *, timeout: float | None = None, deadline: float | None = None) -> None:
        """Close the session (reason 0) and wait for the target's answer."""
        deadline = deadline_from(timeout, deadline)
        itt = self._next_itt()
        self.conn.send(LogoutRequest(itt=itt, cid=0, cmd_sn=self.cmd_sn,
                                     exp_stat_sn=self.exp_stat_sn), deadline=deadline)
        resp = self._receive(itt, deadline, "a Logout Response")
        if not isinstance(resp, LogoutResponse):
            raise ProtocolError(f"expected a Logout Response, got {type(resp).__name__}")
        if resp.response != 0:
            reason = LOGOUT_REASONS.get(resp.response, f"response {resp.response}")
            raise LoginRejected(f"logout refused by the target: {reason}")

