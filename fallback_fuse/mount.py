"""Serve the tree under trio until SIGINT/SIGTERM, then finish in-flight I/O and unmount."""

from __future__ import annotations

import logging
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path

import pyfuse3
import trio

from fallback_fuse.device import TargetEntry
from fallback_fuse.ops import Operations
from fallback_fuse.tree import Tree

log = logging.getLogger("iscsi_handoff.fuse")

async def serve(mountpoint: Path, targets: list[TargetEntry], *, allow_other: bool = False,
                on_ready: Callable[[Tree], Awaitable[None]] | None = None,
                on_stop: Callable[[], Awaitable[None]] | None = None,
                stop: trio.Event | None = None) -> None:
    """Mount, call ``on_ready`` (loop attach, printing), serve until a signal or ``stop``.

    No writeback cache (it would acknowledge bytes the target never got); the mount
    belongs to its caller unless ``allow_other``.
    """
    tree = Tree(targets)
    ops = Operations(tree)
    options = set(pyfuse3.default_options) | {"fsname=iscsi-handoff", "subtype=iscsi"}
    if allow_other:
        options.add("allow_other")
    stop = stop or trio.Event()
    pyfuse3.init(ops, str(mountpoint), options)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_stopper, stop, on_stop, nursery.cancel_scope)
            if on_ready is not None:
                nursery.start_soon(on_ready, tree)
            # main() returns once terminate() is called; requests being served finish.
            await pyfuse3.main()
            nursery.cancel_scope.cancel()
    finally:
        pyfuse3.close(unmount=True)


async def _stopper(stop: trio.Event, on_stop: Callable[[], Awaitable[None]] | None,
                   scope: trio.CancelScope) -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_signals, stop)
        await stop.wait()
        nursery.cancel_scope.cancel()
    if on_stop is not None:
        await on_stop()
    pyfuse3.terminate()


async def _signals(stop: trio.Event) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            log.warning("got %s: finishing I/O, logging out, unmounting",
                        signal.Signals(signum).name)
            stop.set()
            return
