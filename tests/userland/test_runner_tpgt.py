"""The data path runner and portal groups (RFC 7143 13.9): a first login may be
redirected into another portal group; every relogin must land in the first login's.

The hostile target on 127.0.0.1 serves the disk and declares ``target.tpgt``; a scripted
fake in front of it redirects every login to ``redirect_to[0]``."""

from __future__ import annotations

import logging

import pytest
import trio

from userland.errors import SessionFailed
from userland.login.machine import LoginConfig, new_isid
from userland.policy import Bounds
from userland.portal import Portal
from userland.runner import SessionRunner
from userland.scsi import read_cdb
from userland.task import Task

from fake_target import FakeTarget, Peer
from hostile_target import BLOCK, HostileTarget, pattern

INITIATOR = "iqn.2024-01.org.iscsi-handoff.test:initiator"
TARGET = "iqn.2024-01.org.iscsi-handoff.test:hostile"
TUR = bytes(6)
# Relogins retried for long enough to be seen failing; a command is issued until then.
BOUNDS = Bounds(replacement_timeout=3, max_attempts=1000)


def mover(redirect_to: list[str]) -> FakeTarget:
    def script(peer: Peer) -> None:
        req, _ = peer.recv_login()
        peer.send(peer.login_response(req, [("TargetAddress", redirect_to[0])],
                                      status=(1, 1)))
    return FakeTarget(script)


def runner(portal: str, expected_tpgt: int | None = None) -> SessionRunner:
    config = LoginConfig(initiator_name=INITIATOR, target_name=TARGET, isid=new_isid(),
                         expected_tpgt=expected_tpgt)
    return SessionRunner(Portal.parse(portal), config, bounds=BOUNDS, login_timeout=3)


def read_block(lba: int) -> Task:
    return Task(lun=0, cdb=read_cdb(lba, 1), read_length=BLOCK)


async def relogins_refused(r: SessionRunner, target: HostileTarget) -> None:
    """Drop the connection at the next command; every relogin is refused, so the
    command fails at the replacement timeout and no recovery ever completes."""
    target.drop_on_command = True
    with trio.fail_after(30), pytest.raises(SessionFailed, match="within 3 s"):
        await r.execute(Task(lun=0, cdb=TUR))
    assert r.recoveries == 0


def test_a_redirect_into_another_portal_group_is_followed_and_relogins_follow_it() -> None:
    """The user named the portal in group 1; it redirects to a portal of group 4. The
    login takes group 4 (it was refused as 'not group 1' before), and a relogin through
    the same redirect is accepted in group 4."""
    with HostileTarget() as target:
        target.tpgt = 4
        with mover([f"{target.portal},4"]) as front:
            r = runner(f"{front.portal},1", expected_tpgt=1)

            async def main() -> None:
                async with trio.open_nursery() as nursery:
                    await r.start(nursery)
                    assert r.tpgt == 4
                    with trio.fail_after(20):
                        assert (await r.execute(read_block(3))).data == pattern(3 * BLOCK,
                                                                                 BLOCK)
                    target.drop_on_command = True
                    async with trio.open_nursery() as inner:
                        inner.start_soon(r.execute, read_block(5))
                        with trio.fail_after(20):
                            while target.connections < 2:  # the drop, then a relogin
                                await trio.sleep(0.02)
                        target.drop_on_command = False
                    with trio.fail_after(20):
                        assert (await r.execute(read_block(7))).data == pattern(7 * BLOCK,
                                                                                 BLOCK)
                    await r.close()

            trio.run(main)
        assert front.connections >= 2 and r.recoveries >= 1 and r.tpgt == 4
    assert not target.errors and not front.errors


def test_a_relogin_must_land_in_the_first_logins_portal_group(
        caplog: pytest.LogCaptureFixture) -> None:
    """After the first login in group 1 the target answers relogins in group 2: refused,
    until it is group 1 again; then the session is back."""
    caplog.set_level(logging.INFO, logger="iscsi_handoff.session")
    with HostileTarget() as target:
        r = runner(target.portal)

        async def main() -> None:
            async with trio.open_nursery() as nursery:
                await r.start(nursery)
                assert r.tpgt == 1
                target.tpgt = 2
                await relogins_refused(r, target)
                assert target.connections >= 2  # relogins were tried, and refused
                target.tpgt, target.drop_on_command = 1, False
                with trio.fail_after(30):
                    while r.failed_reason is not None:  # relogins go on past the timeout
                        await trio.sleep(0.05)
                    await r.execute(Task(lun=0, cdb=TUR))
                await r.close()

        trio.run(main)
    assert r.recoveries == 1
    assert "TargetPortalGroupTag=2" in caplog.text and "first login" in caplog.text


@pytest.mark.parametrize("tag", [",5", ""])
def test_a_relogin_redirected_out_of_the_first_logins_portal_group_is_refused(
        tag: str, caplog: pytest.LogCaptureFixture) -> None:
    """The first login was redirected into group 4; a relogin redirected to group 5 is
    refused at the redirect (',5') or at the login that lands there (no tag)."""
    caplog.set_level(logging.INFO, logger="iscsi_handoff.session")
    with HostileTarget() as target:
        target.tpgt = 4
        redirect_to = [f"{target.portal},4"]
        with mover(redirect_to) as front:
            r = runner(front.portal)

            async def main() -> None:
                async with trio.open_nursery() as nursery:
                    await r.start(nursery)
                    assert r.tpgt == 4
                    redirect_to[0], target.tpgt = f"{target.portal}{tag}", 5
                    await relogins_refused(r, target)
                    await r.close()

            trio.run(main)
        assert front.connections >= 2
    why = "redirected to portal group 5" if tag else "TargetPortalGroupTag=5"
    assert why in caplog.text
    assert (target.connections == 1) == bool(tag)  # refused before connecting, or after
