"""`doctor`, `session list` and `logout`: what this machine offers, the iSCSI sessions
(the kernel's and our FUSE ones), and ending the ones we made.

Registered on the main group by `register(cli)` at the end of iscsi_handoff/cli.py.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import Any

import click

from iscsi_handoff.output import table
from iscsi_handoff.pathchoice import PathReport, probe_iscsid, probe_paths
from kernel_handoff.sysfs import kernel_iscsi_loaded, list_sessions
from userland.errors import ConfigError, IscsiError

SYSFS_ROOT_HELP = "Read sysfs from here instead of /sys (for tests)."


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@click.option("--no-modprobe", is_flag=True,
              help="Do not try `modprobe -a scsi_transport_iscsi iscsi_tcp` when missing.")
@click.option("--sysfs-root", default="/sys", hidden=True, help=SYSFS_ROOT_HELP)
def doctor(as_json: bool, no_modprobe: bool, sysfs_root: str) -> None:
    """Check which data paths this machine offers, and which one login takes.

    \b
    kernel  iscsi_tcp and NETLINK_ISCSI, root: login hands the socket to the kernel
    fuse    /dev/fuse, pyfuse3, fusermount3 or root: the userland session carries data
    loop    losetup and /dev/loop-control: what --loop needs
    bcc     bcc, kernel headers, kprobes: the optional observer
    Then whether open-iscsi's iscsid runs or is enabled, and each kernel
    session record of ours: kept (by which pid), without a keeper (the next
    login of its target adopts it), or stale (another boot, or sysfs
    disagrees: never used). Then what dead FUSE keepers left (a dead mount,
    loop devices), with the command that cleans each.
    Exits 0 whatever it finds: it is a diagnosis.

    \b
    Examples:
      iscsi-handoff doctor
      iscsi-handoff doctor --json | jq -r .chosen
    """
    from iscsi_handoff import registry
    from iscsi_handoff.kernel_adopt import record_states

    report = probe_paths(sysfs_root=sysfs_root, try_modprobe=not no_modprobe)
    iscsid = probe_iscsid()
    records = record_states(sysfs_root=sysfs_root)
    # Kernel records are shown by record_states (adoptable); FUSE leftovers need cleaning.
    leftovers = [e for e in registry.entries(sysfs_root=sysfs_root)
                 if e.state == registry.LEFTOVER and e.record.path == "fuse"]
    if as_json:
        data = report.to_json()
        data["iscsid"] = iscsid.to_json()
        data["sessions"] = [asdict(r) for r in records]
        data["leftovers"] = [
            {"id": e.record.session_id, "path": e.record.path, "target": e.record.target,
             "why": e.why, "cleanup": e.cleanup} for e in leftovers]
        click.echo(json.dumps(data, indent=2))
        return
    print_report(report)
    click.echo(iscsid.line())
    for record in records:
        click.echo(record.line())
    for e in leftovers:
        click.echo(f"leftover: session {e.record.session_id} ({e.record.target}): {e.why}; "
                   f"clean it with: {e.cleanup}")


def print_report(report: PathReport) -> None:
    rows = [(name, "OK" if ok else "MISSING", reason) for name, ok, reason in report.items()]
    click.echo(f"kernel {report.kernel_release}")
    click.echo(table(rows, ("PATH", "STATUS", "WHY")))
    click.echo(f"login takes: {report.chosen_reason}")


@click.group()
def session() -> None:
    """iSCSI sessions: the kernel's (ours and open-iscsi's alike) and our FUSE ones.

    \b
    Examples:
      iscsi-handoff session list
      iscsi-handoff session list -P 3
      iscsi-handoff session list --json
    """


@session.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@click.option("-P", "--print", "level", type=click.IntRange(0, 3), default=0,
              show_default=True,
              help="Detail, as iscsiadm's -P: 1 keeper, portals, ISID/TSIH, mount point; "
                   "2 initiator, auth method and user, timeouts, recoveries; 3 negotiated "
                   "parameters and LUN to device.")
@click.option("--sysfs-root", default="/sys", hidden=True, help=SYSFS_ROOT_HELP)
def session_list(as_json: bool, level: int, sysfs_root: str) -> None:
    """List iSCSI sessions: the kernel's (from sysfs) and iscsi-handoff's FUSE ones.

    \b
    One row per disk: session id, SCSI host, target, portal, session state,
    LUN, block device and size; FUSE sessions (ID F<ISID>) in a table of their
    own, with their keeper's pid and each LUN's loop device or storage file.
    A session whose keeper died is shown as a leftover with the command that
    cleans it. Passwords are never read.

    \b
    Examples:
      iscsi-handoff session list
      iscsi-handoff session list -P 3
      iscsi-handoff session list --json | jq -r '.sessions[].disks[].dev'
    """
    from iscsi_handoff import session_view

    loaded = kernel_iscsi_loaded(sysfs_root)
    sessions = list_sessions(sysfs_root) if loaded else []
    listing = session_view.gather(loaded, sessions, sysfs_root=sysfs_root)
    if as_json:
        click.echo(json.dumps(session_view.listing_json(listing), indent=2))
    elif level == 0:
        session_view.print_table(listing, click.echo)
    else:
        session_view.print_detail(listing, level, click.echo)


@click.command()
@click.option("--target", "target_name", metavar="IQN",
              help="Log out every session to this target.")
@click.option("--session", "sid", metavar="ID",
              help="Log out this session (the SID or ID column of `session list`).")
@click.option("--all", "every", is_flag=True,
              help="Log out every session iscsi-handoff made (never open-iscsi's) and clean "
                   "what dead keepers left.")
@click.option("--force", is_flag=True,
              help="Tear a kernel session down even without our record of it.")
@click.option("--timeout", type=click.FloatRange(1, 3600), default=60.0, show_default=True,
              help="Seconds to wait for each session's owner to log out.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@click.option("--sysfs-root", default="/sys", hidden=True, help=SYSFS_ROOT_HELP)
def logout(target_name: str | None, sid: str | None, every: bool, force: bool,
           timeout: float, as_json: bool, sysfs_root: str) -> None:
    """Log out sessions made by `iscsi-handoff login` or `mount`, on either path.

    \b
    The process that keeps a session is sent SIGTERM and logs out itself
    (its disks go first); we wait for it (--timeout) and check. If that
    process is gone, a kernel session is logged out over NETLINK_ISCSI from
    here, and a FUSE session's leftovers (its dead mount, the loop devices
    backed by it) are removed: only ours, never anything else. A loop device
    with a filesystem mounted on it is left alone: unmount it first (exit 2).
    Kernel sessions made by open-iscsi are left alone (--force overrides,
    for leftovers we lost track of).

    \b
    Examples:
      iscsi-handoff logout --session 3
      iscsi-handoff logout --session F80123456789a
      iscsi-handoff logout --target iqn.2024-01.com.example:disk1
      iscsi-handoff logout --all
    """
    from iscsi_handoff import fuse_logout, registry
    from iscsi_handoff.kernel_logout import logout as do_logout

    if sum((target_name is not None, sid is not None, every)) != 1:
        raise ConfigError("give exactly one of --target IQN, --session ID or --all")
    kernel_sid: int | None = None
    if sid is not None and sid.isdigit():
        kernel_sid = int(sid)
    elif sid is not None and sid[:1].upper() != "F":
        raise ConfigError(f"--session {sid}: give a kernel SID (a number) or a FUSE session "
                          "ID (F<ISID>), as `iscsi-handoff session list` shows them")
    loaded = kernel_iscsi_loaded(sysfs_root)
    fuse = fuse_logout.select(registry.entries(sysfs_root=sysfs_root), target=target_name,
                              session=sid if kernel_sid is None else None, every=every)
    kernel_wanted = every or kernel_sid is not None or (
        target_name is not None and loaded
        and any(s.target_name == target_name for s in list_sessions(sysfs_root)))
    if not fuse and not kernel_wanted and not every:
        what = f"to {target_name}" if target_name is not None else sid
        raise ConfigError(f"no iSCSI session {what} (see `iscsi-handoff session list`)")
    if kernel_wanted and not loaded and not every:
        raise ConfigError("no iSCSI sessions: this kernel has no iSCSI support loaded")
    results: list[Any] = []
    if kernel_wanted and loaded:
        results += do_logout(target=target_name, sid=kernel_sid, every=every, force=force,
                             timeout=timeout, sysfs_root=sysfs_root)
    chosen = {e.record.session_id for e in fuse}
    failures: list[str] = []
    for entry in fuse:
        try:
            results.append(fuse_logout.logout_one(entry, timeout=timeout, chosen=chosen))
        except IscsiError as exc:
            if not every:
                raise
            failures.append(str(exc))
    if as_json:
        click.echo(json.dumps({"sessions": [asdict(r) for r in results],
                               "errors": failures}, indent=2))
    else:
        if not results and not failures:
            click.echo("no sessions to log out")
        for r in results:
            name = r.session if isinstance(r, fuse_logout.FuseLogoutResult) else r.sid
            click.echo(f"session {name} ({r.target or '?'}): {r.detail}")
    if failures:
        raise fuse_logout.LoopBusy("; ".join(failures)) if all(
            "in use" in f for f in failures) else IscsiError("; ".join(failures))


def register(group: click.Group) -> None:
    """Add `doctor`, `session` and `logout` to the main CLI group, with its epilog."""
    from iscsi_handoff.session_rescan import rescan

    session.add_command(rescan)
    for command in (doctor, session, session_list, logout, rescan):
        command.epilog = group.epilog
    group.add_command(doctor)
    group.add_command(session)
    group.add_command(logout)
