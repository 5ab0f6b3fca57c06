"""What `session list` prints: the kernel's sessions (sysfs, ours and others') and our
FUSE sessions (the registry), in a table, in iscsiadm-like detail (-P 1..3), or as JSON.

-P 1: per session its path, state, keeper, portals (named and connected), ISID, TSIH,
      mount point or host, and for a leftover the command that cleans it;
-P 2: also the initiator name, auth method and user (never a secret), timeouts and
      the recovery count;
-P 3: also every negotiated parameter and each LUN with its device.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from iscsi_handoff import registry
from iscsi_handoff.output import table
from kernel_handoff.sysfs import SessionInfo


@dataclass
class Listing:
    kernel_loaded: bool
    kernel: list[SessionInfo]
    records: dict[int, registry.Entry]  # kernel sid -> our record, checked
    fuse: list[registry.Entry]


def gather(kernel_loaded: bool, kernel: list[SessionInfo], *,
           sysfs_root: str = "/sys") -> Listing:
    entries = registry.entries(sysfs_root=sysfs_root)
    records = {e.record.sid: e for e in entries
               if e.record.path == "kernel" and e.record.sid is not None}
    fuse = [e for e in entries if e.record.path == "fuse"]
    return Listing(kernel_loaded, kernel, records, fuse)


# --- JSON -----------------------------------------------------------------------------

def kernel_json(s: SessionInfo, entry: registry.Entry | None) -> dict[str, Any]:
    data = asdict(s)
    data["portal"] = s.portal
    data.update({"path": "kernel", "id": str(s.sid), "ours": entry is not None,
                 "registry": entry.to_json() if entry is not None else None})
    return data


def fuse_json(entry: registry.Entry) -> dict[str, Any]:
    r = entry.record
    luns = r.details.get("luns", {})
    disks = [{"lun": int(n), "dev": lun.get("loop") or lun.get("storage"),
              "storage": lun.get("storage"), "loop": lun.get("loop"),
              "size_bytes": lun.get("size_bytes"), "read_only": lun.get("read_only")}
             for n, lun in sorted(luns.items(), key=lambda kv: int(kv[0]))]
    return {**entry.to_json(), "ours": True, "target_name": r.target, "disks": disks}


def listing_json(listing: Listing) -> dict[str, Any]:
    sessions = [kernel_json(s, listing.records.get(s.sid)) for s in listing.kernel]
    sessions += [fuse_json(e) for e in listing.fuse]
    return {"kernel_iscsi": listing.kernel_loaded, "sessions": sessions}


# --- tables (-P 0) ---------------------------------------------------------------------

def _show(value: object) -> str:
    return "-" if value is None or value == "" else str(value)


def human_size(size: int | None) -> str:
    if size is None:
        return "-"
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{int(value)} {unit}" if value == int(value) else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def kernel_rows(sessions: list[SessionInfo]) -> list[tuple[str, ...]]:
    rows: list[tuple[str, ...]] = []
    for s in sessions:
        head = (str(s.sid), _show(None if s.host_no is None else f"host{s.host_no}"),
                _show(s.target_name), _show(s.portal), _show(s.state))
        if not s.disks:
            rows.append((*head, "-", "-", "-"))
        for i, d in enumerate(s.disks):
            lead = head if i == 0 else ("",) * len(head)
            rows.append((*lead, str(d.lun), d.dev, human_size(d.size_bytes)))
    return rows


def fuse_rows(entries: list[registry.Entry]) -> list[tuple[str, ...]]:
    rows: list[tuple[str, ...]] = []
    for e in entries:
        r = e.record
        state = e.state if r.ready or e.state != registry.LIVE else "logging in"
        head = (r.session_id, r.target, _show(r.portal_connected or r.portal), state,
                str(r.pid))
        disks = fuse_json(e)["disks"]
        if not disks:
            rows.append((*head, "-", "-", "-"))
        for i, d in enumerate(disks):
            lead = head if i == 0 else ("",) * len(head)
            rows.append((*lead, str(d["lun"]), _show(d["dev"]), human_size(d["size_bytes"])))
    return rows


def print_table(listing: Listing, echo: Any) -> None:
    if listing.kernel:
        echo(table(kernel_rows(listing.kernel),
                   ("SID", "HOST", "TARGET", "PORTAL", "STATE", "LUN", "DEVICE", "SIZE")))
        others = [str(s.sid) for s in listing.kernel if s.sid not in listing.records]
        if others:
            echo(f"not made by iscsi-handoff (open-iscsi's?): session "
                 f"{', '.join(others)}; `iscsiadm -m session` manages those")
        for sid, e in sorted(listing.records.items()):
            if e.state == registry.LEFTOVER:
                echo(f"session {sid}: {e.why}; clean it with: {e.cleanup}")
    if listing.fuse:
        if listing.kernel:
            echo("")
        echo("FUSE sessions (the data goes through iscsi-handoff itself):")
        echo(table(fuse_rows(listing.fuse),
                   ("ID", "TARGET", "PORTAL", "STATE", "PID", "LUN", "DEVICE", "SIZE")))
        for e in listing.fuse:
            if e.state == registry.LEFTOVER:
                echo(f"{e.record.session_id}: {e.why}; clean it with: {e.cleanup}")
    if listing.kernel or listing.fuse:
        return
    if not listing.kernel_loaded:
        echo("no iSCSI sessions: this kernel has no iSCSI support loaded "
             "(no class/iscsi_session in sysfs)")
    else:
        echo("no iSCSI sessions")


# --- detail (-P 1..3) ------------------------------------------------------------------

def print_detail(listing: Listing, level: int, echo: Any) -> None:
    if not listing.kernel and not listing.fuse:
        print_table(listing, echo)
        return
    for s in listing.kernel:
        entry = listing.records.get(s.sid)
        echo(f"Target: {_show(s.target_name)} (kernel path)")
        echo(f"  Session: {s.sid}  host{_show(s.host_no)}  state {_show(s.state)}")
        echo(f"  Portal: {_show(s.portal)}  TPGT {_show(s.tpgt)}")
        if entry is None:
            echo("  Keeper: none of ours (open-iscsi's?)")
        else:
            _record_lines(entry, level, echo)
        if level >= 2 and entry is None:
            echo(f"  Initiator: {_show(s.initiator_name)}")
            echo(f"  Auth user: {_show(s.username)}  recovery timeout {_show(s.recovery_tmo)} s")
        if level >= 3 and (entry is None or not entry.record.details.get("luns")):
            for d in s.disks:
                echo(f"  LUN {d.lun}: {d.dev} ({human_size(d.size_bytes)})"
                     f"{'  ' + d.by_path if d.by_path else ''}")
    for e in listing.fuse:
        echo(f"Target: {e.record.target} (FUSE path)")
        echo(f"  Session: {e.record.session_id}  state {e.state}")
        echo(f"  Portal: named {e.record.portal}, connected {_show(e.record.portal_connected)}")
        _record_lines(e, level, echo)


def _record_lines(e: registry.Entry, level: int, echo: Any) -> None:
    r = e.record
    echo(f"  Keeper: pid {r.pid} ({e.why})")
    echo(f"  ISID: {_show(r.isid)}  TSIH: {r.tsih}")
    if r.mountpoint:
        echo(f"  Mount point: {r.mountpoint}")
    if e.cleanup:
        echo(f"  Clean it with: {e.cleanup}")
    if level < 2:
        return
    d = r.details
    auth = d.get("auth", {})
    timeouts = d.get("timeouts", {})
    echo(f"  Initiator: {_show(r.initiator_name)}")
    echo(f"  Auth: {_show(auth.get('method'))}  user {_show(auth.get('user'))}"
         f"  mutual user {_show(auth.get('mutual_user'))}")
    echo("  Timeouts: " + ", ".join(f"{k} {v:g} s" for k, v in sorted(timeouts.items()))
         if timeouts else "  Timeouts: -")
    echo(f"  Queue depth: {_show(d.get('queue_depth'))}  recoveries {d.get('recoveries', 0)}")
    if level < 3:
        return
    params = d.get("parameters", {})
    if params:
        echo("  Negotiated:")
        for key, value in params.items():
            echo(f"    {key}: {_show(value)}")
    for number, lun in sorted(d.get("luns", {}).items(), key=lambda kv: int(kv[0])):
        device = lun.get("loop") or lun.get("dev") or "-"
        echo(f"  LUN {number}: {device} <- {_show(lun.get('storage'))} "
             f"({human_size(lun.get('size_bytes'))})")
    for dev in r.devices if not d.get("luns") else ():
        echo(f"  Device: {dev}")
