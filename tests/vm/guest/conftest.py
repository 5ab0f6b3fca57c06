"""Fixtures of the guest suite. A new guest test is just tests/vm/guest/test_*.py: these
fixtures, tgt's (a real tgtd on the guest's loopback) and `iscsid` are at hand.

The suite runs only inside the lab's guest (ISCSI_HANDOFF_VM=1, set by the lab): run it
with scripts/vm/run (see tests/vm/README.md). Named explicitly on the host, every test
skips, saying so.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from .openiscsi import Iscsid
from tgt_fixtures import tgt, tgt_session

__all__ = ["iscsid", "release", "tgt", "tgt_session"]

IN_GUEST = os.environ.get("ISCSI_HANDOFF_VM") == "1"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if IN_GUEST:
        return
    here = Path(__file__).parent
    skip = pytest.mark.skip(reason="runs only inside the VM lab's guest: scripts/vm/run "
                                   "(tests/vm/README.md)")
    for item in items:
        if here in item.path.parents:
            item.add_marker(skip)


@pytest.fixture
def figure(capsys: pytest.CaptureFixture[str]) -> Callable[[str], None]:
    """Print a measured figure past pytest's capture, so the host's log (CI's) shows it."""

    def show(text: str) -> None:
        with capsys.disabled():
            print(f"\nfigure: {text}", flush=True)

    return show


@pytest.fixture(scope="session")
def release() -> str:
    """The guest kernel's release, as the lab resolved it (uname -r must match)."""
    return os.environ["VMLAB_RELEASE"]


@pytest.fixture
def iscsid(tmp_path: Path) -> Iterator[Iscsid]:
    """open-iscsi's iscsid, in the foreground with its own pid file; every session it
    made is logged out and the daemon stopped afterwards."""
    daemon = Iscsid(tmp_path)
    daemon.start()
    try:
        yield daemon
    finally:
        daemon.stop()
