"""kernel_handoff.netlink: the real host kernel for opening, a scripted kernel for the rest.

This host's kernel has no NETLINK_ISCSI, so opening the socket shows the real
EPROTONOSUPPORT path. Request/reply matching, event queueing, errors, timeouts and
signals run against FakeKernel (a socketpair) through the same pyroute2 socket code.
"""

from __future__ import annotations

import errno
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fake_kernel import FakeKernel, Seen, event, reply

from kernel_handoff import netlink
from kernel_handoff import uevent as ue
from kernel_handoff.errors import KernelIscsiError, KernelUnavailable, NetlinkTimeout
from kernel_handoff.netlink import NETLINK_ISCSI, IscsiNetlink
from kernel_handoff.uevent import ConnErrorEvent, Event, Request, SessionEvent
from userland.errors import EXIT_UNAVAILABLE

HANDLE = 1234


def _netlink_iscsi_supported() -> bool:
    try:
        socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_ISCSI).close()
    except OSError as exc:
        assert exc.errno == errno.EPROTONOSUPPORT
        return False
    return True


def test_opening_on_this_kernel() -> None:
    if _netlink_iscsi_supported():
        with IscsiNetlink() as nl:  # bound to group 1: needs root, as every request does
            assert nl.next_event(0.01) is None or True
        return
    with pytest.raises(KernelUnavailable) as info:
        IscsiNetlink()
    assert "no iSCSI transport" in str(info.value)
    assert "EPROTONOSUPPORT" in str(info.value)
    assert info.value.exit_code == EXIT_UNAVAILABLE


@pytest.fixture
def kernel() -> Iterator[FakeKernel]:
    k = FakeKernel()
    yield k
    k.close()


def test_reply_matched_and_early_event_queued(kernel: FakeKernel) -> None:
    # The CREATE_SESSION event (106) comes before the reply: it is kept for later.
    reply_ev = kernel.nl.request(ue.create_session(HANDLE, initial_cmdsn=9))
    assert reply_ev.fields_r("c_session_ret") == {"sid": 3, "host_no": 4}
    assert kernel.nl.next_event(0.5) == SessionEvent(Event.CREATE_SESSION, 3, 4)
    assert kernel.seen[0].fields == {"initial_cmdsn": 9, "cmds_max": 128, "queue_depth": 32}


def test_if_error_names_request_and_errno(kernel: FakeKernel) -> None:
    kernel.fail[(Request.SET_PARAM, ue.Param.IFMARKER_EN)] = errno.ENOSYS
    with pytest.raises(KernelIscsiError) as info:
        kernel.nl.request(ue.set_param(HANDLE, 3, 0, ue.Param.IFMARKER_EN, False))
    assert info.value.errno == errno.ENOSYS
    assert "SET_PARAM IFMARKER_EN (session 3)" in str(info.value)
    assert "ENOSYS" in str(info.value)


def test_negative_retcode_is_an_error(kernel: FakeKernel) -> None:
    kernel.retcode_fail[Request.START_CONN] = errno.EINVAL
    with pytest.raises(KernelIscsiError) as info:
        kernel.nl.request(ue.start_conn(HANDLE, 3, 0))
    assert info.value.errno == errno.EINVAL and "START_CONN" in str(info.value)


def test_eperm_says_root(kernel: FakeKernel) -> None:
    kernel.fail[(Request.CREATE_SESSION, None)] = errno.EPERM
    with pytest.raises(KernelIscsiError, match="need root"):
        kernel.nl.request(ue.create_session(HANDLE, initial_cmdsn=1))


def test_every_wait_is_bounded(kernel: FakeKernel) -> None:
    kernel.silent.add(Request.START_CONN)
    began = time.monotonic()
    with pytest.raises(NetlinkTimeout) as info:
        kernel.nl.request(ue.start_conn(HANDLE, 3, 0), timeout=0.3)
    assert 0.25 < time.monotonic() - began < 2
    assert "START_CONN (session 3)" in str(info.value)
    assert kernel.nl.next_event(0.1) is None


def test_late_reply_is_not_taken_for_the_next(kernel: FakeKernel) -> None:
    kernel.silent.add(Request.START_CONN)
    with pytest.raises(NetlinkTimeout):
        kernel.nl.request(ue.start_conn(HANDLE, 3, 0), timeout=0.2)
    # The START_CONN reply arrives late, just before the answer to DESTROY_CONN.
    late = Seen(Request.START_CONN, {}, b"", ue.start_conn(HANDLE, 3, 0).payload)
    kernel.send(*reply(late, iferror=errno.EIO))
    kernel.nl.request(ue.destroy_conn(HANDLE, 3, 0))  # not mistaken for an error


def test_stats_come_multicast(kernel: FakeKernel) -> None:
    kernel.scsicmd_pdus = 41
    answer = kernel.nl.request(ue.get_stats(HANDLE, 3, 0))
    assert ue.decode_stats(answer.tail).scsicmd_pdus == 41


def test_stats_for_another_session_are_an_event(kernel: FakeKernel) -> None:
    def other_first(seen: Seen) -> list[tuple[int, bytes]] | None:
        if seen.code != Request.GET_STATS:
            return None
        other = ue.encode_uevent(Request.GET_STATS, u=ue.pack_u("get_stats", sid=99, cid=0),
                                 tail=ue.encode_stats({"scsicmd_pdus": 1}))
        mine = ue.encode_uevent(Request.GET_STATS, u=ue.pack_u("get_stats", sid=3, cid=0),
                                tail=ue.encode_stats({"scsicmd_pdus": 2}))
        return [(0, other), (0, mine)]

    kernel.handler = other_first
    answer = kernel.nl.request(ue.get_stats(HANDLE, 3, 0))
    assert ue.decode_stats(answer.tail).scsicmd_pdus == 2
    queued = kernel.nl.next_event(0.1)
    assert isinstance(queued, ue.StatsEvent) and queued.sid == 99


def test_events_in_order_and_wait_for_keeps_the_rest(kernel: FakeKernel) -> None:
    kernel.send(*event(Event.CONN_ERROR, "connerror", sid=5, cid=0, error=1020))
    kernel.send(*event(Event.UNBIND_SESSION, "unbind_session", sid=3, host_no=4))
    kernel.send(*event(Event.CONN_ERROR, "connerror", sid=3, cid=0, error=1011))
    got = kernel.nl.wait_for(lambda e: isinstance(e, SessionEvent), timeout=1, what="unbind")
    assert got == SessionEvent(Event.UNBIND_SESSION, 3, 4)
    assert kernel.nl.next_event(0.5) == ConnErrorEvent(5, 0, 1020)
    assert kernel.nl.next_event(0.5) == ConnErrorEvent(3, 0, 1011)
    with pytest.raises(NetlinkTimeout):
        kernel.nl.wait_for(lambda e: True, timeout=0.1, what="nothing")


def test_a_watched_signal_ends_a_wait(kernel: FakeKernel) -> None:
    kernel.nl.watch_signals([signal.SIGUSR1])
    began = time.monotonic()
    signal.setitimer(signal.ITIMER_REAL, 0)  # no stray alarms
    pid = os.getpid()
    threading.Timer(0.2, os.kill, (pid, signal.SIGUSR1)).start()
    try:
        assert kernel.nl.next_event(None) is None
    finally:
        kernel.nl._loop.remove_signal_handler(signal.SIGUSR1)
    assert kernel.nl.stop_signal == signal.SIGUSR1
    assert time.monotonic() - began < 2


def test_after_a_signal_teardown_waits_still_wait(kernel: FakeKernel) -> None:
    # The signal that starts a logout must not cut the logout's own waits short.
    kernel.nl.watch_signals([signal.SIGUSR1])
    try:
        os.kill(os.getpid(), signal.SIGUSR1)
        assert kernel.nl.next_event(1.0) is None and kernel.nl.stop_signal == signal.SIGUSR1
        threading.Timer(0.3, kernel.send, event(Event.UNBIND_SESSION, "unbind_session",
                                                  sid=3, host_no=4)).start()
        got = kernel.nl.wait_for(lambda e: isinstance(e, SessionEvent), timeout=5,
                                 what="the unbind event")
        assert got == SessionEvent(Event.UNBIND_SESSION, 3, 4)
        kernel.nl.request(ue.destroy_session(HANDLE, 3))  # replies are awaited too
    finally:
        kernel.nl._loop.remove_signal_handler(signal.SIGUSR1)


class _Busy:
    """Stands in for IscsiNetlink(port_id=0xFFFFFFFF): EADDRINUSE ``busy`` times first
    (another process holds the port id), then a socket that only records its closing."""

    def __init__(self, busy: int) -> None:
        self.busy = busy
        self.opened: list[dict[str, object]] = []
        self.closed = 0

    def __call__(self, **kw: object) -> _Busy:
        self.opened.append(kw)
        if self.busy:
            self.busy -= 1
            raise KernelIscsiError("opening", errno.EADDRINUSE)
        return self

    def __enter__(self) -> _Busy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.closed += 1


def test_kernel_port_waits_for_the_port_id_and_releases_it(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    fake = _Busy(busy=3)
    monkeypatch.setattr(netlink, "IscsiNetlink", fake)
    with netlink.kernel_port(tmp_path / "lock", wait=5) as nl:
        assert nl is fake  # type: ignore[comparison-overlap]  # the stand-in
    assert fake.opened[-1] == {"port_id": 0xFFFFFFFF, "groups": 0} and len(fake.opened) == 4
    assert fake.closed == 1
    with pytest.raises(KernelIscsiError, match="another process holds it"):
        fake.busy = 10**6
        with netlink.kernel_port(tmp_path / "lock", wait=0.2):
            pass


def test_kernel_port_lock_queues_our_processes(monkeypatch: pytest.MonkeyPatch,
                                               tmp_path: Path) -> None:
    monkeypatch.setattr(netlink, "IscsiNetlink", _Busy(busy=0))
    lock = tmp_path / "run" / "lock"

    def take() -> None:
        with netlink.kernel_port(lock, wait=0.2):
            pass

    # Another login (here a second open of the lock file: flock is per open file, as
    # between processes) must wait its turn, for a bounded time.
    with netlink.kernel_port(lock, wait=5), \
            pytest.raises(KernelIscsiError, match="another login holds it"):
        take()
    take()  # released: free again
