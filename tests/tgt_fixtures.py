"""pytest fixtures: a real tgtd on a free 127.0.0.1 port (iscsi_handoff.tgtlab).

Import the fixtures a module needs: ``from tgt_fixtures import tgt  # noqa: F401``.

- ``tgt``: a fresh tgtd per test, stopped afterwards with its targets, sockets and LUN
  files. Tests may stop, kill or restart it; the teardown copes.
- ``tgt_session``: one tgtd shared by the whole session, for tests that only read. Use
  IQNs of your own and ``delete_target`` what you add.

Where tgtd cannot run (not installed, not root) both skip saying exactly why; under CI
the skip is a failure (tests/conftest.py), since .ci/run installs tgt and runs as root.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from iscsi_handoff.tgtlab import Tgt, unavailable_reason


def require_tgt() -> None:
    """Skip the calling test when no tgtd can run here, with the precise reason."""
    reason = unavailable_reason()
    if reason is not None:
        pytest.skip(f"needs a real tgtd: {reason}")


@pytest.fixture
def tgt() -> Iterator[Tgt]:
    require_tgt()
    with Tgt() as instance:
        yield instance


@pytest.fixture(scope="session")
def tgt_session() -> Iterator[Tgt]:
    require_tgt()
    with Tgt() as instance:
        yield instance
