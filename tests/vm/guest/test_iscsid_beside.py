"""open-iscsi's iscsid started beside a session of ours (issue 11): it must leave it alone.

iscsid's startup sync takes over every session it judges user-created (sysfs `creator`
not -1): STOP_CONN(RECOVER), then a login of its own with its own ISID and no CHAP; on
a CHAP target the two daemons rebinding one session crashed the kernel. Our sessions
are created from netlink port id 0xFFFFFFFF, so `creator` reads -1 and the sync skips
them. Shown here on a plain and a CHAP target: the target's I_T nexus is the same after
iscsid has run for a while, I/O goes on, `iscsiadm -m session` lists the session, and
our keeper still hears the kernel's CONN_ERROR (an `ss -K` is recovered by us).
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from iscsi_handoff.pathchoice import probe_iscsid
from iscsi_handoff.tgtlab import LunSpec, Tgt

from .kernel_login import KernelLogin, drop_caches, sessions_in_sysfs
from .openiscsi import Iscsid, read_direct, write_direct

LUN_SIZE = 32 << 20
USER, SECRET = "beside", "beside-secret-0123"
SETTLE = 12.0  # iscsid's sync took our session over within 15 s, the panic came at ~10 s


def nexus_ids(tgt: Tgt, tid: int) -> list[str]:
    """The I_T nexus numbers tgt shows for target ``tid`` (a new login makes a new one)."""
    text = tgt.show()
    block = re.split(r"^Target \d+: ", text, flags=re.M)[tid]
    return re.findall(r"I_T nexus: (\d+)", block)


def _cut(port: int) -> None:
    done = subprocess.run(["ss", "-K", "dst", "127.0.0.1", "dport", "=", f":{port}"],
                          capture_output=True, text=True, timeout=30, check=False)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("chap", [False, True], ids=["plain", "chap"])
def test_iscsid_leaves_our_session_alone(tgt_session: Tgt, tmp_path: Path, chap: bool,
                                         figure: Callable[[str], None]) -> None:
    tgt = tgt_session
    iqn = f"iqn.2024-01.test.vmlab:beside-{'chap' if chap else 'plain'}"
    target = tgt.add_target(iqn, luns=[LunSpec(size=LUN_SIZE)],
                            chap=(USER, SECRET) if chap else None)
    args: list[str] = []
    if chap:
        secret = tmp_path / "secret"
        secret.write_text(SECRET + "\n")
        secret.chmod(0o600)
        args = ["--chap-user", USER, "--chap-secret-file", str(secret)]
    daemon = Iscsid(tmp_path)
    try:
        with KernelLogin(tgt.portal, iqn, *args) as run:
            (disk,) = run.disks
            sdir = Path(f"/sys/class/iscsi_session/session{disk.sid}")
            assert (sdir / "creator").read_text().strip() == "-1"
            before = nexus_ids(tgt, target.tid)
            assert len(before) == 1, tgt.show()
            first = os.urandom(1 << 20)
            write_direct(disk.dev, 0, first)

            daemon.start()
            assert probe_iscsid().running, "doctor does not see iscsid running"
            began = time.monotonic()
            n = 0
            while time.monotonic() - began < SETTLE:  # I/O all along iscsid's start
                chunk = os.urandom(256 << 10)
                write_direct(disk.dev, (1 << 20) + n * len(chunk), chunk)
                assert read_direct(disk.dev, (1 << 20) + n * len(chunk), len(chunk)) == chunk
                n = (n + 1) % 64
                time.sleep(0.2)
            assert nexus_ids(tgt, target.tid) == before, tgt.show()
            assert "connection failed" not in run.output(), run.output()
            assert run.proc.poll() is None, run.output()
            drop_caches()
            assert read_direct(disk.dev, 0, len(first)) == first

            listed = daemon.adm("-m", "session")
            assert iqn in listed.stdout and "(flash)" in listed.stdout, listed.stdout
            # iscsiadm's logout of it goes through iscsid, which does not own it.
            refused = daemon.adm("-m", "session", "-r", str(disk.sid), "-u", check=False)
            assert disk.sid in sessions_in_sysfs(), refused
            if not chap:  # with a node record for the target, --logoutall neither
                daemon.discover(tgt.portal)
                daemon.adm("-m", "node", "--logoutall=all", check=False)
                assert disk.sid in sessions_in_sysfs()
            assert nexus_ids(tgt, target.tid) == before, tgt.show()
            figure(f"iscsid beside ({'chap' if chap else 'plain'}): creator -1, nexus "
                   f"{before} unchanged after {SETTLE:g} s; `iscsiadm -m session -r "
                   f"{disk.sid} -u` exit {refused.returncode}: "
                   f"{(refused.stderr or refused.stdout).strip().splitlines()[-1:]}")

            if not chap:  # the kernel's CONN_ERROR still reaches our keeper, not iscsid
                mark = len(run.lines)
                _cut(int(tgt.portal.rsplit(":", 1)[1]))
                run.wait_line(rf"session {disk.sid}: recovered in \d+ ms", timeout=120,
                              start=mark)
                data = os.urandom(1 << 20)
                write_direct(disk.dev, 8 << 20, data)
                drop_caches()
                assert read_direct(disk.dev, 8 << 20, len(data)) == data
                with target.lun_paths[0].open("rb") as f:
                    f.seek(8 << 20)
                    assert f.read(len(data)) == data
            assert run.stop() == 0, run.output()
        assert disk.sid not in sessions_in_sysfs()
    finally:
        daemon.stop()
        tgt.delete_target(target.tid)
