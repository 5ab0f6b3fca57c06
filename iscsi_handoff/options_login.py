"""How `login` names what it logs in to: `-p/-T`, `PORTAL IQN`, an iscsi:// URL, a node
record (`--node IQN`, or `-T IQN` alone when one is saved), or `--all` automatic nodes.

A node's settings (over the defaults file) stand in for every option the command line
left at its default: what is typed wins, then the node, then the defaults file.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click
from click.core import ParameterSource

from iscsi_handoff import hints
from iscsi_handoff.nodes import Node, find_one
from iscsi_handoff.options import _stack, pop_where, where_options
from userland.errors import ConfigError, TargetNotFoundError

F = TypeVar("F", bound=Callable[..., Any])

# node key -> (login's parameter, how the text becomes its value)
_PARAMS: dict[str, tuple[str, Callable[[str], Any]]] = {
    "chap_user": ("chap_user", str),
    "chap_secret_file": ("chap_secret_file", Path),
    "chap_secret_env": ("chap_secret_env", str),
    "mutual_user": ("mutual_user", str),
    "mutual_secret_file": ("mutual_secret_file", Path),
    "mutual_secret_env": ("mutual_secret_env", str),
    "chap_algs": ("chap_algs", str),
    "initiator_name": ("initiator_name", str),
    "timeout": ("timeout", float),
    "header_digest": ("header_digest", str),
    "data_digest": ("data_digest", str),
    "replacement_timeout": ("replacement_timeout", float),
    "queue_depth": ("queue_depth", int),
    "loop": ("loop", lambda v: v == "yes"),
    "allow_other": ("allow_other", lambda v: v == "yes"),
}
_SECRET_PAIRS = {"chap_secret_file": "chap_secret_env", "chap_secret_env": "chap_secret_file",
                 "mutual_secret_file": "mutual_secret_env",
                 "mutual_secret_env": "mutual_secret_file"}


def _typed(ctx: click.Context, name: str) -> bool:
    source = ctx.get_parameter_source(name)
    return source in (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT,
                      ParameterSource.PROMPT)


def apply_node(ctx: click.Context, kw: dict[str, Any], node: Node,
               probe: Callable[[], Any] | None = None) -> None:
    """Fill `login`'s keyword arguments from the node where the user typed nothing."""
    settings = node.effective()
    for key, value in settings.items():
        if key not in _PARAMS:
            continue
        param, convert = _PARAMS[key]
        other = _SECRET_PAIRS.get(key)
        if _typed(ctx, param) or (other is not None and _typed(ctx, other)):
            continue
        if param in kw:
            kw[param] = convert(value)
    path = settings.get("path", "auto")
    if _typed(ctx, "fuse") or _typed(ctx, "force_kernel") or kw.get("check"):
        return
    mountpoint = Path(settings["mountpoint"]) if "mountpoint" in settings else None
    if path == "kernel":
        kw["force_kernel"] = True
    elif path == "fuse":
        kw["fuse"] = _prepared(mountpoint, node)
        if "loop" not in settings and not _typed(ctx, "loop"):
            kw["loop"] = _loop_by_default(probe)
    elif mountpoint is not None:
        # path=auto: the mount point matters only where the kernel path is missing.
        from iscsi_handoff.pathchoice import probe_paths

        report = (probe or probe_paths)()
        if not report.kernel_ok:
            kw["fuse"] = _prepared(mountpoint, node)
            if "loop" not in settings and not _typed(ctx, "loop"):
                kw["loop"] = bool(report.loop_ok and os.geteuid() == 0)


def _loop_by_default(probe: Callable[[], Any] | None) -> bool:
    """As an unforced login does: a block device when root and loop devices allow."""
    from iscsi_handoff.pathchoice import probe_paths

    return bool(os.geteuid() == 0 and (probe or probe_paths)().loop_ok)


def _prepared(mountpoint: Path | None, node: Node) -> Path:
    """The node's mount point, else a folder of its own beside the default one (two
    nodes never share one)."""
    from iscsi_handoff.login_path import default_mountpoint, prepare_mountpoint

    if mountpoint is None:
        mountpoint = default_mountpoint().parent / "nodes" / node.file_name()[:-len(".conf")]
    prepare_mountpoint(mountpoint)
    return mountpoint


LOGIN_HELP = """
    \b
    The target: PORTAL IQN, -p PORTAL -T IQN, iscsi://HOST[:PORT]/IQN, or a node
    record: --node IQN (or -T IQN alone), whose settings stand in for options not
    typed. --all logs in every node with startup=automatic (the boot unit).

    \b
    More examples:
      iscsi-handoff login 127.0.0.1:3260 IQN
      iscsi-handoff login iscsi://127.0.0.1:3260/IQN --check --json
      iscsi-handoff login --node IQN
      iscsi-handoff login --all
    """


def login_target(func: F) -> F:
    """Decorate `login`: adds the ways to name a target, and `--node` / `--all`."""

    @functools.wraps(func)
    def wrapper(**kw: Any) -> Any:
        ctx = click.get_current_context()
        node_name = kw.pop("node_name")
        every = kw.pop("every")
        if every:
            if kw["where_args"] or kw["portal_text"] or kw["target_text"] or node_name:
                raise ConfigError("--all logs in every automatic node: it takes no "
                                  "portal, target or --node")
            from iscsi_handoff.login_all import login_all

            typed = [name for name in kw if name not in ("daemon", "as_json", "where_args",
                                                         "portal_text", "target_text")
                     and _typed(ctx, name)]
            if typed:
                raise ConfigError("--all takes only --daemon and --json (per-node settings "
                                  "go in the node records: `iscsi-handoff node update`); "
                                  f"got --{typed[0].replace('_', '-')}")
            login_all(daemon=kw["daemon"], as_json=kw["as_json"],
                      verbose=int((ctx.find_root().obj or {}).get("verbose", 0)))
            return None
        where = pop_where(kw)
        if node_name is not None:
            if where.target is not None and where.target != node_name:
                raise ConfigError(f"--node {node_name} and target {where.target} differ")
            where.target = node_name
        if where.target is None:
            raise ConfigError("which target? give PORTAL IQN, -p PORTAL -T IQN, "
                              "iscsi://HOST/IQN, --node IQN or --all")
        node: Node | None = None
        if node_name is not None or where.portal is None:
            node = find_one(where.target, where.portal)
        else:
            from iscsi_handoff.nodes import find_nodes

            try:
                node = find_nodes(where.target, where.portal)[0]
            except TargetNotFoundError:  # no record: a plain login with what was typed
                node = None
            except ConfigError as exc:  # a broken record need not stop a typed login
                click.echo(f"iscsi-handoff: node records not used: {exc}", err=True)
                node = None
        if node is not None:
            apply_node(ctx, kw, node)
            portal = where.portal if where.portal is not None else node.portal
            hints.note(portal=portal.address())
        else:
            assert where.portal is not None
            portal = where.portal
        if where.url_user is not None and not _typed(ctx, "chap_user"):
            kw["chap_user"] = where.url_user
        return func(portal=portal, target_name=where.target, **kw)

    wrapper.__doc__ = (func.__doc__ or "") + LOGIN_HELP
    return _stack(
        where_options,
        click.option("--node", "node_name", metavar="IQN",
                     help="Log in as the node record for IQN says (`node list`)."),
        click.option("--all", "every", is_flag=True,
                     help="Log in every node with startup=automatic, and report each "
                          "(what the boot unit runs)."),
    )(wrapper)  # type: ignore[return-value]
