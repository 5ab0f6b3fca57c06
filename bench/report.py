"""Ratios, the goals (reported, never asserted), the table, the JSON and the chart."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench.points import BY_NAME, Result

ANCHOR = "iscsi-perf"
CEILING = "fuse-ceiling"
LAYERS = {
    ANCHOR: "libiscsi iscsi-perf (C), the anchor",
    "session": "our userland session, no FUSE",
    "fuse": "our storage file via loop --direct-io=on, fio",
    CEILING: "pyfuse3 in-memory file via loop --direct-io=on, fio",
}


@dataclass(frozen=True)
class Goal:
    layer: str
    point: str
    reference: str  # the layer the ratio is taken to
    at_least: float

    def describe(self) -> str:
        return f"{self.layer} >= {self.at_least:g}x {self.reference} at {self.point}"


GOALS = (
    Goal("session", "1m-qd8-read", ANCHOR, 0.8),
    Goal("session", "4k-qd32-read", ANCHOR, 0.4),
    Goal("fuse", "1m-qd8-read", CEILING, 0.5),
    Goal("fuse", "1m-qd8-write", CEILING, 0.5),
)


def ratio(results: Sequence[Result], layer: str, point: str, reference: str) -> float | None:
    """IOPS of ``layer`` over ``reference`` at ``point``; None when either is missing."""
    mine = _find(results, layer, point)
    ref = _find(results, reference, point)
    if mine is None or ref is None or ref.iops <= 0:
        return None
    return mine.iops / ref.iops


def _find(results: Sequence[Result], layer: str, point: str) -> Result | None:
    return next((r for r in results if r.layer == layer and r.point == point), None)


def goal_status(results: Sequence[Result], goal: Goal) -> tuple[str, float | None]:
    """("met" | "not met" | "not measured", the ratio)."""
    value = ratio(results, goal.layer, goal.point, goal.reference)
    if value is None:
        return "not measured", None
    return ("met" if value >= goal.at_least else "not met"), value


def rows(results: Sequence[Result]) -> list[dict[str, Any]]:
    """One JSON-ready row per result, with both ratios."""
    out = []
    for r in results:
        point = BY_NAME[r.point]
        out.append({**asdict(r), "block_size": point.block_size,
                    "queue_depth": point.queue_depth, "write": point.write,
                    "ratio_to_iscsi_perf": ratio(results, r.layer, r.point, ANCHOR),
                    "ratio_to_ceiling": ratio(results, r.layer, r.point, CEILING)})
    return out


def _x(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def table(results: Sequence[Result]) -> str:
    header = ("layer", "point", "IOPS", "MB/s", "/iscsi-perf", "/ceiling")
    lines = [header]
    for row in rows(results):
        lines.append((row["layer"], row["point"], f"{row['iops']:,.0f}",
                      f"{row['mb_per_s']:,.1f}", _x(row["ratio_to_iscsi_perf"]),
                      _x(row["ratio_to_ceiling"])))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = []
    for n, line in enumerate(lines):
        cells = [c.ljust(w) if i < 2 else c.rjust(w)
                 for i, (c, w) in enumerate(zip(line, widths, strict=True))]
        text.append("  ".join(cells).rstrip())
        if n == 0:
            text.append("  ".join("-" * w for w in widths))
    return "\n".join(text)


def goal_lines(results: Sequence[Result]) -> list[str]:
    lines = []
    for goal in GOALS:
        status, value = goal_status(results, goal)
        shown = "" if value is None else f" (measured {value:.2f}x)"
        lines.append(f"goal {goal.describe()}: {status}{shown}")
    return lines


def document(results: Sequence[Result], **extra: Any) -> dict[str, Any]:
    goals = []
    for goal in GOALS:
        status, value = goal_status(results, goal)
        goals.append({**asdict(goal), "status": status, "ratio": value})
    return {**extra, "layers": LAYERS, "results": rows(results), "goals": goals}


def write_json(doc: dict[str, Any], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=2, sort_keys=False) + "\n")
    tmp.replace(path)
    return path


def write_chart(results: Sequence[Result], path: Path, title: str) -> str | None:
    """A PNG of MB/s per point and layer; returns why not when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install -e '.[bench]'): no chart, JSON only"
    points = [p for p in BY_NAME if any(r.point == p for r in results)]
    layers = [layer for layer in LAYERS if any(r.layer == layer for r in results)]
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    width = 0.8 / max(1, len(layers))
    for ax, metric, label in ((axes[0], "iops", "IOPS"), (axes[1], "mb_per_s", "MB/s")):
        for i, layer in enumerate(layers):
            values = [getattr(r, metric) if (r := _find(results, layer, p)) else 0.0
                      for p in points]
            ax.bar([x + i * width for x in range(len(points))], values, width, label=layer)
        ax.set_xticks([x + width * (len(layers) - 1) / 2 for x in range(len(points))])
        ax.set_xticklabels(points, rotation=30, ha="right")
        ax.set_yscale("log")
        ax.set_ylabel(f"{label} (log scale)")
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=8, loc="upper right")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return None
