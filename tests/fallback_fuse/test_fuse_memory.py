"""The FUSE tree for real: /dev/fuse, a serving process, losetup, mkfs.ext4, mount.

Each LUN is a memory device shared with the test through a file on /dev/shm, so the
device's bytes are checked directly. The daemon runs as its own process
(memory_server.py), as it does for users, and is stopped with a signal.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import json
import mmap
import os
import random
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trio

from fallback_fuse import loop
from fallback_fuse.device import LunInfo, MemoryBlockDevice, TargetInfo
from fallback_fuse.mount import serve
from fallback_fuse.tree import Tree

SERVER = Path(__file__).with_name("memory_server.py")
REPO = Path(__file__).resolve().parents[2]
HOST = "127.0.0.1"
RO_IQN = "iqn.2024-01.org.example.test:ro-disk"
MULTI_IQN = "iqn.2024-01.org.example.test:three"


def _why_no_fuse() -> str | None:
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse is missing (no FUSE in this kernel, or a container without it)"
    if os.geteuid() != 0 and shutil.which("fusermount3") is None:
        return "mounting FUSE as a user needs fusermount3 (Debian package fuse3)"
    return None


def _why_no_loop() -> str | None:
    if os.geteuid() != 0:
        return "losetup, mkfs.ext4 and mount need root"
    for tool in ("losetup", "mkfs.ext4", "e2fsck", "mount", "umount"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    return _why_no_fuse()


@dataclass
class Served:
    """One memory_server.py process and its mount."""

    proc: subprocess.Popen[str]
    root: Path
    lines: list[str]
    pump: threading.Thread

    def path(self, *parts: str) -> Path:
        return self.root.joinpath(HOST, *parts)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        code = self.proc.wait(timeout)
        self.pump.join(5)
        return code

    def stats(self) -> dict[str, dict[str, int]]:
        found = [line for line in self.lines if line.startswith("stats ")]
        assert found, "\n".join(self.lines)
        result: dict[str, dict[str, int]] = json.loads(found[-1][6:])
        return result

    def output(self) -> str:
        return "\n".join(self.lines)


@dataclass
class Lab:
    """Everything a test creates, undone in the right order even when the test fails:
    filesystems unmounted, then loop devices detached, then the FUSE tree unmounted."""

    tmp: Path
    shm: Path
    mounts: list[Path] = field(default_factory=list)
    loops: list[str] = field(default_factory=list)
    servers: list[Served] = field(default_factory=list)

    def lun(self, name: str, size: int, *, lun: int = 1, fill: bytes = b"",
            **spec: Any) -> dict[str, Any]:
        backing = self.shm / f"{name}.img"
        with backing.open("wb") as f:
            f.truncate(size)
            f.write(fill)
        return {"lun": lun, "size": size, "backing": str(backing), **spec}

    def device_bytes(self, lun: dict[str, Any]) -> bytes:
        return Path(lun["backing"]).read_bytes()

    def serve(self, targets: list[dict[str, Any]], **spec: Any) -> Served:
        root = Path(tempfile.mkdtemp(prefix="tree-", dir=self.tmp))
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]))
        proc = subprocess.Popen(
            [sys.executable, str(SERVER), str(root), json.dumps({"targets": targets, **spec})],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        lines: list[str] = []
        ready = threading.Event()

        def pump() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                lines.append(line.rstrip("\n"))
                if line.strip() == "ready":
                    ready.set()
            ready.set()

        thread = threading.Thread(target=pump, daemon=True)
        thread.start()
        served = Served(proc, root, lines, thread)
        self.servers.append(served)
        if not ready.wait(30) or proc.poll() is not None:
            raise AssertionError("the tree did not come up:\n" + served.output())
        return served

    def attach(self, storage: Path, **kw: Any) -> str:
        device = trio.run(lambda: loop.attach(storage, **kw))
        self.loops.append(device)
        return device

    def detach(self, device: str) -> None:
        trio.run(loop.detach, device)
        self.loops.remove(device)

    def mount(self, device: str, where: Path) -> None:
        where.mkdir(exist_ok=True)
        subprocess.run(["mount", device, str(where)], check=True)
        self.mounts.append(where)

    def umount(self, where: Path) -> None:
        subprocess.run(["umount", str(where)], check=True)
        self.mounts.remove(where)

    def teardown(self) -> None:
        for where in reversed(self.mounts):
            if subprocess.run(["umount", str(where)], check=False).returncode != 0:
                subprocess.run(["umount", "-l", str(where)], check=False)
        for device in reversed(self.loops):
            subprocess.run(["losetup", "-d", device], check=False)
        for served in self.servers:
            try:
                served.stop(timeout=30)
            except subprocess.TimeoutExpired:
                served.proc.kill()
                served.proc.wait()
            if os.path.ismount(served.root):
                subprocess.run(["fusermount3", "-u", "-z", str(served.root)], check=False)
        shutil.rmtree(self.shm, ignore_errors=True)


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    reason = _why_no_fuse()
    if reason:
        pytest.skip(reason)
    shm = Path(tempfile.mkdtemp(prefix="fallback-fuse-",
                                dir="/dev/shm" if os.path.isdir("/dev/shm") else tmp_path))
    state = Lab(tmp_path, shm)
    try:
        yield state
    finally:
        state.teardown()


@pytest.fixture
def root_lab(lab: Lab) -> Lab:
    reason = _why_no_loop()
    if reason:
        pytest.skip(reason)
    return lab


def pattern(size: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(size)


def two_targets(lab: Lab, **multi_lun2: Any) -> list[dict[str, Any]]:
    """A read-only single-LUN target and a three-LUN one, on the same host."""
    ro = lab.lun("ro", 4 << 20, read_only=True, serial="RO-0001", fill=pattern(4 << 20, 1))
    return [
        {"hostname": HOST, "ip": HOST, "targetname": RO_IQN, "luns": [ro]},
        {"hostname": HOST, "ip": HOST, "targetname": MULTI_IQN, "luns": [
            lab.lun("lun1", 8 << 20, lun=1, vendor="LIO-ORG", product="three-1"),
            lab.lun("lun2", 16 << 20, lun=2, block_size=4096, **multi_lun2),
            lab.lun("lun3", 2 << 20, lun=3)]},
    ]


def test_layout_and_info_files(lab: Lab) -> None:
    targets = two_targets(lab)
    m = lab.serve(targets)
    assert os.listdir(m.root) == [HOST]
    assert sorted(os.listdir(m.path())) == ["ro-disk", "three"]
    three = m.path("three")
    assert sorted(os.listdir(three)) == ["hostname", "ip", "lun1", "lun2", "lun3", "product",
                                         "serial", "storage", "targetname", "vendor",
                                         "version"]
    assert sorted(os.listdir(m.path("ro-disk"))) == [
        "hostname", "ip", "lun1", "product", "serial", "storage", "targetname", "vendor",
        "version"]
    for n in (1, 2, 3):
        assert sorted(os.listdir(three / f"lun{n}")) == [
            "hostname", "ip", "product", "serial", "storage", "targetname", "vendor",
            "version"]
    expected = {"hostname": HOST, "ip": HOST, "targetname": MULTI_IQN, "vendor": "LIO-ORG",
                "product": "three-1", "version": "0001", "serial": "mem1"}
    for name, value in expected.items():
        assert os.readlink(three / name) == value
        assert os.readlink(three / "lun1" / name) == value
        assert stat.S_ISLNK((three / name).lstat().st_mode)
    assert os.readlink(three / "lun3" / "serial") == "mem3"
    assert os.readlink(m.path("ro-disk") / "serial") == "RO-0001"
    assert os.readlink(m.path("ro-disk") / "targetname") == RO_IQN
    sizes = [(three / f"lun{n}" / "storage").stat().st_size for n in (1, 2, 3)]
    assert sizes == [8 << 20, 16 << 20, 2 << 20]
    top, first = (three / "storage").stat(), (three / "lun1" / "storage").stat()
    assert stat.S_ISREG(top.st_mode) and top.st_ino == first.st_ino and top.st_nlink == 2
    assert stat.S_IMODE(top.st_mode) == 0o644
    with pytest.raises(OSError):  # a symlink to a value, not to a file
        (three / "vendor").open("w")
    with pytest.raises(OSError) as info:
        os.truncate(three / "storage", 0)
    assert info.value.errno == errno.EINVAL
    assert m.stop() == 0, m.output()
    assert not os.path.ismount(m.root)


@pytest.mark.parametrize(("direct_io", "o_direct"), [(True, False), (False, False),
                                                    (False, True)],
                         ids=["direct_io", "page-cache", "page-cache-O_DIRECT"])
def test_unaligned_pread_pwrite_match_the_device(lab: Lab, direct_io: bool,
                                                 o_direct: bool) -> None:
    targets = two_targets(lab)
    m = lab.serve(targets, direct_io=direct_io)
    rng = random.Random(11)
    flags = os.O_RDWR | (os.O_DIRECT if o_direct else 0)
    for lun, path in ((targets[1]["luns"][1], m.path("three", "lun2", "storage")),
                      (targets[1]["luns"][0], m.path("three", "storage"))):
        size = lun["size"]
        model = bytearray(size)
        fd = os.open(path, flags)
        try:
            for _ in range(150):
                data = rng.randbytes(rng.randrange(1, 70000))
                off = rng.randrange(0, size - len(data))
                assert os.pwrite(fd, data, off) == len(data)
                model[off:off + len(data)] = data
                with open(lun["backing"], "rb") as device:  # acknowledged = on the device
                    device.seek(off)
                    assert device.read(len(data)) == data
                back = rng.randrange(0, size)
                n = rng.randrange(1, 20000)
                assert os.pread(fd, n, back) == model[back:back + n]
            assert os.pread(fd, 100, size - 10) == model[-10:]  # short at the end
            assert os.pread(fd, 100, size) == b""
            for off in (size, size - 1000):  # nothing lands past the end
                try:
                    n = os.pwrite(fd, b"z" * 1500, off)
                except OSError as exc:
                    assert exc.errno == errno.ENOSPC
                    n = 0
                else:  # the page cache sends the part before a page boundary alone
                    assert not (direct_io or o_direct) and off < size and n < 1500
                model[off:off + n] = b"z" * n
            os.fsync(fd)
        finally:
            os.close(fd)
        assert lab.device_bytes(lun) == model
    assert m.stop() == 0, m.output()
    stats = m.stats()
    assert stats[f"{MULTI_IQN}/1"]["syncs"] >= 1 and stats[f"{MULTI_IQN}/2"]["syncs"] >= 1


def test_a_read_only_lun_gives_erofs(lab: Lab) -> None:
    targets = two_targets(lab)
    m = lab.serve(targets)
    for path in (m.path("ro-disk", "storage"), m.path("ro-disk", "lun1", "storage")):
        assert stat.S_IMODE(path.stat().st_mode) == 0o444
        for flags in (os.O_WRONLY, os.O_RDWR):
            with pytest.raises(OSError) as info:
                os.open(path, flags)
            assert info.value.errno == errno.EROFS
        assert path.read_bytes() == pattern(4 << 20, 1)
    assert m.stop() == 0, m.output()


def test_sixteen_threads_on_distinct_and_overlapping_ranges(root_lab: Lab) -> None:
    """Eight threads own a MiB each of the storage file. Eight more share 8 blocks of
    4 KiB through a 512-byte-sector loop device, each owning one sector of every block:
    their writes are partial blocks of the same blocks, in flight at once, so a
    read-modify-write without the lock would put back other threads' old sectors."""
    lab = root_lab
    targets = two_targets(lab, latency=0.0005)
    lun = targets[1]["luns"][1]  # 16 MiB, 4 KiB blocks
    m = lab.serve(targets)
    storage = m.path("three", "lun2", "storage")
    device = lab.attach(storage)
    assert loop.uses_direct_io(device)
    assert loop.raise_max_background(m.root, 64) == 64
    shared, sector = 12 << 20, 512
    owned: dict[int, bytes] = {}  # shared sector offset -> the last bytes written there
    errors: list[BaseException] = []

    def distinct(k: int) -> None:
        rng = random.Random(k)
        base = k << 20
        flags = os.O_RDWR | (os.O_DIRECT if k % 2 else 0)
        fd = os.open(storage, flags)
        try:
            for _ in range(40):
                off = base + rng.randrange(0, (1 << 20) - 20000)
                data = rng.randbytes(rng.randrange(1, 20000))
                assert os.pwrite(fd, data, off) == len(data)
                assert os.pread(fd, len(data), off) == data
        finally:
            os.close(fd)

    def overlapping(k: int) -> None:
        j = k - 8  # this thread's sector in every 4 KiB block
        rng = random.Random(k)
        buf = mmap.mmap(-1, sector)  # page-aligned, as O_DIRECT wants
        fd = os.open(device, os.O_RDWR | os.O_DIRECT)
        try:
            for i in range(40):
                block = rng.randrange(8)
                off = shared + block * 4096 + j * sector
                data = f"thread {k} write {i} block {block}".encode().ljust(sector, b".")
                buf[:] = data
                assert os.pwritev(fd, [buf], off) == sector
                buf[:] = bytes(sector)
                assert os.preadv(fd, [buf], off) == sector
                assert buf[:] == data, f"thread {k} lost its write at {off}"
                owned[off] = data
        finally:
            os.close(fd)
            buf.close()

    def guarded(fn: Any, k: int) -> None:
        try:
            fn(k)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=guarded, args=(distinct if k < 8 else overlapping, k))
               for k in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads), "threads hung"
    assert not errors, errors
    data = lab.device_bytes(lun)
    for k in range(8):  # replay each thread's writes on a model of its own MiB
        rng, model = random.Random(k), bytearray(data[k << 20:(k + 1) << 20])
        expected = bytearray(1 << 20)
        for _ in range(40):
            off = rng.randrange(0, (1 << 20) - 20000)
            chunk = rng.randbytes(rng.randrange(1, 20000))
            expected[off:off + len(chunk)] = chunk
        assert model == expected, f"thread {k}'s MiB differs on the device"
    for off, written in owned.items():
        assert data[off:off + sector] == written, f"sector at {off} lost an update"
    lab.detach(device)
    assert m.stop() == 0, m.output()


def test_ext4_on_a_loop_device_survives_a_remount(root_lab: Lab) -> None:
    lab = root_lab
    lun = lab.lun("ext4", 256 << 20, block_size=4096)
    m = lab.serve([{"hostname": HOST, "ip": HOST, "targetname": "iqn.2024-01.test:fs",
                    "luns": [lun]}])
    storage = m.path("fs", "storage")
    device = lab.attach(storage, sector_size=4096)
    assert loop.uses_direct_io(device)
    assert (Path("/sys/block") / Path(device).name / "queue" / "logical_block_size"
            ).read_text().strip() == "4096"
    assert loop.raise_max_background(m.root, 32) == 32
    subprocess.run(["mkfs.ext4", "-q", "-F", device], check=True, timeout=120)
    fs = lab.tmp / "fs"
    lab.mount(device, fs)
    rng = random.Random(3)
    sums = {}
    for i in range(30):
        data = rng.randbytes(rng.randrange(1, 3 << 20))
        (fs / f"d{i % 3}").mkdir(exist_ok=True)
        (fs / f"d{i % 3}" / f"f{i}").write_bytes(data)
        sums[f"d{i % 3}/f{i}"] = hashlib.sha256(data).hexdigest()
    os.sync()
    lab.umount(fs)
    fsck = subprocess.run(["e2fsck", "-fn", device], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    Path("/proc/sys/vm/drop_caches").write_text("3\n")
    lab.mount(device, fs)
    for name, digest in sums.items():
        assert hashlib.sha256((fs / name).read_bytes()).hexdigest() == digest, name
    # Teardown in order: the filesystem, the loop device, then the FUSE tree.
    lab.umount(fs)
    lab.detach(device)
    assert m.stop() == 0, m.output()
    assert not os.path.ismount(m.root)
    assert str(m.root) not in subprocess.run(["losetup", "-a"], capture_output=True,
                                             text=True).stdout
    assert m.stats()["iqn.2024-01.test:fs/1"]["syncs"] > 0  # the journal's flushes


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_finishes_io_in_flight_then_unmounts(lab: Lab, sig: int) -> None:
    lun = lab.lun("slow", 1 << 20, latency=0.5, fill=pattern(1 << 20, 2))
    m = lab.serve([{"hostname": HOST, "ip": HOST, "targetname": "iqn.2024-01.test:slow",
                    "luns": [lun]}], close_grace=5)
    got: list[bytes] = []
    fd = os.open(m.path("slow", "storage"), os.O_RDWR)

    def read_and_close() -> None:
        try:
            got.append(os.pread(fd, 5000, 1000))
            os.pwrite(fd, b"last words", 0)
        finally:
            os.close(fd)

    reader = threading.Thread(target=read_and_close)
    reader.start()
    time.sleep(0.2)  # the read is waiting on the device
    started = time.monotonic()
    m.proc.send_signal(sig)
    reader.join(10)
    assert got == [pattern(1 << 20, 2)[1000:6000]]
    # Wait, not stop(): a second signal sent while it is past its signal handling (on
    # a loaded machine) would kill it with that signal.
    assert m.proc.wait(timeout=15) == 0, m.output()
    m.pump.join(5)
    assert time.monotonic() - started < 5
    assert f"got {signal.Signals(sig).name}" in m.output()
    assert not os.path.ismount(m.root)
    assert lab.device_bytes(lun)[:10] == b"last words"
    assert m.stats()["iqn.2024-01.test:slow/1"]["syncs"] == 1  # the final flush


def test_a_file_left_open_does_not_hold_the_stop_forever(lab: Lab) -> None:
    lun = lab.lun("held", 1 << 20)
    m = lab.serve([{"hostname": HOST, "ip": HOST, "targetname": "iqn.2024-01.test:held",
                    "luns": [lun]}], close_grace=0.5)
    fd = os.open(m.path("held", "storage"), os.O_RDONLY)
    try:
        assert m.stop(timeout=10) == 0, m.output()
        assert "still open" in m.output()
        assert not os.path.ismount(m.root)
        with pytest.raises(OSError) as info:
            os.pread(fd, 10, 0)
        assert info.value.errno in (errno.ENOTCONN, errno.EIO)
    finally:
        with contextlib.suppress(OSError):  # its flush fails, but the fd is closed
            os.close(fd)


def test_punch_hole_unmaps_or_is_unsupported(lab: Lab) -> None:
    """pyfuse3 3.5 does not pass FUSE_FALLOCATE on (the kernel says EOPNOTSUPP); a
    pyfuse3 that does must zero the range."""
    lun = lab.lun("holes", 1 << 20, fill=b"\xee" * (1 << 20))
    m = lab.serve([{"hostname": HOST, "ip": HOST, "targetname": "iqn.2024-01.test:holes",
                    "luns": [lun]}])
    libc = ctypes.CDLL(None, use_errno=True)
    libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_longlong,
                               ctypes.c_longlong]
    fd = os.open(m.path("holes", "storage"), os.O_RDWR)
    try:
        punch_keep_size = 0x02 | 0x01
        if libc.fallocate(fd, punch_keep_size, 1000, 9000) != 0:
            assert ctypes.get_errno() == errno.EOPNOTSUPP
        else:
            data = lab.device_bytes(lun)
            assert data[1000:10000] == bytes(9000) and data[:1000] == b"\xee" * 1000
    finally:
        os.close(fd)
    assert m.stop() == 0, m.output()


def test_serve_in_a_thread_stops_when_its_event_is_set(lab: Lab) -> None:
    """Off the main thread no signal can be caught: ``stop`` ends the mount instead."""
    device = MemoryBlockDevice(1 << 20)
    root = lab.tmp / "threaded"
    root.mkdir()
    ready = threading.Event()
    handles: list[tuple[trio.Event, trio.lowlevel.TrioToken]] = []

    async def main() -> None:
        stop = trio.Event()
        handles.append((stop, trio.lowlevel.current_trio_token()))

        async def on_ready(tree: Tree) -> None:
            ready.set()

        await serve(root, [TargetInfo(HOST, HOST, "iqn.2024-01.test:threaded",
                                      [LunInfo(1, device)])], on_ready=on_ready, stop=stop)

    thread = threading.Thread(target=trio.run, args=(main,), daemon=True)
    thread.start()
    try:
        assert ready.wait(10)
        path = root / HOST / "threaded" / "storage"
        with path.open("r+b") as f:
            f.seek(700)
            f.write(b"from the main thread")
        assert bytes(device.data[700:720]) == b"from the main thread"
        stop, token = handles[0]
        trio.from_thread.run_sync(stop.set, trio_token=token)
        thread.join(10)
        assert not thread.is_alive() and not os.path.ismount(root)
        assert device.syncs == 1  # written, so flushed on the way out
    finally:
        if os.path.ismount(root):
            subprocess.run(["fusermount3", "-u", "-z", str(root)], check=False)
