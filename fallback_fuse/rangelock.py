"""Locks on block ranges: shared for reads, exclusive for writes, first come first served.

A read-modify-write of a partial block must not race another write of that block, or
one of the two updates is lost; a read must not see half of a write. Disjoint ranges
never wait for each other. Waiting in arrival order keeps a stream of reads from
starving a write.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import trio


@dataclass(eq=False)
class _Hold:
    start: int
    end: int
    exclusive: bool
    released: trio.Event = field(default_factory=trio.Event)

    def conflicts(self, other: _Hold) -> bool:
        overlap = self.start < other.end and other.start < self.end
        return overlap and (self.exclusive or other.exclusive)


class RangeLock:
    def __init__(self) -> None:
        self._holds: list[_Hold] = []  # granted or waiting, in arrival order

    @asynccontextmanager
    async def hold(self, start: int, end: int, *, exclusive: bool) -> AsyncIterator[None]:
        """Hold [start, end) until the block ends; cancellation while waiting is safe."""
        mine = _Hold(start, end, exclusive)
        ahead = [h for h in self._holds if h.conflicts(mine)]
        self._holds.append(mine)
        try:
            for other in ahead:  # later arrivals queue behind us, never ahead
                await other.released.wait()
            yield
        finally:
            self._holds.remove(mine)
            mine.released.set()

    def __len__(self) -> int:
        return len(self._holds)
