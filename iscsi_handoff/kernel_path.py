"""The kernel path of `login`: log in here, hand the connection to iscsi_tcp, print the
disks, then stay as the session's keeper, answering connection errors.

    session 3 on host 4: /dev/sdb (LUN 1, 1.0 GiB)  /dev/disk/by-path/ip-...-lun-1

A kernel session outlives its keeper. A keeper that starts for a target that already
has a session of ours nobody keeps (its keeper killed, or stopped as a service) adopts
it instead of logging in again (kernel_adopt.py); one whose keeper is alive is
reported, not duplicated. What each signal means to a keeper:

- SIGINT (Ctrl-C) and SIGUSR1 (what `iscsi-handoff logout` sends): log out, exit.
- SIGTERM: a foreground `login` logs out (as Ctrl-C); a service keeper (--daemon,
  --service, or a foreground one whose terminal hung up) exits leaving its sessions
  to the kernel and their records for the next keeper: a restart never logs out.
- SIGHUP (terminal closed, ssh dropped): the keeper lets go of the terminal (output to
  syslog) and goes on keeping, as a service keeper: never a session nobody keeps.

Before it may be needed the keeper locks its memory and sets PR_SET_IO_FLUSHER
(kernel_handoff/pinning.py), and the portal is resolved once: a relogin must not wait
on a page-in or DNS while the disk it lives on is frozen.
"""

from __future__ import annotations

import contextlib
import json
import logging
import logging.handlers
import os
import signal
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import click

from iscsi_handoff import kernel_adopt, registry, sdnotify
from iscsi_handoff import kernel_owners as owners
from iscsi_handoff.output import emit_ready
from kernel_handoff.errors import KernelUnavailable
from kernel_handoff.handoff import HandoffOptions, KernelSession, handoff
from kernel_handoff.netlink import IscsiNetlink
from kernel_handoff.params import SessionTimers
from kernel_handoff.pinning import lock_memory, set_io_flusher
from kernel_handoff.recovery import Keeper, SessionGuard, Stopped
from kernel_handoff.sysfs import transport_handle
from kernel_handoff.teardown import logout_session
from userland.errors import IscsiError, NetworkError
from userland.login.machine import LoginConfig
from userland.login.run import login
from userland.portal import Portal

log = logging.getLogger("iscsi_handoff.kernel")

LOGOUT_SIGNALS = (signal.SIGINT, signal.SIGUSR1)


@dataclass
class KernelOptions:
    queue_depth: int = 32
    replacement_timeout: float = 120.0
    login_timeout: float = 15.0
    as_json: bool = False
    daemon: bool = False
    service: bool = False  # run by a service manager: SIGTERM leaves, READY=1 via sd_notify
    adopt: bool = True  # False (--force): a new session even beside one of ours
    pidfile: Path | None = None
    sysfs_root: str = "/sys"
    dev_root: str = "/dev"
    on_ready: Callable[[], None] | None = None  # once the disks are printed (login --trace)


@dataclass
class KeeperState:
    """What this process keeps, and how it should end."""

    keepers: list[Keeper]
    adopted: set[int]  # sids taken over from a keeper that was gone
    leave_on_term: bool  # SIGTERM leaves the sessions to the next keeper
    hung_up: bool = False
    given: dict[int, Portal] = field(default_factory=dict)  # sid -> the portal as named


class Terminated(BaseException):
    """A stop signal before the recovery loop watches for it: unwind and undo."""


def _terminated(signum: int, frame: FrameType | None) -> None:
    raise Terminated


def run_kernel_login(portal: Portal, config: LoginConfig, *, queue_depth: int = 32,
                     replacement_timeout: float = 120.0, login_timeout: float = 15.0,
                     as_json: bool = False, daemon: bool = False, service: bool = False,
                     pidfile: Path | None = None,
                     on_ready: Callable[[], None] | None = None, adopt: bool = True) -> None:
    """`login` on the kernel path, for one target (what cli.py's login calls)."""
    opts = KernelOptions(queue_depth=queue_depth, replacement_timeout=replacement_timeout,
                         login_timeout=login_timeout, as_json=as_json, daemon=daemon,
                         service=service, pidfile=pidfile, on_ready=on_ready, adopt=adopt)
    run_kernel_logins([(portal, config)], opts)


def run_kernel_logins(logins: Sequence[tuple[Portal, LoginConfig]],
                      opts: KernelOptions) -> None:
    """Every target in ``logins`` on the kernel path, kept by one process."""
    detached = owners.detach() if opts.daemon else None
    if detached is not None:
        _log_to_syslog()
    state = KeeperState([], set(), leave_on_term=opts.daemon or opts.service)
    handlers = {signum: signal.signal(signum, _terminated)
                for signum in (signal.SIGTERM, signal.SIGUSR1)}

    def hangup(signum: int, frame: FrameType | None) -> None:
        state.hung_up = True  # acted on once the sessions are up (_let_go_of_terminal)

    handlers[signal.SIGHUP] = signal.signal(signal.SIGHUP, hangup)
    try:
        _run(logins, opts, detached, state)
    except Terminated:
        raise KeyboardInterrupt from None  # the CLI's "interrupted", exit 130
    finally:
        for signum, previous in handlers.items():
            signal.signal(signum, previous)
        if opts.pidfile is not None:
            owners.remove_pidfile(opts.pidfile)


def _run(logins: Sequence[tuple[Portal, LoginConfig]], opts: KernelOptions,
         detached: owners.Detached | None, state: KeeperState) -> None:
    _ensure_transport(opts.sysfs_root)
    for failure in (lock_memory(), set_io_flusher()):
        if failure is not None:
            log.warning("keeper: %s", failure)
    with IscsiNetlink() as nl:
        to_recover = _take_all(nl, logins, opts, state)
        leave = False
        # Each session recovers in a thread on a socket of its own; the scan runs while
        # this loop still answers CONN_ERRORs; rescans follow recoveries and LUN changes.
        guard = SessionGuard(nl, state.keepers, open_nl=IscsiNetlink,
                             sysfs_root=opts.sysfs_root, dev_root=opts.dev_root)
        try:
            guard.start()
            for keeper in to_recover:  # adopted with the connection down: before the scan
                guard.start_recovery(keeper, "adopted with its connection down")
            guard.initial_scan(timeout=HandoffOptions.disk_timeout)
            for keeper in state.keepers:
                _record(keeper.session, state.given[keeper.sid], keeper.config)  # + disks
                if keeper.sid not in state.adopted:
                    _log_timings(keeper.session)
            _announce(state, opts)
            if opts.on_ready is not None:
                opts.on_ready()
            if opts.pidfile is not None:
                owners.write_pidfile(opts.pidfile)
            # READY=1 (systemd's Type=notify, `login --all`) once the disks exist
            emit_ready(_ready_doc(state))  # with --json also its one-line ready event
            if detached is not None:
                detached.ready()
            # From here a signal ends the wait for kernel events instead of raising
            # somewhere inside a relogin: the loop returns, then we log out or leave.
            nl.watch_signals((signal.SIGTERM, *LOGOUT_SIGNALS))
            nl.on_signal(signal.SIGHUP, lambda: _let_go_of_terminal(state))
            if state.hung_up:
                _let_go_of_terminal(state)
            with contextlib.suppress(Stopped):  # a signal during an inline recovery
                guard.run()
            leave = nl.stop_signal == signal.SIGTERM and state.leave_on_term
        except Exception:
            leave = state.leave_on_term  # a crashed service keeper: the next one adopts
            raise
        finally:
            guard.stop()
            sdnotify.notify("STOPPING=1")
            if leave:
                _leave_all(state, opts)
            else:
                _log_out_all(nl, state.keepers, opts)


def _let_go_of_terminal(state: KeeperState) -> None:
    """SIGHUP: the terminal is gone. Keep the sessions, as a service keeper would."""
    state.hung_up = True
    if state.leave_on_term:
        return  # already detached (--daemon) or run by a service manager
    state.leave_on_term = True
    _log_to_syslog()
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    os.close(devnull)
    log.warning("terminal hung up: pid %d keeps session(s) %s in the background; "
                "`iscsi-handoff logout` ends them", os.getpid(),
                ", ".join(str(k.sid) for k in state.keepers))


def _log_timings(session: KernelSession) -> None:
    t = session.timings
    t["total"] = t.get("total", 0) + t.get("scan", 0)
    log.info("session %d: login %.0f ms, handoff %.0f ms, scan to the disks %.0f ms; "
             "%.0f ms in all", session.sid, t["login"] * 1000, t.get("netlink", 0) * 1000,
             t.get("scan", 0) * 1000, t["total"] * 1000)


def _ensure_transport(sysfs_root: str) -> None:
    """iscsi_tcp loaded (modprobe it as root, as doctor would), or a clear error."""
    if transport_handle(sysfs_root) is not None:
        return
    from iscsi_handoff.pathchoice import modprobe

    failure = modprobe() if os.geteuid() == 0 else "not root, so no modprobe"
    if transport_handle(sysfs_root) is None:
        why = failure or "modprobe did not make class/iscsi_transport/tcp appear"
        raise KernelUnavailable(f"iscsi_tcp is not loaded ({why})")


def resolve_once(portal: Portal) -> Portal:
    """The portal with its host resolved to an address, once: relogins use that."""
    try:
        infos = socket.getaddrinfo(portal.host, portal.port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise NetworkError(f"cannot resolve {portal.host!r} ({exc.strerror})") from None
    host = str(infos[0][4][0])
    return Portal(host, portal.port, portal.tpgt)


def portal_text(address: str, port: int) -> str:
    """address:port as sysfs-based listings write it ([v6]:port)."""
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


def _take_all(nl: IscsiNetlink, logins: Sequence[tuple[Portal, LoginConfig]],
              opts: KernelOptions, state: KeeperState) -> list[Keeper]:
    """Adopt or log in to every target; the adopted ones whose connection is down."""
    timers = SessionTimers(replacement_timeout=int(opts.replacement_timeout))
    handoff_opts = HandoffOptions(queue_depth=opts.queue_depth, timers=timers,
                                  sysfs_root=opts.sysfs_root, dev_root=opts.dev_root,
                                  create_lock=registry.run_dir() / "kernel-create.lock",
                                  scan=False)  # SessionGuard.initial_scan does it
    to_recover: list[Keeper] = []
    try:
        for given, config in logins:
            assert config.target_name is not None
            portal = resolve_once(given)
            orphan = kernel_adopt.find(config.target_name, (given, portal),
                                       sysfs_root=opts.sysfs_root) if opts.adopt else None
            if orphan is not None:
                keeper = _adopt(orphan, given, portal, config, timers, opts)
                state.keepers.append(keeper)
                state.adopted.add(keeper.sid)
                state.given[keeper.sid] = given
                if not kernel_adopt.connection_up(orphan.info):
                    keeper.conn_up = False
                    to_recover.append(keeper)
                continue
            began = time.monotonic()
            logged_in = login(portal, config, timeout=opts.login_timeout)
            logged_in_at = time.monotonic()
            session = handoff(nl, logged_in, initiator_name=config.initiator_name,
                              target_name=config.target_name, options=handoff_opts)
            session.timings["login"] = logged_in_at - began
            session.timings["total"] = time.monotonic() - began  # the scan adds to it
            state.keepers.append(Keeper(session, portal, config, timers,
                                        login_timeout=opts.login_timeout))
            state.given[session.sid] = given
            _record(session, given, config)
    except BaseException:
        # All or nothing: what we made is logged out, what we adopted is left as found.
        made = [k for k in state.keepers if k.sid not in state.adopted]
        _log_out_all(nl, made, opts)
        state.keepers = []
        raise
    return to_recover


def _adopt(orphan: kernel_adopt.Orphan, given: Portal, portal: Portal, config: LoginConfig,
           timers: SessionTimers, opts: KernelOptions) -> Keeper:
    handle = transport_handle(opts.sysfs_root)
    assert handle is not None  # _ensure_transport
    session = kernel_adopt.adopt(orphan, transport_handle=handle,
                                 initiator_name=config.initiator_name, portal=portal)
    _record(session, given, config)
    log.warning("session %d: adopted (its keeper, pid %d, is gone)", session.sid,
                orphan.record.pid)
    return Keeper(session, portal, config, timers, login_timeout=opts.login_timeout)


def _record(session: KernelSession, given: Portal, config: LoginConfig) -> None:
    owners.write_record(owners.own_record(
        session.sid, session.host_no, session.target_name,
        portal_text(session.address, session.port), session.isid,
        [d.dev for d in session.disks], login_portal=given.address(),
        tsih=session.tsih, initial_cmdsn=session.initial_cmdsn,
        initiator_name=config.initiator_name))


def _leave_all(state: KeeperState, opts: KernelOptions) -> None:
    """Exit keeping the sessions: their records stay for the next keeper to adopt."""
    for keeper in state.keepers:
        if keeper.ended is not None:
            owners.remove_record(keeper.sid, pid=os.getpid())
            continue
        _status(f"left session {keeper.sid} ({keeper.session.target_name}) to the "
                "kernel; the next `login` of it adopts it", opts)


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


def _ready_doc(state: KeeperState) -> dict[str, Any]:
    return {"path": "kernel", "pid": os.getpid(),
            "sessions": [dict(session_json(k.session), adopted=k.sid in state.adopted)
                         for k in state.keepers]}


def _announce(state: KeeperState, opts: KernelOptions) -> None:
    keepers = state.keepers
    if opts.as_json:
        click.echo(json.dumps(_ready_doc(state), indent=2))
    else:
        for keeper in keepers:
            for line in session_lines(keeper.session):
                click.echo(line)
    for sid in sorted(state.adopted):
        _status(f"session {sid}: adopted (its keeper was gone); no new login", opts)
    if state.leave_on_term:
        _status("serving; SIGTERM leaves the sessions to the next keeper, "
                "`iscsi-handoff logout` logs out", opts)
    else:
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
