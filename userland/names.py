"""iSCSI names (RFC 7143 section 4.2.7; RFC 3722 stringprep): iqn., eui., naa."""

from __future__ import annotations

import re

from userland.errors import ConfigError

# iqn.YYYY-MM.reversed.domain[:anything]; RFC 3722 allows lower-case letters, digits,
# '-', '.', ':' and non-ASCII after normalisation; we accept what targets really use.
_IQN = re.compile(r"^iqn\.\d{4}-(0[1-9]|1[0-2])\.[a-z0-9](?:[a-z0-9\-.]*[a-z0-9])?"
                  r"(?::[^\s\x00-\x1f]*)?$")
_EUI = re.compile(r"^eui\.[0-9A-F]{16}$")
_NAA = re.compile(r"^naa\.(?:[0-9A-F]{16}|[0-9A-F]{32})$")
MAX_NAME = 223  # RFC 7143 4.2.7.1: at most 223 bytes


def validate_name(name: str) -> str:
    """Return the name if valid, else raise ConfigError saying what is wrong."""
    if not name:
        raise ConfigError("an iSCSI name must not be empty")
    if len(name.encode()) > MAX_NAME:
        raise ConfigError(f"iSCSI name {name[:40]!r}... is longer than {MAX_NAME} bytes")
    lowered = name[:4].lower()
    if lowered == "iqn.":
        if _IQN.match(name):
            return name
        raise ConfigError(f"{name!r} is not a valid iqn. name (iqn.YYYY-MM.domain[:id], "
                          "lower case)")
    if lowered == "eui.":
        if _EUI.match(name):
            return name
        raise ConfigError(f"{name!r} is not a valid eui. name (eui. + 16 hex digits)")
    if lowered == "naa.":
        if _NAA.match(name):
            return name
        raise ConfigError(f"{name!r} is not a valid naa. name (naa. + 16 or 32 hex digits)")
    raise ConfigError(f"{name!r} is not an iSCSI name (it must start with iqn., eui. "
                      "or naa.)")


def short_name(target_name: str) -> str:
    """The part after the last colon, as the NetBSD initiator names a target's folder."""
    return target_name.rpartition(":")[2] or target_name
