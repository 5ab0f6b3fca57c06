"""bcc in the guest: Debian's python3-bpfcc from the venv (through the lab's .pth), and a
program compiled against the guest kernel's headers counts calls into the iSCSI code."""

from __future__ import annotations

import socket
import struct
from pathlib import Path

NETLINK_ISCSI = 8
UEVENT_SIZE = 56  # struct iscsi_uevent

PROGRAM = b"""
BPF_ARRAY(calls, u64, 1);
int on_rx(void *ctx) {
    int key = 0;
    u64 *n = calls.lookup(&key);
    if (n) __sync_fetch_and_add(n, 1);
    return 0;
}
int on_bind(void *ctx) { return 0; }
"""


def test_bcc_is_debians_and_importable_from_the_venv() -> None:
    import bcc

    real = Path(bcc.__file__).resolve()
    assert real.is_relative_to("/usr/lib/python3/dist-packages/bcc"), real


def test_bcc_kprobes_fire_in_iscsi_code() -> None:
    from bcc import BPF

    prog = BPF(text=PROGRAM)  # compiled against /lib/modules/<release>/build
    try:
        # iscsi_if_rx: every NETLINK_ISCSI message; iscsi_sw_tcp_conn_bind: where a socket
        # is handed to iscsi_tcp. Both kprobe-able on Debian's 6.1 (iscsi_if_recv_msg is
        # inlined and is not).
        prog.attach_kprobe(event=b"iscsi_if_rx", fn_name=b"on_rx")
        prog.attach_kprobe(event=b"iscsi_sw_tcp_conn_bind", fn_name=b"on_bind")
        assert prog.num_open_kprobes() == 2
        _send_harmless_netlink_iscsi()
        calls = prog[b"calls"][0].value
        assert calls >= 1, "the kprobe on iscsi_if_rx never fired"
    finally:
        prog.cleanup()


def _send_harmless_netlink_iscsi() -> None:
    """A request naming transport handle 0: the kernel answers -EINVAL and does nothing."""
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_ISCSI) as sock:
        sock.bind((0, 0))
        # nlmsghdr(len, type, flags, seq, pid) + a zeroed uevent (type 0, handle 0)
        msg = struct.pack("=IHHII", 16 + UEVENT_SIZE, 0, 0, 1, 0) + bytes(UEVENT_SIZE)
        sock.sendto(msg, (0, 0))
        sock.settimeout(10)
        sock.recv(4096)  # the kernel's answer: handled synchronously, so the probe ran
