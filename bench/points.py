"""The measurement points every layer is run at, so ratios compare like with like."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Point:
    name: str
    block_size: int  # bytes per I/O
    queue_depth: int
    write: bool = False


READ_POINTS = (
    Point("4k-qd1-read", 4096, 1),
    Point("4k-qd32-read", 4096, 32),
    Point("1m-qd8-read", 1 << 20, 8),
)
WRITE_POINTS = (
    Point("4k-qd1-write", 4096, 1, write=True),
    Point("4k-qd32-write", 4096, 32, write=True),
    Point("1m-qd8-write", 1 << 20, 8, write=True),
)
ALL_POINTS = READ_POINTS + WRITE_POINTS
BY_NAME = {p.name: p for p in ALL_POINTS}


@dataclass
class Result:
    """One layer at one point. MB/s is 10**6 bytes a second, whatever the tool printed."""

    layer: str
    point: str
    iops: float
    mb_per_s: float

    @classmethod
    def of(cls, layer: str, point: Point, ios: int, seconds: float) -> Result:
        return cls.from_iops(layer, point, ios / seconds)

    @classmethod
    def from_iops(cls, layer: str, point: Point, iops: float) -> Result:
        return cls(layer, point.name, iops, iops * point.block_size / 1e6)
