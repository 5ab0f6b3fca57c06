"""A FUSE keeper's rescan, on SIGUSR2 (what `session rescan` sends): LUNs added or
resized on the target show up in the tree without a relogin.

Per session: REPORT LUNS again; each new disk LUN is probed and added as
``lun<N>/storage`` with its info files (and attached to a loop device with --loop);
each known LUN's capacity is read again, and a new size reaches the storage file (the
kernel is told to forget the cached size) and its loop device (`losetup -c`). A LUN
the target no longer reports is listed as removed but left in the tree (a filesystem
may be mounted on it): its I/O fails with the target's error. Commands go through
the session's ``execute``, under the same bounds as any I/O. Errors are logged and
recorded, never fatal: the keeper keeps serving. The record's ``details.rescans``
counts finished rescans and ``details.last_rescan`` says what changed; `session
rescan` waits for the count to move.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from fallback_fuse import loop as loopdev
from fallback_fuse.device import LunEntry, TargetEntry
from fallback_fuse.mount import forget_attributes
from fallback_fuse.tree import Tree, short_name
from iscsi_handoff import registry
from kernel_handoff.sysfs import by_path_name
from userland.lun import DISK, Lun, report_luns
from userland.runner import SessionRunner

log = logging.getLogger("iscsi_handoff.fuse")


@dataclass
class Served:
    """One session as the keeper serves it."""

    runner: SessionRunner
    entry: TargetEntry
    record_name: str


@dataclass
class Changes:
    added: list[dict[str, Any]] = field(default_factory=list)
    resized: list[dict[str, Any]] = field(default_factory=list)
    removed: list[int] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


async def rescan_on_signal(signals: AsyncIterator[int], served: list[Served], tree: Tree,
                           mountpoint: Path, loops: list[str] | None) -> None:
    """``loops``: with --loop, the keeper's loop devices (new ones are added to it, so
    the stop detaches them too); None without."""
    async for _ in signals:
        log.info("rescan requested")
        for session in served:
            await rescan_session(session, tree, mountpoint, loops)


async def rescan_session(session: Served, tree: Tree, mountpoint: Path,
                         loops: list[str] | None) -> Changes:
    changes = Changes()
    try:
        await _rescan(session, tree, mountpoint, loops, changes)
    except Exception as exc:  # the session is down, REPORT LUNS failed, ...
        changes.errors.append(str(exc))
    for error in changes.errors:
        log.warning("rescan of %s: %s", session.entry.targetname, error)
    try:
        _record(session.record_name, changes)
    except (OSError, ValueError) as exc:  # the run dir: the tree changed all the same
        log.warning("rescan of %s: cannot update the record: %s",
                    session.entry.targetname, exc)
    return changes


async def _rescan(session: Served, tree: Tree, mountpoint: Path, loops: list[str] | None,
                  changes: Changes) -> None:
    entry = session.entry
    folder = mountpoint / entry.hostname / short_name(entry.targetname)
    record = registry.read(session.record_name)
    luns: dict[str, dict[str, Any]] = dict(record.details.get("luns", {})) if record else {}
    numbers = await report_luns(session.runner)
    known = {lun.number: lun for lun in entry.luns}
    for lun in list(entry.luns):
        if lun.number not in numbers:
            changes.removed.append(lun.number)
            continue
        try:
            await _resize(lun, tree, luns.get(str(lun.number), {}), changes)
        except Exception as exc:
            changes.errors.append(f"LUN {lun.number}: {exc}")
    for number in numbers:
        if number in known:
            continue
        try:
            await _add(session, number, tree, folder, loops, luns, changes)
        except Exception as exc:
            changes.errors.append(f"LUN {number}: {exc}")


async def _resize(lun: LunEntry, tree: Tree, shown: dict[str, Any],
                  changes: Changes) -> None:
    device = lun.device
    if not isinstance(device, Lun):
        return
    was = device.num_blocks * device.block_size
    size = await device.read_capacity()
    node = tree.storage_node(device)
    if size == was or node is None or node.storage is None:
        return
    node.storage.resize()
    await forget_attributes([node.inode])
    change: dict[str, Any] = {"lun": lun.number, "was_bytes": was, "size_bytes": size}
    storage = shown.get("storage")
    if storage:
        # A stat makes the kernel take the new size (the loop driver reads the inode's).
        await trio.to_thread.run_sync(os.stat, storage)
    if shown.get("loop"):
        await loopdev.refresh_capacity(shown["loop"])
        change["loop"] = shown["loop"]
    shown["size_bytes"] = size
    changes.resized.append(change)
    log.info("LUN %d: %d -> %d bytes", lun.number, was, size)


async def _add(session: Served, number: int, tree: Tree, folder: Path, loops: list[str] | None,
               luns: dict[str, dict[str, Any]], changes: Changes) -> None:
    lun = Lun(session.runner, number)
    await lun.probe()
    if lun.info.device_type != DISK:
        return
    entry = session.entry
    new = LunEntry(number, lun, lun.info.vendor, lun.info.product, lun.info.version,
                   lun.info.serial)
    folder_inode, _node = tree.add_lun(entry, new)
    entry.luns.append(new)
    await forget_attributes([folder_inode])  # its link count and entries changed
    storage = folder / f"lun{number}" / "storage"
    size = lun.num_blocks * lun.block_size
    shown: dict[str, Any] = {"storage": str(storage), "size_bytes": size,
                             "read_only": lun.read_only}
    luns[str(number)] = shown
    added: dict[str, Any] = {"lun": number, **shown}
    changes.added.append(added)
    log.info("LUN %d added: %s (%d bytes)", number, storage, size)
    if loops is not None:
        device = await loopdev.attach(storage, read_only=lun.read_only,
                                      sector_size=lun.block_size)
        loops.append(device)
        shown["loop"] = added["loop"] = device


def _record(name: str, changes: Changes) -> None:
    record = registry.read(name)
    if record is None:
        return
    luns = {**record.details.get("luns", {})}
    storage = list(record.storage)
    loops = list(record.loops)
    by_path = list(record.by_path)
    host, port = _address(record.portal_connected)
    for added in changes.added:
        luns[str(added["lun"])] = {k: v for k, v in added.items() if k != "lun"}
        storage.append(added["storage"])
        if added.get("loop"):
            loops.append(added["loop"])
        if host:
            by_path.append(by_path_name(host, port, record.target, added["lun"]))
    for resized in changes.resized:
        shown = luns.get(str(resized["lun"]))
        if shown is not None:
            luns[str(resized["lun"])] = {**shown, "size_bytes": resized["size_bytes"]}
    last = {"at": time.time(), "added": changes.added, "resized": changes.resized,
            "removed": changes.removed, "errors": changes.errors}
    registry.update(name, storage=tuple(storage), loops=tuple(loops), by_path=tuple(by_path),
                    details={"luns": luns, "rescans": record.details.get("rescans", 0) + 1,
                             "last_rescan": last})


def _address(connected: str) -> tuple[str, int]:
    """host and port from "address:port" or "[v6]:port" ("" when unknown)."""
    address, _, port = connected.rpartition(":")
    if not address or not port.isdigit():
        return "", 0
    return address.strip("[]"), int(port)
