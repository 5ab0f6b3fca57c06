"""`logout` for FUSE sessions: signal a live keeper and check it cleaned up; clean what
a dead keeper left (its dead mount, loop devices backed by it), only what the record
says is ours and reality confirms.

A loop device something still uses (a filesystem mounted on it) is never pulled out:
the session stays and the error names the mount point to unmount first.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from iscsi_handoff import registry, sysstate
from userland.errors import ConfigError, IscsiError

POLL = 0.1


@dataclass
class FuseLogoutResult:
    session: str
    target: str
    how: str  # "owner" (signalled), "cleaned" (leftovers removed), "busy"
    detail: str
    path: str = "fuse"


class LoopBusy(ConfigError):
    """A loop device of the session is in use: unmount it first (exit 2)."""


def select(entries: list[registry.Entry], *, target: str | None, session: str | None,
           every: bool) -> list[registry.Entry]:
    fuse = [e for e in entries if e.record.path == "fuse"]
    if every:
        return fuse
    if session is not None:
        return [e for e in fuse if e.record.session_id.lower() == session.lower()]
    return [e for e in fuse if e.record.target == target]


def _busy(record: registry.Record) -> str | None:
    for device in registry.our_loops(record):
        held = sysstate.loop_holders(device)
        if held:
            return (f"{device} is in use ({', '.join(held)}): unmount that first, then "
                    "log out again")
    return None


def logout_one(entry: registry.Entry, *, timeout: float, chosen: set[str]) -> FuseLogoutResult:
    """End one FUSE session: its keeper if alive, else what it left."""
    r = entry.record
    busy = _busy(r)
    if busy is not None:
        raise LoopBusy(f"session {r.session_id} ({r.target}): {busy}")
    if entry.state == registry.LIVE:
        shared = [e.record.session_id for e in registry.entries()
                  if e.record.pid == r.pid and e.record.session_id not in chosen]
        if shared:
            raise ConfigError(f"session {r.session_id} shares its keeper, pid {r.pid}, with "
                              f"session {', '.join(shared)} (one `mount`): log them out "
                              "together (--all, or each with --session)")
        _signal_and_wait(r, timeout)
        left = clean(r)
        how = "logged out by its keeper" + (f"; then cleaned: {', '.join(left)}" if left
                                            else "")
        return FuseLogoutResult(r.session_id, r.target, "owner", f"{how}, pid {r.pid}")
    left = clean(r)
    return FuseLogoutResult(r.session_id, r.target, "cleaned",
                            f"its keeper, pid {r.pid}, was gone; cleaned: "
                            f"{', '.join(left) or 'nothing left'}")


def _signal_and_wait(r: registry.Record, timeout: float) -> None:
    try:
        os.kill(r.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not registry.owner_alive(r):
            return
        time.sleep(POLL)
    raise IscsiError(f"session {r.session_id}: its keeper, pid {r.pid}, did not log out "
                     f"within {timeout:g} s (its log says why; SIGKILL it, then "
                     "`iscsi-handoff logout --all` cleans up)")


def clean(r: registry.Record) -> list[str]:
    """Remove what a gone keeper left: loop devices (ours, unused), then our mount (only
    if it is the one on top at that path), then the folder we made; then the record."""
    done: list[str] = []
    for device in registry.our_loops(r):
        held = sysstate.loop_holders(device)
        if held:
            raise LoopBusy(f"session {r.session_id}: {device} is in use ({', '.join(held)}):"
                           " unmount that first, then `iscsi-handoff logout --all` again")
        _run(["losetup", "-d", device], f"detach {device}")
        _wait(partial(_detached, device), f"{device} did not let go of its file")
        done.append(f"detached {device}")
    mine = registry.our_mount(r)
    if mine is not None and r.mountpoint is not None:
        top = sysstate.top_mount(r.mountpoint)
        if top is None or top.mount_id != mine.mount_id:
            raise IscsiError(f"session {r.session_id}: another mount covers ours at "
                             f"{r.mountpoint}: unmount that one first")
        _unmount(r.mountpoint)
        done.append(f"unmounted {r.mountpoint}")
    if r.made_mountpoint and r.mountpoint is not None and not os.path.ismount(r.mountpoint):
        with contextlib.suppress(OSError):
            os.rmdir(r.mountpoint)  # only while empty
    if r.pidfile is not None and not registry.owner_alive(r):
        with contextlib.suppress(OSError, ValueError):
            if int(Path(r.pidfile).read_text().strip()) == r.pid:
                os.unlink(r.pidfile)  # still naming the dead keeper: nobody else's
    registry.remove(r.name, pid=r.pid)
    return done


def _unmount(path: str) -> None:
    """A dead FUSE mount answers ENOTCONN to everything: a lazy unmount takes it off."""
    if os.geteuid() == 0:
        _run(["umount", "-l", path], f"unmount {path}")
    else:
        _run(["fusermount3", "-u", "-z", path], f"unmount {path}")


def _run(args: list[str], what: str) -> None:
    try:
        done = subprocess.run(args, capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise IscsiError(f"cannot {what}: {exc}") from None
    if done.returncode != 0:
        raise IscsiError(f"cannot {what}: {done.stderr.strip() or done.returncode}")


def _detached(device: str) -> bool:
    return sysstate.loop_backing_file(device) is None


def _wait(ok: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not ok():
        if time.monotonic() > deadline:
            raise IscsiError(what)
        time.sleep(POLL)
