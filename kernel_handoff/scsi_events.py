"""SCSI device events from the kernel's uevents: how userland hears that a target's LUNs
changed.

When a command gets the UNIT ATTENTION REPORTED LUNS DATA HAS CHANGED (sense 06h/3Fh/0Eh),
scsi_lib.c (scsi_report_sense) logs "LUN assignments on this target have changed" and
sends a KOBJ_CHANGE uevent for that SCSI device with SDEV_UA=REPORTED_LUNS_DATA_HAS_CHANGED
(CAPACITY_DATA_HAS_CHANGED for 2Ah/09h, and so on; a media change gives
SDEV_MEDIA_CHANGE=1). The kernel adds no LUN by itself: iscsid rescans the host on it,
and so do we. uevents are multicast on NETLINK_KOBJECT_UEVENT, group 1, as
"ACTION@DEVPATH\\0KEY=VALUE\\0...", whether or not udev runs.
"""

from __future__ import annotations

import logging
import re
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger("iscsi_handoff.kernel")

NETLINK_KOBJECT_UEVENT = 15
KERNEL_GROUP = 1  # udev's own rebroadcasts use group 2
RESCAN_UAS = frozenset({"REPORTED_LUNS_DATA_HAS_CHANGED", "CAPACITY_DATA_HAS_CHANGED",
                        "INQUIRY_DATA_HAS_CHANGED", "MODE_PARAMETERS_CHANGED"})
_HCTL_END = re.compile(r"/(\d+):(\d+):(\d+):(\d+)$")


@dataclass(frozen=True)
class ScsiEvent:
    """A SCSI device's change event that asks for a rescan."""

    host_no: int
    hctl: str
    what: str  # "REPORTED_LUNS_DATA_HAS_CHANGED", "MEDIA_CHANGE", ...


def parse_uevent(data: bytes) -> ScsiEvent | None:
    """The SCSI event in one uevent datagram, or None if it is something else."""
    head, _, rest = data.partition(b"\0")
    if b"@" not in head or head.startswith(b"libudev"):
        return None  # udev's own format (group 2) or garbage
    env: dict[str, str] = {}
    for item in rest.split(b"\0"):
        key, sep, value = item.partition(b"=")
        if sep:
            env[key.decode(errors="replace")] = value.decode(errors="replace")
    if env.get("ACTION") != "change" or env.get("SUBSYSTEM") != "scsi":
        return None
    m = _HCTL_END.search(env.get("DEVPATH", ""))
    if m is None:
        return None
    hctl = ":".join(m.groups())
    ua = env.get("SDEV_UA")
    if ua in RESCAN_UAS:
        return ScsiEvent(int(m.group(1)), hctl, ua)
    if env.get("SDEV_MEDIA_CHANGE") == "1":
        return ScsiEvent(int(m.group(1)), hctl, "MEDIA_CHANGE")
    return None


class ScsiEventListener:
    """A thread that calls ``on_event`` for each SCSI change event of the hosts asked for.

    Without the socket (a kernel without uevents, or one that refuses the bind) the
    listener says so once and does nothing: rescans still follow every recovery and
    `session rescan`.
    """

    def __init__(self, on_event: Callable[[ScsiEvent], None],
                 hosts: Callable[[], set[int]], *,
                 sock: socket.socket | None = None) -> None:
        self.on_event = on_event
        self.hosts = hosts
        self._stop = threading.Event()
        self._sock = sock
        self._thread: threading.Thread | None = None

    def start(self) -> bool:
        if self._sock is None:
            try:
                self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM,
                                           NETLINK_KOBJECT_UEVENT)
                self._sock.bind((0, KERNEL_GROUP))
            except OSError as exc:
                log.warning("no SCSI uevents (%s): a target's LUN changes are seen only "
                            "after a recovery or `session rescan`", exc.strerror or exc)
                if self._sock is not None:
                    self._sock.close()
                self._sock = None
                return False
        self._sock.settimeout(0.5)  # how soon stop() is noticed
        self._thread = threading.Thread(target=self._run, name="scsi-uevents", daemon=True)
        self._thread.start()
        return True

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._sock is not None:
            self._sock.close()

    def _run(self) -> None:
        assert self._sock is not None
        while not self._stop.is_set():
            try:
                data = self._sock.recv(1 << 16)
            except TimeoutError:
                continue
            except OSError as exc:  # ENOBUFS: a burst we were too slow for
                log.debug("uevent socket: %s", exc.strerror or exc)
                continue
            event = parse_uevent(data)
            if event is not None and event.host_no in self.hosts():
                try:
                    self.on_event(event)
                except Exception:  # a listener that dies would hear no more changes
                    log.exception("handling the SCSI event %s of %s", event.what,
                                  event.hctl)
