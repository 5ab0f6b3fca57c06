"""The FUSE fallback: userland sessions carry the data, each disk LUN a file in a tree.

One session per target (all under one trio loop with pyfuse3), every disk LUN probed,
then the tree is served until SIGINT/SIGTERM/SIGHUP (SIGUSR2 rescans: see
fuse_rescan); with ``loop`` every disk LUN's
storage file is attached with `losetup --direct-io=on` and detached again on the way
out. A signal during login and probe ends them at once (sessions closed, nothing
mounted, exit 130). Each session has a record in the registry from before its login (a
claim that refuses a duplicate) until after the unmount; `session list` and `logout`
read it.
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
from typing import Any

import click
import trio

from fallback_fuse import loop as loopdev
from fallback_fuse.device import LunEntry, TargetEntry
from fallback_fuse.mount import serve
from fallback_fuse.tree import Tree, short_name
from iscsi_handoff import registry, sysstate
from iscsi_handoff.datapath import FuseOptions
from iscsi_handoff.fuse_rescan import Served, rescan_on_signal
from iscsi_handoff.kernel_owners import Detached, remove_pidfile, write_pidfile
from iscsi_handoff.login_path import check_mountpoint
from iscsi_handoff.output import PARAM_KEYS
from kernel_handoff.sysfs import by_path_name
from userland.errors import PathUnavailable
from userland.login.machine import LoginConfig, LoginResult
from userland.lun import DISK, Lun, report_luns
from userland.portal import Portal
from userland.runner import SessionRunner

log = logging.getLogger("iscsi_handoff.fuse")

DETAILS_REFRESH = 5.0  # seconds between updates of the recovery count in the records


@dataclass
class Mounted:
    """What a running mount shows, for the printout and for tests."""

    storage_paths: list[Path] = field(default_factory=list)
    loops: list[str] = field(default_factory=list)


@dataclass
class Keep:
    """How the keeper runs: duplicates allowed, detached, pidfile, its own folder."""

    force: bool = False
    detached: Detached | None = None
    pidfile: Path | None = None
    made_mountpoint: bool = False  # we created the folder: remove it when done


def check_fuse_available() -> None:
    if not os.path.exists("/dev/fuse"):
        raise PathUnavailable("FUSE is unavailable: /dev/fuse is missing (modprobe fuse, or "
                              "run the container with --device /dev/fuse)")


def _claim(logins: list[tuple[Portal, LoginConfig]], opts: FuseOptions,
           keep: Keep) -> list[registry.Record]:
    """A record per session before its login: a second login to the same target and
    portal from the same initiator name is refused from here on."""
    mountpoint = os.path.realpath(opts.mountpoint)
    claimed: list[registry.Record] = []
    try:
        for portal, config in logins:
            assert config.target_name is not None
            auth: dict[str, Any] = {"method": None, "user": None, "mutual_user": None}
            if config.credentials is not None:
                auth["user"] = config.credentials.user
            if config.mutual is not None:
                auth["mutual_user"] = config.mutual.user
            record = registry.new_record(
                "fuse", target=config.target_name, portal=str(portal),
                isid=config.isid.hex(), initiator_name=config.initiator_name,
                mountpoint=mountpoint, made_mountpoint=keep.made_mountpoint,
                pidfile=str(keep.pidfile) if keep.pidfile is not None else None,
                details={"auth": auth,
                         "timeouts": {"replacement": opts.replacement_timeout,
                                      "login": opts.login_timeout},
                         "queue_depth": opts.queue_depth, "recoveries": 0,
                         "rescans": 0})
            claimed.append(registry.claim(record, force=keep.force))
    except BaseException:
        for record in claimed:
            registry.remove(record.name, pid=os.getpid())
        raise
    return claimed


async def _open_target(nursery: trio.Nursery, portal: Portal, config: LoginConfig,
                       opts: FuseOptions, runners: list[SessionRunner],
                       ) -> tuple[SessionRunner, TargetEntry, LoginResult]:
    # The probe obeys the session's bounds (userland.policy) like any later I/O.
    runner = SessionRunner(portal, config, queue_depth=opts.queue_depth,
                           replacement_timeout=opts.replacement_timeout,
                           login_timeout=opts.login_timeout)
    runners.append(runner)  # closed by the caller even if the login is cancelled
    result = await runner.start(nursery)
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
    return runner, entry, result


def _logged_in(record: registry.Record, runner: SessionRunner, entry: TargetEntry,
               result: LoginResult) -> registry.Record:
    """The claim, now with what the login negotiated."""
    assert runner.transport is not None
    address, port = runner.transport.sock.getpeername()[:2]
    connected = f"[{address}]:{port}" if ":" in str(address) else f"{address}:{port}"
    neg = result.negotiated
    params = {key: getattr(neg, attr) for key, attr in PARAM_KEYS}
    auth = {**record.details.get("auth", {}), "method": result.auth_method}
    names = tuple(by_path_name(str(address), int(port), entry.targetname, lun.number)
                  for lun in entry.luns)
    return registry.update(record.name, portal_connected=connected, tsih=result.tsih,
                           by_path=names,
                           details={"parameters": params, "auth": auth}) or record


def _holders(loops: list[str]) -> str | None:
    """Why the tree must not go yet: a loop device of ours that something still uses."""
    for device in loops:
        held = sysstate.loop_holders(device)
        if held:
            return (f"{device} is in use ({', '.join(held)}): unmount it and this session "
                    "ends (a second signal ends it anyway, and that filesystem then gets "
                    "I/O errors)")
    return None


@contextlib.contextmanager
def _early_signals(*signums: int) -> Iterator[AsyncIterator[int] | None]:
    """Signals caught from the first moment of the trio loop (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield None
        return
    with trio.open_signal_receiver(*signums) as receiver:
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
                   mounted: Mounted | None = None, *, stop: trio.Event | None = None,
                   keep: Keep | None = None) -> None:
    keep = keep if keep is not None else Keep()
    check_fuse_available()
    check_mountpoint(opts.mountpoint, force=keep.force)
    mounted = mounted if mounted is not None else Mounted()
    records = _claim(logins, opts, keep)
    mountpoint = os.path.realpath(opts.mountpoint)
    runners: list[SessionRunner] = []
    mount_id: int | None = None
    stopping_event = trio.Event()
    probing = trio.CancelScope()
    try:
        # SIGUSR2 would kill the keeper by default: caught (and held) from the start.
        with (_early_signals(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals,
              _early_signals(signal.SIGUSR2) as rescans):
            async with trio.open_nursery() as nursery:
                if signals is not None:
                    nursery.start_soon(_watch_signals, signals, probing, stopping_event)
                if stop is not None:
                    nursery.start_soon(_forward, stop, stopping_event)
                try:
                    entries = []
                    with probing:
                        for (portal, config), record in zip(logins, records, strict=True):
                            runner, entry, result = await _open_target(
                                nursery, portal, config, opts, runners)
                            entries.append(entry)
                            records[len(entries) - 1] = _logged_in(record, runner, entry,
                                                                   result)
                    if not probing.cancelled_caught:

                        async def ready(tree: Tree) -> None:
                            nonlocal mount_id
                            top = sysstate.top_mount(mountpoint)
                            mount_id = top.mount_id if top is not None else None
                            try:
                                await _announce(entries, opts, mounted, records, mount_id)
                            except BaseException:  # a losetup failed: give back those attached
                                with trio.CancelScope(shield=True):
                                    await stopping()
                                raise
                            if keep.pidfile is not None:
                                write_pidfile(keep.pidfile)
                            if keep.detached is not None:
                                keep.detached.ready()
                            log.info("serving %s at %s", ", ".join(r.target for r in records),
                                     mountpoint)
                            served = [Served(runner, entry, record.name) for runner, entry,
                                      record in zip(runners, entries, records, strict=True)]
                            async with trio.open_nursery() as tasks:
                                if rescans is not None:
                                    tasks.start_soon(rescan_on_signal, rescans, served, tree,
                                                     opts.mountpoint,
                                                     mounted.loops if opts.loop else None)
                                tasks.start_soon(_refresh_details, runners, records)

                        async def stopping() -> None:
                            for device in reversed(list(mounted.loops)):
                                try:
                                    await loopdev.detach(device)
                                except loopdev.LoopError as exc:
                                    log.warning("%s", exc)
                                else:
                                    mounted.loops.remove(device)
                                    _say(f"detached {device}")
                            for record in records:
                                now = registry.read(record.name) or record  # rescans add
                                registry.update(record.name, loops=tuple(
                                    d for d in now.loops
                                    if loopdev.backing_file(d) is not None))

                        def ours() -> bool:
                            top = sysstate.top_mount(mountpoint)
                            return top is not None and (mount_id is None
                                                        or top.mount_id == mount_id)

                        await serve(opts.mountpoint, entries, allow_other=opts.allow_other,
                                    on_ready=ready, on_stop=stopping, stop=stopping_event,
                                    hold=lambda: _holders(mounted.loops), may_unmount=ours)
                finally:
                    with trio.CancelScope(shield=True):
                        for runner in runners:
                            await runner.close()
                    nursery.cancel_scope.cancel()
        if probing.cancelled_caught:
            raise KeyboardInterrupt  # the CLI's "interrupted", exit 130
    finally:
        for record in records:
            registry.remove(record.name, pid=os.getpid())
        if keep.made_mountpoint and not os.path.ismount(mountpoint):
            with contextlib.suppress(OSError):
                os.rmdir(mountpoint)  # only while empty: never anything of anyone's
        if keep.pidfile is not None:
            remove_pidfile(keep.pidfile)
    _say(f"unmounted {opts.mountpoint}; logged out")
    log.info("unmounted %s; logged out", opts.mountpoint)


async def _announce(entries: list[TargetEntry], opts: FuseOptions, mounted: Mounted,
                    records: list[registry.Record], mount_id: int | None) -> None:
    """Print each storage file (and loop device), and put them in the records."""
    for index, entry in enumerate(entries):
        folder = opts.mountpoint / entry.hostname / short_name(entry.targetname)
        storages: list[str] = []
        loops: list[str] = []
        lun_map: dict[str, dict[str, Any]] = {}
        for i, lun in enumerate(entry.luns):
            storage = folder / "storage" if i == 0 else folder / f"lun{lun.number}" / "storage"
            mounted.storage_paths.append(storage)
            storages.append(str(storage))
            size = lun.device.num_blocks * lun.device.block_size
            ro = ", read-only" if lun.device.read_only else ""
            if i == 0:
                _say(f"{entry.targetname}: {storage} (LUN {lun.number}, {_size(size)}"
                           f"{ro})")
            else:
                _say(f"  LUN {lun.number}: {storage} ({_size(size)}{ro})")
            lun_map[str(lun.number)] = {"storage": str(storage), "size_bytes": size,
                                        "read_only": lun.device.read_only}
            if opts.loop:
                device = await loopdev.attach(storage, read_only=lun.device.read_only,
                                              sector_size=lun.device.block_size)
                mounted.loops.append(device)
                loops.append(device)
                lun_map[str(lun.number)]["loop"] = device
                registry.update(records[index].name, loops=tuple(loops))
                depth = loopdev.raise_max_background(opts.mountpoint, opts.queue_depth)
                _say(f"  {device} -> {storage} (direct I/O, {depth} requests in flight)")
        if not entry.luns:
            _say(f"{entry.targetname}: no disk LUNs")
        records[index] = registry.update(
            records[index].name, storage=tuple(storages), loops=tuple(loops),
            mount_id=mount_id, ready=True, details={"luns": lun_map}) or records[index]
    _say("serving; Ctrl-C, SIGTERM or `iscsi-handoff logout` to finish I/O, log out "
               "and unmount")
    from iscsi_handoff.output import emit_ready  # --json's ready line, READY=1 for systemd

    emit_ready({"path": "fuse", "pid": os.getpid(), "mountpoint": str(opts.mountpoint),
                "targets": [{"target": e.targetname, "host": e.hostname, "ip": e.ip,
                             "luns": [lun.number for lun in e.luns]} for e in entries],
                "storage": [str(p) for p in mounted.storage_paths], "loops": mounted.loops})


async def _refresh_details(runners: list[SessionRunner],
                           records: list[registry.Record]) -> None:
    """Keep each record's recovery count current for `session list -P 2`."""
    seen = [0] * len(runners)
    while True:
        await trio.sleep(DETAILS_REFRESH)
        for i, runner in enumerate(runners):
            if runner.recoveries != seen[i]:
                seen[i] = runner.recoveries
                registry.update(records[i].name, details={"recoveries": runner.recoveries})


def _say(text: str) -> None:
    """A line for people: on stdout, or stderr under --json (stdout then carries only
    the JSON ready object, for scripts)."""
    from iscsi_handoff.output import json_mode

    click.echo(text, err=json_mode())


def _size(n: int) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift:
            return f"{n / (1 << shift):.1f} {unit}"
    return f"{n} B"
