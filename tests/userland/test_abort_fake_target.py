"""A command that gets no status: ABORT TASK, then the same command again on the same
connection; a target that ignores the abort too loses the connection (ERL 0 relogin).
tgtd always answers, so a scripted fake target plays the stuck one."""

from __future__ import annotations

import trio

from userland.login.machine import LoginConfig, new_isid
from userland.pdu import (
    LogoutRequest,
    LogoutResponse,
    NopIn,
    NopOut,
    Pdu,
    ScsiCommand,
    ScsiResponse,
    TaskMgmtRequest,
    TaskMgmtResponse,
    TmfFunction,
)
from userland.portal import Portal
from userland.runner import SessionRunner
from userland.task import Task

from fake_target import FakeTarget, Peer, plain_login

INITIATOR = "iqn.2024-01.org.iscsi-handoff.test:initiator"
TARGET = "iqn.2024-01.org.iscsi-handoff.test:stuck"
TUR = bytes(6)


class Ffp:
    """The fake target's full feature phase bookkeeping: StatSN and the CmdSN window."""

    def __init__(self, peer: Peer) -> None:
        self.peer = peer
        self.exp_cmd_sn = 0

    def recv(self) -> Pdu:
        while True:
            pdu = self.peer.recv()
            if isinstance(pdu, NopOut) and pdu.itt != 0xFFFFFFFF:
                self.send(NopIn(itt=pdu.itt))  # keep the initiator's pings happy
                continue
            if isinstance(pdu, ScsiCommand | LogoutRequest) and not pdu.immediate:
                self.exp_cmd_sn = pdu.cmd_sn + 1
            return pdu

    def send(self, pdu: Pdu) -> None:
        self.peer.stat_sn += 1
        for name, value in (("stat_sn", self.peer.stat_sn), ("exp_cmd_sn", self.exp_cmd_sn),
                            ("max_cmd_sn", self.exp_cmd_sn + 31)):
            setattr(pdu, name, value)
        self.peer.send(pdu)


def run_one_command(target: FakeTarget, *, command_timeout: float) -> SessionRunner:
    config = LoginConfig(initiator_name=INITIATOR, target_name=TARGET, isid=new_isid())
    runner = SessionRunner(Portal.parse(target.portal), config, command_timeout=command_timeout,
                           abort_timeout=2.0, replacement_timeout=20)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await runner.start(nursery)
            with trio.fail_after(30):
                task = await runner.execute(Task(lun=0, cdb=TUR))
            assert task.status == 0 and task.attempts == 2
            await runner.close()
            nursery.cancel_scope.cancel()

    trio.run(main)
    return runner


def test_a_stuck_command_is_aborted_and_issued_again() -> None:
    seen: dict[str, object] = {}

    def script(peer: Peer) -> None:
        plain_login(peer)
        ffp = Ffp(peer)
        first = ffp.recv()
        assert isinstance(first, ScsiCommand)  # ... and never answered
        tmf = ffp.recv()
        assert isinstance(tmf, TaskMgmtRequest)
        seen.update(function=tmf.function, rtt=tmf.rtt, ref=tmf.ref_cmd_sn,
                    immediate=tmf.immediate, first_itt=first.itt, first_sn=first.cmd_sn)
        ffp.send(TaskMgmtResponse(itt=tmf.itt, response=0))  # FUNCTION COMPLETE
        again = ffp.recv()
        assert isinstance(again, ScsiCommand)
        seen.update(again_itt=again.itt, again_sn=again.cmd_sn, again_cdb=again.cdb[:6])
        ffp.send(ScsiResponse(itt=again.itt, status=0))
        logout = ffp.recv()
        assert isinstance(logout, LogoutRequest)
        ffp.send(LogoutResponse(itt=logout.itt))

    with FakeTarget(script) as target:
        runner = run_one_command(target, command_timeout=1.0)
    assert not target.errors, target.errors
    assert (runner.aborts, runner.recoveries, target.connections) == (1, 0, 1)
    assert seen["function"] == TmfFunction.ABORT_TASK and seen["immediate"]
    assert seen["rtt"] == seen["first_itt"] and seen["ref"] == seen["first_sn"]
    assert seen["again_itt"] != seen["first_itt"]
    assert seen["again_sn"] == (int(str(seen["first_sn"])) + 1) & 0xFFFFFFFF
    assert seen["again_cdb"] == TUR


def test_an_ignored_abort_costs_the_connection_and_the_command_runs_after_relogin() -> None:
    def script(peer: Peer) -> None:
        plain_login(peer)
        ffp = Ffp(peer)
        if peer_number.pop(0) == 1:
            while True:  # swallow the command and the abort alike until the initiator leaves
                ffp.recv()
        command = ffp.recv()
        assert isinstance(command, ScsiCommand)
        ffp.send(ScsiResponse(itt=command.itt, status=0))
        logout = ffp.recv()
        assert isinstance(logout, LogoutRequest)
        ffp.send(LogoutResponse(itt=logout.itt))

    peer_number = [1, 2]
    with FakeTarget(script) as target:
        runner = run_one_command(target, command_timeout=1.0)
    assert not target.errors, target.errors
    assert (runner.aborts, runner.recoveries, target.connections) == (1, 1, 2)
