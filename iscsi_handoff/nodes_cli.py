"""`node list | update | delete | install-boot`, and what `discover --save` records.

Registered on the main group by `register(cli)` at the end of iscsi_handoff/cli.py.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click

from iscsi_handoff.config import config_dir, nodes_dir
from iscsi_handoff.nodes import Node, apply_sets, delete_node, find_nodes, load_nodes, save_node
from iscsi_handoff.options import parse_portal
from iscsi_handoff.output import table
from userland.discovery.sendtargets import DiscoveredTarget
from userland.errors import ConfigError
from userland.names import validate_name

UNIT_NAME = "iscsi-handoff-boot.service"


def save_discovered(targets: Sequence[DiscoveredTarget], settings: dict[str, str]) -> list[Node]:
    """One node per target and portal; an existing record keeps its own settings."""
    existing = {(n.target, n.portal.host, n.portal.port): n for n in load_nodes()}
    saved = []
    for target in targets:
        for portal in target.portals:
            node = existing.get((target.name, portal.host, portal.port))
            if node is None:
                node = Node(target.name, portal, dict(settings))
            else:
                node.portal = portal  # the tag as the target says it today
                for key, value in settings.items():
                    node.settings.setdefault(key, value)
            save_node(node)
            saved.append(node)
    return saved


def node_json(node: Node) -> dict[str, Any]:
    return {"target": node.target, "portal": str(node.portal), "startup": node.startup,
            "file": str(node.path), "settings": node.settings,
            "effective": node.effective()}


@click.group()
def node() -> None:
    """Node records: what to log in to and how, kept under /etc/iscsi-handoff/nodes.

    \b
    Examples:
      iscsi-handoff discover 192.0.2.10 --save
      iscsi-handoff node list
      iscsi-handoff node update -T IQN --set startup=automatic
      iscsi-handoff node install-boot      # logs in automatic nodes at every boot
    """


def _targets(target: str | None, portal_text: str | None) -> list[Node]:
    if target is None:
        raise ConfigError("which node? give --target IQN (and --portal P when it has several)")
    portal = parse_portal(portal_text) if portal_text else None
    return find_nodes(validate_name(target), portal)


@node.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
def node_list(as_json: bool) -> None:
    """List node records: target, portal, startup, path, file.

    \b
    Examples:
      iscsi-handoff node list
      iscsi-handoff node list --json | jq -r '.nodes[].target'
    """
    nodes = load_nodes()
    if as_json:
        click.echo(json.dumps({"config_dir": str(config_dir()),
                               "nodes": [node_json(n) for n in nodes]}, indent=2))
        return
    if not nodes:
        click.echo(f"no node records in {nodes_dir()} (iscsi-handoff discover PORTAL --save)")
        return
    rows = [(n.target, str(n.portal), n.startup, n.effective().get("path", "auto"))
            for n in nodes]
    click.echo(table(rows, ("TARGET", "PORTAL", "STARTUP", "PATH")))


@node.command("update")
@click.option("--target", "target", metavar="IQN", help="The node's target.")
@click.option("--portal", "portal_text", metavar="PORTAL",
              help="The node's portal, when the target has several.")
@click.option("--set", "assignments", multiple=True, metavar="KEY=VALUE", required=True,
              help="A setting (README: 'Nodes and login at boot'); KEY= removes it.")
@click.option("--json", "as_json", is_flag=True, help="Print the updated records as JSON.")
def node_update(target: str | None, portal_text: str | None, assignments: tuple[str, ...],
                as_json: bool) -> None:
    """Change settings of a node (every portal of the target unless --portal).

    \b
    Keys: startup (automatic|manual), path (auto|kernel|fuse), mountpoint,
    loop, allow_other, chap_user, chap_secret_file, chap_secret_env, mutual_user,
    mutual_secret_file, mutual_secret_env, chap_algs, header_digest, data_digest,
    timeout, replacement_timeout, queue_depth, initiator_name.
    A secret itself is refused: name its file or environment variable.

    \b
    Examples:
      iscsi-handoff node update -T IQN --set startup=automatic
      iscsi-handoff node update -T IQN --set chap_user=alice \\
          --set chap_secret_file=/etc/iscsi-handoff/alice.secret
      iscsi-handoff node update -T IQN -p 192.0.2.10 --set path=fuse \\
          --set mountpoint=/srv/iscsi
    """
    nodes = _targets(target, portal_text)
    for one in nodes:  # all checked before any is written
        apply_sets(one, assignments)
    for one in nodes:
        save_node(one)
    if as_json:
        click.echo(json.dumps({"nodes": [node_json(n) for n in nodes]}, indent=2))
    else:
        for one in nodes:
            click.echo(f"updated {one.path}")


@node.command("delete")
@click.option("--target", "target", metavar="IQN", help="The node's target.")
@click.option("--portal", "portal_text", metavar="PORTAL",
              help="Only the record at this portal.")
@click.option("--json", "as_json", is_flag=True, help="Print what was deleted as JSON.")
def node_delete(target: str | None, portal_text: str | None, as_json: bool) -> None:
    """Delete a node record (sessions already logged in stay; `logout` ends them).

    \b
    Examples:
      iscsi-handoff node delete -T IQN
      iscsi-handoff node delete -T IQN -p 192.0.2.10:3260
    """
    nodes = _targets(target, portal_text)
    for one in nodes:
        delete_node(one)
    if as_json:
        click.echo(json.dumps({"deleted": [str(n.path) for n in nodes]}))
    else:
        for one in nodes:
            click.echo(f"deleted {one.path}")


def boot_unit(command: Sequence[str]) -> str:
    """The unit: after the network, before remote filesystems; up once the disks exist."""
    exec_start = " ".join(command)
    logout = " ".join([*command[:-2], "logout", "--all"])  # command ends "login --all"
    env = ""
    if "ISCSI_HANDOFF_CONFIG_DIR" in os.environ:
        env = f"Environment=ISCSI_HANDOFF_CONFIG_DIR={os.environ['ISCSI_HANDOFF_CONFIG_DIR']}\n"
    return f"""\
# Installed by `iscsi-handoff node install-boot`: logs in every node with
# startup=automatic (iscsi-handoff node list), and is ready only once their disks exist.
[Unit]
Description=iSCSI logins of iscsi-handoff's automatic nodes
DefaultDependencies=no
Wants=network-online.target remote-fs-pre.target
After=network-online.target
Before=remote-fs-pre.target remote-fs.target shutdown.target
Conflicts=shutdown.target

[Service]
Type=notify
NotifyAccess=main
{env}ExecStartPre=-/sbin/modprobe -a scsi_transport_iscsi iscsi_tcp
ExecStart={exec_start}
# A stop or restart leaves kernel sessions for the next keeper (FUSE ones cannot outlive
# their keeper); at shutdown, filesystems are unmounted first (remote-fs), then we log out.
ExecStop=/bin/sh -c 'if [ "$$(systemctl is-system-running)" = stopping ]; then exec {logout}; fi'
TimeoutStartSec=infinity
KillMode=mixed
TimeoutStopSec=90
OOMScoreAdjust=-1000

[Install]
WantedBy=remote-fs.target
"""


def _command() -> list[str]:
    found = shutil.which("iscsi-handoff")
    return [found, "login", "--all"] if found else [sys.executable, "-m", "iscsi_handoff",
                                                    "login", "--all"]


@node.command("install-boot")
@click.option("--unit-dir", type=click.Path(file_okay=False, path_type=Path),
              default=Path("/etc/systemd/system"), show_default=True,
              help="Where the unit file goes.")
@click.option("--print", "just_print", is_flag=True, help="Print the unit, write nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
def install_boot(unit_dir: Path, just_print: bool, as_json: bool) -> None:
    """Install the systemd unit that logs in automatic nodes at boot.

    \b
    Writes UNIT_DIR/iscsi-handoff-boot.service (Type=notify: started once every
    automatic node's disks exist; After=network-online.target,
    Before=remote-fs-pre.target). Then:
      systemctl daemon-reload && systemctl enable --now iscsi-handoff-boot

    \b
    Examples:
      iscsi-handoff node install-boot
      iscsi-handoff node install-boot --print
    """
    text = boot_unit(_command())
    if just_print:
        click.echo(text, nl=False)
        return
    path = unit_dir / UNIT_NAME
    try:
        unit_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{UNIT_NAME}.tmp")
        tmp.write_text(text)
        tmp.replace(path)
    except OSError as exc:
        raise ConfigError(f"cannot write {path}: {exc.strerror}") from None
    if as_json:
        click.echo(json.dumps({"unit": str(path)}))
    else:
        click.echo(f"wrote {path}\nnow: systemctl daemon-reload && "
                   "systemctl enable --now iscsi-handoff-boot")


def register(group: click.Group) -> None:
    for command in (node, node_list, node_update, node_delete, install_boot):
        command.epilog = group.epilog
    group.add_command(node)

