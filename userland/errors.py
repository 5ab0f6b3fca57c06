"""The one exception tree of the project.

Every error a user can cause or meet is an ``IscsiError``; the CLI prints its text as
one line and exits with its ``exit_code``. Texts never contain secrets.
"""

from __future__ import annotations

# Exit codes, documented in the README. 1 is left for bugs (an unexpected exception).
EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_USAGE = 2
EXIT_NETWORK = 3
EXIT_AUTH = 4
EXIT_TARGET_NOT_FOUND = 5
EXIT_LOGIN_REFUSED = 6
EXIT_PROTOCOL = 7
EXIT_IO = 8
EXIT_UNAVAILABLE = 9
EXIT_SESSION_EXISTS = 15  # iscsiadm's ISCSI_ERR_SESS_EXISTS


class IscsiError(Exception):
    """Base of every error we raise on purpose."""

    exit_code = EXIT_INTERNAL


class ConfigError(IscsiError):
    """Bad input from the user: a malformed portal, a name, an unsafe secret file."""

    exit_code = EXIT_USAGE


class NetworkError(IscsiError):
    """The TCP side failed: refused, unreachable, reset, or silent past a deadline."""

    exit_code = EXIT_NETWORK


class LoginTimeout(NetworkError):
    """The portal accepted TCP but did not finish the exchange in time."""


class AuthenticationError(IscsiError):
    """CHAP failed in either direction, or the target refused this initiator."""

    exit_code = EXIT_AUTH


class TargetNotFoundError(IscsiError):
    """The target name is unknown to the portal (or was removed)."""

    exit_code = EXIT_TARGET_NOT_FOUND


class LoginRejected(IscsiError):
    """The target refused the login for another reason (resources, version, ...)."""

    exit_code = EXIT_LOGIN_REFUSED


class ProtocolError(IscsiError):
    """The peer broke RFC 7143: a malformed PDU, an answer outside what we offered."""

    exit_code = EXIT_PROTOCOL


class NegotiationError(ProtocolError):
    """A text key came back with a value we did not offer or cannot accept."""


class DigestError(ProtocolError):
    """A CRC32C header or data digest did not match."""


class ScsiError(IscsiError):
    """A SCSI command ended with CHECK CONDITION or another non-GOOD status."""

    exit_code = EXIT_IO

    def __init__(self, message: str, errno_value: int = 5) -> None:
        super().__init__(message)
        self.errno_value = errno_value


class SessionFailed(IscsiError):
    """The session could not be recovered within the replacement timeout."""

    exit_code = EXIT_IO


class PathUnavailable(IscsiError):
    """The requested data path (kernel iscsi_tcp, FUSE) is missing on this machine."""

    exit_code = EXIT_UNAVAILABLE


class SessionExists(IscsiError):
    """A live session from this initiator name to this target and portal exists already."""

    exit_code = EXIT_SESSION_EXISTS
