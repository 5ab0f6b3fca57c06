"""Our userland session without FUSE: trio tasks keeping `queue_depth` commands in flight.

Run as its own process (``python -m bench.session_perf``), one per point, so py-spy can
watch exactly the measuring part: the child prints ``measuring`` once logged in and the
LUN probed, then one JSON line with the figures.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable

import trio

from bench.children import ChildFailed, deadline, spawn, stop
from bench.points import BY_NAME, Point, Result
from userland.login.machine import LoginConfig, new_isid
from userland.lun import Lun
from userland.portal import Portal
from userland.runner import SessionRunner

LAYER = "session"
INITIATOR = "iqn.2024-01.org.iscsi-handoff:bench"
MEASURING = "measuring"


async def _measure(runner: SessionRunner, point: Point, seconds: float) -> tuple[int, float]:
    lun = Lun(runner, 1)
    await lun.probe()
    blocks = point.block_size // lun.block_size
    span = lun.num_blocks - blocks
    payload = bytes(point.block_size)
    count = 0
    next_lba = 0
    print(MEASURING, flush=True)
    end_at = time.perf_counter() + seconds

    async def worker() -> None:
        nonlocal count, next_lba
        while time.perf_counter() < end_at:
            lba = next_lba
            next_lba = (next_lba + blocks) % span  # sequential, as iscsi-perf reads
            if point.write:
                await lun.write_blocks(lba, payload)
            else:
                await lun.read_blocks(lba, blocks)
            count += 1

    started = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for _ in range(point.queue_depth):
            nursery.start_soon(worker)
    return count, time.perf_counter() - started


async def _session_main(portal: str, target: str, point: Point, seconds: float) -> None:
    config = LoginConfig(initiator_name=INITIATOR, target_name=target, isid=new_isid())
    runner = SessionRunner(Portal.parse(portal), config, queue_depth=max(32, point.queue_depth))
    async with trio.open_nursery() as nursery:
        await runner.start(nursery)
        try:
            ios, elapsed = await _measure(runner, point, seconds)
        finally:
            await runner.close()
    print(json.dumps({"ios": ios, "seconds": elapsed}), flush=True)


def run_session(portal: str, target: str, point: Point, seconds: float, *,
                on_measuring: Callable[[int], None] | None = None) -> Result:
    """Measure one point in a child process; ``on_measuring(pid)`` when it starts."""
    cmd = [sys.executable, "-m", "bench.session_perf", "--portal", portal, "--target", target,
           "--point", point.name, "--seconds", str(seconds)]
    proc = spawn(cmd)
    lines: list[str] = []
    try:
        assert proc.stdout is not None
        with deadline(proc, seconds + 60):
            for line in proc.stdout:
                lines.append(line.rstrip("\n"))
                if line.strip() == MEASURING and on_measuring is not None:
                    on_measuring(proc.pid)
            status = proc.wait()
    finally:
        stop(proc)
    if status != 0 or not lines:
        raise ChildFailed(f"session bench exited with status {status}: "
                          f"{lines[-1] if lines else '(no output)'}")
    figures = json.loads(lines[-1])
    return Result.of(LAYER, point, int(figures["ios"]), float(figures["seconds"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--portal", required=True)
    parser.add_argument("--target", required=True)
    parser.add_argument("--point", required=True, choices=sorted(BY_NAME))
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()
    try:
        trio.run(_session_main, args.portal, args.target, BY_NAME[args.point], args.seconds)
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as exc:  # one line for the parent, which prints the last line
        while isinstance(exc, ExceptionGroup) and exc.exceptions:  # trio's nurseries
            exc = exc.exceptions[0]
        print(f"{type(exc).__name__}: {exc}", flush=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
