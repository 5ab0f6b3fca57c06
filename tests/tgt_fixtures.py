"""pytest fixtures: a real tgtd per test, started on a free 127.0.0.1 port."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator

import pytest

from iscsi_handoff.tgtlab import Tgt


def _why_not() -> str | None:
    if shutil.which("tgtd") is None:
        return "tgtd is not installed (Debian package tgt; ./scripts/setup installs it)"
    if os.geteuid() != 0:
        return "tgtd needs root (its control socket lives in /run/tgtd)"
    return None


@pytest.fixture
def tgt() -> Iterator[Tgt]:
    reason = _why_not()
    if reason:
        pytest.skip(reason)
    with Tgt() as instance:
        yield instance
