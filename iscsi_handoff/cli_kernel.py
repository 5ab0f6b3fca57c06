"""`doctor`, `session list` and `logout`: what this machine offers, the kernel's iSCSI
sessions, and ending the ones we made.

Registered on the main group by `register(cli)` at the end of iscsi_handoff/cli.py.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import Any

import click

from iscsi_handoff.output import table
from iscsi_handoff.pathchoice import PathReport, probe_paths
from kernel_handoff.sysfs import SessionInfo, kernel_iscsi_loaded, list_sessions
from userland.errors import ConfigError

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
    Exits 0 whatever it finds: it is a diagnosis.

    \b
    Examples:
      iscsi-handoff doctor
      iscsi-handoff doctor --json | jq -r .chosen
    """
    report = probe_paths(sysfs_root=sysfs_root, try_modprobe=not no_modprobe)
    if as_json:
        click.echo(json.dumps(report.to_json(), indent=2))
    else:
        print_report(report)


def print_report(report: PathReport) -> None:
    rows = [(name, "OK" if ok else "MISSING", reason) for name, ok, reason in report.items()]
    click.echo(f"kernel {report.kernel_release}")
    click.echo(table(rows, ("PATH", "STATUS", "WHY")))
    click.echo(f"login takes: {report.chosen_reason}")


@click.group()
def session() -> None:
    """The kernel's iSCSI sessions (ours and open-iscsi's alike), read from sysfs.

    \b
    Examples:
      iscsi-handoff session list
      iscsi-handoff session list --json
    """


@session.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@click.option("--sysfs-root", default="/sys", hidden=True, help=SYSFS_ROOT_HELP)
def session_list(as_json: bool, sysfs_root: str) -> None:
    """List the kernel's iSCSI sessions and their disks.

    \b
    One row per disk: session id, SCSI host, target, portal, session state,
    LUN, block device and size. Passwords are never read.

    \b
    Examples:
      iscsi-handoff session list
      iscsi-handoff session list --json | jq -r '.sessions[].disks[].dev'
    """
    loaded = kernel_iscsi_loaded(sysfs_root)
    sessions = list_sessions(sysfs_root) if loaded else []
    if as_json:
        click.echo(json.dumps({"kernel_iscsi": loaded,
                               "sessions": [session_json(s) for s in sessions]}, indent=2))
        return
    if not loaded:
        click.echo("no iSCSI sessions: this kernel has no iSCSI support loaded "
                   "(no class/iscsi_session in sysfs)")
        return
    if not sessions:
        click.echo("no iSCSI sessions")
        return
    click.echo(table(session_rows(sessions),
                     ("SID", "HOST", "TARGET", "PORTAL", "STATE", "LUN", "DEVICE", "SIZE")))


def session_json(s: SessionInfo) -> dict[str, Any]:
    data = asdict(s)
    data["portal"] = s.portal
    return data


def session_rows(sessions: list[SessionInfo]) -> list[tuple[str, ...]]:
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


def _show(value: str | None) -> str:
    return "-" if value is None else value


def human_size(size: int | None) -> str:
    if size is None:
        return "-"
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{int(value)} {unit}" if value == int(value) else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


@click.command()
@click.option("--target", "target_name", metavar="IQN",
              help="Log out every session to this target.")
@click.option("--session", "sid", type=click.IntRange(0), metavar="N",
              help="Log out session N (the SID column of `session list`).")
@click.option("--all", "every", is_flag=True,
              help="Log out every session iscsi-handoff made (never open-iscsi's).")
@click.option("--force", is_flag=True,
              help="Tear a session down even without our record of it.")
@click.option("--timeout", type=click.FloatRange(1, 3600), default=60.0, show_default=True,
              help="Seconds to wait for each session's owner to log out.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@click.option("--sysfs-root", default="/sys", hidden=True, help=SYSFS_ROOT_HELP)
def logout(target_name: str | None, sid: int | None, every: bool, force: bool,
           timeout: float, as_json: bool, sysfs_root: str) -> None:
    """Log out kernel sessions made by `iscsi-handoff login`.

    \b
    The `login` process that owns a session is sent SIGTERM and logs out
    itself (its disks go first); if that process is gone, the session is
    logged out over NETLINK_ISCSI from here. Sessions made by open-iscsi
    are left alone (--force overrides, for leftovers we lost track of).

    \b
    Examples:
      iscsi-handoff logout --session 3
      iscsi-handoff logout --target iqn.2024-01.com.example:disk1
      iscsi-handoff logout --all
    """
    from iscsi_handoff.kernel_logout import logout as do_logout

    if sum((target_name is not None, sid is not None, every)) != 1:
        raise ConfigError("give exactly one of --target IQN, --session N or --all")
    if not kernel_iscsi_loaded(sysfs_root):
        results = []
        if not every:
            raise ConfigError("no iSCSI sessions: this kernel has no iSCSI support loaded")
    else:
        results = do_logout(target=target_name, sid=sid, every=every, force=force,
                            timeout=timeout, sysfs_root=sysfs_root)
    if as_json:
        click.echo(json.dumps({"sessions": [asdict(r) for r in results]}, indent=2))
        return
    if not results:
        click.echo("no sessions to log out")
    for r in results:
        click.echo(f"session {r.sid} ({r.target or '?'}): {r.detail}")


def register(group: click.Group) -> None:
    """Add `doctor`, `session` and `logout` to the main CLI group, with its epilog."""
    from iscsi_handoff.session_rescan import rescan

    session.add_command(rescan)
    for command in (doctor, session, session_list, logout, rescan):
        command.epilog = group.epilog
    group.add_command(doctor)
    group.add_command(session)
    group.add_command(logout)
