"""`session rescan`: make LUNs added or resized on a target show up, without a relogin.

Kernel sessions (ours or open-iscsi's: a rescan is harmless to either): offline
devices back to running, `- - -` to the SCSI host's scan (new LUNs), `1` to each
device's rescan (sd reads the capacity again), then a bounded wait for the new disks'
block devices (kernel_handoff.scan.rescan_session). A keeper does the same by itself
after every recovery and when the target reports REPORTED LUNS DATA HAS CHANGED.
FUSE sessions (found in the registry, ids F<ISID>): their keeper is sent SIGUSR2 and
rescans by itself (iscsi_handoff.fuse_rescan); this waits, bounded, for the record's
rescan count to move and prints what the keeper recorded.
"""

from __future__ import annotations

import json
import os
import signal
import time
from dataclasses import asdict
from typing import Any

import click

from iscsi_handoff import registry
from iscsi_handoff.output import table
from kernel_handoff.scan import RescanReport, rescan_session
from kernel_handoff.sysfs import (
    SessionInfo,
    SysfsError,
    kernel_iscsi_loaded,
    list_sessions,
)
from userland.errors import ConfigError, PathUnavailable, SessionFailed

POLL = 0.1  # seconds between looks at a FUSE keeper's record


def select(sessions: list[SessionInfo], *, target: str | None,
           sid: int | None) -> list[SessionInfo]:
    if sid is not None:
        return [s for s in sessions if s.sid == sid]
    if target is not None:
        return [s for s in sessions if s.target_name == target]
    return sessions


def select_fuse(records: list[registry.Record], *, target: str | None,
                session_id: str | None) -> list[registry.Record]:
    if session_id is not None:
        return [r for r in records if r.session_id.lower() == session_id.lower()]
    if target is not None:
        return [r for r in records if r.target == target]
    return records


def fuse_records() -> list[registry.Record]:
    """Live FUSE sessions from the registry (a dead keeper's record cannot rescan)."""
    return [e.record for e in registry.entries(remove_stale=False)
            if e.record.path == "fuse" and e.state == registry.LIVE]


def rescan_fuse(records: list[registry.Record], timeout: float) -> list[registry.Record]:
    """SIGUSR2 to each keeper (once: it rescans all its sessions), then wait until every
    record's ``rescans`` count has moved; the records as they are then."""
    for record in records:
        if not record.ready:
            raise PathUnavailable(f"session {record.session_id} is still logging in: "
                                  "try again when it serves")
    before = {r.name: int(r.details.get("rescans", 0)) for r in records}
    for pid in {r.pid for r in records}:
        try:
            os.kill(pid, signal.SIGUSR2)
        except ProcessLookupError:
            raise PathUnavailable(f"the keeper, pid {pid}, is gone") from None
    deadline = time.monotonic() + timeout
    done: dict[str, registry.Record] = {}
    while len(done) < len(records):
        for record in records:
            now = registry.read(record.name)
            if now is None:
                raise PathUnavailable(f"session {record.session_id} ended during the rescan")
            if int(now.details.get("rescans", 0)) > before[record.name]:
                done[record.name] = now
        if len(done) < len(records):
            if time.monotonic() > deadline:
                raise PathUnavailable(f"no rescan result from pid {records[0].pid} within "
                                      f"{timeout:g} s (is the session recovering?)")
            time.sleep(POLL)
    return [done[r.name] for r in records]


def fuse_summary(last: dict[str, Any]) -> str:
    parts = [f"LUN {a['lun']} added as {a['storage']} ({a['size_bytes']} bytes"
             + (f", {a['loop']}" if a.get("loop") else "") + ")"
             for a in last.get("added", [])]
    parts += [f"LUN {c['lun']} resized to {c['size_bytes']} bytes (was {c['was_bytes']})"
              for c in last.get("resized", [])]
    parts += [f"LUN {n} no longer reported (left in the tree; its I/O fails)"
              for n in last.get("removed", [])]
    parts += list(last.get("errors", []))
    return "; ".join(parts) or "nothing changed"


def fuse_json(record: registry.Record) -> dict[str, Any]:
    last = record.details.get("last_rescan", {})
    return {"path": "fuse", "id": record.session_id, "target": record.target,
            "pid": record.pid, "added": last.get("added", []),
            "resized": last.get("resized", []), "removed": last.get("removed", []),
            "errors": last.get("errors", []),
            "luns": record.details.get("luns", {})}


def report_json(info: SessionInfo, report: RescanReport) -> dict[str, Any]:
    return {
        "path": "kernel", "id": str(info.sid), "sid": info.sid,
        "target": info.target_name, "host_no": info.host_no,
        "added": [asdict(d) for d in report.added],
        "resized": [{"disk": asdict(d), "was_bytes": was} for d, was in report.resized],
        "revived": report.revived,
        "disks": [asdict(d) for d in report.disks],
        "errors": report.errors,
    }


@click.command("rescan")
@click.option("--target", "target_name", metavar="IQN",
              help="Rescan every session to this target.")
@click.option("--session", "session_id", metavar="ID",
              help="Rescan this session (the ID column of `session list`: N for a kernel "
                   "session, F<ISID> for a FUSE one).")
@click.option("--timeout", type=click.FloatRange(1, 600), default=20.0, show_default=True,
              help="Seconds to wait for new disks' block devices (kernel, per session) "
                   "or for the FUSE keepers' rescans.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@click.option("--sysfs-root", default="/sys", hidden=True,
              help="Read sysfs from here instead of /sys (for tests).")
def rescan(target_name: str | None, session_id: str | None, timeout: float, as_json: bool,
           sysfs_root: str) -> None:
    """Find LUNs added or resized on the target (kernel sessions need root).

    \b
    Every session, or those named. Kernel: offline disks are set back to
    running, the SCSI host is scanned for new LUNs and each disk's capacity is
    read again. FUSE: the keeper sends REPORT LUNS and READ CAPACITY again; new
    LUNs appear as lunN/storage, a new size in the storage file (and its loop
    device). Prints what changed, then every disk.

    \b
    Examples:
      iscsi-handoff session rescan
      iscsi-handoff session rescan --target iqn.2024-01.com.example:disk1
      iscsi-handoff session rescan --session 3 --json
    """
    if target_name is not None and session_id is not None:
        raise ConfigError("give --target IQN or --session ID, not both")
    sid: int | None = None
    if session_id is not None and session_id.isdigit():
        sid = int(session_id)
    fuse = select_fuse(fuse_records(), target=target_name, session_id=session_id)
    kernel = kernel_iscsi_loaded(sysfs_root)
    chosen = (select(list_sessions(sysfs_root), target=target_name, sid=sid)
              if kernel and (session_id is None or sid is not None) else [])
    if not chosen and not fuse:
        if session_id is not None:
            raise ConfigError(f"no iSCSI session {session_id} (see `iscsi-handoff "
                              "session list`)")
        if target_name is not None:
            raise ConfigError(f"no iSCSI session to {target_name}")
        if not kernel:
            raise ConfigError("no iSCSI sessions: this kernel has no iSCSI support loaded "
                              "and no FUSE session is served")
    results: list[tuple[SessionInfo, RescanReport]] = []
    for info in chosen:
        if info.host_no is None:
            raise SysfsError(f"session {info.sid} has no SCSI host in sysfs")
        results.append((info, rescan_session(sysfs_root, info.sid, info.host_no,
                                             timeout=timeout)))
    fused = rescan_fuse(fuse, timeout) if fuse else []
    if as_json:
        click.echo(json.dumps({"sessions": [report_json(i, r) for i, r in results]
                               + [fuse_json(f) for f in fused]}, indent=2))
    else:
        if not results and not fused:
            click.echo("no iSCSI sessions")
        for record in fused:
            click.echo(f"session {record.session_id} ({record.target}): "
                       f"{fuse_summary(record.details.get('last_rescan', {}))}")
        for info, report in results:
            click.echo(f"session {info.sid} ({info.target_name or '?'}): "
                       f"{report.summary()}")
        rows = [(str(i.sid), str(d.lun), d.dev, str(d.size_bytes), d.state or "-")
                for i, r in results for d in r.disks]
        if rows:
            click.echo(table(rows, ("SID", "LUN", "DEVICE", "BYTES", "STATE")))
        rows = [(f.session_id, lun, shown.get("loop") or shown.get("storage", "-"),
                 str(shown.get("size_bytes", "-")), "fuse")
                for f in fused for lun, shown in sorted(f.details.get("luns", {}).items(),
                                                        key=lambda kv: int(kv[0]))]
        if rows:
            click.echo(table(rows, ("ID", "LUN", "DEVICE", "BYTES", "PATH")))
    for record in fused:
        errors = record.details.get("last_rescan", {}).get("errors", [])
        if errors:
            raise SessionFailed(f"rescan of session {record.session_id} incomplete: "
                                f"{errors[0]}")
    failed = [(i, r) for i, r in results if r.errors]
    if failed:
        info, report = failed[0]
        raise SysfsError(f"rescan of session {info.sid} incomplete: {report.errors[0]}")
