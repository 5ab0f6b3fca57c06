"""The data-path options `login` and `mount` share, kept apart from the code that runs
them so that the CLI starts without importing trio, pyfuse3 or netlink (seconds under
emulation, per process)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass
class FuseOptions:
    mountpoint: Path
    loop: bool = False
    allow_other: bool = False
    queue_depth: int = 32
    replacement_timeout: float = 120.0
    login_timeout: float = 15.0
