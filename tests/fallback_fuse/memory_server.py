"""Serve a FUSE tree of in-memory LUNs, as its own process (a test helper).

usage: python memory_server.py MOUNTPOINT SPEC_JSON

SPEC_JSON: {"targets": [{"hostname", "ip", "targetname", "luns": [{"lun", "size",
"block_size", "read_only", "unmap", "latency", "backing", "vendor", ...}]}],
"direct_io": true, "close_grace": 10} (both optional). A LUN with "backing" (a file of exactly
"size" bytes, on /dev/shm) is a shared mmap of it, so a test reads the device's bytes
from outside. Prints "ready" once mounted; on exit, one "stats {json}" line with every
LUN's syncs and unmaps. SIGTERM/SIGINT finish I/O and unmount.
"""

from __future__ import annotations

import json
import mmap
import sys
from pathlib import Path
from typing import Any

import trio

from fallback_fuse.device import LunInfo, MemoryBlockDevice, TargetInfo
from fallback_fuse.mount import serve
from fallback_fuse.tree import Tree


def device(spec: dict[str, Any]) -> MemoryBlockDevice:
    buffer = None
    if spec.get("backing"):
        with open(spec["backing"], "r+b") as f:
            buffer = mmap.mmap(f.fileno(), spec["size"])
    return MemoryBlockDevice(spec["size"], block_size=spec.get("block_size", 512),
                             read_only=spec.get("read_only", False),
                             supports_unmap=spec.get("unmap", True),
                             latency=spec.get("latency", 0.0), buffer=buffer)


def targets(spec: dict[str, Any]) -> list[TargetInfo]:
    return [TargetInfo(t["hostname"], t["ip"], t["targetname"],
                       [LunInfo(lun["lun"], device(lun), lun.get("vendor", "MEMORY"),
                                lun.get("product", "RAM DISK"), lun.get("version", "0001"),
                                lun.get("serial", f"mem{lun['lun']}"))
                        for lun in t["luns"]])
            for t in spec["targets"]]


async def main(mountpoint: Path, spec: dict[str, Any]) -> None:
    served = targets(spec)

    async def ready(tree: Tree) -> None:
        print("ready", flush=True)

    options = {key: spec[key] for key in ("direct_io", "close_grace") if key in spec}
    await serve(mountpoint, served, on_ready=ready, **options)
    stats = {f"{t.targetname}/{lun.lun}": {"syncs": dev.syncs, "unmaps": dev.unmaps}
             for t in served for lun in t.luns
             if isinstance(dev := lun.device, MemoryBlockDevice)}
    print("stats " + json.dumps(stats), flush=True)


if __name__ == "__main__":
    trio.run(main, Path(sys.argv[1]), json.loads(sys.argv[2]))
