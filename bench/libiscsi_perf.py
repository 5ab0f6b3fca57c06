"""libiscsi's iscsi-perf (C) as the anchor: sequential reads at a queue depth.

``iscsi-perf -t N`` runs N whole seconds and ends with one line ``iops average I (M MB/s)``
over the run (its MB are MiB: the figure kept is IOPS, MB/s is computed from it).
"""

from __future__ import annotations

import math
import re

from bench.children import ToolOutputError, run_child
from bench.points import Point, Result

LAYER = "iscsi-perf"
_AVERAGE = re.compile(r"iops average (\d+)")


def parse_iscsi_perf(out: str) -> float:
    """The run's IOPS: the last ``iops average`` (the final summary with ``-t``)."""
    averages = _AVERAGE.findall(out)
    if not averages:
        tail = out.strip().splitlines()[-1:] or ["(nothing)"]
        raise ToolOutputError(f"iscsi-perf printed no figure; last line: {tail[0]!r}")
    return float(averages[-1])


def iscsi_perf_command(url: str, point: Point, seconds: float) -> list[str]:
    if point.write:
        raise ValueError("iscsi-perf only reads")
    return ["iscsi-perf", "-t", str(max(1, math.ceil(seconds))), "-m", str(point.queue_depth),
            "-b", str(point.block_size // 512), url]


def run_iscsi_perf(url: str, point: Point, seconds: float) -> tuple[Result, str]:
    """The result and iscsi-perf's own output (kept for the record)."""
    out = run_child(iscsi_perf_command(url, point, seconds), timeout=seconds + 60)
    return Result.from_iops(LAYER, point, parse_iscsi_perf(out)), out
