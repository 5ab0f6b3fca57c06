"""Login Response status (RFC 7143 section 11.13.5) turned into one clear sentence."""

from __future__ import annotations

from userland.errors import (
    AuthenticationError,
    IscsiError,
    LoginRejected,
    ProtocolError,
    TargetNotFoundError,
)

# (class, detail) -> (exception type, what a person should read)
_STATUS: dict[tuple[int, int], tuple[type[IscsiError], str]] = {
    (0x02, 0x00): (LoginRejected, "initiator error (the target did not say which)"),
    (0x02, 0x01): (AuthenticationError, "authentication failed"),
    (0x02, 0x02): (AuthenticationError, "initiator not authorized to access this target"),
    (0x02, 0x03): (TargetNotFoundError, "target not found"),
    (0x02, 0x04): (TargetNotFoundError, "target removed"),
    (0x02, 0x05): (LoginRejected, "unsupported iSCSI version"),
    (0x02, 0x06): (LoginRejected, "too many connections on this session"),
    (0x02, 0x07): (LoginRejected, "a required login parameter was missing"),
    (0x02, 0x08): (LoginRejected, "this connection cannot be included in the session"),
    (0x02, 0x09): (LoginRejected, "session type not supported by the target"),
    (0x02, 0x0A): (LoginRejected, "the session to reinstate does not exist"),
    (0x02, 0x0B): (ProtocolError, "the target called our login request invalid"),
    (0x03, 0x00): (LoginRejected, "target error (the target did not say which)"),
    (0x03, 0x01): (LoginRejected, "target service unavailable; try again later"),
    (0x03, 0x02): (LoginRejected, "target out of resources"),
}

REDIRECT_CLASS = 0x01
REDIRECT_TEMPORARY = 0x01
REDIRECT_PERMANENT = 0x02


def status_error(status_class: int, status_detail: int, *, target: str,
                 had_credentials: bool) -> IscsiError:
    """The exception for a failed login, with a sentence a user can act on."""
    code = f"status 0x{status_class:02x}{status_detail:02x}"
    where = f"login to {target}" if target else "discovery login"
    if (status_class, status_detail) == (0x02, 0x01) and not had_credentials:
        return AuthenticationError(
            f"{where}: the target requires CHAP authentication and no credentials were "
            f"given (use --chap-user with --chap-secret-file) ({code})")
    known = _STATUS.get((status_class, status_detail))
    if known is not None:
        kind, text = known
        return kind(f"{where}: {text} ({code})")
    if status_class == 0x02:
        return LoginRejected(f"{where}: refused by the target, initiator error ({code})")
    if status_class == 0x03:
        return LoginRejected(f"{where}: refused by the target, target error ({code})")
    return ProtocolError(f"{where}: unknown login status class ({code})")
