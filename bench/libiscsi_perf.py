"""libiscsi's iscsi-perf (C) as the anchor: sequential reads at a queue depth."""

from __future__ import annotations

import re
import signal
import subprocess
import time

from bench.points import Point, Result

_AVERAGE = re.compile(r"iops average (\d+)")


def run_iscsi_perf(url: str, point: Point, seconds: float) -> Result:
    """iscsi-perf runs until SIGINT; its last 'iops average' is the figure."""
    blocks = point.block_size // 512
    proc = subprocess.Popen(["iscsi-perf", "-m", str(point.queue_depth), "-b", str(blocks), url],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    time.sleep(seconds)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=30)
    averages = _AVERAGE.findall(out)
    if not averages:
        raise RuntimeError(f"iscsi-perf printed no figure: {out[-300:]!r}")
    iops = float(averages[-1])
    return Result("libiscsi iscsi-perf", point.name, iops, iops * point.block_size / 1e6)
