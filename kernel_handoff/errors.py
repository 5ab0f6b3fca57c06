"""Errors of the kernel path, in the userland/errors.py tree.

The kernel answers a refused NETLINK_ISCSI request with -errno; the error names the
request and says the errno in words, in one line, and keeps the number for callers
that tolerate some (ENOSYS from an optional SET_PARAM, EINVAL from a gone session).
"""

from __future__ import annotations

import errno as errno_mod
import os

from userland.errors import EXIT_IO, IscsiError, PathUnavailable


def errno_text(value: int) -> str:
    name = errno_mod.errorcode.get(value, f"errno {value}")
    return f"{os.strerror(value)} ({name})"


class KernelUnavailable(PathUnavailable):
    """No NETLINK_ISCSI (no scsi_transport_iscsi), or no iscsi_tcp transport."""


class KernelIscsiError(IscsiError):
    """The kernel refused a NETLINK_ISCSI request (IF_ERROR, or a negative retcode)."""

    exit_code = EXIT_IO

    def __init__(self, request: str, errno_value: int, detail: str = "") -> None:
        self.request = request
        self.errno = errno_value
        hint = ""
        if errno_value == errno_mod.EPERM:
            hint = "; NETLINK_ISCSI requests need root (CAP_SYS_ADMIN)"
        extra = f"; {detail}" if detail else ""
        super().__init__(f"kernel refused {request}: {errno_text(errno_value)}{hint}{extra}")


class NetlinkTimeout(KernelIscsiError):
    """The kernel did not answer a request in time."""

    def __init__(self, request: str, timeout: float) -> None:
        self.timeout = timeout
        IscsiError.__init__(self, f"no answer from the kernel to {request} within "
                                  f"{timeout:g} s")
        self.request = request
        self.errno = errno_mod.ETIMEDOUT


class HandoffError(IscsiError):
    """The handoff went wrong after the kernel accepted the requests (no disks, ...)."""

    exit_code = EXIT_IO
