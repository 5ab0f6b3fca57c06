"""kernel_handoff.sysfs against a fake sysfs tree laid out as Linux lays it out.

The tree mirrors a host with iscsi_tcp loaded and two sessions: class/ entries are
symlinks into devices/platform/host<H>/session<sid>/..., and each class directory has a
`device` link back to the session (or connection) device, as the kernel makes them.
"""

from __future__ import annotations

import builtins
import json
import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from iscsi_handoff.cli import cli
from kernel_handoff import sysfs
from kernel_handoff.sysfs import DisksTimeout, SysfsError

TARGET1 = "iqn.2024-01.org.example:disk1"
TARGET2 = "iqn.2024-01.org.example:disk2"
INITIATOR = "iqn.2024-01.org.example:initiator"
SECRET = "s3cret-never-shown"
TCP_HANDLE = 18446744072644178752  # a kernel pointer, as iscsi_tcp's handle is


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def _attrs(directory: Path, attrs: dict[str, str]) -> None:
    for name, value in attrs.items():
        _write(directory / name, value + "\n")


def _link(link: Path, target: Path) -> None:
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(os.path.relpath(target, link.parent))


class FakeSysfs:
    def __init__(self, base: Path) -> None:
        self.root = base / "sys"
        self.dev = base / "dev"
        self.platform = self.root / "devices" / "platform"
        (self.root / "class" / "iscsi_session").mkdir(parents=True)
        (self.root / "class" / "iscsi_connection").mkdir(parents=True)
        (self.root / "class" / "scsi_host").mkdir(parents=True)
        (self.dev / "disk" / "by-path").mkdir(parents=True)
        transport = self.root / "devices" / "virtual" / "iscsi_transport" / "tcp"
        _attrs(transport, {"handle": str(TCP_HANDLE), "caps": "0x39"})
        _link(self.root / "class" / "iscsi_transport" / "tcp", transport)

    def add_host(self, host: int) -> None:
        hostdir = self.platform / f"host{host}"
        scsi_host = hostdir / "scsi_host" / f"host{host}"
        _attrs(scsi_host, {"proc_name": "iscsi_tcp", "state": "running"})
        _write(scsi_host / "scan", "")
        _link(scsi_host / "device", hostdir)
        _link(self.root / "class" / "scsi_host" / f"host{host}", scsi_host)

    def add_session(self, host: int, sid: int, attrs: dict[str, str],
                    conn: dict[str, str]) -> None:
        self.add_host(host)
        sess_dev = self.platform / f"host{host}" / f"session{sid}"
        cls = sess_dev / "iscsi_session" / f"session{sid}"
        _attrs(cls, attrs)
        _link(cls / "device", sess_dev)
        _link(self.root / "class" / "iscsi_session" / f"session{sid}", cls)
        conn_dev = sess_dev / f"connection{sid}:0"
        ccls = conn_dev / "iscsi_connection" / f"connection{sid}:0"
        _attrs(ccls, conn)
        _link(ccls / "device", conn_dev)
        _link(self.root / "class" / "iscsi_connection" / f"connection{sid}:0", ccls)

    def add_disk(self, host: int, sid: int, lun: int, name: str, sectors: int,
                 model: str = "VIRTUAL-DISK") -> None:
        sess_dev = self.platform / f"host{host}" / f"session{sid}"
        target = sess_dev / f"target{host}:0:0"
        sdev = target / f"{host}:0:0:{lun}"
        # as the kernel does it: the scsi_device (scan) first, the block device (sd) later
        _attrs(sdev, {"vendor": "IET     ", "model": f"{model:<16}", "rev": "0001",
                      "state": "running", "type": "0"})
        block = sdev / "block" / name
        _attrs(block, {"size": str(sectors), "ro": "0", "dev": "8:16"})
        _link(block / "device", sdev)

    def by_path_link(self, address: str, port: int, target: str, lun: int, name: str) -> Path:
        link = self.dev / "disk" / "by-path" / f"ip-{address}:{port}-iscsi-{target}-lun-{lun}"
        link.symlink_to(f"../../{name}")
        return link


@pytest.fixture
def fake(tmp_path: Path) -> FakeSysfs:
    fs = FakeSysfs(tmp_path)
    fs.add_session(2, 1, {
        "targetname": TARGET1, "tpgt": "1", "initiatorname": INITIATOR,
        "ifacename": "default", "state": "LOGGED_IN", "recovery_tmo": "120",
        "username": "alice", "password": SECRET, "username_in": "(null)",
        "password_in": SECRET, "target_state": "SCANNED",
    }, {
        "persistent_address": "192.0.2.10", "persistent_port": "3260",
        "address": "192.0.2.10", "port": "3260", "state": "up", "exp_statsn": "41",
    })
    fs.add_disk(2, 1, 0, "sdb", 131072)
    fs.add_disk(2, 1, 1, "sdc", 2097152, model="OTHER")
    fs.by_path_link("192.0.2.10", 3260, TARGET1, 0, "sdb")
    fs.add_session(3, 2, {
        "targetname": TARGET2, "tpgt": "2", "initiatorname": INITIATOR,
        "ifacename": "(null)", "state": "FAILED", "recovery_tmo": "5",
        "username": "(null)", "password": "(null)",
    }, {
        "persistent_address": "2001:db8::1", "persistent_port": "3261",
        "address": "2001:db8::1", "port": "3261", "state": "failed",
    })
    return fs


def test_transport_handle(fake: FakeSysfs, tmp_path: Path) -> None:
    assert sysfs.transport_handle(fake.root) == TCP_HANDLE
    assert sysfs.transport_handle(tmp_path / "nothing") is None
    assert sysfs.kernel_iscsi_loaded(fake.root)
    assert not sysfs.kernel_iscsi_loaded(tmp_path / "nothing")


def test_list_sessions(fake: FakeSysfs) -> None:
    s1, s2 = sysfs.list_sessions(fake.root, dev_root=fake.dev)
    assert (s1.sid, s1.host_no, s1.target_name, s1.tpgt) == (1, 2, TARGET1, 1)
    assert (s1.initiator_name, s1.iface_name, s1.state) == (INITIATOR, "default", "LOGGED_IN")
    assert (s1.recovery_tmo, s1.username) == (120, "alice")
    (c,) = s1.connections
    assert (c.cid, c.persistent_address, c.persistent_port, c.address, c.port) == (
        0, "192.0.2.10", 3260, "192.0.2.10", 3260)
    assert (c.state, c.exp_statsn) == ("up", 41)
    assert s1.portal == "192.0.2.10:3260"

    sdb, sdc = s1.disks
    assert (sdb.lun, sdb.name, sdb.dev, sdb.size_bytes) == (0, "sdb", str(fake.dev / "sdb"),
                                                            64 << 20)
    assert (sdb.vendor, sdb.model, sdb.hctl, sdb.state) == ("IET", "VIRTUAL-DISK", "2:0:0:0",
                                                            "running")
    assert sdb.by_path == str(fake.dev / "disk" / "by-path" /
                              f"ip-192.0.2.10:3260-iscsi-{TARGET1}-lun-0")
    assert (sdc.lun, sdc.name, sdc.size_bytes, sdc.model, sdc.by_path) == (
        1, "sdc", 1 << 30, "OTHER", None)

    assert (s2.sid, s2.host_no, s2.state, s2.tpgt, s2.recovery_tmo) == (2, 3, "FAILED", 2, 5)
    assert s2.iface_name is None and s2.username is None  # "(null)" is unset
    assert s2.portal == "[2001:db8::1]:3261"
    assert s2.connections[0].exp_statsn is None
    assert s2.disks == ()


def test_default_dev_root_and_get_session(fake: FakeSysfs) -> None:
    s1 = sysfs.get_session(fake.root, 1)
    assert s1 is not None and [d.dev for d in s1.disks] == ["/dev/sdb", "/dev/sdc"]
    assert sysfs.get_session(fake.root, 99) is None
    assert sysfs.session_ids(fake.root) == [1, 2]


def test_no_iscsi_in_kernel(tmp_path: Path) -> None:
    assert sysfs.list_sessions(tmp_path) == []
    assert sysfs.session_disks(tmp_path, 1) == []


def test_host_from_target_dirs_when_links_say_nothing(fake: FakeSysfs) -> None:
    """A session device found without a host<H> above it still gets its host number."""
    odd = fake.root / "devices" / "odd" / "session7"
    cls = odd / "iscsi_session" / "session7"
    _attrs(cls, {"targetname": TARGET1})
    _link(cls / "device", odd)
    _link(fake.root / "class" / "iscsi_session" / "session7", cls)
    (odd / "target9:0:0").mkdir()
    info = sysfs.get_session(fake.root, 7)
    assert info is not None and info.host_no == 9 and info.connections == ()


def test_passwords_are_never_opened(fake: FakeSysfs, monkeypatch: pytest.MonkeyPatch) -> None:
    opened: list[str] = []
    real_os_open, real_open = os.open, builtins.open

    def spy_os_open(path: Any, *args: Any, **kw: Any) -> int:
        opened.append(os.fspath(path))
        return real_os_open(path, *args, **kw)

    def spy_open(file: Any, *args: Any, **kw: Any) -> Any:
        if isinstance(file, str | os.PathLike):
            opened.append(os.fspath(file))
        return real_open(file, *args, **kw)

    monkeypatch.setattr(os, "open", spy_os_open)
    monkeypatch.setattr(builtins, "open", spy_open)
    sessions = sysfs.list_sessions(fake.root, dev_root=fake.dev)
    sysfs.wait_for_disks(fake.root, 1, expected_luns={0, 1}, timeout=1)
    monkeypatch.undo()

    assert any(p.endswith("/targetname") for p in opened)
    assert any(p.endswith("/username") for p in opened)
    assert not [p for p in opened if "password" in os.path.basename(p)]
    assert SECRET not in repr(sessions)
    with pytest.raises(ValueError, match="secret"):
        sysfs._read_attr(fake.root, "password")


def test_scan_host_writes_dash_dash_dash(fake: FakeSysfs) -> None:
    sysfs.scan_host(fake.root, 2)
    assert (fake.root / "class" / "scsi_host" / "host2" / "scan").read_text() == "- - -"
    with pytest.raises(SysfsError, match="SCSI host 42 is not in sysfs"):
        sysfs.scan_host(fake.root, 42)
    assert not (fake.root / "class" / "scsi_host" / "host42").exists()


def test_wait_for_disks_sees_them_appear(fake: FakeSysfs) -> None:
    def appear() -> None:
        time.sleep(0.2)
        fake.add_disk(3, 2, 0, "sdd", 2048)
        time.sleep(0.2)
        fake.add_disk(3, 2, 3, "sde", 4096)

    thread = threading.Thread(target=appear)
    start = time.monotonic()
    thread.start()
    try:
        first = sysfs.wait_for_disks(fake.root, 2, timeout=5)
        assert [d.name for d in first] == ["sdd"]
        both = sysfs.wait_for_disks(fake.root, 2, expected_luns={0, 3}, timeout=5)
    finally:
        thread.join()
    elapsed = time.monotonic() - start
    assert [(d.lun, d.name, d.size_bytes) for d in both] == [(0, "sdd", 1 << 20),
                                                             (3, "sde", 2 << 20)]
    assert 0.35 < elapsed < 3


def test_wait_for_disks_times_out_with_bounded_polls(fake: FakeSysfs) -> None:
    now = [100.0]
    sleeps: list[float] = []

    def sleep(seconds: float) -> None:
        sleeps.append(seconds)
        now[0] += seconds

    with pytest.raises(DisksTimeout) as info:
        sysfs.wait_for_disks(fake.root, 1, expected_luns={0, 7}, timeout=2.0,
                             clock=lambda: now[0], sleep=sleep, poll_interval=0.25)
    assert str(info.value) == ("session 1: LUN 7 did not appear as a disk within 2 s "
                               "(found: LUN 0 as sdb, LUN 1 as sdc)")
    assert [d.name for d in info.value.found] == ["sdb", "sdc"]
    assert len(sleeps) == 8 and all(0 < s <= 0.25 for s in sleeps)

    with pytest.raises(DisksTimeout, match="session 5 is not in sysfs"):
        sysfs.wait_for_disks(fake.root, 5, timeout=0.1, clock=lambda: now[0], sleep=sleep)
    with pytest.raises(DisksTimeout, match=r"session 2: no disk appeared within 0\.5 s"):
        sysfs.wait_for_disks(fake.root, 2, timeout=0.5, clock=lambda: now[0], sleep=sleep)


def test_by_path_name_follows_udev() -> None:
    assert sysfs.by_path_name("10.0.0.1", 3260, TARGET1, 3) == (
        f"ip-10.0.0.1:3260-iscsi-{TARGET1}-lun-3")
    assert sysfs.by_path_name("10.0.0.1", 3260, TARGET1, 0x4001_0100).endswith(
        "-lun-0x0100400100000000")


def test_session_list_command_on_fake_tree(fake: FakeSysfs) -> None:
    runner = CliRunner()
    out = runner.invoke(cli, ["session", "list", "--sysfs-root", str(fake.root)])
    assert out.exit_code == 0, out.output
    lines = out.output.splitlines()
    assert lines[0].split() == ["SID", "HOST", "TARGET", "PORTAL", "STATE", "LUN", "DEVICE",
                                "SIZE"]
    assert lines[1].split() == ["1", "host2", TARGET1, "192.0.2.10:3260", "LOGGED_IN", "0",
                                "/dev/sdb", "64", "MiB"]
    assert lines[2].split() == ["1", "/dev/sdc", "1", "GiB"]
    assert lines[3].split() == ["2", "host3", TARGET2, "[2001:db8::1]:3261", "FAILED", "-",
                                "-", "-"]
    out = runner.invoke(cli, ["session", "list", "--json", "--sysfs-root", str(fake.root)])
    assert out.exit_code == 0 and SECRET not in out.output
    data = json.loads(out.output)
    assert data["kernel_iscsi"] is True
    assert [d["name"] for d in data["sessions"][0]["disks"]] == ["sdb", "sdc"]
    assert data["sessions"][0]["portal"] == "192.0.2.10:3260"
    assert data["sessions"][1]["connections"][0]["state"] == "failed"
