"""pytest fixtures for the guest suite: LIO, the kernel's own target, on the guest's lo.

Import what a module needs:
``from vm.guest.lio_fixtures import lio_open, lio_session  # noqa: F401``.

- ``lio_session``: one Lio (iscsi_handoff.liolab) on a free 127.0.0.1 port for the whole
  session, stopped at the end with every target it made, their backstores and LUN files.
  Every worker run costs seconds under TCG, so targets are made once and shared.
- ``lio_open``, ``lio_chap``, ``lio_mutual`` (session): a target on it with one 64 MiB
  LUN and an ACL for INITIATOR: without CHAP, with one-way CHAP, with one-way and mutual
  CHAP. Each is a LioCase: the target, the options `iscsi-handoff` needs to log in
  (secrets in files of mode 600, never in argv), and the environment libiscsi's tools
  take the same secrets from. Tests may write to the LUNs; they must not delete them.
- ``lio``: a Lio of the test's own, for tests that make, break or delete targets.

Where LIO cannot run (no target modules, not root) they skip saying why; under CI the
skip is a failure (tests/conftest.py).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from iscsi_handoff.liolab import Lio, LunSpec, Target, unavailable_reason

INITIATOR = "iqn.2024-01.org.iscsi-handoff.test:guest-initiator"
CHAP_USER, CHAP_SECRET = "guest-initiator", "initiator-secret-0123"
MUTUAL_USER, MUTUAL_SECRET = "lio-target", "target-secret-456789"
LUN_SIZE = 64 << 20


@dataclass
class LioCase:
    lio: Lio
    target: Target
    login_args: list[str]  # --portal P --target IQN --initiator-name I [CHAP options]
    libiscsi_env: dict[str, str] = field(default_factory=dict)

    @property
    def iqn(self) -> str:
        return self.target.iqn

    def url(self, lun: int = 0) -> str:
        """iscsi://127.0.0.1:PORT/IQN/LUN, credentials left to libiscsi_env."""
        return f"iscsi://{self.lio.portal}/{self.target.iqn}/{lun}"


def require_lio() -> None:
    reason = unavailable_reason()
    if reason is not None:
        pytest.skip(f"needs LIO (the kernel's iSCSI target): {reason}")


def write_secret(folder: Path, name: str, value: str) -> Path:
    path = folder / name
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(value + "\n")
    return path


def unique_iqn(kind: str) -> str:
    """LIO is one per kernel: names must not collide between tests (or runs)."""
    return f"iqn.2024-01.org.iscsi-handoff.test:{kind}-{os.getpid()}-{os.urandom(3).hex()}"


def make_case(lio: Lio, folder: Path, iqn: str, *, chap: bool, mutual: bool,
              size: int = LUN_SIZE) -> LioCase:
    """A target with one LUN and an ACL for INITIATOR; secret files go to `folder`."""
    target = lio.add_target(iqn, luns=[LunSpec(size=size)], acls=[INITIATOR],
                            chap=(CHAP_USER, CHAP_SECRET) if chap else None,
                            mutual=(MUTUAL_USER, MUTUAL_SECRET) if mutual else None)
    args = ["--portal", lio.portal, "--target", iqn, "--initiator-name", INITIATOR]
    env: dict[str, str] = {}
    short = iqn.rsplit(":", 1)[1]
    if chap:
        args += ["--chap-user", CHAP_USER, "--chap-secret-file",
                 str(write_secret(folder, f"{short}.chap", CHAP_SECRET))]
        env |= {"LIBISCSI_CHAP_USERNAME": CHAP_USER, "LIBISCSI_CHAP_PASSWORD": CHAP_SECRET}
    if mutual:
        args += ["--mutual-user", MUTUAL_USER, "--mutual-secret-file",
                 str(write_secret(folder, f"{short}.mutual", MUTUAL_SECRET))]
        env |= {"LIBISCSI_CHAP_TARGET_USERNAME": MUTUAL_USER,
                "LIBISCSI_CHAP_TARGET_PASSWORD": MUTUAL_SECRET}
    return LioCase(lio, target, args, env)


@pytest.fixture(scope="session")
def lio_session() -> Iterator[Lio]:
    require_lio()
    with Lio() as instance:
        yield instance


@pytest.fixture
def lio() -> Iterator[Lio]:
    require_lio()
    with Lio() as instance:
        yield instance


@pytest.fixture(scope="session")
def lio_open(lio_session: Lio, tmp_path_factory: pytest.TempPathFactory) -> LioCase:
    return make_case(lio_session, tmp_path_factory.mktemp("lio-open"), unique_iqn("open"),
                     chap=False, mutual=False)


@pytest.fixture(scope="session")
def lio_chap(lio_session: Lio, tmp_path_factory: pytest.TempPathFactory) -> LioCase:
    return make_case(lio_session, tmp_path_factory.mktemp("lio-chap"), unique_iqn("chap"),
                     chap=True, mutual=False)


@pytest.fixture(scope="session")
def lio_mutual(lio_session: Lio, tmp_path_factory: pytest.TempPathFactory) -> LioCase:
    return make_case(lio_session, tmp_path_factory.mktemp("lio-mutual"),
                     unique_iqn("mutual"), chap=True, mutual=True)
