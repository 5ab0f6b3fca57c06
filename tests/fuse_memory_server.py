"""Serve a FUSE tree of in-memory LUNs (a test helper run as its own process).

usage: python tests/fuse_memory_server.py MOUNTPOINT  — prints "ready" when mounted.
Two targets: host 127.0.0.1 with `disk1` (one 64 MiB LUN) and `multi` (LUNs 1-3, LUN 3
read-only). SIGTERM finishes I/O and unmounts.
"""

from __future__ import annotations

import sys
from pathlib import Path

import trio

from fallback_fuse.device import LunEntry, MemoryBlockDevice, TargetEntry
from fallback_fuse.mount import serve
from fallback_fuse.tree import Tree


def targets() -> list[TargetEntry]:
    def lun(n: int, size: int, ro: bool = False) -> LunEntry:
        return LunEntry(n, MemoryBlockDevice(size, read_only=ro), "IET", "VIRTUAL-DISK",
                        "0001", f"beaf{n}")

    return [TargetEntry("127.0.0.1", "127.0.0.1", "iqn.2024-01.org.example:disk1",
                        [lun(1, 64 << 20)]),
            TargetEntry("127.0.0.1", "127.0.0.1", "iqn.2024-01.org.example:multi",
                        [lun(1, 8 << 20), lun(2, 16 << 20), lun(3, 4 << 20, ro=True)])]


async def main(mountpoint: Path) -> None:
    async def ready(tree: Tree) -> None:
        print("ready", flush=True)

    await serve(mountpoint, targets(), on_ready=ready)


if __name__ == "__main__":
    trio.run(main, Path(sys.argv[1]))
