"""This initiator's iSCSI name: open-iscsi's when it has one, else our own, kept."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from userland.errors import ConfigError
from userland.names import validate_name

OPEN_ISCSI_NAME_FILE = Path("/etc/iscsi/initiatorname.iscsi")
NAME_PREFIX = "iqn.2024-01.org.iscsi-handoff"


def state_dir() -> Path:
    """Our state directory: $ISCSI_HANDOFF_STATE_DIR, else /var/lib (root) or ~/.local."""
    override = os.environ.get("ISCSI_HANDOFF_STATE_DIR")
    if override:
        return Path(override)
    if os.geteuid() == 0:
        return Path("/var/lib/iscsi-handoff")
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "iscsi-handoff"


def read_open_iscsi_name(path: Path = OPEN_ISCSI_NAME_FILE) -> str | None:
    try:
        text = path.read_text()
    except OSError:
        return None
    for line in text.splitlines():
        key, sep, value = line.strip().partition("=")
        if sep and key.strip() == "InitiatorName" and value.strip():
            return value.strip()
    return None


def initiator_name(override: str | None = None, *,
                   open_iscsi_file: Path = OPEN_ISCSI_NAME_FILE) -> str:
    """--initiator-name, else open-iscsi's name, else ours (generated once, then kept)."""
    if override:
        return validate_name(override)
    name = read_open_iscsi_name(open_iscsi_file)
    if name:
        return validate_name(name)
    path = state_dir() / "initiatorname"
    try:
        stored = path.read_text().strip()
    except FileNotFoundError:
        stored = ""
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
    if stored:
        return validate_name(stored)
    name = f"{NAME_PREFIX}:{secrets.token_hex(6)}"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(name + "\n")
        tmp.replace(path)
    except OSError as exc:
        raise ConfigError(f"cannot keep the initiator name in {path}: {exc.strerror} "
                          "(set ISCSI_HANDOFF_STATE_DIR or pass --initiator-name)") from None
    return name
