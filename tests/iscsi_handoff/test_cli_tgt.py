"""The CLI against a real tgtd: what a user types, what a user sees, which exit code."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from iscsi_handoff.tgtlab import LunSpec, Tgt

from tgt_fixtures import tgt  # noqa: F401  (fixture)

pytestmark = pytest.mark.tgt

IQN = "iqn.2024-01.org.iscsi-handoff.test"
USER, SECRET = "alice", "alice-secret-123"
TUSER, TSECRET = "target1", "target1-secret-456"


def run(*args: str, env: dict[str, str] | None = None,
        timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "iscsi_handoff", *args], capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})


def secret_file(tmp_path: Path, name: str, value: str) -> Path:
    path = tmp_path / name
    path.write_text(value + "\n")
    path.chmod(0o600)
    return path


def one_clean_line(proc: subprocess.CompletedProcess[str]) -> str:
    """A user error is one line on stderr, never a traceback."""
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    return lines[0]


def test_discover_three_targets_matches_libiscsi(tgt: Tgt) -> None:  # noqa: F811
    names = [f"{IQN}:disk{i}" for i in range(3)]
    for name in names:
        tgt.add_target(name, luns=[LunSpec(size=8 << 20)])
    proc = run("discover", tgt.portal, "--json")
    assert proc.returncode == 0, proc.stderr
    found = json.loads(proc.stdout)["targets"]
    assert sorted(t["name"] for t in found) == sorted(names)
    for t in found:
        assert [p["port"] for p in t["portals"]] == [tgt.port]
    table = run("discover", tgt.portal)
    assert table.returncode == 0 and all(n in table.stdout for n in names)
    # libiscsi's view of the same portal
    ls = subprocess.run(["iscsi-ls", "-s", f"iscsi://{tgt.portal}"], capture_output=True,
                        text=True, timeout=30)
    assert ls.returncode == 0, ls.stderr
    # lines: "Target:IQN Portal:HOST:PORT,TPGT"
    theirs = sorted((words[0].removeprefix("Target:"), words[1].removeprefix("Portal:"))
                    for words in (line.split() for line in ls.stdout.splitlines())
                    if words and words[0].startswith("Target:"))
    ours = sorted((t["name"], f"{p['address']},{p['tpgt']}") for t in found
                  for p in t["portals"])
    assert theirs == ours


def test_login_check_without_auth_prints_parameters(tgt: Tgt) -> None:  # noqa: F811
    tgt.add_target(f"{IQN}:plain")
    proc = run("login", "--portal", tgt.portal, "--target", f"{IQN}:plain", "--check")
    assert proc.returncode == 0, proc.stderr
    assert "MaxRecvDataSegmentLength" in proc.stdout and "logged out" in proc.stdout
    as_json = run("login", "--portal", tgt.portal, "--target", f"{IQN}:plain", "--check",
                  "--json")
    params = json.loads(as_json.stdout)["parameters"]
    assert params["HeaderDigest"]["value"] == "None"
    assert params["ErrorRecoveryLevel"]["value"] == 0
    assert params["TargetPortalGroupTag"]["chosen_by"] == "target"


def test_one_way_and_mutual_chap(tgt: Tgt, tmp_path: Path) -> None:  # noqa: F811
    tgt.add_target(f"{IQN}:chap", chap=(USER, SECRET))
    tgt.add_target(f"{IQN}:mutual", chap=(USER, SECRET), mutual=(TUSER, TSECRET))
    ours = secret_file(tmp_path, "ours", SECRET)
    secret_file(tmp_path, "theirs", TSECRET)
    proc = run("login", "--portal", tgt.portal, "--target", f"{IQN}:chap", "--check",
               "--chap-user", USER, "--chap-secret-file", str(ours))
    assert proc.returncode == 0, proc.stderr
    assert "auth CHAP" in proc.stdout
    proc = run("-v", "login", "--portal", tgt.portal, "--target", f"{IQN}:mutual", "--check",
               "--chap-user", USER, "--chap-secret-file", str(ours),
               "--mutual-user", TUSER, "--mutual-secret-env", "TSECRET",
               env={"TSECRET": TSECRET})
    assert proc.returncode == 0, proc.stderr
    # -v shows the exchange, never the secrets or the CHAP responses
    assert "CHAP_N=alice" in proc.stderr and "CHAP_R=<redacted>" in proc.stderr
    assert SECRET not in proc.stderr + proc.stdout and TSECRET not in proc.stderr


def test_crc32c_digests_required_by_the_target(tgt: Tgt) -> None:  # noqa: F811
    target = tgt.add_target(f"{IQN}:digest")
    tgt.update_param(target.tid, "HeaderDigest", "CRC32C")
    tgt.update_param(target.tid, "DataDigest", "CRC32C")
    proc = run("login", "--portal", tgt.portal, "--target", f"{IQN}:digest", "--check",
               "--json")
    assert proc.returncode == 0, proc.stderr
    params = json.loads(proc.stdout)["parameters"]
    assert params["HeaderDigest"]["value"] == "CRC32C"
    assert params["DataDigest"]["value"] == "CRC32C"
    forced = run("login", "--portal", tgt.portal, "--target", f"{IQN}:digest", "--check",
                 "--header-digest", "crc32c", "--data-digest", "crc32c")
    assert forced.returncode == 0, forced.stderr
    # tgt set to CRC32C still answers None to an offer of None alone (a tgt leniency),
    # so a refusal cannot be shown with it; test_login_fake_target covers an answer
    # outside our offer.


def test_wrong_secrets_and_missing_credentials(tgt: Tgt, tmp_path: Path) -> None:  # noqa: F811
    tgt.add_target(f"{IQN}:chap", chap=(USER, SECRET))
    tgt.add_target(f"{IQN}:mutual", chap=(USER, SECRET), mutual=(TUSER, TSECRET))
    wrong = secret_file(tmp_path, "wrong", "not-the-secret-1")
    right = secret_file(tmp_path, "right", SECRET)
    wrong_target = secret_file(tmp_path, "wrongt", "not-their-secret-2")
    proc = run("login", "--portal", tgt.portal, "--target", f"{IQN}:chap", "--check",
               "--chap-user", USER, "--chap-secret-file", str(wrong))
    assert proc.returncode == 4
    assert "authentication failed" in one_clean_line(proc)
    proc = run("login", "--portal", tgt.portal, "--target", f"{IQN}:mutual", "--check",
               "--chap-user", USER, "--chap-secret-file", str(right),
               "--mutual-user", TUSER, "--mutual-secret-file", str(wrong_target))
    assert proc.returncode == 4
    assert "mutual CHAP" in one_clean_line(proc)
    proc = run("login", "--portal", tgt.portal, "--target", f"{IQN}:chap", "--check")
    assert proc.returncode == 4
    assert "no credentials" in one_clean_line(proc)


def test_unknown_target_refused_and_silent_portals(tgt: Tgt) -> None:  # noqa: F811
    tgt.add_target(f"{IQN}:real")
    proc = run("login", "--portal", tgt.portal, "--target", f"{IQN}:nosuch", "--check")
    assert proc.returncode == 5
    assert "target not found" in one_clean_line(proc)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free_port = s.getsockname()[1]
    proc = run("discover", f"127.0.0.1:{free_port}")
    assert proc.returncode == 3
    assert "refused" in one_clean_line(proc)


@pytest.fixture
def silent_portal() -> Iterator[str]:
    """Accepts TCP and never says a word."""
    server = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except TimeoutError:
                continue
            except OSError:
                return

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"127.0.0.1:{server.getsockname()[1]}"
    stop.set()
    thread.join()
    server.close()
    for s in held:
        s.close()


def test_silent_portal_fails_within_the_deadline(silent_portal: str) -> None:
    started = time.monotonic()
    proc = run("login", "--portal", silent_portal, "--target", f"{IQN}:x", "--check",
               "--timeout", "2")
    elapsed = time.monotonic() - started
    assert proc.returncode == 3
    assert "said nothing" in one_clean_line(proc)
    assert elapsed < 10  # 2 s deadline plus interpreter start-up, generously


def test_usage_errors_are_one_line(tmp_path: Path) -> None:
    open_file = tmp_path / "open"
    open_file.write_text("secret-secret-1\n")
    open_file.chmod(0o644)
    proc = run("discover", "127.0.0.1:1", "--chap-user", "u", "--chap-secret-file",
               str(open_file))
    assert proc.returncode == 2 and "chmod 600" in one_clean_line(proc)
    proc = run("login", "--portal", "127.0.0.1:1", "--target", "not-an-iqn", "--check")
    assert proc.returncode == 2 and "iSCSI name" in one_clean_line(proc)
    proc = run("discover", "127.0.0.1:99999")
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    version = run("--version")
    assert version.returncode == 0 and "iscsi-handoff" in version.stdout
