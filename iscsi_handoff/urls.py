"""`iscsi://[user@]host[:port]/IQN[/LUN]`, libiscsi's URL form, wherever a portal and a
target are asked for. One carrying a password is refused: argv is public (`ps`)."""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import parse_qsl, unquote, urlsplit

from userland.errors import ConfigError
from userland.names import validate_name
from userland.portal import Portal

SCHEME = "iscsi://"
NO_PASSWORD = ("argv is visible to every user (ps), so a password never goes on the "
               "command line: give --chap-user with --chap-secret-file FILE (mode 600) "
               "or --chap-secret-env VAR")


@dataclass(frozen=True)
class IscsiUrl:
    portal: Portal
    target: str | None
    lun: int | None
    user: str | None


def is_url(text: str) -> bool:
    return text.lower().startswith(SCHEME)


def parse_url(text: str) -> IscsiUrl:
    shown = text.split("@", 1)[-1] if "@" in text else text  # never echo user:password
    parts = urlsplit(text)
    userinfo, at, hostport = parts.netloc.rpartition("@")
    if at and ("%" in userinfo or ":" in userinfo):
        raise ConfigError(f"iscsi:// URL with a password refused: {NO_PASSWORD}")
    query = parse_qsl(parts.query, keep_blank_values=True)
    if any("password" in key.lower() or "secret" in key.lower() for key, _ in query):
        raise ConfigError(f"iscsi:// URL with a password refused: {NO_PASSWORD}")
    if query:
        raise ConfigError(f"iscsi://{shown[8:]}: query keys are not understood here "
                          f"({', '.join(k for k, _ in query)})")
    if not hostport:
        raise ConfigError(f"{shown!r}: no host (iscsi://HOST[:PORT]/IQN[/LUN])")
    portal = Portal.parse(hostport, what="iscsi:// URL")
    if hostport.endswith(":"):
        raise ConfigError(f"{shown!r}: empty port after ':'")
    pieces = [unquote(p) for p in parts.path.split("/") if p]
    if len(pieces) > 2:
        raise ConfigError(f"{shown!r}: expected iscsi://HOST[:PORT]/IQN[/LUN]")
    target = validate_name(pieces[0]) if pieces else None
    lun: int | None = None
    if len(pieces) == 2:
        if not pieces[1].isdigit():
            raise ConfigError(f"{shown!r}: LUN {pieces[1]!r} is not a number")
        lun = int(pieces[1])
    return IscsiUrl(portal, target, lun, unquote(userinfo) if userinfo else None)
