"""Serve the tree under trio; on SIGINT/SIGTERM/SIGHUP finish in-flight I/O, then unmount.

The stop, in order: ``hold`` (while it names a reason, such as a filesystem mounted on
one of the caller's loop devices, the tree keeps serving: pulling it out from under a
mounted filesystem would corrupt it; a second signal stops anyway), ``on_stop`` (the
caller detaches its loop devices while the daemon still answers), a short wait for
storage files to be closed (a detached loop device releases its file a moment later),
``pyfuse3.terminate()`` (no new requests are read; those being served finish), a
SYNCHRONIZE CACHE on every LUN written to, and the unmount, unless ``may_unmount`` says
the mount at the mount point is no longer ours (someone mounted over it: unmounting by
path would take theirs). A second signal skips the wait for open files; a third
abandons requests that are still waiting on the target.

pyfuse3 keeps one session per process: one ``serve`` at a time.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from pathlib import Path

import pyfuse3
import trio

from fallback_fuse.device import TargetInfo
from fallback_fuse.ops import Operations
from fallback_fuse.tree import Tree
from userland.errors import ConfigError, PathUnavailable

log = logging.getLogger("iscsi_handoff.fuse")

CLOSE_GRACE = 10.0  # seconds to wait for storage files to be closed after on_stop
MAX_TASKS = 128  # requests served at once; above any max_background we set
HOLD_POLL = 0.5  # seconds between looks at what holds the stop back
FINAL_SYNC_TIMEOUT = 30.0  # signals are no longer heard then: never hang on the way out


def mount_options(allow_other: bool) -> set[str]:
    """No writeback cache (pyfuse3 only asks for it when told): it would acknowledge
    bytes the target never got. The mount is its caller's alone unless allow_other."""
    options = set(pyfuse3.default_options) | {"fsname=iscsi-handoff", "subtype=iscsi"}
    if allow_other:
        options.add("allow_other")
    return options


class _StopRequests:
    """Signals and the caller's ``stop`` event, counted: each one asks for more force."""

    def __init__(self) -> None:
        self.count = 0
        self._lot = trio.lowlevel.ParkingLot()

    def request(self) -> None:
        self.count += 1
        self._lot.unpark_all()

    async def wait_beyond(self, count: int) -> None:
        while self.count <= count:
            await self._lot.park()


async def serve(mountpoint: str | os.PathLike[str], targets: Sequence[TargetInfo], *,
                allow_other: bool = False,
                on_ready: Callable[[Tree], Awaitable[None]] | None = None,
                on_stop: Callable[[], Awaitable[None]] | None = None,
                stop: trio.Event | None = None, direct_io: bool = True,
                max_tasks: int = MAX_TASKS, close_grace: float = CLOSE_GRACE,
                hold: Callable[[], str | None] | None = None,
                may_unmount: Callable[[], bool] | None = None) -> None:
    """Mount ``targets`` at ``mountpoint`` and serve them until told to stop.

    ``on_ready(tree)`` runs once mounted (attach loop devices, print paths);
    ``on_stop()`` runs first thing when stopping, once ``hold()`` returns None. Stop
    with SIGINT/SIGTERM/SIGHUP (when run in the main thread) or by setting ``stop``.
    ``direct_io=False`` lets the page cache serve the storage files (see ``ops``). The
    mount point is the caller's: it is neither created nor removed.
    """
    if not Path(mountpoint).is_dir():
        raise ConfigError(f"mount point {os.fspath(mountpoint)} is not a directory")
    tree = Tree(targets, private=allow_other)
    ops = Operations(tree, direct_io=direct_io)
    stops = _StopRequests()
    # Signals are caught before mounting: a SIGTERM right after must still unmount.
    with _signal_receiver() as signals:
        try:
            pyfuse3.init(ops, os.fspath(mountpoint), mount_options(allow_other))
        except RuntimeError as exc:
            raise PathUnavailable(f"cannot mount FUSE at {os.fspath(mountpoint)}: {exc} "
                                  "(is /dev/fuse there, and fusermount3 installed?)") from None
        try:
            await _serve_mounted(tree, ops, stops, signals, stop, on_ready, on_stop,
                                 max_tasks, close_grace, hold)
        finally:
            unmount = may_unmount is None or may_unmount()
            if not unmount:
                log.warning("another mount covers %s: leaving ours under it (umount %s "
                            "twice: theirs, then ours)", os.fspath(mountpoint),
                            os.fspath(mountpoint))
            pyfuse3.close(unmount=unmount)


async def _serve_mounted(tree: Tree, ops: Operations, stops: _StopRequests,
                         signals: AsyncIterator[int] | None, stop: trio.Event | None,
                         on_ready: Callable[[Tree], Awaitable[None]] | None,
                         on_stop: Callable[[], Awaitable[None]] | None,
                         max_tasks: int, close_grace: float,
                         hold: Callable[[], str | None] | None) -> None:
    serving = trio.CancelScope()
    stopped = False

    async def run_on_stop() -> None:
        nonlocal stopped
        if on_stop is not None and not stopped:
            stopped = True
            await on_stop()

    async def stopper() -> None:
        await stops.wait_beyond(0)
        said = None
        while hold is not None and stops.count == 1 and (reason := hold()) is not None:
            if reason != said:
                log.warning("not stopping yet: %s", reason)
                said = reason
            with trio.move_on_after(HOLD_POLL):
                await stops.wait_beyond(1)
        await run_on_stop()
        with trio.move_on_after(close_grace):
            while ops.open_storage and stops.count == 1:
                await trio.sleep(0.05)
        if ops.open_storage:
            log.warning("%d storage file(s) still open: their users will get errors",
                        ops.open_storage)
        pyfuse3.terminate()  # main() returns once the requests being served are done
        await stops.wait_beyond(stops.count)
        log.warning("abandoning requests still waiting on the target")
        serving.cancel()

    async with trio.open_nursery() as nursery:
        if signals is not None:
            nursery.start_soon(_signals_to, signals, stops)
        if stop is not None:
            nursery.start_soon(_event_to, stop, stops)
        nursery.start_soon(stopper)
        if on_ready is not None:
            nursery.start_soon(on_ready, tree)
        with serving:
            await pyfuse3.main(max_tasks=max_tasks)
        nursery.cancel_scope.cancel()
    if not serving.cancelled_caught:
        with trio.move_on_after(FINAL_SYNC_TIMEOUT) as scope:
            await _sync_written(tree)
        if scope.cancelled_caught:
            log.warning("final SYNCHRONIZE CACHE timed out")
    with trio.CancelScope(shield=True):
        try:
            await run_on_stop()  # unmounted from outside: still let the caller clean up
        except Exception:
            log.exception("on_stop failed")


async def forget_attributes(inodes: Sequence[int]) -> None:
    """Tell the kernel these nodes changed (a rescan resized a LUN or added one), so it
    asks again instead of answering from its attribute cache. No writeback cache is
    used, but pyfuse3 still says to call it from a thread."""
    for inode in inodes:
        try:
            await trio.to_thread.run_sync(pyfuse3.invalidate_inode, inode, True)
        except OSError as exc:  # ENOENT: the kernel had not cached it; nothing to forget
            log.debug("invalidate inode %d: %s", inode, exc)


async def _sync_written(tree: Tree) -> None:
    for storage in tree.storages:
        if storage.dirty:
            try:
                await storage.sync()
            except Exception as exc:
                log.warning("final SYNCHRONIZE CACHE failed: %s", exc)


async def _event_to(stop: trio.Event, stops: _StopRequests) -> None:
    await stop.wait()
    stops.request()


async def _signals_to(signals: AsyncIterator[int], stops: _StopRequests) -> None:
    async for signum in signals:
        log.warning("got %s: finishing I/O, then unmounting", signal.Signals(signum).name)
        stops.request()


@contextlib.contextmanager
def _signal_receiver() -> Iterator[AsyncIterator[int] | None]:
    """SIGINT/SIGTERM/SIGHUP (a closed terminal, a dropped ssh) as stop requests; only
    the main thread can catch them."""
    if threading.current_thread() is not threading.main_thread():
        yield None
        return
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as receiver:
        yield receiver
