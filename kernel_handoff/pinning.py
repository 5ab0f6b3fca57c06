"""What a keeper asks of the kernel before it may be needed while its own disk is frozen
(as iscsid does, usr/iscsid.c): its memory locked in RAM, so a relogin never waits on a
page-in from a disk that is waiting on the relogin; and PR_SET_IO_FLUSHER, so the
memory it allocates meanwhile is never reclaimed by writing to such a disk.

Each returns None when done, else one line saying why not: a keeper without them
still works, as it did before, only less safely under memory pressure.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import threading

MCL_CURRENT = 1
MCL_FUTURE = 2
PR_SET_IO_FLUSHER = 57
# MCL_FUTURE pins every later mapping whole, a thread's stack too: the default 8 MiB
# stacks of the keeper's recovery, rescan and uevent threads locked ~270 MB per keeper
# in the guest. Its threads run shallow code: 1 MiB each is plenty.
THREAD_STACK = 1 << 20
# Nor does each thread need a malloc arena of its own (64 MiB of address space each,
# all of it locked under MCL_FUTURE): the main one will do.
M_ARENA_MAX = -8


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def _failure(what: str) -> str:
    err = ctypes.get_errno()
    return f"{what} failed: {os.strerror(err)}"


def lock_memory() -> str | None:
    """mlockall(MCL_CURRENT | MCL_FUTURE), threads made from now on with small stacks."""
    threading.stack_size(THREAD_STACK)
    _libc().mallopt(M_ARENA_MAX, 1)
    if _libc().mlockall(MCL_CURRENT | MCL_FUTURE) != 0:
        return _failure("mlockall") + " (needs CAP_IPC_LOCK or RLIMIT_MEMLOCK)"
    return None


def set_io_flusher() -> str | None:
    """prctl(PR_SET_IO_FLUSHER, 1): allocations behave as GFP_NOIO (Linux 5.6+)."""
    if _libc().prctl(PR_SET_IO_FLUSHER, 1, 0, 0, 0) != 0:
        return _failure("prctl(PR_SET_IO_FLUSHER)") + " (needs CAP_SYS_RESOURCE, Linux 5.6+)"
    return None
