"""Portal addresses: `host`, `host:port`, `[v6]:port`, each with an optional `,tpgt`."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from userland.errors import ConfigError

DEFAULT_PORT = 3260


def _digits(text: str) -> bool:
    """ASCII decimal digits only: str.isdigit() also takes '²' and Arabic-Indic digits."""
    return text.isascii() and text.isdigit() and len(text) <= 5


@dataclass(frozen=True)
class Portal:
    host: str
    port: int = DEFAULT_PORT
    tpgt: int | None = None

    @classmethod
    def parse(cls, text: str, *, what: str = "portal") -> Portal:
        """Parse a portal as users and SendTargets write it (RFC 7143 13.8)."""
        raw = text.strip()
        tpgt: int | None = None
        if "," in raw:
            raw, _, tag = raw.rpartition(",")
            if not _digits(tag) or int(tag) > 65535:
                raise ConfigError(f"{what} {text!r}: portal group tag must be 0..65535")
            tpgt = int(tag)
        port_text = ""
        has_port = False
        if raw.startswith("["):
            host, sep, tail = raw[1:].partition("]")
            if not sep or (tail and not tail.startswith(":")):
                raise ConfigError(f"{what} {text!r}: malformed [IPv6] address")
            port_text, has_port = tail[1:], bool(tail)
            try:
                ipaddress.IPv6Address(host)
            except ValueError:
                raise ConfigError(f"{what} {text!r}: {host!r} is not an IPv6 address") from None
        elif raw.count(":") > 1:  # a bare IPv6 address has no room for a port
            host = raw
            try:
                ipaddress.IPv6Address(host)
            except ValueError:
                raise ConfigError(f"{what} {text!r}: write IPv6 as [addr]:port") from None
        else:
            host, sep, port_text = raw.partition(":")
            has_port = bool(sep)
        if not host:
            raise ConfigError(f"{what} {text!r}: no host")
        if not host.isprintable() or any(c.isspace() for c in host):
            raise ConfigError(f"{what} {text!r}: the host contains spaces or control "
                              "characters")
        port = DEFAULT_PORT
        if has_port:
            if not port_text:
                raise ConfigError(f"{what} {text!r}: empty port after ':' (give host or "
                                  "host:port)")
            if not _digits(port_text) or not 0 < int(port_text) < 65536:
                raise ConfigError(f"{what} {text!r}: port must be 1..65535")
            port = int(port_text)
        return cls(host, port, tpgt)

    @property
    def is_ipv6(self) -> bool:
        return ":" in self.host

    def address(self) -> str:
        """host:port as it goes back on the wire and in sysfs ([v6]:port)."""
        host = f"[{self.host}]" if self.is_ipv6 else self.host
        return f"{host}:{self.port}"

    def __str__(self) -> str:
        tag = f",{self.tpgt}" if self.tpgt is not None else ""
        return self.address() + tag
