"""systemd's readiness protocol (sd_notify(3)) without libsystemd: one datagram of
"KEY=value" lines to the AF_UNIX socket named by $NOTIFY_SOCKET ("@" = abstract).

A keeper run by the unit (Type=notify) says READY=1 once its disks exist, so units
ordered after it find them; outside systemd (no $NOTIFY_SOCKET) nothing is sent.
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger("iscsi_handoff.kernel")


def notify(*fields: str) -> bool:
    """Send ``fields`` ("READY=1", "STATUS=...") to systemd; False when not under it."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return False
    address = "\0" + path[1:] if path.startswith("@") else path
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.sendto("\n".join(fields).encode(), address)
    except OSError as exc:
        log.warning("cannot notify systemd at %s: %s", path, exc.strerror or exc)
        return False
    return True
