"""The settings files: node records and the defaults every node starts from.

Both are the same small format, one ``key = value`` a line, ``#`` comments, no sections:

    /etc/iscsi-handoff/iscsi-handoff.conf      defaults for every node
    /etc/iscsi-handoff/nodes/<IQN>,<host>,<port>.conf   one target at one portal

$ISCSI_HANDOFF_CONFIG_DIR moves /etc/iscsi-handoff (tests, a system with a read-only /etc).
A secret is never written in these files, only where to find it: a file path or an
environment variable name. A file holding one inline is refused as a whole.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from userland.errors import ConfigError
from userland.login.chap import parse_algorithms
from userland.names import validate_name
from userland.portal import Portal

DEFAULT_CONFIG_DIR = Path("/etc/iscsi-handoff")
DIGESTS = ("none", "crc32c", "prefer-none", "prefer-crc32c")
_TRUE = {"yes", "true", "on", "1"}
_FALSE = {"no", "false", "off", "0"}


def config_dir() -> Path:
    override = os.environ.get("ISCSI_HANDOFF_CONFIG_DIR")
    return Path(override) if override else DEFAULT_CONFIG_DIR


def defaults_path() -> Path:
    return config_dir() / "iscsi-handoff.conf"


def nodes_dir() -> Path:
    return config_dir() / "nodes"


def _choice(*choices: str) -> Callable[[str], str]:
    def parse(value: str) -> str:
        if value not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}")
        return value
    return parse


def _int_range(low: int, high: int) -> Callable[[str], str]:
    def parse(value: str) -> str:
        if not value.isdigit() or not low <= int(value) <= high:
            raise ValueError(f"must be a whole number {low}..{high}")
        return str(int(value))
    return parse


def _seconds(low: float, high: float) -> Callable[[str], str]:
    def parse(value: str) -> str:
        try:
            number = float(value)
        except ValueError:
            raise ValueError(f"must be seconds, {low:g}..{high:g}") from None
        if not low <= number <= high:
            raise ValueError(f"must be seconds, {low:g}..{high:g}")
        return f"{number:g}"
    return parse


def _flag(value: str) -> str:
    if value.lower() in _TRUE:
        return "yes"
    if value.lower() in _FALSE:
        return "no"
    raise ValueError("must be yes or no")


def _user(value: str) -> str:
    if not value or any(c.isspace() for c in value):
        raise ValueError("must be a non-empty name without spaces")
    return value


def _absolute_path(value: str) -> str:
    # Boot logins run from /: a relative path would mean something else there.
    if not value.startswith("/"):
        raise ValueError("must be an absolute path (boot logins run from /)")
    return value


def _env_name(value: str) -> str:
    if not value or not (value[0].isalpha() or value[0] == "_") or \
            not all(c.isalnum() or c == "_" for c in value):
        raise ValueError("must be an environment variable name (letters, digits, _)")
    return value


def _algs(value: str) -> str:
    parse_algorithms(value)
    return value


def _name(value: str) -> str:
    validate_name(value)
    return value


def _portal(value: str) -> str:
    return str(Portal.parse(value))


@dataclass(frozen=True)
class Key:
    parse: Callable[[str], str]
    help: str
    node_only: bool = False  # identity keys: never in the defaults file, never --set


KEYS: dict[str, Key] = {
    "target": Key(_name, "the target's iSCSI name (written by discover --save)", True),
    "portal": Key(_portal, "host:port,tpgt the target answered at (written by discover "
                  "--save)", True),
    "startup": Key(_choice("automatic", "manual"),
                   "automatic: `login --all` (and so the boot unit) logs in; manual: only "
                   "`login --node`. Default manual"),
    "path": Key(_choice("auto", "kernel", "fuse"),
                "auto: the kernel path where it works, else FUSE; kernel or fuse insist. "
                "Default auto"),
    "mountpoint": Key(_absolute_path, "where the FUSE tree goes when the FUSE path is taken"),
    "loop": Key(_flag, "FUSE path: also attach /dev/loopN (yes/no)"),
    "allow_other": Key(_flag, "FUSE path: let other users see the tree (yes/no)"),
    "chap_user": Key(_user, "our CHAP name (iscsiadm: node.session.auth.username)"),
    "chap_secret_file": Key(_absolute_path, "file holding our CHAP secret, mode 600"),
    "chap_secret_env": Key(_env_name, "environment variable holding our CHAP secret"),
    "mutual_user": Key(_user, "the target's CHAP name for mutual CHAP "
                       "(node.session.auth.username_in)"),
    "mutual_secret_file": Key(_absolute_path, "file holding the target's CHAP secret"),
    "mutual_secret_env": Key(_env_name, "environment variable holding the target's secret"),
    "chap_algs": Key(_algs, "CHAP algorithms to offer, in order (md5, sha1, sha256, "
                     "sha3-256)"),
    "header_digest": Key(_choice(*DIGESTS), "none, crc32c, prefer-none or prefer-crc32c"),
    "data_digest": Key(_choice(*DIGESTS), "none, crc32c, prefer-none or prefer-crc32c"),
    "timeout": Key(_seconds(0.1, 3600), "seconds for connect and login"),
    "replacement_timeout": Key(_seconds(1, 86400),
                               "seconds a lost connection is retried before I/O fails"),
    "queue_depth": Key(_int_range(1, 1024), "commands in flight per session"),
    "initiator_name": Key(_name, "our iSCSI name for this node"),
}

# iscsiadm's names, for people who type them from habit.
ALIASES = {
    "node.startup": "startup",
    "node.session.auth.username": "chap_user",
    "node.session.auth.username_in": "mutual_user",
    "node.session.auth.chap_algs": "chap_algs",
    "node.conn[0].iscsi.HeaderDigest": "header_digest",
    "node.conn[0].iscsi.DataDigest": "data_digest",
    "node.session.timeo.replacement_timeout": "replacement_timeout",
    "node.session.queue_depth": "queue_depth",
    "node.conn[0].timeo.login_timeout": "timeout",
}

INLINE_SECRET_HINT = ("a secret is never kept in a node file (anyone who can read /etc "
                      "could read it): use chap_secret_file=/path (mode 600) or "
                      "chap_secret_env=VAR, and mutual_secret_file / mutual_secret_env")


def _is_inline_secret(key: str) -> bool:
    low = key.lower()
    if low in KEYS:
        return False
    return any(word in low for word in ("password", "secret", "passwd"))


def check_setting(key: str, value: str, *, where: str, node: bool = True) -> tuple[str, str]:
    """One validated (key, value), or a ConfigError that names where it came from."""
    key = ALIASES.get(key, key)
    if _is_inline_secret(key):
        raise ConfigError(f"{where}: {key} refused: {INLINE_SECRET_HINT}")
    spec = KEYS.get(key)
    if spec is None:
        raise ConfigError(f"{where}: unknown key {key!r} (known: {', '.join(KEYS)})")
    if spec.node_only and not node:
        raise ConfigError(f"{where}: {key} belongs in a node file, not the defaults file")
    # A parser says why with ValueError, or with the ConfigError of the check it reuses.
    try:
        value = value.strip()
        return key, spec.parse(value)
    except (ValueError, ConfigError) as exc:
        raise ConfigError(f"{where}: {key}={value}: {key} {exc}") from None


def parse_settings(text: str, *, where: str, node: bool = True) -> dict[str, str]:
    settings: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        if not sep:
            raise ConfigError(f"{where}:{number}: expected key = value, got {line[:40]!r}")
        key, value = check_setting(key.strip(), value, where=f"{where}:{number}", node=node)
        settings[key] = value
    _check_pairs(settings, where=where)
    return settings


def _check_pairs(settings: Mapping[str, str], *, where: str) -> None:
    for side in ("chap", "mutual"):
        if f"{side}_secret_file" in settings and f"{side}_secret_env" in settings:
            raise ConfigError(f"{where}: give {side}_secret_file or {side}_secret_env, "
                              "not both")


def read_settings(path: Path, *, node: bool = True) -> dict[str, str]:
    try:
        mode = path.stat().st_mode
        # Root logs in from these at boot: one anybody may edit could point it anywhere.
        if mode & (stat.S_IWGRP | stat.S_IWOTH):
            raise ConfigError(f"{path} is writable by group or others (mode "
                              f"{stat.S_IMODE(mode):04o}); run: chmod 644 {path}")
        text = path.read_text()
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or "not text"
        raise ConfigError(f"cannot read {path}: {reason}") from None
    return parse_settings(text, where=str(path), node=node)


def read_defaults() -> dict[str, str]:
    return read_settings(defaults_path(), node=False)


def render_settings(settings: Mapping[str, str], header: str) -> str:
    order = [k for k in KEYS if k in settings]
    lines = [f"# {header}", "# Format and keys: iscsi-handoff README, 'Nodes and login at boot'."]
    lines += [f"{key} = {settings[key]}" for key in order]
    return "\n".join(lines) + "\n"


def write_settings(path: Path, settings: Mapping[str, str], header: str) -> None:
    """Atomically: a reader (a boot login) sees the old file or the new, never half."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(render_settings(settings, header))
        os.chmod(tmp, 0o644)  # no secrets inside, by construction
        tmp.replace(path)
    except OSError as exc:
        raise ConfigError(f"cannot write {path}: {exc.strerror} "
                          "(root owns /etc/iscsi-handoff; $ISCSI_HANDOFF_CONFIG_DIR "
                          "moves it)") from None
