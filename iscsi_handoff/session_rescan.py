"""`session rescan`: make LUNs added or resized on a target show up, without a relogin.

Kernel sessions (ours or open-iscsi's: a rescan is harmless to either): offline
devices back to running, `- - -` to the SCSI host's scan (new LUNs), `1` to each
device's rescan (sd reads the capacity again), then a bounded wait for the new disks'
block devices (kernel_handoff.scan.rescan_session). A keeper does the same by itself
after every recovery and when the target reports REPORTED LUNS DATA HAS CHANGED.
FUSE sessions are not reached from here yet (their keeper would have to probe REPORT
LUNS and READ CAPACITY again).
"""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import Any

import click

from iscsi_handoff.output import table
from kernel_handoff.scan import RescanReport, rescan_session
from kernel_handoff.sysfs import (
    SessionInfo,
    SysfsError,
    kernel_iscsi_loaded,
    list_sessions,
)
from userland.errors import ConfigError


def select(sessions: list[SessionInfo], *, target: str | None,
           sid: int | None) -> list[SessionInfo]:
    if target is not None and sid is not None:
        raise ConfigError("give --target IQN or --session N, not both")
    if sid is not None:
        chosen = [s for s in sessions if s.sid == sid]
        if not chosen:
            raise ConfigError(f"no iSCSI session {sid} (see `iscsi-handoff session list`)")
        return chosen
    if target is not None:
        chosen = [s for s in sessions if s.target_name == target]
        if not chosen:
            raise ConfigError(f"no iSCSI session to {target}")
        return chosen
    return sessions


def report_json(info: SessionInfo, report: RescanReport) -> dict[str, Any]:
    return {
        "sid": info.sid, "target": info.target_name, "host_no": info.host_no,
        "added": [asdict(d) for d in report.added],
        "resized": [{"disk": asdict(d), "was_bytes": was} for d, was in report.resized],
        "revived": report.revived,
        "disks": [asdict(d) for d in report.disks],
        "errors": report.errors,
    }


@click.command("rescan")
@click.option("--target", "target_name", metavar="IQN",
              help="Rescan every session to this target.")
@click.option("--session", "sid", type=click.IntRange(0), metavar="N",
              help="Rescan session N (the SID column of `session list`).")
@click.option("--timeout", type=click.FloatRange(1, 600), default=20.0, show_default=True,
              help="Seconds to wait for new disks' block devices, per session.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@click.option("--sysfs-root", default="/sys", hidden=True,
              help="Read sysfs from here instead of /sys (for tests).")
def rescan(target_name: str | None, sid: int | None, timeout: float, as_json: bool,
           sysfs_root: str) -> None:
    """Find LUNs added or resized on the target (kernel sessions; needs root).

    \b
    Every session, or those named: offline disks are set back to running, the
    SCSI host is scanned for new LUNs and each disk's capacity is read again.
    Prints what changed, then every disk.

    \b
    Examples:
      iscsi-handoff session rescan
      iscsi-handoff session rescan --target iqn.2024-01.com.example:disk1
      iscsi-handoff session rescan --session 3 --json
    """
    if not kernel_iscsi_loaded(sysfs_root):
        raise ConfigError("no iSCSI sessions: this kernel has no iSCSI support loaded")
    chosen = select(list_sessions(sysfs_root), target=target_name, sid=sid)
    results: list[tuple[SessionInfo, RescanReport]] = []
    for info in chosen:
        if info.host_no is None:
            raise SysfsError(f"session {info.sid} has no SCSI host in sysfs")
        results.append((info, rescan_session(sysfs_root, info.sid, info.host_no,
                                             timeout=timeout)))
    if as_json:
        click.echo(json.dumps({"sessions": [report_json(i, r) for i, r in results]},
                              indent=2))
    else:
        if not results:
            click.echo("no iSCSI sessions")
        for info, report in results:
            click.echo(f"session {info.sid} ({info.target_name or '?'}): "
                       f"{report.summary()}")
        rows = [(str(i.sid), str(d.lun), d.dev, str(d.size_bytes), d.state or "-")
                for i, r in results for d in r.disks]
        if rows:
            click.echo(table(rows, ("SID", "LUN", "DEVICE", "BYTES", "STATE")))
    failed = [(i, r) for i, r in results if r.errors]
    if failed:
        info, report = failed[0]
        raise SysfsError(f"rescan of session {info.sid} incomplete: {report.errors[0]}")
