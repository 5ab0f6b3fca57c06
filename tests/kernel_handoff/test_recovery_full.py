"""Recovery all the way, against a scripted kernel and a fake sysfs: a target's request
to log out, a connection failing during the teardown, the SCSI uevents that ask for a
rescan, and the rescan itself (offline devices back to running, new and resized LUNs).
The same against Debian's kernel and tgtd: tests/vm/guest/test_recovery_full.py."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fake_kernel import FakeKernel, Seen, event
from test_recovery import Logins, keeper

from kernel_handoff import uevent as ue
from kernel_handoff.recovery import SessionGuard
from kernel_handoff.scan import rescan_session
from kernel_handoff.scsi_events import ScsiEvent, parse_uevent
from kernel_handoff.teardown import logout_session
from kernel_handoff.uevent import ConnErr, Event, RecvPduEvent, Request
from userland.pdu import Opcode

HANDLE = 77


@pytest.fixture
def kernel() -> Iterator[FakeKernel]:
    k = FakeKernel(scsicmd_pdus=10)
    k.conns.add((3, 0))
    yield k
    k.close()


@pytest.fixture
def logins() -> Iterator[Logins]:
    fake = Logins()
    yield fake
    fake.close()


def async_logout_request(within: int) -> RecvPduEvent:
    bhs = bytearray(48)
    bhs[0] = Opcode.ASYNC_MESSAGE
    bhs[1] = 0x80
    bhs[16:20] = b"\xff\xff\xff\xff"
    bhs[36] = 1  # AsyncEvent: the target requests a logout
    bhs[42:44] = within.to_bytes(2, "big")  # Parameter3
    return RecvPduEvent(3, 0, 0, bytes(bhs), b"")


def test_async_logout_request_is_answered_with_a_logout_then_a_relogin(
        kernel: FakeKernel, logins: Logins) -> None:
    k = keeper()
    guard = SessionGuard(kernel.nl, [k], login_fn=logins)
    guard.dispatch(async_logout_request(within=5))
    assert kernel.names() == ["SEND_PDU"]  # a Logout through the kernel, no drop
    pdu = kernel.seen[0].tail[:48]
    assert pdu[0] == 0x40 | Opcode.LOGOUT_REQUEST and pdu[1] == 0x80  # immediate, close
    assert k.logout_deadline is not None and logins.configs == []
    response = kernel.nl.next_event(2.0)  # the fake kernel answers every SEND_PDU
    assert isinstance(response, RecvPduEvent) and response.opcode == Opcode.LOGOUT_RESPONSE
    guard.dispatch(response)
    names = kernel.names()
    assert names[1:4] == ["STOP_CONN", "GET_STATS", "BIND_CONN"] and names[-1] == "START_CONN"
    assert k.recoveries == 1 and k.conn_up and k.logout_deadline is None


def test_async_logout_without_a_response_relogs_in_at_its_deadline(
        kernel: FakeKernel, logins: Logins) -> None:
    def no_response(seen: Seen) -> list[tuple[int, bytes]] | None:
        if seen.code == Request.SEND_PDU:  # taken, but the target never answers
            return [(Request.SEND_PDU, ue.encode_uevent(Request.SEND_PDU))]
        return None

    kernel.handler = no_response
    k = keeper()
    guard = SessionGuard(kernel.nl, [k], login_fn=logins)
    guard.dispatch(async_logout_request(within=0))  # 0: "no time given", our own wait
    assert k.logout_deadline is not None
    k.logout_deadline = time.monotonic()  # as if the wait had run out
    guard._check_deadlines()
    assert k.recoveries == 1 and "START_CONN" in kernel.names()


def test_other_async_events_are_only_logged(kernel: FakeKernel, logins: Logins) -> None:
    ev = async_logout_request(0)
    bhs = bytearray(ev.bhs)
    bhs[36] = 0  # a SCSI event
    guard = SessionGuard(kernel.nl, [keeper()], login_fn=logins)
    guard.dispatch(RecvPduEvent(3, 0, 0, bytes(bhs), b""))
    assert kernel.seen == [] and logins.configs == []


def _conn_error_instead_of_logout(seen: Seen) -> list[tuple[int, bytes]] | None:
    if seen.code == Request.SEND_PDU:
        return [(Request.SEND_PDU, ue.encode_uevent(Request.SEND_PDU)),
                event(Event.CONN_ERROR, "connerror", sid=3, cid=0,
                      error=ConnErr.TCP_CONN_CLOSE)]
    return None


def test_a_connection_failing_during_logout_short_circuits_it(kernel: FakeKernel) -> None:
    kernel.handler = _conn_error_instead_of_logout
    began = time.monotonic()
    report = logout_session(kernel.nl, HANDLE, 3, 0, conn_up=True, logout_timeout=15.0)
    took = time.monotonic() - began
    assert report.destroyed and report.unbound and not report.logged_out
    assert report.logout_response is None
    assert kernel.names() == ["UNBIND_SESSION", "SEND_PDU", "STOP_CONN", "DESTROY_CONN",
                              "DESTROY_SESSION"]
    assert took < 15.0, "waited out the Logout Response that could not come"


def test_a_connection_failing_during_unbind_stops_it_and_skips_the_logout(
        kernel: FakeKernel) -> None:
    def fail_at_unbind(seen: Seen) -> list[tuple[int, bytes]] | None:
        if seen.code == Request.UNBIND_SESSION:
            return [(Request.UNBIND_SESSION, ue.encode_uevent(Request.UNBIND_SESSION)),
                    event(Event.CONN_ERROR, "connerror", sid=3, cid=0,
                          error=ConnErr.TCP_CONN_CLOSE)]
        if seen.code == Request.STOP_CONN:  # failing the I/O lets the removal finish
            return [(Request.STOP_CONN, ue.encode_uevent(Request.STOP_CONN)),
                    event(Event.UNBIND_SESSION, "unbind_session", sid=3, host_no=4)]
        return None

    kernel.handler = fail_at_unbind
    report = logout_session(kernel.nl, HANDLE, 3, 0, conn_up=True, unbind_timeout=5.0)
    assert report.destroyed and report.unbound and report.logout_response is None
    assert kernel.names() == ["UNBIND_SESSION", "STOP_CONN", "DESTROY_CONN",
                              "DESTROY_SESSION"]
    assert kernel.seen[1].fields["flag"] == ue.StopConn.TERM


# --- SCSI uevents ---------------------------------------------------------------------

def uevent(action: str, devpath: str, **env: str) -> bytes:
    items = [f"{action}@{devpath}", f"ACTION={action}", f"DEVPATH={devpath}",
             "SUBSYSTEM=scsi", *(f"{k}={v}" for k, v in env.items())]
    return "\0".join(items).encode() + b"\0"


SDEV = "/devices/platform/host4/session3/target4:0:0/4:0:0:1"


def test_reported_luns_changed_asks_for_a_rescan() -> None:
    got = parse_uevent(uevent("change", SDEV, DEVTYPE="scsi_device",
                              SDEV_UA="REPORTED_LUNS_DATA_HAS_CHANGED"))
    assert got == ScsiEvent(4, "4:0:0:1", "REPORTED_LUNS_DATA_HAS_CHANGED")
    assert parse_uevent(uevent("change", SDEV, SDEV_MEDIA_CHANGE="1")) == ScsiEvent(
        4, "4:0:0:1", "MEDIA_CHANGE")
    assert parse_uevent(uevent("change", SDEV, SDEV_UA="CAPACITY_DATA_HAS_CHANGED")) \
        is not None


@pytest.mark.parametrize("data", [
    uevent("add", SDEV, SDEV_UA="REPORTED_LUNS_DATA_HAS_CHANGED"),  # not a change
    uevent("change", SDEV),  # no unit attention
    uevent("change", SDEV, SDEV_UA="POWER_ON_RESET_OCCURRED"),  # none that needs a rescan
    uevent("change", "/devices/virtual/block/loop0", SDEV_MEDIA_CHANGE="1"),  # not H:C:T:L
    b"libudev\0\xfe\xed",  # udev's rebroadcast format
    b"",
])
def test_other_uevents_are_not_scsi_changes(data: bytes) -> None:
    assert parse_uevent(data) is None


# --- the rescan ------------------------------------------------------------------------

class Sysfs:
    """A session's SCSI devices as sysfs shows them; writes land in plain files."""

    def __init__(self, base: Path) -> None:
        self.root = base / "sys"
        self.sess = self.root / "devices" / "platform" / "host4" / "session3"
        cls = self.root / "class" / "iscsi_session" / "session3"
        cls.mkdir(parents=True)
        os.symlink(self.sess, cls / "device")
        self.scan = self.root / "class" / "scsi_host" / "host4" / "scan"
        self.scan.parent.mkdir(parents=True)
        self.scan.write_text("")
        self.disk(0, None, kind="12")

    def disk(self, lun: int, name: str | None, *, sectors: int = 2048, kind: str = "0",
             state: str = "running") -> Path:
        sdev = self.sess / "target4:0:0" / f"4:0:0:{lun}"
        sdev.mkdir(parents=True, exist_ok=True)
        (sdev / "type").write_text(kind + "\n")
        (sdev / "state").write_text(state + "\n")
        (sdev / "rescan").write_text("")
        if name is not None:
            (sdev / "block" / name).mkdir(parents=True, exist_ok=True)
            (sdev / "block" / name / "size").write_text(f"{sectors}\n")
        return sdev


def test_rescan_revives_offline_devices_and_finds_new_and_resized_luns(
        tmp_path: Path) -> None:
    tree = Sysfs(tmp_path)
    lun1 = tree.disk(1, "sdb", state="offline")
    (tmp_path / "dev").mkdir()
    # what the kernel would do during the writes: LUN 2 appears, LUN 1 grows
    tree.disk(2, "sdc")
    (lun1 / "block" / "sdb" / "size").write_text("4096\n")
    before = {"4:0:0:1": 2048}
    report = rescan_session(tree.root, 3, 4, timeout=1.0, dev_root=tmp_path / "dev")
    assert (lun1 / "state").read_text().split() == ["running"]
    assert report.revived == ["4:0:0:1"]
    assert tree.scan.read_text() == "- - -"
    assert (lun1 / "rescan").read_text() == "1"
    assert (tree.sess / "target4:0:0" / "4:0:0:0" / "rescan").read_text() == "1"
    assert {d.name for d in report.disks} == {"sdb", "sdc"}
    assert report.errors == [] and before  # every write was taken
    # both were there before the call in this fake: nothing counts as added or resized
    assert report.added == [] and report.resized == []
    assert "offline -> running" in report.summary()


def test_rescan_reports_a_lun_that_appears_and_one_that_grows(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch
                                                              ) -> None:
    tree = Sysfs(tmp_path)
    lun1 = tree.disk(1, "sdb")
    (tmp_path / "dev").mkdir()
    from kernel_handoff import scan
    from kernel_handoff.sysfs import SysfsRoot
    from kernel_handoff.sysfs import scan_host as real_scan_host

    def kernel_scans(root: SysfsRoot, host_no: int) -> None:
        real_scan_host(root, host_no)
        tree.disk(2, "sdc", sectors=8192)
        (lun1 / "block" / "sdb" / "size").write_text("4096\n")

    monkeypatch.setattr(scan, "scan_host", kernel_scans)
    report = rescan_session(tree.root, 3, 4, timeout=1.0, dev_root=tmp_path / "dev")
    assert [(d.lun, d.name) for d in report.added] == [(2, "sdc")]
    assert [(d.name, d.size_bytes, was) for d, was in report.resized] == [
        ("sdb", 4096 * 512, 2048 * 512)]
    assert report.revived == [] and report.errors == []


def test_rescan_of_a_missing_host_says_so(tmp_path: Path) -> None:
    tree = Sysfs(tmp_path)
    tree.scan.unlink()
    report = rescan_session(tree.root, 3, 4, timeout=0.2, dev_root=tmp_path)
    assert any("SCSI host 4 is not in sysfs" in e for e in report.errors)


# --- the persistent portal ----------------------------------------------------------------

def test_a_redirected_session_keeps_the_named_portal_as_persistent(
        kernel: FakeKernel, logins: Logins) -> None:
    from kernel_handoff.recovery import pin_persistent_portal
    from userland.portal import Portal

    kernel.bound.add((3, 0))
    k = keeper()
    k.session.portal = Portal("127.0.0.9", 3261)  # where the redirect took the login
    k.session.address, k.session.port = "127.0.0.9", 3261
    pin_persistent_portal(kernel.nl, k)
    params = {s.param: s.value for s in kernel.seen if s.param is not None}
    assert params == {ue.Param.PERSISTENT_ADDRESS: "127.0.0.1",
                      ue.Param.PERSISTENT_PORT: "3260"}
    assert (k.session.address, k.session.port) == ("127.0.0.1", 3260)
    # a relogin keeps them, wherever it lands
    SessionGuard(kernel.nl, [k], login_fn=logins).dispatch(
        ue.ConnErrorEvent(3, 0, ConnErr.TCP_CONN_CLOSE))
    later = [s.value for s in kernel.seen if s.param == ue.Param.PERSISTENT_ADDRESS]
    assert later[-1] == "127.0.0.1"


def test_a_session_not_redirected_keeps_the_peer_address(kernel: FakeKernel) -> None:
    from kernel_handoff.recovery import pin_persistent_portal

    k = keeper()
    pin_persistent_portal(kernel.nl, k)
    assert kernel.seen == []


# --- sessions recovering independently -------------------------------------------------

def test_one_sessions_recovery_never_holds_up_anothers(kernel: FakeKernel,
                                                       logins: Logins) -> None:
    import dataclasses
    import threading

    from kernel_handoff.recovery import Keeper

    kernels: list[FakeKernel] = []

    def open_nl():  # type: ignore[no-untyped-def]
        k = FakeKernel(scsicmd_pdus=10)  # each recovery's own socket, its own kernel
        k.conns.update({(3, 0), (5, 0)})
        kernels.append(k)
        return k.nl

    release = threading.Event()
    slow_isid = keeper().session.isid

    def login_fn(portal, config, timeout):  # type: ignore[no-untyped-def]
        if config.isid == slow_isid:
            release.wait(10)  # session 3's target takes its time
        return logins(portal, config, timeout)

    one = keeper()
    other_session = dataclasses.replace(one.session, sid=5, isid=bytes.fromhex("80aaaa000005"))
    two = Keeper(other_session, one.portal, dataclasses.replace(one.config,
                 isid=other_session.isid), one.timers, 5.0)
    guard = SessionGuard(kernel.nl, [one, two], login_fn=login_fn, open_nl=open_nl)
    try:
        guard.dispatch(ue.ConnErrorEvent(3, 0, ConnErr.TCP_CONN_CLOSE))
        guard.dispatch(ue.ConnErrorEvent(5, 0, ConnErr.TCP_CONN_CLOSE))
        deadline = time.monotonic() + 10
        while two.recoveries == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert two.recoveries == 1 and two.conn_up  # while session 3 still waits
        assert one.recoveries == 0 and not one.conn_up
        # a repeated error for the session in recovery starts no second recovery
        guard.dispatch(ue.ConnErrorEvent(3, 0, ConnErr.TCP_CONN_CLOSE))
        release.set()
        assert one.worker is not None
        one.worker.join(10)
        assert one.recoveries == 1 and one.conn_up
        assert kernel.seen == []  # every request went on the recoveries' own sockets
        assert sum(k.names().count("START_CONN") for k in kernels) == 2
    finally:
        release.set()
        guard.stop()
        for k in kernels:
            k.close()
