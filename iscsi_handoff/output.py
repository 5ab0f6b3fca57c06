"""What commands print: aligned tables for people, JSON for scripts."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import click

from userland.discovery.sendtargets import DiscoveredTarget
from userland.login.machine import LoginResult
from userland.portal import Portal
from userland.printable import escape

# Negotiated fields in RFC 7143 key order, with the key names people know.
PARAM_KEYS: tuple[tuple[str, str], ...] = (
    ("HeaderDigest", "header_digest"),
    ("DataDigest", "data_digest"),
    ("MaxConnections", "max_connections"),
    ("InitialR2T", "initial_r2t"),
    ("ImmediateData", "immediate_data"),
    ("MaxRecvDataSegmentLength", "max_recv_data_segment_length"),
    ("MaxXmitDataSegmentLength", "max_xmit_data_segment_length"),
    ("MaxBurstLength", "max_burst_length"),
    ("FirstBurstLength", "first_burst_length"),
    ("DefaultTime2Wait", "default_time2wait"),
    ("DefaultTime2Retain", "default_time2retain"),
    ("MaxOutstandingR2T", "max_outstanding_r2t"),
    ("DataPDUInOrder", "data_pdu_in_order"),
    ("DataSequenceInOrder", "data_sequence_in_order"),
    ("ErrorRecoveryLevel", "error_recovery_level"),
    ("TargetPortalGroupTag", "target_portal_group_tag"),
    ("TargetAlias", "target_alias"),
)


def table(rows: Sequence[Sequence[str]], header: Sequence[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
             for r in [header, *rows]]
    return "\n".join(lines)


def _show(value: Any) -> str:
    """A value for a table: a target's strings (alias) never carry control characters."""
    if isinstance(value, bool):
        return "Yes" if value else "No"
    return "-" if value is None else escape(str(value))


def targets_json(targets: Sequence[DiscoveredTarget]) -> list[dict[str, Any]]:
    return [{"name": t.name, "portals": [portal_json(p) for p in t.portals]} for t in targets]


def portal_json(p: Portal) -> dict[str, Any]:
    return {"address": p.address(), "host": p.host, "port": p.port, "tpgt": p.tpgt}


def print_targets(targets: Sequence[DiscoveredTarget], *, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps({"targets": targets_json(targets)}, indent=2))
        return
    if not targets:
        click.echo("no targets")
        return
    rows = [(escape(t.name), escape(", ".join(str(p) for p in t.portals), limit=1024))
            for t in targets]
    click.echo(table(rows, ("TARGET", "PORTALS (address,tpgt)")))


def login_json(result: LoginResult, *, target: str, portal: Portal) -> dict[str, Any]:
    neg = result.negotiated
    params = {key: {"value": getattr(neg, attr), "chosen_by": neg.chosen_by.get(key, "default")}
              for key, attr in PARAM_KEYS}
    return {"target": target, "portal": portal_json(portal), "isid": result.isid.hex(),
            "tsih": result.tsih, "auth_method": result.auth_method,
            "cmd_sn": result.cmd_sn, "exp_stat_sn": result.exp_stat_sn,
            "parameters": params}


def print_login(result: LoginResult, *, target: str, portal: Portal) -> None:
    neg = result.negotiated
    click.echo(f"logged in to {escape(target)} at {escape(str(portal))} (auth "
               f"{result.auth_method}, "
               f"ISID {result.isid.hex()}, TSIH {result.tsih})")
    rows = [(key, _show(getattr(neg, attr)), neg.chosen_by.get(key, "default"))
            for key, attr in PARAM_KEYS]
    click.echo(table(rows, ("PARAMETER", "VALUE", "CHOSEN BY")))


# --json is a mode of the whole process: errors then go to stderr as JSON too.
_json_mode = False


def set_json_mode(on: bool = True) -> None:
    global _json_mode
    _json_mode = on


def json_mode() -> bool:
    return _json_mode


READY_FIELD = "X_ISCSI_HANDOFF_READY"  # the ready object, for `login --all` listening


def emit_ready(obj: dict[str, Any], *, echo: bool = True) -> None:
    """A serving login is up (disks exist): one JSON line with --json, and READY=1 for
    systemd (Type=notify) or `login --all`. Human lines were printed before this;
    ``echo=False`` where the caller printed its JSON already."""
    from iscsi_handoff.sdnotify import notify

    event = {"event": "ready", **obj}
    if _json_mode and echo:
        click.echo(json.dumps(event))
    notify("READY=1", "STATUS=serving", f"{READY_FIELD}={json.dumps(event)}")


def error_json(message: str, exit_code: int, kind: str) -> str:
    return json.dumps({"error": {"message": message, "exit_code": exit_code, "kind": kind}})
