"""Drive the login machine over a blocking connection, following redirects."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from userland.connection import Connection
from userland.errors import (
    AuthenticationError,
    ConfigError,
    LoginTimeout,
    NetworkError,
    ProtocolError,
)
from userland.login.machine import (
    LoginConfig,
    LoginMachine,
    LoginResult,
    Redirected,
    config_for_redirect,
)
from userland.pdu import LoginResponse
from userland.portal import Portal
from userland.printable import escape

log = logging.getLogger("iscsi_handoff.login")
MAX_REDIRECTS = 5
DEFAULT_LOGIN_TIMEOUT = 15.0


@dataclass
class LoggedIn:
    """A connection in full feature phase and what its login agreed."""

    connection: Connection
    result: LoginResult
    portal: Portal  # where we ended up, after any redirects
    redirects: list[str]


def login(portal: Portal, config: LoginConfig, *, timeout: float = DEFAULT_LOGIN_TIMEOUT,
          deadline: float | None = None) -> LoggedIn:
    """Connect and log in; the whole exchange, redirects included, within ``timeout``.

    ``deadline`` (a ``time.monotonic()`` value), when given, replaces ``timeout``: a
    command shares one deadline between login and what follows it.
    """
    if deadline is None:
        deadline = time.monotonic() + timeout
    hops: list[str] = []
    while True:
        conn = Connection.open(portal, deadline=deadline)
        try:
            outcome = login_on(conn, config, deadline=deadline)
        except BaseException:
            conn.close()
            raise
        if isinstance(outcome, LoginResult):
            neg = outcome.negotiated
            conn.set_digests(header=neg.header_digest == "CRC32C",
                             data=neg.data_digest == "CRC32C")
            conn.reader.max_data_segment_length = neg.max_recv_data_segment_length
            return LoggedIn(conn, outcome, portal, hops)
        conn.close()
        hops.append(outcome.target_address)
        if len(hops) > MAX_REDIRECTS:
            raise ProtocolError(f"login redirected more than {MAX_REDIRECTS} times "
                                f"({escape(' -> '.join(hops))})")
        try:
            new_portal = Portal.parse(outcome.target_address, what="redirect TargetAddress")
        except ConfigError as exc:  # the target's address, not the user's: exit 7
            raise ProtocolError(str(exc)) from None
        kind = "permanently" if outcome.permanent else "temporarily"
        log.info("target moved %s to %s", kind, new_portal)
        portal = new_portal
        config = config_for_redirect(config, outcome.target_address, new_portal.tpgt)


def login_on(conn: Connection, config: LoginConfig, *,
             deadline: float) -> LoginResult | Redirected:
    """One login exchange on an open connection (also used for recovery relogins)."""
    machine = LoginMachine(config)
    for warning in machine.warnings:
        log.warning("%s", warning)
    request = machine.initial_request()
    seen = 0
    answered = 0  # Login Responses so far
    while True:
        _log_transcript(machine, seen)
        seen = len(machine.transcript)
        conn.send(request, deadline=deadline)
        try:
            pdu = conn.receive(deadline=deadline, waiting_for="a Login Response")
        except LoginTimeout:
            raise
        except NetworkError as exc:
            if answered == 0 and config.credentials is None:
                # LIO closes without a Login Response when CHAP is required and we
                # offered only AuthMethod=None: say what most likely went wrong.
                raise AuthenticationError(
                    f"{exc}; offered no authentication, the target may require CHAP "
                    "(give --chap-user and a secret)") from None
            raise
        answered += 1
        if not isinstance(pdu, LoginResponse):
            raise ProtocolError(f"expected a Login Response, got {type(pdu).__name__}")
        try:
            outcome = machine.receive(pdu)
        finally:
            _log_transcript(machine, seen)
            seen = len(machine.transcript)
        if isinstance(outcome, LoginResult):
            for warning in outcome.warnings[len(machine.warnings):]:
                log.warning("%s", warning)
            return outcome
        if isinstance(outcome, Redirected):
            return outcome
        request = outcome


def _log_transcript(machine: LoginMachine, start: int) -> None:
    for direction, pairs in machine.transcript[start:]:
        for key, value in pairs:
            log.info("login %s %s=%s", "->" if direction == "sent" else "<-", key,
                     escape(value))

