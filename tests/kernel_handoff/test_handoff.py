"""kernel_handoff.handoff against a scripted kernel, a fake sysfs and a real TCP socket.

What the sequence sends (order, CmdSN, our fd, every parameter's value), that the disks
are found through sysfs, and that every failure undoes what was created and closes our
socket. The same code against Debian's real kernel: tests/vm/guest/test_kernel_*.py.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fake_kernel import FakeKernel, Seen

from kernel_handoff import uevent as ue
from kernel_handoff.errors import HandoffError, KernelIscsiError
from kernel_handoff.handoff import HandoffOptions, KernelSession, handoff
from kernel_handoff.sysfs import DisksTimeout
from kernel_handoff.uevent import Param, Request
from userland.connection import Connection
from userland.errors import ProtocolError
from userland.keys import Negotiator
from userland.login.machine import LoginResult
from userland.login.run import LoggedIn
from userland.pdu import LogoutResponse, decode
from userland.portal import Portal

TARGET = "iqn.2024-01.org.example:disk1"
INITIATOR = "iqn.2024-01.org.example:host"
HANDLE = 18446744072644178752
ISID = bytes.fromhex("80aabbccddee")


class Tree:
    """Just enough sysfs: the tcp transport, and what scanning session 3 makes."""

    def __init__(self, base: Path) -> None:
        self.root = base / "sys"
        self.dev = base / "dev"
        (self.dev / "disk" / "by-path").mkdir(parents=True)
        tcp = self.root / "class" / "iscsi_transport" / "tcp"
        tcp.mkdir(parents=True)
        (tcp / "handle").write_text(f"{HANDLE}\n")
        self.with_block = True

    def make_session(self, sid: int, host: int) -> None:
        host_dir = self.root / "devices" / "platform" / f"host{host}"
        sess = host_dir / f"session{sid}"
        cls = sess / "iscsi_session" / f"session{sid}"
        cls.mkdir(parents=True)
        (cls / "targetname").write_text(TARGET + "\n")
        os.symlink(os.path.relpath(sess, cls), cls / "device")
        (self.root / "class" / "iscsi_session").mkdir(parents=True, exist_ok=True)
        os.symlink(cls, self.root / "class" / "iscsi_session" / f"session{sid}")
        scan = self.root / "class" / "scsi_host" / f"host{host}"
        scan.mkdir(parents=True)
        (scan / "scan").write_text("")
        target = sess / f"target{host}:0:0"
        for lun, kind in ((0, "12"), (1, "0")):
            sdev = target / f"{host}:0:0:{lun}"
            sdev.mkdir(parents=True)
            (sdev / "type").write_text(kind + "\n")
        if self.with_block:
            block = target / f"{host}:0:0:1" / "block" / "sdb"
            block.mkdir(parents=True)
            (block / "size").write_text("2097152\n")


class Peer:
    """A loopback TCP connection: ours (logged in, to hand over) and the target's end."""

    def __init__(self) -> None:
        listener = socket.create_server(("127.0.0.1", 0))
        ours = socket.create_connection(listener.getsockname())
        ours.settimeout(15.0)  # as login leaves it: a peek must still not wait
        self.target, _ = listener.accept()
        listener.close()
        port = ours.getpeername()[1]
        self.portal = Portal("127.0.0.1", port)
        self.conn = Connection(ours, self.portal)
        self.fd = ours.fileno()


def login_result(**negotiated: Any) -> LoginResult:
    neg = dataclasses.replace(Negotiator(session_type="Normal").result(),
                              max_recv_data_segment_length=262144,
                              max_xmit_data_segment_length=65536, first_burst_length=65536,
                              max_burst_length=1048576, initial_r2t=False,
                              target_portal_group_tag=1, **negotiated)
    return LoginResult(negotiated=neg, isid=ISID, tsih=7, cid=0, cmd_sn=1234,
                       exp_stat_sn=88, max_cmd_sn=1300, auth_method="None")


@pytest.fixture
def peer() -> Iterator[Peer]:
    p = Peer()
    yield p
    p.target.close()
    p.conn.close()


@pytest.fixture
def tree(tmp_path: Path) -> Tree:
    return Tree(tmp_path)


@pytest.fixture
def kernel(tree: Tree) -> Iterator[FakeKernel]:
    def on_start(seen: Seen) -> None:
        if seen.code == Request.START_CONN:
            tree.make_session(3, 4)
        # and the usual answer: FakeKernel's own

    k = FakeKernel()
    k.handler = on_start
    yield k
    k.close()


def opts(tree: Tree, **kw: Any) -> HandoffOptions:
    # One socket for all: the fake kernel has no port id 0xFFFFFFFF to bind.
    return HandoffOptions(sysfs_root=tree.root, dev_root=tree.dev, by_path_timeout=0,
                          creator=contextlib.nullcontext, **kw)


def run(kernel: FakeKernel, tree: Tree, peer: Peer, result: LoginResult | None = None,
        **kw: Any) -> KernelSession:
    logged_in = LoggedIn(peer.conn, result or login_result(), peer.portal, [])
    return handoff(kernel.nl, logged_in, initiator_name=INITIATOR, target_name=TARGET,
                   options=opts(tree, **kw))


def params(kernel: FakeKernel) -> dict[Param, str]:
    return {s.param: s.value for s in kernel.seen if s.param is not None}


def test_sequence_values_and_disks(kernel: FakeKernel, tree: Tree, peer: Peer) -> None:
    session = run(kernel, tree, peer)
    names = kernel.names()
    assert names[:3] == ["CREATE_SESSION", "CREATE_CONN", "SET_PARAM SESS_RECOVERY_TMO"]
    assert names[3] == "BIND_CONN" and names[-1] == "START_CONN"
    assert kernel.seen[0].fields == {"initial_cmdsn": 1234, "cmds_max": 128,
                                     "queue_depth": 32}
    bind = kernel.seen[3].fields
    assert bind == {"sid": 3, "cid": 0, "transport_eph": peer.fd, "is_leading": 1}
    p = params(kernel)
    assert p[Param.MAX_RECV_DLENGTH] == "262144" and p[Param.MAX_XMIT_DLENGTH] == "65536"
    assert p[Param.FIRST_BURST] == "65536" and p[Param.MAX_BURST] == "1048576"
    assert p[Param.INITIAL_R2T_EN] == "0" and p[Param.IMM_DATA_EN] == "1"
    assert p[Param.HDRDGST_EN] == "0" and p[Param.DATADGST_EN] == "0"
    assert p[Param.EXP_STATSN] == "88" and p[Param.ERL] == "0" and p[Param.MAX_R2T] == "1"
    assert p[Param.TARGET_NAME] == TARGET and p[Param.INITIATOR_NAME] == INITIATOR
    assert p[Param.PERSISTENT_ADDRESS] == "127.0.0.1"
    assert p[Param.PERSISTENT_PORT] == str(peer.portal.port)
    assert p[Param.TPGT] == "1" and p[Param.ISID] == ISID.hex()
    assert p[Param.IFACE_NAME] == "iscsi-handoff"
    assert p[Param.SESS_RECOVERY_TMO] == "120" and p[Param.RECV_TMO] == "5"
    # Every SET_PARAM but the recovery timeout comes after the bind.
    first_bind = names.index("BIND_CONN")
    assert all(n.startswith("SET_PARAM") for n in names[first_bind + 1:-1])
    assert peer.conn.sock.fileno() == -1  # ours is closed: the kernel holds the socket
    assert (session.sid, session.host_no, session.cid) == (3, 4, 0)
    assert session.initial_cmdsn == 1234 and session.tsih == 7
    assert [(d.lun, d.name, d.size_bytes) for d in session.disks] == [(1, "sdb", 1 << 30)]
    assert session.by_path(1) == (f"/dev/disk/by-path/ip-127.0.0.1:{peer.portal.port}"
                                  f"-iscsi-{TARGET}-lun-1")


def test_digests_and_markers(kernel: FakeKernel, tree: Tree, peer: Peer) -> None:
    for param in (Param.IFMARKER_EN, Param.OFMARKER_EN, Param.ISID, Param.FAST_ABORT):
        kernel.fail[(Request.SET_PARAM, param)] = errno.ENOSYS  # as iscsi_tcp answers
    run(kernel, tree, peer, login_result(header_digest="CRC32C", data_digest="CRC32C"))
    p = params(kernel)
    assert p[Param.HDRDGST_EN] == "1" and p[Param.DATADGST_EN] == "1"


def test_a_required_param_refused_undoes_all(kernel: FakeKernel, tree: Tree,
                                             peer: Peer) -> None:
    kernel.fail[(Request.SET_PARAM, Param.MAX_BURST)] = errno.EINVAL
    with pytest.raises(KernelIscsiError, match="MAX_BURST"):
        run(kernel, tree, peer)
    assert kernel.names()[-3:] == ["STOP_CONN", "DESTROY_CONN", "DESTROY_SESSION"]
    assert kernel.seen[-3].fields["flag"] == ue.StopConn.TERM
    assert peer.conn.sock.fileno() == -1


def test_start_refused_undoes_all(kernel: FakeKernel, tree: Tree,
                                  peer: Peer) -> None:
    kernel.retcode_fail[Request.START_CONN] = errno.EINVAL
    with pytest.raises(KernelIscsiError, match="START_CONN"):
        run(kernel, tree, peer)
    assert kernel.names()[-3:] == ["STOP_CONN", "DESTROY_CONN", "DESTROY_SESSION"]
    assert peer.conn.sock.fileno() == -1


def test_failure_before_bind_logs_out_on_our_socket(kernel: FakeKernel, tree: Tree,
                                                    peer: Peer) -> None:
    kernel.fail[(Request.CREATE_CONN, None)] = errno.ENOMEM
    answered: list[int] = []

    def target() -> None:  # answer the Logout our undo sends on the still-ours socket
        data = peer.target.recv(48)
        answered.append(data[0] & 0x3F)
        rsp = LogoutResponse(itt=int.from_bytes(data[16:20], "big"), stat_sn=88)
        peer.target.sendall(rsp.encode())

    t = threading.Thread(target=target)
    t.start()
    with pytest.raises(KernelIscsiError, match="CREATE_CONN"):
        run(kernel, tree, peer)
    t.join(5)
    assert answered == [0x06]
    assert kernel.names()[-1] == "DESTROY_SESSION"
    assert "BIND_CONN" not in kernel.names()
    assert peer.conn.sock.fileno() == -1


def test_unread_bytes_forbid_the_bind(kernel: FakeKernel, tree: Tree,
                                      peer: Peer) -> None:
    nop_in = bytes([0x20, 0x80]) + bytes(46)
    peer.target.sendall(nop_in)
    peer.target.close()  # and gone: the undo's Logout on our socket fails at once
    time.sleep(0.05)
    with pytest.raises(HandoffError, match="right after the final login response"):
        run(kernel, tree, peer)
    assert "BIND_CONN" not in kernel.names()
    assert kernel.names()[-2:] == ["DESTROY_CONN", "DESTROY_SESSION"]
    assert decode(nop_in).itt == 0  # what was waiting was a whole PDU, unread by us


def test_erl_above_zero_is_refused_before_binding(kernel: FakeKernel, tree: Tree,
                                                  peer: Peer) -> None:
    peer.target.close()
    with pytest.raises(ProtocolError, match="ErrorRecoveryLevel 1"):
        run(kernel, tree, peer, login_result(error_recovery_level=1))
    assert "BIND_CONN" not in kernel.names()


def test_disk_never_appearing_logs_out(kernel: FakeKernel, tree: Tree,
                                       peer: Peer) -> None:
    tree.with_block = False
    with pytest.raises(DisksTimeout):
        run(kernel, tree, peer, disk_timeout=0.3)
    tail = kernel.names()[kernel.names().index("START_CONN") + 1:]
    assert tail == ["UNBIND_SESSION", "SEND_PDU", "STOP_CONN", "DESTROY_CONN",
                    "DESTROY_SESSION"]
    logout = kernel.seen[[s.name for s in kernel.seen].index("SEND_PDU")]
    assert logout.fields["hdr_size"] == 48 and logout.tail[:2] == bytes([0x46, 0x80])
