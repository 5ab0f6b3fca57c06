"""Node records: what the user asked to log in to, and how (one file per target and portal).

Sessions are what is logged in now; nodes are what should be. `discover --save` writes
them, `node update` changes them, `login --node` / `login --all` (and the boot unit) read
them. The file format is iscsi_handoff/config.py's.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from iscsi_handoff.config import (
    check_setting,
    nodes_dir,
    read_defaults,
    read_settings,
    write_settings,
)
from userland.errors import ConfigError, TargetNotFoundError
from userland.portal import Portal

SUFFIX = ".conf"


@dataclass
class Node:
    target: str
    portal: Portal
    settings: dict[str, str] = field(default_factory=dict)  # without target and portal
    path: Path | None = None

    @property
    def startup(self) -> str:
        return self.settings.get("startup", "manual")

    def file_name(self) -> str:
        # IQNs and hosts hold no ',' (RFC 3722 names; hostnames): the name parses back.
        return f"{self.target},{self.portal.host},{self.portal.port}{SUFFIX}"

    def record(self) -> dict[str, str]:
        return {"target": self.target, "portal": str(self.portal), **self.settings}

    def effective(self, defaults: dict[str, str] | None = None) -> dict[str, str]:
        """The defaults file, then this node's own keys on top."""
        base = read_defaults() if defaults is None else defaults
        return {**base, **self.settings}


def load_node(path: Path) -> Node:
    settings = read_settings(path)
    if "target" not in settings or "portal" not in settings:
        raise ConfigError(f"{path}: a node file needs target = IQN and portal = HOST:PORT")
    target = settings.pop("target")
    portal = Portal.parse(settings.pop("portal"))
    return Node(target, portal, settings, path)


def load_nodes(directory: Path | None = None) -> list[Node]:
    """Every node, in name order. One bad file stops the whole read: a boot that skipped
    it silently would leave a disk missing with no word why."""
    folder = nodes_dir() if directory is None else directory
    try:
        paths = sorted(p for p in folder.iterdir()
                       if p.name.endswith(SUFFIX) and not p.name.startswith("."))
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise ConfigError(f"cannot read {folder}: {exc.strerror}") from None
    return [load_node(p) for p in paths]


def _same_portal(a: Portal, b: Portal) -> bool:
    return a.host == b.host and a.port == b.port and (
        a.tpgt is None or b.tpgt is None or a.tpgt == b.tpgt)


def find_nodes(target: str, portal: Portal | None = None,
               nodes: Iterable[Node] | None = None) -> list[Node]:
    """The nodes for a target (at one portal when given); an error when there are none."""
    every = load_nodes() if nodes is None else list(nodes)
    found = [n for n in every if n.target == target
             and (portal is None or _same_portal(n.portal, portal))]
    if not found:
        where = f" at {portal}" if portal is not None else ""
        raise TargetNotFoundError(f"no node record for {target}{where} in {nodes_dir()} "
                                  "(`iscsi-handoff discover PORTAL --save` makes them; "
                                  "`iscsi-handoff node list` shows them)")
    return found


def find_one(target: str, portal: Portal | None = None) -> Node:
    found = find_nodes(target, portal)
    if len(found) > 1:
        portals = ", ".join(str(n.portal) for n in found)
        raise ConfigError(f"{target} has node records at several portals ({portals}): "
                          "say which with --portal")
    return found[0]


def save_node(node: Node) -> Path:
    path = nodes_dir() / node.file_name()
    write_settings(path, node.record(), f"iscsi-handoff node: {node.target} at {node.portal}")
    node.path = path
    return path


def delete_node(node: Node) -> None:
    assert node.path is not None
    try:
        node.path.unlink()
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise ConfigError(f"cannot delete {node.path}: {exc.strerror}") from None


def apply_sets(node: Node, assignments: Iterable[str]) -> None:
    """`--set KEY=VALUE` (an empty value removes the key, back to the default)."""
    for text in assignments:
        key, sep, value = text.partition("=")
        if not sep:
            raise ConfigError(f"--set {text!r}: write KEY=VALUE")
        key = key.strip()
        if not value.strip():
            node.settings.pop(key, None)
            continue
        key, value = check_setting(key, value, where="--set")
        if key in ("target", "portal"):
            raise ConfigError(f"--set {text}: {key} names the node; delete it and "
                              "discover again instead")
        node.settings[key] = value
        # A secret comes from one place: setting the file forgets the variable, and back.
        for side in ("chap", "mutual"):
            for mine, other in (("file", "env"), ("env", "file")):
                if key == f"{side}_secret_{mine}":
                    node.settings.pop(f"{side}_secret_{other}", None)
