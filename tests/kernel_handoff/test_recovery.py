"""kernel_handoff.recovery against a scripted kernel and a stand-in login (real sockets).

What a CONN_ERROR makes us send, in order; the CmdSN the relogin starts from; retries,
INVALID_HOST, other sessions' events, a signal mid-recovery. The same loop against
Debian's kernel and tgtd (ss -K, tgtd restart): tests/vm/guest/test_kernel_recovery.py.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import signal
import socket
import threading
from collections.abc import Iterator

import pytest
from fake_kernel import FakeKernel, event, reply

from kernel_handoff import recovery
from kernel_handoff import uevent as ue
from kernel_handoff.handoff import KernelSession
from kernel_handoff.params import SessionTimers
from kernel_handoff.recovery import Keeper, SessionGuard
from kernel_handoff.uevent import ConnErr, Event, Param, Request
from userland.connection import Connection
from userland.errors import NetworkError, SessionFailed
from userland.keys import Negotiator
from userland.login.machine import LoginConfig, LoginResult
from userland.login.run import LoggedIn
from userland.portal import Portal

HANDLE = 77
ISID = bytes.fromhex("80112233aabb")
TARGET = "iqn.2024-01.org.example:disk1"


class Logins:
    """Stands in for login(): hands back a real loopback connection, or fails."""

    def __init__(self, failures: int = 0) -> None:
        self.configs: list[LoginConfig] = []
        self.failures = failures
        self.sockets: list[socket.socket] = []
        self.conns: list[Connection] = []
        self.fds: list[int] = []

    def __call__(self, portal: Portal, config: LoginConfig, timeout: float) -> LoggedIn:
        self.configs.append(config)
        if self.failures:
            self.failures -= 1
            raise NetworkError("connect to 127.0.0.1:3260: connection refused")
        listener = socket.create_server(("127.0.0.1", 0))
        ours = socket.create_connection(listener.getsockname())
        theirs, _ = listener.accept()
        listener.close()
        self.sockets.append(theirs)
        conn = Connection(ours, portal)
        self.conns.append(conn)
        self.fds.append(ours.fileno())
        neg = dataclasses.replace(Negotiator(session_type="Normal").result(),
                                  default_time2wait=0, max_recv_data_segment_length=262144)
        result = LoginResult(negotiated=neg, isid=config.isid, tsih=9, cid=config.cid,
                             cmd_sn=config.initial_cmd_sn, exp_stat_sn=5, max_cmd_sn=200,
                             auth_method="None")
        return LoggedIn(conn, result, portal, [])

    def close(self) -> None:
        for s in self.sockets:
            s.close()


@pytest.fixture
def kernel() -> Iterator[FakeKernel]:
    k = FakeKernel(scsicmd_pdus=10)
    k.conns.add((3, 0))  # the session and its connection exist, from the handoff
    yield k
    k.close()


@pytest.fixture
def logins() -> Iterator[Logins]:
    fake = Logins()
    yield fake
    fake.close()


def keeper(initial_cmdsn: int = 100, time2wait: int = 0) -> Keeper:
    neg = dataclasses.replace(Negotiator(session_type="Normal").result(),
                              default_time2wait=time2wait)
    session = KernelSession(sid=3, host_no=4, cid=0, transport_handle=HANDLE,
                            target_name=TARGET, initiator_name="iqn.2024-01.org.example:i",
                            portal=Portal("127.0.0.1", 3260), address="127.0.0.1",
                            port=3260, isid=ISID, tsih=7, initial_cmdsn=initial_cmdsn,
                            negotiated=neg)
    config = LoginConfig(initiator_name=session.initiator_name, target_name=TARGET,
                         isid=ISID)
    return Keeper(session, Portal("127.0.0.1", 3260), config, SessionTimers(), 5.0)


def conn_error(error: int, sid: int = 3) -> ue.ConnErrorEvent:
    return ue.ConnErrorEvent(sid, 0, error)


def test_conn_error_relogin_and_rebind(kernel: FakeKernel, logins: Logins) -> None:
    k = keeper()
    guard = SessionGuard(kernel.nl, [k], login_fn=logins)
    guard.dispatch(conn_error(ConnErr.TCP_CONN_CLOSE))
    names = kernel.names()
    assert names[:3] == ["STOP_CONN", "GET_STATS", "BIND_CONN"]
    assert kernel.seen[0].fields["flag"] == ue.StopConn.RECOVER
    assert names[-1] == "START_CONN"
    (config,) = logins.configs
    assert (config.isid, config.tsih, config.cid) == (ISID, 0, 0)
    assert config.initial_cmd_sn == 110  # initial_cmdsn + scsicmd_pdus
    assert kernel.seen[2].fields["transport_eph"] == logins.fds[0]
    assert logins.conns[0].sock.fileno() == -1  # closed: the kernel has it
    params = {s.param: s.value for s in kernel.seen if s.param is not None}
    assert params[Param.EXP_STATSN] == "5" and params[Param.MAX_RECV_DLENGTH] == "262144"
    assert (k.recoveries, k.conn_up, k.ended) == (1, True, None)
    assert k.session.tsih == 9


def test_cmdsn_wraps(kernel: FakeKernel, logins: Logins) -> None:
    kernel.scsicmd_pdus = 0x20
    guard = SessionGuard(kernel.nl, [keeper(initial_cmdsn=0xFFFFFFF0)], login_fn=logins)
    guard.dispatch(conn_error(ConnErr.CONN_FAILED))
    assert logins.configs[0].initial_cmd_sn == 0x10


def test_failed_logins_are_retried(kernel: FakeKernel, monkeypatch: pytest.MonkeyPatch
                                   ) -> None:
    monkeypatch.setattr(recovery, "MIN_RETRY", 0.05)
    logins = Logins(failures=2)
    try:
        k = keeper()
        SessionGuard(kernel.nl, [k], login_fn=logins).dispatch(conn_error(1020))
        assert len(logins.configs) == 3 and k.recoveries == 1
        assert {c.initial_cmd_sn for c in logins.configs} == {110}
        assert kernel.names().count("START_CONN") == 1
    finally:
        logins.close()


def test_refused_rebind_stops_and_retries(kernel: FakeKernel, logins: Logins,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(recovery, "MIN_RETRY", 0.05)
    refusals = [errno.EINVAL]

    def refuse_first_start(seen):  # type: ignore[no-untyped-def]
        if seen.code == Request.START_CONN and refusals:
            return [reply(seen, r=ue.pack_r("retcode", retcode=-refusals.pop()))]
        return None

    kernel.handler = refuse_first_start
    k = keeper()
    SessionGuard(kernel.nl, [k], login_fn=logins).dispatch(conn_error(1020))
    names = kernel.names()
    assert names.count("START_CONN") == 2 and names.count("BIND_CONN") == 2
    first_start = names.index("START_CONN")
    assert names[first_start + 1] == "STOP_CONN"  # stopped again before the next try
    assert k.recoveries == 1 and len(logins.conns) == 2
    assert all(c.sock.fileno() == -1 for c in logins.conns)


def test_invalid_host_ends_and_destroys_the_session(kernel: FakeKernel,
                                                    logins: Logins) -> None:
    k = keeper()
    guard = SessionGuard(kernel.nl, [k], login_fn=logins)
    kernel.send(*event(Event.CONN_ERROR, "connerror", sid=3, cid=0,
                       error=ConnErr.INVALID_HOST))
    with pytest.raises(SessionFailed, match="INVALID_HOST"):
        guard.run()  # its only session is over: the loop ends, saying why
    assert k.ended is not None and k.failed and not k.conn_up
    # destroyed, not left for nobody to keep; no relogin tried
    assert kernel.names() == ["STOP_CONN", "DESTROY_CONN", "DESTROY_SESSION"]
    assert kernel.seen[0].fields["flag"] == ue.StopConn.TERM
    assert logins.configs == []


def test_other_sessions_are_not_ours(kernel: FakeKernel, logins: Logins) -> None:
    guard = SessionGuard(kernel.nl, [keeper()], login_fn=logins)
    guard.dispatch(conn_error(1020, sid=99))
    guard.dispatch(ue.SessionEvent(Event.DESTROY_SESSION, 99, 1))
    assert kernel.seen == [] and logins.configs == [] and guard.live()


def test_destroyed_elsewhere_ends_the_loop(kernel: FakeKernel, logins: Logins) -> None:
    k = keeper()
    guard = SessionGuard(kernel.nl, [k], login_fn=logins)
    kernel.send(*event(Event.UNBIND_SESSION, "unbind_session", sid=3, host_no=4))
    kernel.send(*event(Event.DESTROY_SESSION, "d_session", host_no=4, sid=3))
    guard.run()  # returns: nothing left to keep
    assert k.ended is not None and "another process" in k.ended


def test_run_answers_events_until_a_signal(kernel: FakeKernel, logins: Logins) -> None:
    k = keeper()
    guard = SessionGuard(kernel.nl, [k], login_fn=logins)
    kernel.nl.watch_signals([signal.SIGUSR1])
    try:
        kernel.send(*event(Event.CONN_ERROR, "connerror", sid=3, cid=0, error=1020))
        kernel.send(*event(Event.CONN_ERROR, "connerror", sid=3, cid=0, error=1019))
        threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGUSR1)).start()
        guard.run()
    finally:
        kernel.nl._loop.remove_signal_handler(signal.SIGUSR1)
    assert kernel.nl.stop_signal == signal.SIGUSR1
    assert k.recoveries >= 1 and k.conn_up


def test_a_signal_mid_recovery_stops_it(kernel: FakeKernel, logins: Logins) -> None:
    k = keeper(time2wait=5)
    guard = SessionGuard(kernel.nl, [k], login_fn=logins)
    kernel.nl.watch_signals([signal.SIGUSR1])
    try:
        kernel.send(*event(Event.CONN_ERROR, "connerror", sid=3, cid=0, error=1020))
        threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGUSR1)).start()
        guard.run()  # returns during DefaultTime2Wait, before any relogin
    finally:
        kernel.nl._loop.remove_signal_handler(signal.SIGUSR1)
    assert logins.configs == [] and not k.conn_up  # the teardown will skip the Logout
    assert kernel.names() == ["STOP_CONN", "GET_STATS"]


def test_repeated_error_during_the_wait_is_answered_once(kernel: FakeKernel,
                                                         logins: Logins) -> None:
    k = keeper(time2wait=1)
    guard = SessionGuard(kernel.nl, [k], login_fn=logins)
    threading.Timer(0.2, kernel.send, event(Event.CONN_ERROR, "connerror", sid=3, cid=0,
                                            error=1019)).start()
    guard.dispatch(conn_error(1020))
    assert kernel.nl.next_event(0.2) is None and guard._deferred == []
    assert k.recoveries == 1 and len(logins.configs) == 1
