"""The kernel path of `login`: log in here, hand the connection to iscsi_tcp, print the
disks, then stay in the foreground answering connection errors until SIGTERM/SIGINT,
which log out.

    session 3 on host 4: /dev/sdb (LUN 1, 1.0 GiB)  /dev/disk/by-path/ip-...-lun-1

With --daemon the same happens in a detached child: the command returns once the disks
are printed, and `iscsi-handoff logout` (or SIGTERM to the pidfile's pid) ends it.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import os
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import click

from iscsi_handoff import kernel_owners as owners
from kernel_handoff.errors import KernelUnavailable
from kernel_handoff.handoff import HandoffOptions, KernelSession, handoff
from kernel_handoff.netlink import IscsiNetlink
from kernel_handoff.params import SessionTimers
from kernel_handoff.recovery import Keeper, SessionGuard
from kernel_handoff.sysfs import transport_handle
from kernel_handoff.teardown import logout_session
from userland.errors import IscsiError
from userland.login.machine import LoginConfig
from userland.login.run import login
from userland.portal import Portal

log = logging.getLogger("iscsi_handoff.kernel")


@dataclass
class KernelOptions:
    queue_depth: int = 32
    replacement_timeout: float = 120.0
    login_timeout: float = 15.0
    as_json: bool = False
    daemon: bool = False
    pidfile: Path | None = None
    sysfs_root: str = "/sys"
    dev_root: str = "/dev"
    on_ready: Callable[[], None] | None = None  # once the disks are printed (login --trace)


class Terminated(BaseException):
    """SIGTERM before the recovery loop watches for it: unwind and undo, like Ctrl-C."""


def _terminated(signum: int, frame: FrameType | None) -> None:
    raise Terminated


def run_kernel_login(portal: Portal, config: LoginConfig, *, queue_depth: int = 32,
                     replacement_timeout: float = 120.0, login_timeout: float = 15.0,
                     as_json: bool = False, daemon: bool = False,
                     pidfile: Path | None = None,
                     on_ready: Callable[[], None] | None = None) -> None:
    """`login` on the kernel path, for one target (what cli.py's login calls)."""
    opts = KernelOptions(queue_depth=queue_depth, replacement_timeout=replacement_timeout,
                         login_timeout=login_timeout, as_json=as_json, daemon=daemon,
                         pidfile=pidfile, on_ready=on_ready)
    run_kernel_logins([(portal, config)], opts)


def run_kernel_logins(logins: Sequence[tuple[Portal, LoginConfig]],
                      opts: KernelOptions) -> None:
    """Every target in ``logins`` on the kernel path, kept by one foreground process."""
    detached = owners.detach() if opts.daemon else None
    if detached is not None:
        _log_to_syslog()
    previous = signal.signal(signal.SIGTERM, _terminated)
    try:
        _run(logins, opts, detached)
    except Terminated:
        raise KeyboardInterrupt from None  # the CLI's "interrupted", exit 130
    finally:
        signal.signal(signal.SIGTERM, previous)
        if opts.pidfile is not None:
            owners.remove_pidfile(opts.pidfile)


def _run(logins: Sequence[tuple[Portal, LoginConfig]], opts: KernelOptions,
         detached: owners.Detached | None) -> None:
    _ensure_transport(opts.sysfs_root)
    with IscsiNetlink() as nl:
        keepers = _log_in_all(nl, logins, opts)
        # Each session recovers in a thread on a socket of its own; the scan runs while
        # this loop still answers CONN_ERRORs; rescans follow recoveries and LUN changes.
        guard = SessionGuard(nl, keepers, open_nl=IscsiNetlink,
                             sysfs_root=opts.sysfs_root, dev_root=opts.dev_root)
        try:
            guard.start()
            guard.initial_scan(timeout=HandoffOptions.disk_timeout)
            for keeper in keepers:
                _record(keeper)  # now with its disks
                _log_timings(keeper.session)
            _announce(keepers, opts)
            if opts.on_ready is not None:
                opts.on_ready()
            if opts.pidfile is not None:
                owners.write_pidfile(opts.pidfile)
            if detached is not None:
                detached.ready()
            # From here a signal ends the wait for kernel events instead of raising
            # somewhere inside a relogin: the loop returns and we log out below.
            nl.watch_signals((signal.SIGTERM, signal.SIGINT))
            guard.run()
        finally:
            guard.stop()
            _log_out_all(nl, keepers, opts)


def _ensure_transport(sysfs_root: str) -> None:
    """iscsi_tcp loaded (modprobe it as root, as doctor would), or a clear error."""
    if transport_handle(sysfs_root) is not None:
        return
    from iscsi_handoff.pathchoice import modprobe

    failure = modprobe() if os.geteuid() == 0 else "not root, so no modprobe"
    if transport_handle(sysfs_root) is None:
        why = failure or "modprobe did not make class/iscsi_transport/tcp appear"
        raise KernelUnavailable(f"iscsi_tcp is not loaded ({why})")


def _log_in_all(nl: IscsiNetlink, logins: Sequence[tuple[Portal, LoginConfig]],
                opts: KernelOptions) -> list[Keeper]:
    timers = SessionTimers(replacement_timeout=int(opts.replacement_timeout))
    handoff_opts = HandoffOptions(queue_depth=opts.queue_depth, timers=timers,
                                  sysfs_root=opts.sysfs_root, dev_root=opts.dev_root,
                                  scan=False)  # SessionGuard.initial_scan does it
    keepers: list[Keeper] = []
    try:
        for portal, config in logins:
            assert config.target_name is not None
            began = time.monotonic()
            logged_in = login(portal, config, timeout=opts.login_timeout)
            logged_in_at = time.monotonic()
            session = handoff(nl, logged_in, initiator_name=config.initiator_name,
                              target_name=config.target_name, options=handoff_opts)
            session.timings["login"] = logged_in_at - began
            session.timings["total"] = time.monotonic() - began  # the scan adds to it
            keepers.append(Keeper(session, portal, config, timers,
                                  login_timeout=opts.login_timeout))
            _record(keepers[-1])
    except BaseException:
        _log_out_all(nl, keepers, opts)  # all or nothing
        raise
    return keepers


def _log_timings(session: KernelSession) -> None:
    t = session.timings
    t["total"] = t.get("total", 0) + t.get("scan", 0)
    log.info("session %d: login %.0f ms, handoff %.0f ms, scan to the disks %.0f ms; "
             "%.0f ms in all", session.sid, t["login"] * 1000, t.get("netlink", 0) * 1000,
             t.get("scan", 0) * 1000, t["total"] * 1000)


def _record(keeper: Keeper) -> None:
    session = keeper.session
    owners.write_record(owners.own_record(
        session.sid, session.host_no, session.target_name,
        f"{session.address}:{session.port}", session.isid,
        [d.dev for d in session.disks]))


def _log_out_all(nl: IscsiNetlink, keepers: list[Keeper], opts: KernelOptions) -> None:
    for keeper in keepers:
        s = keeper.session
        if keeper.ended is not None:  # destroyed elsewhere: nothing left to undo
            owners.remove_record(s.sid, pid=os.getpid())
            continue
        try:
            report = logout_session(nl, s.transport_handle, s.sid, s.cid,
                                    conn_up=keeper.conn_up,
                                    unbind_timeout=opts.replacement_timeout + 15)
            text = f"logged out of session {s.sid} ({s.target_name})" + (
                "" if report.logged_out else ", without the target's answer")
            _status(text, opts)
        except IscsiError as exc:
            log.error("session %d: teardown failed: %s", s.sid, exc)
        finally:
            keeper.ended = keeper.ended or "logged out"
            owners.remove_record(s.sid, pid=os.getpid())


# --- output ----------------------------------------------------------------------------

def human_size(n: int | None) -> str:
    if n is None:
        return "size unknown"
    for unit, shift in (("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift:
            return f"{n / (1 << shift):.1f} {unit}"
    return f"{n} B"


def session_lines(s: KernelSession) -> list[str]:
    head = f"session {s.sid} on host {s.host_no}"
    if not s.disks:
        return [f"{head}: {s.target_name} has no disk LUNs"]
    lines = []
    for d in s.disks:
        link = f"  {d.by_path}" if d.by_path else ""
        lines.append(f"{head}: {d.dev} (LUN {d.lun}, {human_size(d.size_bytes)}){link}")
    return lines


def session_json(s: KernelSession) -> dict[str, Any]:
    return {
        "sid": s.sid, "host_no": s.host_no, "target": s.target_name,
        "portal": {"address": s.address, "port": s.port}, "isid": s.isid.hex(),
        "tsih": s.tsih,
        "disks": [{"lun": d.lun, "dev": d.dev, "name": d.name, "size_bytes": d.size_bytes,
                   "vendor": d.vendor, "model": d.model, "hctl": d.hctl,
                   "by_path": d.by_path, "by_path_name": s.by_path(d.lun)}
                  for d in s.disks],
        "seconds": {k: round(v, 4) for k, v in s.timings.items()},
    }


def _announce(keepers: list[Keeper], opts: KernelOptions) -> None:
    if opts.as_json:
        click.echo(json.dumps({"path": "kernel", "pid": os.getpid(),
                               "sessions": [session_json(k.session) for k in keepers]},
                              indent=2))
    else:
        for keeper in keepers:
            for line in session_lines(keeper.session):
                click.echo(line)
    _status("serving; Ctrl-C or SIGTERM to log out", opts)


def _status(text: str, opts: KernelOptions) -> None:
    """Progress lines: stdout for people, stderr when stdout carries JSON."""
    click.echo(text, err=opts.as_json)


def _log_to_syslog() -> None:
    """A daemon's stderr is /dev/null: its warnings (recoveries) go to syslog instead."""
    if not os.path.exists("/dev/log"):
        return
    handler = logging.handlers.SysLogHandler(address="/dev/log")
    handler.setFormatter(logging.Formatter("iscsi-handoff[%(process)d]: %(message)s"))
    logging.getLogger("iscsi_handoff").addHandler(handler)
