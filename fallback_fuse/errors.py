"""Device failures as the errno a FUSE reply carries."""

from __future__ import annotations

import errno
import logging

from userland.errors import IscsiError, ScsiError

log = logging.getLogger("iscsi_handoff.fuse")


def errno_of(exc: BaseException) -> int:
    """ScsiError and OSError carry their errno; any other failure is EIO.

    An exception we did not expect is logged with its traceback: it is a bug, but the
    daemon must live on (a dead daemon turns every open file into EIO at once).
    """
    if isinstance(exc, ScsiError) and exc.errno_value > 0:
        return exc.errno_value
    if isinstance(exc, OSError) and isinstance(exc.errno, int) and exc.errno > 0:
        return exc.errno
    if not isinstance(exc, IscsiError | OSError):
        log.error("unexpected error in a FUSE request", exc_info=exc)
    return errno.EIO
