"""The seed corpus on disk: one recorded TCP connection per ``corpus/*.seed`` file.

Format (text, so a diff shows what changed): a first line ``# {json}`` with what was
recorded (target, scenario, the CHAP accounts of the throwaway lab, digests asked), then
one line per run of bytes one side sent: ``> hex`` initiator to target, ``< hex`` target
to initiator.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CORPUS_DIR = Path(__file__).resolve().parent / "corpus"
TO_TARGET, TO_INITIATOR = ">", "<"


@dataclass
class Recording:
    name: str
    meta: dict[str, Any]
    chunks: list[tuple[str, bytes]] = field(default_factory=list)

    def stream(self, direction: str) -> bytes:
        return b"".join(data for d, data in self.chunks if d == direction)

    def dump(self) -> str:
        lines = ["# " + json.dumps(self.meta, sort_keys=True)]
        lines += [f"{d} {data.hex()}" for d, data in self.chunks]
        return "\n".join(lines) + "\n"

    @classmethod
    def parse(cls, name: str, text: str) -> Recording:
        lines = text.splitlines()
        if not lines or not lines[0].startswith("# "):
            raise ValueError(f"{name}: no '# {{json}}' header line")
        rec = cls(name, json.loads(lines[0][2:]))
        for n, line in enumerate(lines[1:], start=2):
            direction, _, hexdata = line.partition(" ")
            if direction not in (TO_TARGET, TO_INITIATOR):
                raise ValueError(f"{name}:{n}: line starts with {direction!r}")
            rec.chunks.append((direction, bytes.fromhex(hexdata)))
        return rec


def load_corpus(directory: Path = CORPUS_DIR) -> list[Recording]:
    return [Recording.parse(p.name, p.read_text()) for p in sorted(directory.glob("*.seed"))]
