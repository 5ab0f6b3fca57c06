"""The FUSE fallback end to end, as a user runs it: `iscsi-handoff login --fuse M --loop`
against a real tgtd, then losetup's device, mkfs.ext4, mount, files, e2fsck."""

from __future__ import annotations

import hashlib
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from iscsi_handoff.tgtlab import LunSpec, Tgt

from tgt_fixtures import tgt  # noqa: F401

pytestmark = pytest.mark.tgt

IQN = "iqn.2024-01.org.iscsi-handoff.test:fuse"
BIG_BURSTS = {"InitialR2T": "No", "ImmediateData": "Yes",
              "MaxRecvDataSegmentLength": "262144", "MaxBurstLength": "1048576",
              "FirstBurstLength": "1048576"}


def _why_not() -> str | None:
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse is missing (no FUSE in this kernel or container)"
    if os.geteuid() != 0:
        return "losetup, mkfs and mount need root"
    return None


@dataclass
class FuseMount:
    proc: subprocess.Popen[str]
    root: Path
    output: list[str]

    def folder(self, name: str = "fuse") -> Path:
        return self.root / "127.0.0.1" / name

    def loop_device(self) -> str:
        for line in self.output:
            m = re.search(r"(/dev/loop\d+) ->", line)
            if m:
                return m.group(1)
        raise AssertionError(f"no loop device printed: {self.output}")

    def stop(self, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout)


def start_mount(root: Path, *args: str) -> FuseMount:
    proc = subprocess.Popen([sys.executable, "-m", "iscsi_handoff", *args, "--fuse", str(root)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output: list[str] = []
    ready = threading.Event()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            output.append(line.rstrip())
            if line.startswith("serving;"):
                ready.set()
        ready.set()

    threading.Thread(target=pump, daemon=True).start()
    if not ready.wait(60) or proc.poll() is not None:
        proc.kill()
        raise AssertionError("mount did not come up:\n" + "\n".join(output))
    return FuseMount(proc, root, output)


@pytest.fixture
def mount_root(tmp_path: Path) -> Iterator[Path]:
    reason = _why_not()
    if reason:
        pytest.skip(reason)
    root = tmp_path / "iscsi"
    root.mkdir()
    yield root
    # Whatever a failed test left behind: never leave a mount or a loop device.
    subprocess.run(["umount", "-l", str(tmp_path / "fs")], capture_output=True, check=False)
    subprocess.run(["fusermount3", "-u", "-z", str(root)], capture_output=True, check=False)


def login_args(tgt: Tgt, target: str = IQN) -> list[str]:  # noqa: F811
    return ["login", "--portal", tgt.portal, "--target", target]


def test_ext4_on_the_loop_device_survives_a_remount(tgt: Tgt, mount_root: Path,  # noqa: F811
                                                    tmp_path: Path) -> None:
    tgt.add_target(IQN, luns=[LunSpec(size=512 << 20)], params=BIG_BURSTS)
    m = start_mount(mount_root, *login_args(tgt), "--loop")
    fs = tmp_path / "fs"
    fs.mkdir()
    try:
        dev = m.loop_device()
        assert (m.folder() / "storage").stat().st_size == 512 << 20
        subprocess.run(["mkfs.ext4", "-q", "-F", dev], check=True, timeout=120)
        subprocess.run(["mount", dev, str(fs)], check=True)
        sums = {}
        rng = random.Random(1)
        for i in range(20):  # 200 MiB of files
            data = rng.randbytes(10 << 20)
            (fs / f"f{i}").write_bytes(data)
            sums[f"f{i}"] = hashlib.sha256(data).hexdigest()
        os.sync()
        subprocess.run(["umount", str(fs)], check=True)
        fsck = subprocess.run(["e2fsck", "-fn", dev], capture_output=True, text=True)
        assert fsck.returncode == 0, fsck.stdout + fsck.stderr
        subprocess.run(["sh", "-c", "echo 3 > /proc/sys/vm/drop_caches"], check=True)
        subprocess.run(["mount", dev, str(fs)], check=True)
        for name, digest in sums.items():
            assert hashlib.sha256((fs / name).read_bytes()).hexdigest() == digest, name
        subprocess.run(["umount", str(fs)], check=True)
    finally:
        assert m.stop() == 0, "\n".join(m.output)
    assert any("detached" in line for line in m.output)
    assert not (m.root / "127.0.0.1").exists()  # unmounted
    losetup = subprocess.run(["losetup", "-a"], capture_output=True, text=True).stdout
    assert str(mount_root) not in losetup


def test_layout_three_luns_read_only_and_unaligned_io(tgt: Tgt,  # noqa: F811
                                                      mount_root: Path) -> None:
    target = tgt.add_target(IQN, luns=[LunSpec(size=8 << 20), LunSpec(size=16 << 20),
                                       LunSpec(size=4 << 20, readonly=True)])
    m = start_mount(mount_root, *login_args(tgt))
    try:
        folder = m.folder()
        names = sorted(p.name for p in folder.iterdir())
        assert names == ["hostname", "ip", "lun1", "lun2", "lun3", "product", "serial",
                         "storage", "targetname", "vendor", "version"]
        assert os.readlink(folder / "targetname") == IQN
        assert os.readlink(folder / "vendor") == "IET"
        assert os.readlink(folder / "ip") == "127.0.0.1"
        sizes = [(folder / f"lun{n}" / "storage").stat().st_size for n in (1, 2, 3)]
        assert sizes == [8 << 20, 16 << 20, 4 << 20]
        ro = folder / "lun3" / "storage"
        assert ro.stat().st_mode & 0o777 == 0o444
        with pytest.raises(OSError) as info:
            os.open(ro, os.O_WRONLY)
        assert info.value.errno == 30  # EROFS
        # unaligned pwrite/pread, compared with tgt's own backing file
        rng = random.Random(5)
        model = bytearray(16 << 20)
        fd = os.open(folder / "lun2" / "storage", os.O_RDWR)
        try:
            for _ in range(200):
                off = rng.randrange(0, (16 << 20) - 70000)
                data = rng.randbytes(rng.randrange(1, 70000))
                assert os.pwrite(fd, data, off) == len(data)
                model[off:off + len(data)] = data
                back_off = rng.randrange(0, (16 << 20) - 5000)
                n = rng.randrange(1, 5000)
                assert os.pread(fd, n, back_off) == model[back_off:back_off + n]
            os.fsync(fd)
        finally:
            os.close(fd)
    finally:
        assert m.stop() == 0, "\n".join(m.output)
    assert target.lun_paths[1].read_bytes() == model


def test_sixteen_threads_on_distinct_and_overlapping_ranges(tgt: Tgt,  # noqa: F811
                                                            mount_root: Path) -> None:
    target = tgt.add_target(IQN, luns=[LunSpec(size=32 << 20)], params=BIG_BURSTS)
    m = start_mount(mount_root, *login_args(tgt))
    errors: list[BaseException] = []
    region = 1 << 20
    try:
        path = m.folder() / "storage"

        def worker(k: int) -> None:
            try:
                rng = random.Random(k)
                fd = os.open(path, os.O_RDWR)
                try:
                    # 8 threads own a region each; 8 more hammer one shared region with
                    # whole-region writes of one byte value, so any torn mix is visible.
                    for _ in range(30):
                        if k < 8:
                            off = k * region + rng.randrange(0, region - 9000)
                            data = rng.randbytes(rng.randrange(1, 9000))
                            os.pwrite(fd, data, off)
                            assert os.pread(fd, len(data), off) == data
                        else:
                            os.pwrite(fd, bytes([k]) * 65536, 8 * region + 100)
                            got = os.pread(fd, 65536, 8 * region + 100)
                            assert len(set(got)) == 1, "torn write in the shared range"
                finally:
                    os.close(fd)
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=worker, args=(k,)) for k in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not errors, errors
    finally:
        assert m.stop() == 0, "\n".join(m.output)
    shared = target.lun_paths[0].read_bytes()[8 * region + 100:8 * region + 100 + 65536]
    assert len(set(shared)) == 1 and shared[0] in range(8, 16)


def test_target_gone_for_good_gives_eio_then_a_clean_unmount(tgt: Tgt,  # noqa: F811
                                                             mount_root: Path) -> None:
    tgt.add_target(IQN, luns=[LunSpec(size=8 << 20)])
    m = start_mount(mount_root, *login_args(tgt), "--replacement-timeout", "5")
    path = m.folder() / "storage"
    with path.open("rb") as f:
        assert len(f.read(4096)) == 4096
    tgt.kill()
    started = time.monotonic()
    fd = os.open(path, os.O_RDONLY)
    try:
        with pytest.raises(OSError) as info:
            for _ in range(100):
                os.pread(fd, 4096, 0)
                time.sleep(0.1)
        assert info.value.errno == 5  # EIO
    finally:
        os.close(fd)
    assert time.monotonic() - started < 5 + 8
    assert m.stop() == 0, "\n".join(m.output)
    assert not (m.root / "127.0.0.1").exists()
