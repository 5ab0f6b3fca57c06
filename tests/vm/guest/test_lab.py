"""The lab itself: the guest runs Debian's stock kernel with the modules and mounts the
other guest tests rely on."""

from __future__ import annotations

import os
import socket
from pathlib import Path

from ..vmlab.modules import WANTED

NETLINK_ISCSI = 8
ISCSI_NL_GRP_ISCSID = 1


def loaded_modules() -> set[str]:
    return {line.split()[0] for line in Path("/proc/modules").read_text().splitlines()}


def test_guest_runs_the_resolved_stock_kernel(release: str) -> None:
    assert os.uname().release == release
    assert "Debian" in os.uname().version
    moddir = Path("/lib/modules") / release
    assert (moddir / "modules.dep").is_file(), "depmod's modules.dep missing in the guest"
    # bcc compiles against this: Debian's headers package, linked as Debian links it
    assert (moddir / "build" / "Makefile").is_file(), \
        f"{moddir}/build does not reach linux-headers-{release} (is it installed on the host?)"


def test_every_wanted_module_is_loaded() -> None:
    results = Path(os.environ["VMLAB_RESULTS"])
    failed = (results / "modules.failed").read_text().strip()
    absent = (results / "modules.absent").read_text().split()
    assert failed == "", f"insmod failed in the initramfs: {failed}"
    missing = set(WANTED) - set(absent) - loaded_modules()
    # built-in ones have /sys/module/<name> too, without being in /proc/modules
    missing = {m for m in missing if not Path(f"/sys/module/{m}").is_dir()}
    assert not missing, f"modules not loaded: {sorted(missing)}"


def test_iscsi_tcp_transport_is_registered() -> None:
    assert {"scsi_transport_iscsi", "iscsi_tcp"} <= loaded_modules()
    handle = Path("/sys/class/iscsi_transport/tcp/handle").read_text().strip()
    assert int(handle) != 0


def test_netlink_iscsi_socket_opens_and_joins_the_iscsid_group() -> None:
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_ISCSI) as sock:
        sock.bind((0, ISCSI_NL_GRP_ISCSID))  # pid 0: the kernel assigns our port id
        assert sock.getsockname()[0] != 0


def test_root_is_a_writable_overlay_and_the_system_mounts_are_there() -> None:
    mounts = {}
    for line in Path("/proc/mounts").read_text().splitlines():
        _dev, point, fstype, *_ = line.split()
        mounts[point] = fstype
    assert mounts["/"] == "overlay"
    for point, fstype in {"/proc": "proc", "/sys": "sysfs", "/dev": "devtmpfs",
                          "/dev/shm": "tmpfs", "/run": "tmpfs", "/tmp": "tmpfs",
                          "/sys/kernel/debug": "debugfs", "/sys/kernel/tracing": "tracefs",
                          "/sys/fs/fuse/connections": "fusectl"}.items():
        assert mounts.get(point) == fstype, f"{point} is not {fstype}: {mounts.get(point)}"
    probe = Path("/etc/vmlab-write-probe")
    probe.write_text("guest only\n")  # lands in the overlay's tmpfs, not on the host
    probe.unlink()


def test_loopback_is_up_and_nothing_else() -> None:
    names = sorted(p.name for p in Path("/sys/class/net").iterdir())
    assert names == ["lo"], f"the guest should have no network card (-nic none): {names}"
    assert Path("/sys/class/net/lo/operstate").read_text().strip() in ("unknown", "up")
    with socket.create_server(("127.0.0.1", 0)) as server, \
            socket.create_connection(server.getsockname(), timeout=5):
        conn, _ = server.accept()
        conn.close()


def test_open_iscsi_initiator_name_is_written() -> None:
    text = Path("/etc/iscsi/initiatorname.iscsi").read_text()
    assert text.startswith("InitiatorName=iqn.")
