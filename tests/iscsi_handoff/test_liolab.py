"""The LIO lab's input side, on any machine (LIO itself runs in the QEMU guest only:
tests/vm/guest/test_lio.py).

What is checked here needs no target modules: the worker refuses unsafe or malformed
input before it touches the kernel, and no secret ever reaches a command line.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from iscsi_handoff import lio_target
from iscsi_handoff.liolab import SYSTEM_PYTHON, WORKER, Lio, LioError, LunSpec, Target, Worker

ROOT = Path(__file__).resolve().parents[2]
IQN = "iqn.2024-01.org.iscsi-handoff.test:lio"
SECRET = "s3cret-not-in-argv"
MUTUAL = "another-s3cret-here"


def run_script(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """scripts/lio-target as a user runs it (Debian's python3, or ours where it is absent)."""
    extra = {} if os.access(SYSTEM_PYTHON, os.X_OK) else {"LIO_PYTHON": sys.executable}
    return subprocess.run([str(ROOT / "scripts" / "lio-target"), *args], capture_output=True,
                          text=True, timeout=30, stdin=subprocess.DEVNULL,
                          env={**os.environ, **extra, **(env or {})})


def secret_file(tmp_path: Path, text: str, mode: int) -> Path:
    path = tmp_path / "secret"
    path.write_text(text + "\n")
    path.chmod(mode)
    return path


def lun_file(tmp_path: Path, size: int = 1 << 20) -> Path:
    path = tmp_path / "lun.img"
    with path.open("wb") as f:
        f.truncate(size)
    return path


def test_script_refuses_a_secret_file_others_can_read_and_never_prints_it(
        tmp_path: Path) -> None:
    secret = secret_file(tmp_path, SECRET, 0o644)
    done = run_script("create", IQN, "--portal", "127.0.0.1:3260", "--lun",
                      str(lun_file(tmp_path)), "--chap-user", "alice",
                      "--chap-secret-file", str(secret))
    assert done.returncode == lio_target.EXIT_USAGE, done.stderr
    assert "mode 644" in done.stderr and "chmod 600" in done.stderr
    assert SECRET not in done.stdout + done.stderr


def test_script_has_no_option_that_takes_a_secret_itself(tmp_path: Path) -> None:
    done = run_script("create", IQN, "--portal", "127.0.0.1:3260", "--lun",
                      str(lun_file(tmp_path)), "--chap-user", "alice",
                      "--chap-secret", SECRET)
    assert done.returncode == 2
    assert "unrecognized arguments" in done.stderr or "ambiguous" in done.stderr
    # nor may an abbreviation stand for --chap-secret-file
    done = run_script("create", IQN, "--portal", "127.0.0.1:3260", "--lun",
                      str(lun_file(tmp_path)), "--chap-user", "alice",
                      "--chap-secret-f", "/dev/null")
    assert done.returncode == 2 and "unrecognized arguments" in done.stderr


def test_mutual_secret_from_env_must_differ_and_needs_chap(tmp_path: Path) -> None:
    args = ["create", IQN, "--portal", "127.0.0.1:3260", "--lun", str(lun_file(tmp_path))]
    done = run_script(*args, "--mutual-user", "tgt", "--mutual-secret-env", "M",
                      env={"M": MUTUAL})
    assert done.returncode == 2 and "needs --chap-user" in done.stderr
    done = run_script(*args, "--chap-user", "alice", "--chap-secret-env", "C",
                      "--mutual-user", "tgt", "--mutual-secret-env", "M",
                      env={"C": SECRET, "M": SECRET})
    assert done.returncode == 2 and "must differ" in done.stderr
    assert SECRET not in done.stdout + done.stderr


def test_read_secret_rules(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = secret_file(tmp_path, SECRET, 0o600)
    assert lio_target.read_secret("chap", str(path), None) == SECRET  # one newline dropped
    monkeypatch.setenv("C", " padded ")
    with pytest.raises(lio_target.LioError, match="leading or trailing"):
        lio_target.read_secret("chap", None, "C")  # rtslib would strip it silently
    monkeypatch.setenv("C", "NULL")
    with pytest.raises(lio_target.LioError, match="1-255"):
        lio_target.read_secret("chap", None, "C")  # rtslib's word for "unset"
    with pytest.raises(lio_target.LioError, match="exactly one"):
        lio_target.read_secret("chap", str(path), "C")
    with pytest.raises(lio_target.LioError, match="not set"):
        lio_target.read_secret("chap", None, "NO_SUCH_VARIABLE_HERE")
    link = tmp_path / "link"
    link.symlink_to(path)
    with pytest.raises(lio_target.LioError, match="cannot open"):
        lio_target.read_secret("chap", str(link), None)  # O_NOFOLLOW


@pytest.mark.parametrize(("text", "expected"), [
    ("127.0.0.1:3260", ("127.0.0.1", 3260)),
    ("[::1]:3261", ("::1", 3261)),
    ("192.168.56.10:3260", ("192.168.56.10", 3260)),
])
def test_parse_portal(text: str, expected: tuple[str, int]) -> None:
    assert lio_target.parse_portal(text) == expected


@pytest.mark.parametrize("text", ["127.0.0.1", "::1:3260", ":3260", "h:0", "h:70000", "h:x"])
def test_parse_portal_refuses(text: str) -> None:
    with pytest.raises(lio_target.LioError) as info:
        lio_target.parse_portal(text)
    assert info.value.exit_code == lio_target.EXIT_USAGE


def test_backstore_names_are_per_target_and_per_lun() -> None:
    names = {lio_target.backstore_name(iqn, n) for iqn in (IQN, IQN + "2") for n in (0, 1)}
    assert len(names) == 4
    assert lio_target.backstore_name(IQN, 1).startswith("ihlab_")


def test_worker_checks_requests_and_keeps_secrets_out_of_argv_and_answers() -> None:
    """The lab's worker (Debian's python3 running lio_target.py serve) refuses a bad
    secret before touching the kernel, and no secret is in its argv or environment."""
    python = SYSTEM_PYTHON if os.access(SYSTEM_PYTHON, os.X_OK) else sys.executable
    worker = Worker(python)
    try:
        spec = {"iqn": IQN, "portal": "127.0.0.1:3260", "luns": ["/nonexistent/lun.img"],
                "acls": [], "chap": ["alice", f" {SECRET} "], "mutual": None}
        with pytest.raises(LioError) as info:
            worker.request({"op": "create", "spec": spec})
        assert "leading or trailing spaces" in str(info.value)
        assert SECRET not in str(info.value)
        # a well-formed one fails too here (no LIO, or no such LUN file), but later
        spec |= {"chap": ["alice", SECRET], "mutual": ["tgt", MUTUAL]}
        with pytest.raises(LioError) as info:
            worker.request({"op": "create", "spec": spec})
        assert SECRET not in str(info.value) and MUTUAL not in str(info.value)
        pid = worker._running().pid  # the same process answered both
        for name in ("cmdline", "environ"):
            seen = Path(f"/proc/{pid}/{name}").read_bytes()
            assert SECRET.encode() not in seen and MUTUAL.encode() not in seen
        with pytest.raises(LioError, match="unknown request"):
            worker.request({"op": "format-disk"})
        with pytest.raises(LioError, match="must differ"):
            worker.request({"op": "create", "spec": spec | {"mutual": ["tgt", SECRET]}})
        assert worker._running().pid == pid  # refusals do not end the worker
    finally:
        worker.close()
    assert worker._proc is None


def test_create_request_carries_what_the_target_needs() -> None:
    lab = Lio(host="::1", port=3262)
    target = Target(IQN, lun_paths=[Path("/a.img"), Path("/b.img")], luns=[LunSpec()] * 2,
                    acls=["iqn.2024-01.org.example:host"], chap=("alice", SECRET),
                    mutual=("tgt", MUTUAL), params={"MaxRecvDataSegmentLength": "65536"})
    request = lab.create_request(target)
    assert request["op"] == "create"
    spec = lio_target.spec_from_json(request["spec"])  # what the worker will make of it
    assert (spec.host, spec.port) == ("::1", 3262)
    assert spec.luns == [Path("/a.img"), Path("/b.img")]
    assert spec.acls == ["iqn.2024-01.org.example:host"]
    assert spec.chap == ("alice", SECRET) and spec.mutual == ("tgt", MUTUAL)
    assert spec.params == {"MaxRecvDataSegmentLength": "65536"}
    assert SECRET not in repr(target) and MUTUAL not in repr(target)


def test_command_line_spec_matches_the_request_spec(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("C", SECRET)
    args = lio_target.parser().parse_args([
        "create", IQN, "--portal", "[::1]:3262", "--lun", "/a.img", "--acl", "iqn.x:y",
        "--chap-user", "alice", "--chap-secret-env", "C", "--mutual-user", "tgt",
        "--mutual-secret-file", str(secret_file(tmp_path, MUTUAL, 0o600)),
        "--param", "HeaderDigest=CRC32C"])
    spec = lio_target.spec_from(args)
    assert (spec.host, spec.port, spec.luns, spec.acls) == \
        ("::1", 3262, [Path("/a.img")], ["iqn.x:y"])
    assert spec.chap == ("alice", SECRET) and spec.mutual == ("tgt", MUTUAL)
    assert spec.params == {"HeaderDigest": "CRC32C"}


def test_lab_refuses_work_before_start_and_mutual_without_chap() -> None:
    lab = Lio()
    with pytest.raises(LioError, match="start"):
        lab.add_target(IQN)
    lab._started = True  # only the argument check is under test here
    with pytest.raises(LioError, match="mutual CHAP needs chap"):
        lab.add_target(IQN, mutual=("tgt", MUTUAL))
    assert not lab.targets


def test_worker_path_is_the_module_the_script_runs() -> None:
    assert WORKER == ROOT / "iscsi_handoff" / "lio_target.py"
    assert "iscsi_handoff/lio_target.py" in (ROOT / "scripts" / "lio-target").read_text()
