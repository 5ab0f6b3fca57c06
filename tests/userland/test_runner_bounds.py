"""userland.policy in the runner: the replacement timeout, Time2Wait, reconnecting past
the timeout, and close() during recovery, against the hostile target on 127.0.0.1; and
what a LUN makes of RECOVERED ERROR, write residuals and an implausible capacity."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

import pytest
import trio

from userland.errors import ProtocolError, ScsiError, SessionFailed
from userland.login.machine import LoginConfig, new_isid
from userland.lun import Lun, report_luns
from userland.policy import Bounds
from userland.portal import Portal
from userland.runner import SessionRunner
from userland.task import Task

from hostile_target import BLOCK, HostileTarget, pattern

INITIATOR = "iqn.2024-01.org.iscsi-handoff.test:initiator"
TARGET = "iqn.2024-01.org.iscsi-handoff.test:hostile"
TUR = bytes(6)


def runner(target: HostileTarget, bounds: Bounds) -> SessionRunner:
    config = LoginConfig(initiator_name=INITIATOR, target_name=TARGET, isid=new_isid())
    return SessionRunner(Portal.parse(target.portal), config, bounds=bounds, login_timeout=3)


def test_relogins_without_progress_do_not_restart_the_replacement_timeout() -> None:
    """Each relogin succeeds, each connection dies at the first command: the command
    fails once the replacement timeout, counted from the first failure, is over."""
    bounds = Bounds(replacement_timeout=3, max_attempts=1000)
    with HostileTarget() as target:
        r = runner(target, bounds)
        elapsed: list[float] = []

        async def main() -> None:
            async with trio.open_nursery() as nursery:
                await r.start(nursery)
                target.drop_on_command = True
                started = time.monotonic()
                with trio.fail_after(30), pytest.raises(SessionFailed, match="within 3 s"):
                    await r.execute(Task(lun=0, cdb=TUR))
                elapsed.append(time.monotonic() - started)
                await r.close()

        trio.run(main)
    assert r.recoveries >= 2  # relogins did succeed, and did not reset the clock
    assert elapsed[0] < 3 + 10  # the bound: the timeout plus a relogin and a tick or two


def test_time2wait_above_the_replacement_timeout_still_relogs_in() -> None:
    bounds = Bounds(replacement_timeout=4)
    with HostileTarget(answers={"DefaultTime2Wait": "3600"}) as target:
        r = runner(target, bounds)

        async def main() -> None:
            async with trio.open_nursery() as nursery:
                await r.start(nursery)
                assert r.session is not None
                assert r.session.params.default_time2wait == 3600
                target.drop_on_command = True
                async with trio.open_nursery() as inner:
                    inner.start_soon(r.execute, Task(lun=0, cdb=TUR))
                    with trio.fail_after(20):
                        while target.connections < 2:  # the drop, then a relogin
                            await trio.sleep(0.05)
                    target.drop_on_command = False
                with trio.fail_after(20):
                    await r.execute(Task(lun=0, cdb=TUR))
                await r.close()

        trio.run(main)
    assert r.recoveries >= 1 and r.failed_reason == "session closed"


def test_past_the_replacement_timeout_the_session_reconnects_and_serves_again() -> None:
    bounds = Bounds(replacement_timeout=1, backoff_min=0.5, backoff_max=1)
    with HostileTarget() as target:
        r = runner(target, bounds)

        async def main() -> None:
            async with trio.open_nursery() as nursery:
                await r.start(nursery)
                target.down = True
                target.drop_on_command = True
                with trio.fail_after(20), pytest.raises(SessionFailed):
                    await r.execute(Task(lun=0, cdb=TUR))
                with pytest.raises(SessionFailed):  # new I/O fails at once meanwhile
                    await r.execute(Task(lun=0, cdb=TUR))
                target.down = target.drop_on_command = False
                with trio.fail_after(20):
                    while True:
                        try:
                            task = await r.execute(Task(lun=0, cdb=TUR))
                            break
                        except SessionFailed:
                            await trio.sleep(0.2)
                assert task.status == 0 and r.failed_reason is None
                await r.close()

        trio.run(main)
    assert not target.errors, target.errors


def test_close_during_recovery_leaves_no_session_behind() -> None:
    bounds = Bounds(replacement_timeout=60)
    with HostileTarget() as target:
        r = runner(target, bounds)

        async def main() -> None:
            async with trio.open_nursery() as nursery:
                await r.start(nursery)
                target.down = True
                target.drop_on_command = True
                nursery.start_soon(_expect_failure, r)
                while target.connections < 3:  # recovering: relogins are being refused
                    await trio.sleep(0.05)
                with trio.fail_after(10):
                    await r.close()
                assert r.transport is None
                seen = target.connections
                await trio.sleep(2.5)  # nothing keeps trying once closed
                assert target.connections == seen

        trio.run(main)


async def _expect_failure(r: SessionRunner) -> None:
    with pytest.raises(SessionFailed, match="closed"):
        await r.execute(Task(lun=0, cdb=TUR))


def probed_lun(mode: str, body: Callable[[Lun], Awaitable[None]]) -> HostileTarget:
    with HostileTarget(mode) as target:
        r = runner(target, Bounds.for_replacement_timeout(5))

        async def main() -> None:
            async with trio.open_nursery() as nursery:
                await r.start(nursery)
                [number] = await report_luns(r)
                lun = Lun(r, number)
                await lun.probe()
                with trio.fail_after(30):
                    await body(lun)
                await r.close()

        trio.run(main)
    assert not target.errors, target.errors
    return target


def test_recovered_error_is_success() -> None:
    async def body(lun: Lun) -> None:
        assert await lun.read_blocks(8, 8) == pattern(8 * BLOCK, 8 * BLOCK)

    probed_lun("recovered_error", body)


def test_a_write_the_target_took_only_part_of_fails() -> None:
    async def body(lun: Lun) -> None:
        with pytest.raises(ScsiError, match="took 3584 of 4096 bytes"):
            await lun.write_blocks(0, bytes(4096))

    probed_lun("write_residual", body)


def test_an_implausible_capacity_is_a_protocol_error() -> None:
    with HostileTarget("capacity_2_63") as target:
        r = runner(target, Bounds.for_replacement_timeout(5))

        async def main() -> None:
            async with trio.open_nursery() as nursery:
                await r.start(nursery)
                with pytest.raises(ProtocolError, match="beyond the 8 EiB"):
                    await Lun(r, 0).probe()
                await r.close()

        trio.run(main)
