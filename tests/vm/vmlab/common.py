"""Paths and the error type shared by the lab's modules."""

from __future__ import annotations

import contextlib
import fcntl
from collections.abc import Callable, Iterator
from pathlib import Path

from userland.errors import EXIT_UNAVAILABLE, IscsiError

REPO = Path(__file__).resolve().parents[3]
CACHE = REPO / ".cache" / "vm"  # git-ignored, like every downloaded or built artifact

Log = Callable[[str], None]  # shows one line of progress (print, or a test's reporter)


class LabError(IscsiError):
    """The lab cannot prepare or boot the guest: a missing tool, package or file."""

    exit_code = EXIT_UNAVAILABLE


@contextlib.contextmanager
def cache_lock(cache: Path = CACHE) -> Iterator[None]:
    """Serialise cache updates between lab runs (several helpers may boot at once)."""
    cache.mkdir(parents=True, exist_ok=True)
    with (cache / "lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
