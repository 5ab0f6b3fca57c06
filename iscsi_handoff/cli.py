"""The `iscsi-handoff` command: discovery, login and the demo.

Every IscsiError becomes one line on stderr and its exit code (see the README);
only a bug shows a traceback, and only with -v.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import click

from iscsi_handoff import __version__
from iscsi_handoff.datapath import FuseOptions
from iscsi_handoff.login_path import (
    check_fuse_prerequisites,
    check_mountpoint,
    decide,
    prepare_mountpoint,
    session_mountpoint,
)
from iscsi_handoff.options import (
    DIGEST_CHOICES,
    Auth,
    PortalType,
    add_common_options,
    auth_from,
    auth_options,
    discovery_auth_from,
    discovery_auth_options,
    fuse_options,
    fuse_options_from,
    node_settings_from,
    pop_where,
    where_options,
)
from iscsi_handoff.options_login import login_target
from iscsi_handoff.output import (
    error_json,
    json_mode,
    login_json,
    print_login,
    print_targets,
    targets_json,
)
from userland.discovery.run import discover
from userland.discovery.sendtargets import DiscoveredTarget
from userland.errors import (
    EXIT_INTERNAL,
    ConfigError,
    IscsiError,
    PathUnavailable,
    TargetNotFoundError,
)
from userland.exchange import Exchange
from userland.login.machine import LoginConfig, new_isid
from userland.login.run import login as do_login
from userland.names import validate_name
from userland.portal import Portal

log = logging.getLogger("iscsi_handoff")

EPILOG = """\b
Exit codes: 0 ok, 1 internal error, 2 usage or configuration, 3 network
(refused, unreachable, timed out), 4 authentication or authorization,
5 target not found, 6 login refused by the target, 7 protocol error,
8 I/O error, 9 data path unavailable, 15 session exists, 130 interrupted.
"""


@click.group(epilog=EPILOG, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="iscsi-handoff")
@click.option("-v", "--verbose", count=True,
              help="-v shows the login exchange (secrets redacted); -vv every PDU.")
@click.pass_context
def cli(ctx: click.Context, verbose: int) -> None:
    """A userland iSCSI initiator: discovery, CHAP and login in Python.

    \b
    Examples:
      iscsi-handoff discover 127.0.0.1:3260
      iscsi-handoff login --portal 127.0.0.1:3260 --target iqn.2024-01.com.example:disk1 --check
      iscsi-handoff demo
    """
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(message)s", stream=sys.stderr)
    ctx.obj = {"verbose": verbose}


@cli.command(epilog=EPILOG)
@where_options
@auth_options
@discovery_auth_options
@click.option("--save", is_flag=True,
              help="Record each target and portal found as a node (`node list`).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
def discover_cmd(as_json: bool, save: bool, **kw: Any) -> None:
    """List the targets a portal offers (SendTargets=All).

    PORTAL is host, host:port or [ipv6]:port (default port 3260), as an argument or
    -p; an iscsi://HOST[:PORT]/IQN URL (or -T IQN) shows that target only. The
    --discovery-chap-* options authenticate this discovery session; without them
    (and without --save) the plain --chap-* ones do. With --save, each target and
    portal found becomes a node record, and the plain --chap-*/--mutual-* options
    are its session credentials, recorded as their file or variable name.

    \b
    Examples:
      iscsi-handoff discover 127.0.0.1:3260
      iscsi-handoff discover -p 127.0.0.1:3260 --save
      iscsi-handoff discover san1:3260 --chap-user alice --chap-secret-file ~/.iscsi-secret
      iscsi-handoff discover san1 --discovery-chap-user disc \\
          --discovery-chap-secret-file /etc/iscsi-handoff/disc.secret --save \\
          --chap-user alice --chap-secret-file /etc/iscsi-handoff/alice.secret
      iscsi-handoff discover [::1]:3260 --json
    """
    where = pop_where(kw)
    if where.portal is None:
        raise ConfigError("which portal? give PORTAL, -p PORTAL or iscsi://HOST[:PORT]")
    recorded = node_settings_from(kw) if save else {}
    auth = auth_from(kw)
    # With --save the plain ones are the nodes' session credentials (tgt, for one,
    # refuses a discovery session that offers a target's CHAP account).
    credentials, mutual = discovery_auth_from(kw, auth, fall_back=not save)
    targets = discover(where.portal, initiator_name=auth.initiator_name,
                       credentials=credentials, mutual=mutual,
                       chap_algorithms=auth.chap_algorithms, timeout=auth.timeout)
    if where.target is not None:
        from userland.errors import TargetNotFoundError

        targets = [t for t in targets if t.name == where.target]
        if not targets:
            raise TargetNotFoundError(f"{where.portal} does not list {where.target}")
    if save:
        from iscsi_handoff.nodes_cli import save_discovered

        nodes = save_discovered(targets, recorded)
        if as_json:
            click.echo(json.dumps({"targets": targets_json(targets),
                                   "saved": [str(n.path) for n in nodes]}, indent=2))
            return
        for node in nodes:
            click.echo(f"saved {node.path}", err=True)
    print_targets(targets, as_json=as_json)


discover_cmd.name = "discover"


@cli.command(epilog=EPILOG)
@login_target
@click.option("--check", is_flag=True,
              help="Log in, print the negotiated parameters, log out.")
@click.option("--kernel", "force_kernel", is_flag=True,
              help="Insist on the kernel path (an error where iscsi_tcp is missing).")
@click.option("--daemon", is_flag=True,
              help="Return once the disks (or storage files) are up; a background process "
                   "keeps the session (end it with `iscsi-handoff logout`). Both paths; on "
                   "the kernel path SIGTERM to it leaves the session for the next keeper.")
@click.option("--service", is_flag=True,
              help="For a service manager (the systemd units): stay in the foreground, "
                   "send READY=1 once the disks exist, and on SIGTERM leave a kernel session "
                   "for the next keeper instead of logging out (a FUSE session cannot "
                   "outlive its keeper: it logs out).")
@click.option("--pidfile", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write the keeping process's pid here.")
@click.option("--force", is_flag=True,
              help="Log in even though this initiator has a session to the target and "
                   "portal already; FUSE: mount over a mount point or a non-empty folder.")
@click.option("--trace", is_flag=True,
              help="Kernel path: watch the handoff with bcc and print the kernel's timeline.")
@click.option("--header-digest", type=click.Choice(sorted(DIGEST_CHOICES)),
              default="prefer-none", show_default=True,
              help="CRC32C header digest: never, always, or either with a preference.")
@click.option("--data-digest", type=click.Choice(sorted(DIGEST_CHOICES)),
              default="prefer-none", show_default=True, help="CRC32C data digest, likewise.")
@fuse_options
@auth_options
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts (--check).")
def login(portal: Portal, target_name: str, check: bool, force_kernel: bool, daemon: bool,
          service: bool, pidfile: Path | None, force: bool, trace: bool, header_digest: str,
          data_digest: str, as_json: bool, fuse: Path | None, **kw: Any) -> None:
    """Log in to a target and give its LUNs to this machine.

    \b
    By default the kernel path: log in here, hand the connection to the
    kernel's iscsi_tcp, print each LUN's /dev/sdX, then stay to answer
    connection errors until Ctrl-C or SIGTERM (which log out; SIGHUP leaves
    it keeping the session in the background). A session of ours to the
    same target whose keeper is gone is adopted, not logged in twice; one
    whose keeper lives is refused (exit 15). Where the kernel has no iSCSI,
    the FUSE fallback instead, with a loop device, and one line saying why
    (`iscsi-handoff doctor` tells which path you get), in a folder of its own
    under /run/iscsi-handoff/fuse. A second login to the same target and
    portal is refused (exit 15) unless --force.
    With --check: log in to full feature phase, show every negotiated
    parameter and which side chose it, log out, exit 0.
    With --fuse MOUNT: the userland session carries the data and each disk
    LUN is a file, MOUNT/<host>/<target>/storage (and lunN/storage); --loop
    also attaches every disk LUN as /dev/loopN. Runs until Ctrl-C, SIGTERM,
    SIGHUP or `iscsi-handoff logout`, then finishes I/O, logs out and
    unmounts (not while a filesystem on its loop device is mounted).

    \b
    Examples:
      iscsi-handoff login --portal 127.0.0.1:3260 --target IQN
      iscsi-handoff login --portal 127.0.0.1:3260 --target IQN --check
      iscsi-handoff login --portal 127.0.0.1:3260 --target IQN --fuse /mnt/iscsi --loop
      iscsi-handoff login --portal 127.0.0.1:3260 --target IQN --daemon --pidfile /run/x.pid
      iscsi-handoff login --portal 127.0.0.1 --target IQN --check \\
          --chap-user alice --chap-secret-file alice.secret \\
          --mutual-user target1 --mutual-secret-file target1.secret
    """
    validate_name(target_name)
    if pidfile is not None:
        pidfile = pidfile.absolute()  # a daemon works from /
    if check and (fuse is not None or force_kernel or kw["loop"] or daemon or service
                  or trace):
        raise ConfigError("--check logs in and out again: it takes no --fuse, --loop, "
                          "--kernel, --daemon, --service or --trace")
    if fuse is not None and trace:
        raise ConfigError("--trace watches the kernel path, not --fuse")
    if daemon and service:
        raise ConfigError("--daemon forks, --service stays in the foreground: pick one")
    # The fallback may be chosen below, so its options apply without --fuse too.
    data_opts = fuse_options_from(kw, fuse if fuse is not None else Path("."))
    assert data_opts is not None
    auth = auth_from(kw)
    config = LoginConfig(initiator_name=auth.initiator_name, target_name=target_name,
                         isid=new_isid(), credentials=auth.credentials, mutual=auth.mutual,
                         chap_algorithms=auth.chap_algorithms,
                         header_digest=DIGEST_CHOICES[header_digest],
                         data_digest=DIGEST_CHOICES[data_digest],
                         expected_tpgt=portal.tpgt)
    data_opts.login_timeout = auth.timeout
    if not check:
        default_mount = session_mountpoint(portal.host, target_name, config.isid)
        choice = decide(force_kernel=force_kernel, fuse_mount=fuse, loop=data_opts.loop,
                        default_mount=default_mount)
        if choice.path == "kernel":
            refuse_duplicate(config, portal, force=force, adoptable=True)
            run_kernel(portal, config, data_opts, as_json=as_json, daemon=daemon,
                       service=service, pidfile=pidfile, trace=trace, adopt=not force)
            return
        # --service changes nothing here: a FUSE session dies with its keeper, so SIGTERM
        # logs out (READY=1 goes out once the tree is up, as without it).
        if trace:
            raise PathUnavailable("--trace needs the kernel path, which is unavailable "
                                  f"here: {choice.notice}")
        check_fuse_prerequisites(loop=choice.loop)
        if fuse is not None:
            check_mountpoint(fuse, force=force)
        refuse_duplicate(config, portal, force=force)
        if choice.notice is not None:
            click.echo(f"iscsi-handoff: {choice.notice}", err=True)
        assert choice.mountpoint is not None
        data_opts.mountpoint = choice.mountpoint
        data_opts.loop = choice.loop
        run_fuse([(portal, config)], data_opts, force=force, daemon=daemon, pidfile=pidfile,
                 make_mountpoint=fuse is None)
        return
    session = do_login(portal, config, timeout=auth.timeout)
    with session.connection:
        Exchange(session.connection, session.result).logout(timeout=auth.timeout)
    if as_json:
        click.echo(json.dumps(login_json(session.result, target=target_name,
                                         portal=session.portal), indent=2))
    else:
        print_login(session.result, target=target_name, portal=session.portal)
        click.echo("logged out")


def refuse_duplicate(config: LoginConfig, portal: Portal, *, force: bool,
                     adoptable: bool = False) -> None:
    """Exit 15 before anything is set up when this initiator has a live session to the
    target and portal (the FUSE keeper's claim under the registry's lock is the race-free
    check; the kernel path has only this one until its keeper claims too). ``adoptable``:
    the kernel path adopts a session of ours whose keeper is gone instead."""
    from iscsi_handoff import registry

    assert config.target_name is not None
    if not force:
        registry.refuse_duplicate(target=config.target_name, portal=str(portal),
                                  initiator_name=config.initiator_name, adoptable=adoptable)


def run_fuse(logins: list[tuple[Portal, LoginConfig]], opts: FuseOptions, *,
             force: bool = False, daemon: bool = False, pidfile: Path | None = None,
             make_mountpoint: bool = False) -> None:
    """The FUSE fallback: imported only when taken (trio and pyfuse3 cost start-up time).

    ``--daemon`` forks here, before trio and before any login: the parent returns 0 once
    the child has printed the tree and its loop devices, or the child's error status."""
    check_fuse_prerequisites(loop=opts.loop)
    import trio

    from iscsi_handoff import fuse_path
    from iscsi_handoff.daemon_log import log_detached
    from iscsi_handoff.kernel_owners import detach

    # --daemon's child works from / : every path it keeps must not depend on the cwd.
    opts.mountpoint = opts.mountpoint.absolute()
    pidfile = pidfile.absolute() if pidfile is not None else None
    made = prepare_mountpoint(opts.mountpoint) if make_mountpoint else False
    keep = fuse_path.Keep(force=force, pidfile=pidfile, made_mountpoint=made)
    try:
        if daemon:
            keep.detached = detach()
            log_detached()
        trio.run(partial(fuse_path.run_fuse, logins, opts, keep=keep))
    finally:
        if made:
            with contextlib.suppress(OSError):
                opts.mountpoint.rmdir()  # only while empty, and not mounted


def run_kernel(portal: Portal, config: LoginConfig, opts: FuseOptions, *, as_json: bool,
               daemon: bool, pidfile: Path | None, trace: bool, service: bool = False,
               adopt: bool = True) -> None:
    """The kernel path: imported only when taken (it needs netlink, not FUSE)."""
    from iscsi_handoff.kernel_path import run_kernel_login

    def go(on_ready: Callable[[], None] | None = None) -> None:
        run_kernel_login(portal, config, queue_depth=opts.queue_depth,
                         replacement_timeout=opts.replacement_timeout,
                         login_timeout=opts.login_timeout, as_json=as_json, daemon=daemon,
                         service=service, pidfile=pidfile, on_ready=on_ready,
                         adopt=adopt)

    if not trace:
        go()
        return
    if daemon:
        raise ConfigError("--trace watches this process's handoff: it cannot go with --daemon")
    from kernel_handoff.ebpf.observer import Observer, print_notes
    from kernel_handoff.ebpf.timeline import print_timeline

    observer = Observer()
    observer.start()  # probes in place before the login starts
    shown = False

    def show() -> None:  # once the disks are up, or when the login failed
        nonlocal shown
        if shown:
            return
        shown = True
        observer.stop()
        print_notes(observer, sys.stderr)
        print_timeline(observer.events(), sys.stderr)

    try:
        go(on_ready=show)
    finally:
        show()


# `mount` opens one session per listed target and keeps them all: a portal listing
# thousands must not make us open thousands. Raise it with --max-targets.
DEFAULT_MAX_TARGETS = 256


@cli.command(epilog=EPILOG)
@click.argument("mount_args", nargs=-1, metavar="[PORTAL] MOUNTPOINT")
@click.option("-p", "--portal", "portal_text", metavar="PORTAL",
              help="host[:port] or iscsi://HOST[:PORT] (instead of the positional PORTAL).")
@click.option("-T", "--target", "target_text", metavar="IQN",
              help="Mount only this target of those the portal lists.")
@click.option("--max-targets", type=click.IntRange(1, 100000), default=DEFAULT_MAX_TARGETS,
              show_default=True,
              help="Refuse to mount a portal listing more targets than this.")
@click.option("--daemon", is_flag=True,
              help="Return once the tree is up; a background process keeps the sessions.")
@click.option("--pidfile", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write the keeping process's pid here.")
@click.option("--force", is_flag=True,
              help="Log in even to targets this initiator has a session with; mount over "
                   "a mount point or a non-empty folder.")
@fuse_options
@discovery_auth_options
@auth_options
def mount(mount_args: tuple[str, ...], portal_text: str | None, target_text: str | None,
          max_targets: int, daemon: bool, pidfile: Path | None, force: bool,
          **kw: Any) -> None:
    """Mount every target a portal lists, one session each, as a FUSE tree.

    \b
    MOUNTPOINT/<host>/<target>/storage is each target's first disk LUN,
    lunN/storage every disk LUN. Runs until Ctrl-C, SIGTERM, SIGHUP or
    `iscsi-handoff logout`.

    \b
    Examples:
      iscsi-handoff mount 127.0.0.1:3260 /mnt/iscsi
      iscsi-handoff mount 127.0.0.1:3260 /mnt/iscsi --loop
      iscsi-handoff mount -p 127.0.0.1:3260 -T IQN /mnt/iscsi

    Discovery authenticates with --discovery-chap-* (none without them), each
    target's session with --chap-*/--mutual-*. A target whose login fails is
    reported on stderr and the others are mounted.
    """
    portal, mountpoint, only = _mount_where(mount_args, portal_text, target_text)
    opts = fuse_options_from(kw, mountpoint)
    assert opts is not None
    check_fuse_prerequisites(loop=opts.loop)
    check_mountpoint(mountpoint, force=force)
    auth = auth_from(kw)
    opts.login_timeout = auth.timeout
    credentials, mutual = discovery_auth_from(kw, auth, fall_back=False)
    targets = discover(portal, initiator_name=auth.initiator_name,
                       credentials=credentials, mutual=mutual,
                       chap_algorithms=auth.chap_algorithms, timeout=auth.timeout)
    if only is not None:
        targets = [t for t in targets if t.name == only]
        if not targets:
            raise TargetNotFoundError(f"{portal} does not list {only} "
                                 f"(`iscsi-handoff discover {portal}` shows what it lists)")
    logins = mount_logins(portal, targets, auth, max_targets=max_targets)
    run_fuse(trial_login.usable(logins, timeout=auth.timeout), opts, force=force,
             daemon=daemon, pidfile=pidfile)


def _mount_where(args: tuple[str, ...], portal_text: str | None,
                 target_text: str | None) -> tuple[Portal, Path, str | None]:
    """`mount PORTAL MOUNTPOINT`, or `mount -p PORTAL [-T IQN] MOUNTPOINT` (iscsiadm's
    letters); a URL may carry the target."""
    from iscsi_handoff.options import resolve_where

    if len(args) != (1 if portal_text is not None else 2):
        raise ConfigError("give PORTAL MOUNTPOINT, or -p PORTAL MOUNTPOINT")
    where = resolve_where(tuple(args[:-1]), portal_text, target_text)
    if where.url_user is not None:
        raise ConfigError("mount takes CHAP users from --chap-user, not from a URL")
    assert where.portal is not None
    return where.portal, Path(args[-1]), where.target


def mount_logins(portal: Portal, targets: list[DiscoveredTarget], auth: Auth, *,
                 max_targets: int) -> list[tuple[Portal, LoginConfig]]:
    """One login per discovered target, at its first portal, with the TPGT it was listed
    with; refused past ``max_targets`` (each session costs memory and a connection)."""
    if not targets:
        raise ConfigError(f"{portal} lists no targets")
    if len(targets) > max_targets:
        raise ConfigError(f"{portal} lists {len(targets)} targets, more than --max-targets "
                          f"{max_targets}; raise --max-targets to mount them all")
    return [(t.portals[0], LoginConfig(initiator_name=auth.initiator_name,
                                       target_name=t.name, isid=new_isid(),
                                       credentials=auth.credentials, mutual=auth.mutual,
                                       chap_algorithms=auth.chap_algorithms,
                                       expected_tpgt=t.portals[0].tpgt,
                                       expected_tpgt_from="the SendTargets answer"))
            for t in targets]


@cli.command(epilog=EPILOG)
@click.option("--portal", type=PortalType(), default=None,
              help="Use this portal instead of starting a throwaway tgtd.")
@click.option("--target", "target_name", default=None, metavar="IQN",
              help="Target to log in to (default: the first one discovered).")
def demo(portal: Portal | None, target_name: str | None) -> None:
    """Show discovery and login end to end.

    With no --portal, starts a throwaway tgtd (Debian package tgt) on a free
    127.0.0.1 port with one 64 MiB LUN, and stops it afterwards. Needs root.
    """
    from iscsi_handoff.demo import run_demo

    if target_name is not None:
        validate_name(target_name)
    run_demo(portal, target_name)


def _unwrap(exc: BaseException) -> BaseException:
    """trio wraps errors from tasks in ExceptionGroups: find the one that matters."""
    while isinstance(exc, BaseExceptionGroup):
        mine = [e for e in exc.exceptions if isinstance(_unwrap(e), IscsiError)]
        others = [e for e in exc.exceptions if isinstance(_unwrap(e), KeyboardInterrupt)]
        picked = mine or others or list(exc.exceptions)
        if len(picked) != 1 and not mine:
            return exc
        exc = _unwrap(picked[0])
    return exc


def main() -> None:
    """Console entry point: run the CLI, turning our errors into one line each."""
    try:
        try:
            _run()
        except BaseExceptionGroup as group:
            inner = _unwrap(group)
            if inner is group:
                raise
            _run_handled(inner)
        sys.stdout.flush()
    except BrokenPipeError:
        quiet_pipe()


def quiet_pipe() -> None:
    """The reader went away (`... | head -1`): what it did not read is not an error."""
    import os

    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)  # the interpreter's last flush must not fail
    sys.exit(0)


def _run() -> None:
    try:
        cli.main(standalone_mode=False)
    except SystemExit as exc:
        # click answers EPIPE itself with a quiet exit 1 after wrapping stdout in its
        # PacifyFlushWrapper; 1 means a bug here: say 0.
        if exc.code == 1 and type(sys.stdout).__name__.endswith("PacifyFlushWrapper"):
            quiet_pipe()
        raise
    except click.exceptions.Abort:
        click.echo("iscsi-handoff: interrupted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        if json_mode() or "--json" in sys.argv[1:]:
            click.echo(error_json(exc.format_message(), exc.exit_code, "UsageError"), err=True)
        else:
            exc.show()
        sys.exit(exc.exit_code)
    except IscsiError as exc:
        _report(exc)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        click.echo("iscsi-handoff: interrupted", err=True)
        sys.exit(130)
    except (BaseExceptionGroup, BrokenPipeError):
        raise
    except Exception as exc:  # a bug: say so in one line; -v shows where
        _internal(exc)


def _report(exc: IscsiError) -> None:
    """One line with its next step (iscsi_handoff/hints.py), or JSON under --json."""
    from iscsi_handoff.hints import report_error

    report_error(exc)


def _internal(exc: BaseException) -> None:
    if log.isEnabledFor(logging.INFO):
        raise exc
    click.echo(f"iscsi-handoff: internal error: {type(exc).__name__}: {exc} "
               "(run with -v for a traceback)", err=True)
    sys.exit(EXIT_INTERNAL)


def _run_handled(exc: BaseException) -> None:
    """The same answers as _run gives, for an error that came out of a trio nursery."""
    if isinstance(exc, IscsiError):
        _report(exc)
        sys.exit(exc.exit_code)
    if isinstance(exc, KeyboardInterrupt):
        click.echo("iscsi-handoff: interrupted", err=True)
        sys.exit(130)
    if isinstance(exc, BrokenPipeError):
        raise exc
    _internal(exc)


from iscsi_handoff import cli_kernel, cli_trace, nodes_cli, trial_login  # noqa: E402  (doctor, session, trace, node)

cli_kernel.register(cli)
cli_trace.register(cli)
nodes_cli.register(cli)
add_common_options(cli)  # last: -v, --json, -p/-T on every command
