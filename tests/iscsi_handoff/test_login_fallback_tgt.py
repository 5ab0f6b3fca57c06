"""On a kernel without iSCSI (this host's), plain `login` falls back to FUSE with a loop
device and says why in one line; `doctor` gives the same reason. Against a real tgtd."""

from __future__ import annotations

import json
import mmap
import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from iscsi_handoff.pathchoice import probe_kernel
from iscsi_handoff.tgtlab import LunSpec, Tgt

from tgt_fixtures import tgt  # noqa: F401

pytestmark = pytest.mark.tgt

IQN = "iqn.2024-01.org.iscsi-handoff.test:fallback"


def _why_not() -> str | None:
    if probe_kernel(try_modprobe=False)[0]:
        return "this kernel has the iSCSI path: the fallback is tested where it is missing"
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse is missing"
    if os.geteuid() != 0:
        return "the loop device needs root"
    return None


def test_login_without_kernel_iscsi_falls_back_to_fuse_with_a_loop_device(
        tgt: Tgt, tmp_path: Path) -> None:  # noqa: F811
    reason = _why_not()
    if reason:
        pytest.skip(reason)
    target = tgt.add_target(IQN, luns=[LunSpec(size=8 << 20)])
    backing = target.lun_paths[0]
    env = dict(os.environ, ISCSI_HANDOFF_RUN_DIR=str(tmp_path / "run"))
    doctor = subprocess.run([sys.executable, "-m", "iscsi_handoff", "doctor", "--json"],
                            env=env, capture_output=True, text=True, timeout=60, check=False)
    report = json.loads(doctor.stdout)
    assert report["chosen"] == "fuse" and not report["paths"]["kernel"]["ok"]
    kernel_reason = report["paths"]["kernel"]["reason"]

    proc = subprocess.Popen([sys.executable, "-m", "iscsi_handoff", "login",
                             "--portal", tgt.portal, "--target", IQN],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out: list[str] = []
    ready = threading.Event()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            out.append(line.rstrip())
            if line.startswith("serving;"):
                ready.set()
        ready.set()

    threading.Thread(target=pump, daemon=True).start()
    mountpoint = tmp_path / "run" / "fuse" / "127.0.0.1-fallback"  # its own folder
    try:
        assert ready.wait(60) and proc.poll() is None, "\n".join(out)
        loop = next(m.group(1) for line in out if (m := re.search(r"(/dev/loop\d+) ->", line)))
        # The block device carries data to the target: compare with tgt's backing file.
        pattern = os.urandom(1 << 20)
        fd = os.open(loop, os.O_RDWR | os.O_DIRECT | os.O_SYNC)
        try:
            buf = mmap.mmap(-1, len(pattern))
            buf.write(pattern)
            assert os.pwritev(fd, [buf], 3 << 20) == len(pattern)
        finally:
            os.close(fd)
        with open(backing, "rb") as f:
            f.seek(3 << 20)
            assert f.read(len(pattern)) == pattern
        assert (mountpoint / "127.0.0.1" / "fallback" / "storage").stat().st_size == 8 << 20
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=60)
    assert proc.stderr is not None
    err = proc.stderr.read().strip().splitlines()
    assert code == 0, (out, err)
    # One line, naming the same reason doctor gives, and where the tree went.
    assert err[0] == (f"iscsi-handoff: kernel path unavailable ({kernel_reason}); using the "
                      f"FUSE fallback at {mountpoint} with a loop device"), err
    assert err[1:] == ["got SIGTERM: finishing I/O, then unmounting"], err
    assert not os.path.ismount(mountpoint)
    assert not mountpoint.exists()  # the folder it made is gone with it
    listed = subprocess.run(["losetup", "-j", str(mountpoint / "127.0.0.1" / "fallback"
                                                  / "storage")],
                            capture_output=True, text=True, check=False).stdout
    assert listed == ""
