"""The tgt lab itself, checked with a peer initiator (libiscsi's iscsi-ls / iscsi-inq).

Several tgtd side by side, targets with and without CHAP, mutual CHAP, the initiator
address ACL, and a stop that leaves no process, socket or LUN file behind, and never
touches a tgtd this lab did not start.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import threading
from pathlib import Path

import pytest

from iscsi_handoff.tgtlab import LunSpec, Target, Tgt, TgtError

from tgt_fixtures import require_tgt, tgt  # noqa: F401  (fixture)

pytestmark = pytest.mark.tgt

IQN = "iqn.2024-01.org.iscsi-handoff.test"
USER, SECRET = "alice", "alice-secret-12"
TUSER, TSECRET = "the-target", "target-secret-3"


def libiscsi(*args: str) -> subprocess.CompletedProcess[str]:
    if shutil.which(args[0]) is None:
        pytest.skip(f"{args[0]} not found: install Debian's libiscsi-bin (./scripts/setup does)")
    return subprocess.run(list(args), capture_output=True, text=True, timeout=30,
                          stdin=subprocess.DEVNULL)


def listed(lab: Tgt, *, show_luns: bool = False) -> str:
    proc = libiscsi("iscsi-ls", *(["-s"] if show_luns else []), f"iscsi://{lab.portal}")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def inquiry(url: str) -> subprocess.CompletedProcess[str]:
    return libiscsi("iscsi-inq", url)


def gone(tgt_pid: int | None, control: int) -> None:
    assert tgt_pid is not None
    assert not Path(f"/proc/{tgt_pid}").exists(), f"tgtd {tgt_pid} still there"
    assert not (Path("/run/tgtd") / f"socket.{control}").exists()
    assert not (Path("/run/tgtd") / f"socket.{control}.lock").exists()


def test_two_instances_at_once_with_and_without_chap_then_gone() -> None:
    require_tgt()
    started: list[Tgt] = []
    errors: list[BaseException] = []

    def start_one() -> None:
        try:
            instance = Tgt()
            instance.start()
            started.append(instance)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=start_one) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    try:
        assert not errors, errors
        plain, guarded = started
        assert plain.port != guarded.port and plain.control != guarded.control
        a = plain.add_target(f"{IQN}:a", luns=[LunSpec(size=4 << 20)])
        plain.add_target(f"{IQN}:a2")
        b = guarded.add_target(f"{IQN}:b", chap=(USER, SECRET))
        open_one = guarded.add_target(f"{IQN}:b-open")

        # no CHAP: libiscsi lists both targets and their LUNs; nothing of the other tgtd
        out = listed(plain, show_luns=True)
        assert f"Target:{IQN}:a Portal:{plain.portal},1" in out
        assert f"Target:{IQN}:a2 Portal:{plain.portal},1" in out
        assert out.count("Lun:1    Type:DIRECT_ACCESS") == 2
        assert f"{IQN}:b" not in out
        assert inquiry(plain.url(a, 1)).returncode == 0

        # CHAP: the URL with user%secret logs in; without, or with a wrong secret, not
        assert f"Target:{IQN}:b Portal:{guarded.portal},1" in listed(guarded)
        ok = inquiry(f"iscsi://{USER}%{SECRET}@{guarded.portal}/{IQN}:b/1")
        assert ok.returncode == 0 and "VIRTUAL-DISK" in ok.stdout, ok.stderr
        assert guarded.url(b, 1) == f"iscsi://{USER}%{SECRET}@{guarded.portal}/{IQN}:b/1"
        assert inquiry(f"iscsi://{guarded.portal}/{IQN}:b/1").returncode != 0
        assert inquiry(f"iscsi://{USER}%wrong-secret-1@{guarded.portal}/{IQN}:b/1"
                       ).returncode != 0
        assert inquiry(guarded.url(open_one, 1)).returncode == 0
    finally:
        facts = [(t.pid, t.control, t.workdir, [p for x in t.targets for p in x.lun_paths])
                 for t in started]
        for instance in started:
            instance.stop()
    for pid, control, workdir, luns in facts:
        gone(pid, control)
        assert not workdir.exists() and not any(p.exists() for p in luns)


def test_mutual_chap_through_libiscsi_url(tgt: Tgt) -> None:  # noqa: F811
    target = tgt.add_target(f"{IQN}:mutual", chap=(USER, SECRET), mutual=(TUSER, TSECRET))
    url = tgt.url(target, 1)
    assert url.endswith(f"/1?target_user={TUSER}&target_password={TSECRET}")
    ok = inquiry(url)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    bad = inquiry(url.replace(TSECRET, "not-the-secret"))
    assert bad.returncode != 0 and "Invalid CHAP_R response from the target" in bad.stderr
    assert "the-target (outgoing)" in tgt.show()


def test_luns_sizes_readonly_and_delete(tgt: Tgt) -> None:  # noqa: F811
    target = tgt.add_target(f"{IQN}:luns", luns=[LunSpec(size=1 << 20),
                                                 LunSpec(size=2 << 20, readonly=True)])
    assert [p.stat().st_size for p in target.lun_paths] == [1 << 20, 2 << 20]
    assert all(p.stat().st_blocks == 0 for p in target.lun_paths)  # sparse
    for lun, size in ((1, 1 << 20), (2, 2 << 20)):
        cap = libiscsi("iscsi-readcapacity16", "-s", tgt.url(target, lun))
        assert cap.returncode == 0 and cap.stdout.split() == [str(size)], cap.stderr
    assert tgt.show().count("Readonly: Yes") == 1
    default = tgt.add_target(f"{IQN}:default")
    assert default.lun_paths[0].stat().st_size == 64 << 20
    tgt.delete_target(target.tid)
    assert not any(p.exists() for p in target.lun_paths)
    assert f"{IQN}:luns" not in listed(tgt) and f"{IQN}:default" in listed(tgt)


def test_existing_backing_file_is_used_and_kept(tgt: Tgt, tmp_path: Path) -> None:  # noqa: F811
    backing = tmp_path / "disk.img"
    backing.write_bytes(b"\xab" * (1 << 20))
    target = tgt.add_target(f"{IQN}:existing", luns=[LunSpec(path=backing)])
    assert target.lun_paths == [backing]
    cap = libiscsi("iscsi-readcapacity16", "-s", tgt.url(target, 1))
    assert cap.stdout.split() == [str(1 << 20)]
    with pytest.raises(TgtError, match="not found"):
        tgt.add_target(f"{IQN}:x", luns=[LunSpec(path=tmp_path / "missing")])
    assert [t.iqn for t in tgt.targets] == [f"{IQN}:existing"]  # the half-made one is gone
    assert f"{IQN}:x" not in tgt.show()
    tgt.stop()
    assert backing.read_bytes() == b"\xab" * (1 << 20)


def test_params_and_initiator_address(tgt: Tgt) -> None:  # noqa: F811
    t = tgt.add_target(f"{IQN}:tuned", params={"MaxRecvDataSegmentLength": "262144"})
    tgt.update_param(t.tid, "HeaderDigest", "CRC32C")
    params = tgt.show(t.tid)
    assert "MaxRecvDataSegmentLength=262144" in params and "HeaderDigest=CRC32C" in params
    assert t.params == {"MaxRecvDataSegmentLength": "262144", "HeaderDigest": "CRC32C"}
    with pytest.raises(TgtError, match=r"--name NoSuchKey .*failed \(exit 22\)"):
        tgt.update_param(t.tid, "NoSuchKey", "1")
    # tgt filters SendTargets by the initiator ACL: 127.0.0.1 does not see it
    tgt.add_target(f"{IQN}:elsewhere", initiator_address="127.0.0.2")
    out = listed(tgt)
    assert f"{IQN}:tuned" in out and f"{IQN}:elsewhere" not in out
    with pytest.raises(TgtError, match="another secret"):
        tgt.add_target(f"{IQN}:c1", chap=(USER, SECRET))
        tgt.add_target(f"{IQN}:c2", chap=(USER, "a-different-one"))
    with pytest.raises(TgtError, match=r"this target already exists|invalid|exit"):
        tgt.add_target(f"{IQN}:tuned", luns=[LunSpec(size=1 << 20)])  # same IQN twice
    assert [x.iqn.rsplit(":", 1)[1] for x in tgt.targets] == ["tuned", "elsewhere", "c1"]
    assert tgt.show().count(f"{IQN}:") == 3


def test_secrets_never_in_errors(tgt: Tgt) -> None:  # noqa: F811
    tgt.add_target(f"{IQN}:s", chap=(USER, SECRET))
    with pytest.raises(TgtError) as info:
        tgt._adm("--mode", "account", "--op", "new", "--user", USER, "--password", SECRET)
    assert SECRET not in str(info.value) and "--password ***" in str(info.value)


def test_a_taken_port_or_control_number_fails_clearly_and_harms_nobody(
        tgt: Tgt) -> None:  # noqa: F811
    tgt.add_target(f"{IQN}:first")
    same_port = Tgt(port=tgt.port)
    with pytest.raises(TgtError, match="Address already in use"):
        same_port.start()
    assert not same_port.running and same_port._rundir is None  # nothing left behind
    same_control = Tgt(control=tgt.control)
    with pytest.raises(TgtError, match="another tgtd is using"):
        same_control.start()
    same_control.stop()  # must not remove the sockets of the tgtd it did not start
    assert tgt.running and (Path("/run/tgtd") / f"socket.{tgt.control}").exists()
    assert f"{IQN}:first" in listed(tgt)
    # a port we picked ourselves that turns out busy is simply replaced
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        other = Tgt()
        other.start()
        try:
            assert other.port != busy.getsockname()[1]
        finally:
            other.stop()


def test_kill_restart_and_stop_twice(tgt: Tgt) -> None:  # noqa: F811
    target: Target = tgt.add_target(f"{IQN}:r", chap=(USER, SECRET),
                                    luns=[LunSpec(size=1 << 20)])
    target.lun_paths[0].write_bytes(b"\x5a" * 512)
    port, first = tgt.port, tgt.pid
    tgt.restart()
    assert tgt.port == port and tgt.pid != first and tgt.running
    assert first is not None and not Path(f"/proc/{first}").exists()
    assert inquiry(tgt.url(target, 1)).returncode == 0
    assert tgt.targets[0].lun_paths == target.lun_paths
    tgt.kill()
    assert not tgt.running
    with pytest.raises(TgtError, match="not running"):
        tgt.show()
    pid, control = tgt.pid, tgt.control
    tgt.stop()
    tgt.stop()
    gone(pid, control)
    assert not target.lun_paths[0].exists()
