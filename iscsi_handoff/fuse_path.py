"""The FUSE fallback: userland sessions carry the data, each disk LUN a file in a tree.

One session per target (all under one trio loop with pyfuse3), every disk LUN probed,
then the tree is served until SIGINT/SIGTERM; with ``loop`` each target's storage file
is attached with `losetup --direct-io=on` and detached again on the way out. A signal
during login and probe ends them at once (sessions closed, nothing mounted, exit 130).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import click
import trio

from fallback_fuse import loop as loopdev
from fallback_fuse.device import LunEntry, TargetEntry
from fallback_fuse.mount import serve
from fallback_fuse.tree import Tree, short_name
from iscsi_handoff.datapath import FuseOptions
from userland.errors import ConfigError, PathUnavailable
from userland.login.machine import LoginConfig
from userland.lun import DISK, Lun, report_luns
from userland.portal import Portal
from userland.runner import SessionRunner

log = logging.getLogger("iscsi_handoff.fuse")


@dataclass
class Mounted:
    """What a running mount shows, for the printout and for tests."""

    storage_paths: list[Path] = field(default_factory=list)
    loops: list[str] = field(default_factory=list)


def check_fuse_available() -> None:
    if not os.path.exists("/dev/fuse"):
        raise PathUnavailable("FUSE is unavailable: /dev/fuse is missing (modprobe fuse, or "
                              "run the container with --device /dev/fuse)")


async def _open_target(nursery: trio.Nursery, portal: Portal, config: LoginConfig,
                       opts: FuseOptions, runners: list[SessionRunner]) -> TargetEntry:
    # The probe obeys the session's bounds (userland.policy) like any later I/O.
    runner = SessionRunner(portal, config, queue_depth=opts.queue_depth,
                           replacement_timeout=opts.replacement_timeout,
                           login_timeout=opts.login_timeout)
    runners.append(runner)
    await runner.start(nursery)
    assert config.target_name is not None
    ip = portal.host
    with contextlib.suppress(OSError, AttributeError):  # the connection may be gone already
        ip = str(runner.transport.sock.getpeername()[0])  # type: ignore[union-attr]
    entry = TargetEntry(hostname=portal.host, ip=ip, targetname=config.target_name)
    for number in await report_luns(runner):
        lun = Lun(runner, number)
        await lun.probe()
        if lun.info.device_type != DISK:
            continue  # tgt's LUN 0 is a controller, for one
        entry.luns.append(LunEntry(number, lun, lun.info.vendor, lun.info.product,
                                   lun.info.version, lun.info.serial))
    if not entry.luns:
        log.warning("%s has no disk LUNs", config.target_name)
    return entry


@contextlib.contextmanager
def _early_signals() -> Iterator[AsyncIterator[int] | None]:
    """SIGINT/SIGTERM from the first moment of the trio loop (only the main thread)."""
    if threading.current_thread() is not threading.main_thread():
        yield None
        return
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as receiver:
        yield receiver


async def _watch_signals(signals: AsyncIterator[int], probing: trio.CancelScope,
                         stop: trio.Event) -> None:
    """Before the mount: cancel the login and probe. After: ``serve`` hears signals
    itself, and one that slips in between still stops it through ``stop``."""
    async for signum in signals:
        log.warning("got %s before serving: logging out", signal.Signals(signum).name)
        probing.cancel()
        stop.set()


async def _forward(source: trio.Event, stop: trio.Event) -> None:
    await source.wait()
    stop.set()


async def run_fuse(logins: list[tuple[Portal, LoginConfig]], opts: FuseOptions,
                   mounted: Mounted | None = None, *, stop: trio.Event | None = None) -> None:
    check_fuse_available()
    if not opts.mountpoint.is_dir():
        raise ConfigError(f"mount point {opts.mountpoint} is not a directory")
    mounted = mounted if mounted is not None else Mounted()
    runners: list[SessionRunner] = []
    stopping_event = trio.Event()
    probing = trio.CancelScope()
    with _early_signals() as signals:
        async with trio.open_nursery() as nursery:
            if signals is not None:
                nursery.start_soon(_watch_signals, signals, probing, stopping_event)
            if stop is not None:
                nursery.start_soon(_forward, stop, stopping_event)
            try:
                entries = []
                with probing:
                    for portal, config in logins:
                        entries.append(await _open_target(nursery, portal, config, opts,
                                                          runners))
                if not probing.cancelled_caught:
                    await _serve_tree(entries, opts, mounted, stopping_event)
            finally:
                with trio.CancelScope(shield=True):
                    for runner in runners:
                        await runner.close()
                nursery.cancel_scope.cancel()
    if probing.cancelled_caught:
        raise KeyboardInterrupt  # the CLI's "interrupted", exit 130
    click.echo(f"unmounted {opts.mountpoint}; logged out")


async def _serve_tree(entries: list[TargetEntry], opts: FuseOptions, mounted: Mounted,
                      stop: trio.Event) -> None:
    async def ready(tree: Tree) -> None:
        await _announce(entries, opts, mounted)

    async def stopping() -> None:
        for device in reversed(mounted.loops):
            with contextlib.suppress(OSError):
                await loopdev.detach(device)
                click.echo(f"detached {device}")

    await serve(opts.mountpoint, entries, allow_other=opts.allow_other,
                on_ready=ready, on_stop=stopping, stop=stop)


async def _announce(entries: list[TargetEntry], opts: FuseOptions, mounted: Mounted) -> None:
    for entry in entries:
        folder = opts.mountpoint / entry.hostname / short_name(entry.targetname)
        if not entry.luns:
            continue
        storage = folder / "storage"
        mounted.storage_paths.append(storage)
        first = entry.luns[0]
        size = first.device.num_blocks * first.device.block_size
        click.echo(f"{entry.targetname}: {storage} (LUN {first.number}, {_size(size)}"
                   f"{', read-only' if first.device.read_only else ''})")
        for lun in entry.luns[1:]:
            click.echo(f"  LUN {lun.number}: {folder / f'lun{lun.number}' / 'storage'}")
        if opts.loop:
            device = await loopdev.attach(storage, read_only=first.device.read_only,
                                          sector_size=first.device.block_size)
            mounted.loops.append(device)
            depth = loopdev.raise_max_background(opts.mountpoint, opts.queue_depth)
            click.echo(f"  {device} -> {storage} (direct I/O, {depth} requests in flight)")
    click.echo("serving; Ctrl-C or SIGTERM to finish I/O, log out and unmount")
    from iscsi_handoff.output import emit_ready  # --json's ready line, READY=1 for systemd

    emit_ready({"path": "fuse", "pid": os.getpid(), "mountpoint": str(opts.mountpoint),
                "targets": [{"target": e.targetname, "host": e.hostname, "ip": e.ip,
                             "luns": [lun.number for lun in e.luns]} for e in entries],
                "storage": [str(p) for p in mounted.storage_paths], "loops": mounted.loops})


def _size(n: int) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift:
            return f"{n / (1 << shift):.1f} {unit}"
    return f"{n} B"
