"""The FUSE ceiling: the same tree, operations and storage code as the iSCSI fallback,
over an in-memory LUN instead of a session, so it costs everything but iSCSI.

usage: python -m bench.fuse_server MOUNTPOINT SIZE_BYTES

Serves MOUNT/127.0.0.1/ceiling/storage until SIGTERM/SIGINT, then unmounts.
"""

from __future__ import annotations

import sys
from pathlib import Path

import trio

from fallback_fuse.device import LunInfo, MemoryBlockDevice, TargetInfo
from fallback_fuse.mount import serve

HOST = "127.0.0.1"
TARGET = "iqn.2024-01.org.iscsi-handoff.bench:ceiling"
STORAGE = Path(HOST, "ceiling", "storage")  # relative to the mount point


async def _main(mountpoint: Path, size: int) -> None:
    device = MemoryBlockDevice(size)
    target = TargetInfo(HOST, HOST, TARGET, [LunInfo(1, device, "MEMORY", "RAM DISK", "0001",
                                                     "ceiling1")])
    await serve(mountpoint, [target])


def main() -> None:
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    try:
        trio.run(_main, Path(sys.argv[1]), int(sys.argv[2]))
    except Exception as exc:  # one line: the bench shows the server's last line
        while isinstance(exc, ExceptionGroup) and exc.exceptions:  # trio's nurseries
            exc = exc.exceptions[0]
        print(f"{type(exc).__name__}: {exc}", flush=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
