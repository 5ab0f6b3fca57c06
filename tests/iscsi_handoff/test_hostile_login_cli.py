"""The real CLI against a target that misbehaves at login and in Text exchanges.

Each test runs `iscsi-handoff` as a subprocess against tests/fake_target.py and checks
what a user gets: the exit code, one line on stderr, no traceback, no control character
from the target on the terminal, and the peak RSS where the point is memory.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import pytest

from userland.discovery.sendtargets import MAX_SENDTARGETS_BYTES
from userland.keys import encode_text
from userland.login.chap import encode_binary

from fake_target import (
    FakeTarget,
    LoginPlan,
    Peer,
    answer_logout,
    hostile,
    login_as,
    many_targets,
    serve_text,
    target_list,
    text_pdus,
)

INITIATOR = "iqn.2024-01.org.iscsi-handoff:hostile"
TARGET = "iqn.2024-01.org.example:disk1"
CHAP_ENV = {"HOSTILE_SECRET": "alice-secret-123"}
CHAP = ("--chap-user", "alice", "--chap-secret-env", "HOSTILE_SECRET")
# The CLI alone peaks near 40-50 MB (Python, click, userland). A 16 MiB SendTargets
# answer held whole and built into pairs took 320-760 MB; bounded, it adds little.
RSS_BOUND_KIB = 150 * 1024
CONTROL = ("\x1b", "\x9b", "\r", "\x07", "\u202e")


@dataclass
class Ran:
    returncode: int
    stdout: str
    stderr: str
    max_rss_kib: int  # the CLI process's own peak, from wait4
    seconds: float

    def one_line(self) -> str:
        """A failure is one line on stderr: no traceback, no control character."""
        assert "Traceback" not in self.stderr, self.stderr
        lines = [ln for ln in self.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1, self.stderr
        assert not any(c in self.stderr for c in CONTROL), repr(self.stderr)
        return lines[0]


# The CLI is started by a small Python that forks it and reports its peak RSS: a child
# forked straight from pytest would count pytest's own pages (large after the fuzz run)
# in ru_maxrss until its exec.
_MEASURED = """\
import os, sys
pid = os.fork()
if pid == 0:
    os.execv(sys.argv[1], sys.argv[1:])
_, status, usage = os.wait4(pid, 0)
with open(os.environ["HOSTILE_RSS_OUT"], "w") as out:
    out.write(str(usage.ru_maxrss))
code = os.waitstatus_to_exitcode(status)
sys.exit(code if code >= 0 else 128 - code)
"""


def cli(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> Ran:
    """Run the CLI; its own peak RSS comes from wait4 in a small parent of its own."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err, \
            tempfile.NamedTemporaryFile("r") as rss:
        started = time.monotonic()
        proc = subprocess.Popen([sys.executable, "-c", _MEASURED, sys.executable, "-m",
                                 "iscsi_handoff", *args], stdout=out, stderr=err,
                                stdin=subprocess.DEVNULL, start_new_session=True,
                                env={**os.environ, **(env or {}),
                                     "HOSTILE_RSS_OUT": rss.name})
        killer = threading.Timer(timeout, os.killpg, (proc.pid, signal.SIGKILL))
        killer.start()
        try:
            proc.wait()
        finally:
            killer.cancel()
        seconds = time.monotonic() - started
        out.seek(0)
        err.seek(0)
        peak = rss.read().strip()
        return Ran(proc.returncode, out.read().decode(errors="replace"),
                   err.read().decode(errors="replace"), int(peak) if peak else -1, seconds)


def discover(fake: FakeTarget, *extra: str, **kw: object) -> Ran:
    return cli("discover", fake.portal, "--initiator-name", INITIATOR, "--timeout", "10",
               *extra, **kw)  # type: ignore[arg-type]


def check(fake: FakeTarget, *extra: str, portal: str | None = None,
          env: dict[str, str] | None = None) -> Ran:
    return cli("login", "--portal", portal or fake.portal, "--target", TARGET, "--check",
               "--initiator-name", INITIATOR, "--timeout", "10", *extra, env=env)


def chap_plan(challenge: list[tuple[str, str]]) -> LoginPlan:
    return LoginPlan(first=[("AuthMethod", "CHAP")], chap=challenge)


GOOD_C = encode_binary(b"\x11" * 16)


# -- repeated keys (RFC 7143 6.3)

def test_repeated_auth_method_is_refused() -> None:
    plan = LoginPlan(first=[("AuthMethod", "None"), ("AuthMethod", "None")])
    with FakeTarget(hostile(plan)) as fake:
        ran = discover(fake)
    assert ran.returncode == 7
    assert "AuthMethod twice" in ran.one_line()


def test_repeated_chap_challenge_is_refused() -> None:
    plan = chap_plan([("CHAP_A", "5"), ("CHAP_I", "1"), ("CHAP_C", GOOD_C),
                      ("CHAP_C", encode_binary(b"\x22" * 16))])
    with FakeTarget(hostile(plan)) as fake:
        ran = check(fake, *CHAP, env=CHAP_ENV)
    assert ran.returncode == 7
    assert "CHAP_C twice" in ran.one_line()


def test_operational_key_repeated_is_refused() -> None:
    plan = LoginPlan(extra=[("MaxBurstLength", "8192")])
    with FakeTarget(hostile(plan)) as fake:
        ran = check(fake)
    assert ran.returncode == 7
    assert "MaxBurstLength twice" in ran.one_line()


# -- strict CHAP numbers (12.1.3, 6.1)

@pytest.mark.parametrize(("key", "value"), [
    ("CHAP_I", "0b101"), ("CHAP_I", "0x05"), ("CHAP_I", "+5"), ("CHAP_I", " 5"),
    ("CHAP_I", "256"), ("CHAP_C", "0x12 34"), ("CHAP_C", "0x" + "ab" * 1025),
])
def test_malformed_chap_numbers_are_refused(key: str, value: str) -> None:
    pairs = {"CHAP_A": "5", "CHAP_I": "7", "CHAP_C": GOOD_C, key: value}
    with FakeTarget(hostile(chap_plan(list(pairs.items())))) as fake:
        ran = check(fake, *CHAP, env=CHAP_ENV)
    assert ran.returncode == 7, ran.stderr
    assert key in ran.one_line()


# -- TargetPortalGroupTag (13.9)

def test_missing_portal_group_tag_is_refused() -> None:
    with FakeTarget(hostile(LoginPlan(tpgt=None))) as fake:
        ran = check(fake)
    assert ran.returncode == 7
    assert "did not send TargetPortalGroupTag" in ran.one_line()


def test_portal_group_tag_changed_during_login_is_refused() -> None:
    plan = LoginPlan(tpgt=1, extra=[("TargetPortalGroupTag", "2")])
    with FakeTarget(hostile(plan)) as fake:
        ran = check(fake)
    assert ran.returncode == 7
    assert "TargetPortalGroupTag twice" in ran.one_line()


def test_users_portal_group_tag_must_match_the_targets() -> None:
    with FakeTarget(hostile(LoginPlan(tpgt=1))) as fake:
        wrong = check(fake, portal=f"{fake.portal},5")
        right = check(fake, portal=f"{fake.portal},1")
    assert wrong.returncode == 2
    assert "portal group tag 5, but the target serves it in group 1" in wrong.one_line()
    assert right.returncode == 0, right.stderr
    assert "TargetPortalGroupTag" in right.stdout


def test_empty_port_is_refused() -> None:
    ran = cli("discover", "127.0.0.1:", "--initiator-name", INITIATOR)
    assert ran.returncode == 2
    assert "empty port" in ran.stderr and "Traceback" not in ran.stderr


# -- a required digest the target will not do

@pytest.mark.parametrize(("key", "answer"), [
    ("HeaderDigest", "Reject"), ("HeaderDigest", "NotUnderstood"), ("HeaderDigest", None),
    ("DataDigest", "Reject"),
])
def test_required_digest_refused_or_ignored_fails_the_login(key: str,
                                                            answer: str | None) -> None:
    option = "--header-digest" if key == "HeaderDigest" else "--data-digest"
    with FakeTarget(hostile(LoginPlan(answers={key: answer}))) as fake:
        ran = check(fake, option, "crc32c")
    assert ran.returncode == 7
    line = ran.one_line()
    assert f"{key}=CRC32C was required" in line
    assert ("never answered" in line) if answer is None else (f"{key}={answer}" in line)


# -- SendTargets: splits, size, counts

NAMES = [f"iqn.2024-01.org.example:t{i:03d}" for i in range(40)]


def one_target_per_pdu(names: Iterable[str]) -> Iterable[tuple[bytes, bool]]:
    return ((encode_text(list(target_list([n]))), False) for n in names)


def test_send_targets_split_with_f0_c0_is_accepted() -> None:
    with FakeTarget(hostile(text=lambda: one_target_per_pdu(NAMES),
                            set_boundaries=True)) as fake:
        ran = discover(fake, "--json")
    assert ran.returncode == 0, ran.stderr
    assert all(n in ran.stdout for n in NAMES)
    assert not fake.errors, fake.errors


def test_f0_c0_pdu_ending_inside_a_pair_is_refused() -> None:
    with FakeTarget(hostile(text=lambda: text_pdus(target_list(NAMES), chunk=100),
                            set_boundaries=True)) as fake:
        ran = discover(fake)
    assert ran.returncode == 7
    assert "ends inside a key=value pair" in ran.one_line()


def test_sixteen_mib_send_targets_is_refused_with_bounded_memory() -> None:
    """Held whole, then built into pairs, such an answer peaked at 320-760 MB."""
    answer = lambda: text_pdus(many_targets(16 << 20), chunk=256 << 10)  # noqa: E731
    with FakeTarget(hostile(text=answer)) as fake:
        ran = discover(fake, timeout=120)
    assert ran.returncode == 7
    assert f"longer than {MAX_SENDTARGETS_BYTES} bytes" in ran.one_line()
    assert 0 < ran.max_rss_kib < RSS_BOUND_KIB, ran.max_rss_kib


THOUSAND = [f"iqn.2024-01.org.example:lun-host-{i:04d}" for i in range(1000)]


def test_mount_of_a_thousand_targets_is_capped_with_bounded_memory(tmp_path: Path) -> None:
    mountpoint = tmp_path / "mnt"  # empty: a mount never goes over a non-empty folder
    mountpoint.mkdir()
    with FakeTarget(hostile(text=lambda: text_pdus(target_list(THOUSAND)))) as fake:
        listed = discover(fake)
        ran = cli("mount", fake.portal, str(mountpoint), "--initiator-name",
                  INITIATOR, "--timeout", "10")
    assert listed.returncode == 0, listed.stderr
    assert len([ln for ln in listed.stdout.splitlines() if "lun-host-" in ln]) == 1000
    assert ran.returncode == 2
    assert "lists 1000 targets, more than --max-targets 256" in ran.one_line()
    assert 0 < ran.max_rss_kib < RSS_BOUND_KIB, ran.max_rss_kib


# -- control characters from the target never reach the terminal

def test_control_characters_in_names_and_alias_are_escaped() -> None:
    evil = "iqn.2024-01.org.example:evil\x9b2J\u202eftp\x7f"
    with FakeTarget(hostile(text=lambda: text_pdus(target_list([evil])))) as fake:
        listed = discover(fake)
    assert listed.returncode == 0, listed.stderr
    assert not any(c in listed.stdout for c in (*CONTROL, "\x7f")), repr(listed.stdout)
    assert "evil\\x9b2J\\u202eftp\\x7f" in listed.stdout

    plan = LoginPlan(extra=[("TargetAlias", "disk\x1b]0;owned\x07\r")])
    with FakeTarget(hostile(plan)) as fake:
        ran = check(fake)
    assert ran.returncode == 0, ran.stderr
    assert not any(c in ran.stdout for c in CONTROL), repr(ran.stdout)
    assert "disk\\x1b]0;owned\\x07\\x0d" in ran.stdout


def test_control_characters_in_a_rejected_value_are_escaped() -> None:
    with FakeTarget(hostile(LoginPlan(answers={"HeaderDigest": "\x1b[2J\x1b[H"}))) as fake:
        ran = check(fake)
    assert ran.returncode == 7
    assert "HeaderDigest=\\x1b[2J\\x1b[H" in ran.one_line()


def test_control_characters_in_a_target_address_are_refused() -> None:
    pairs = [("TargetName", TARGET), ("TargetAddress", "evil\x1b[31m:3260,1")]
    with FakeTarget(hostile(text=lambda: text_pdus(pairs))) as fake:
        ran = discover(fake)
    assert ran.returncode == 7
    assert "control characters" in ran.one_line()


# -- --timeout bounds the whole discover

def test_timeout_bounds_login_send_targets_and_logout_together() -> None:
    """Each step alone fits the timeout; the three together do not."""
    step = 1.2

    def slow(peer: Peer) -> None:
        time.sleep(step)
        login_as(peer, LoginPlan())
        time.sleep(step)
        serve_text(peer, text_pdus(target_list([TARGET])))
        time.sleep(step)
        answer_logout(peer)

    with FakeTarget(slow) as fake:
        ran = cli("discover", fake.portal, "--initiator-name", INITIATOR, "--timeout", "2")
    assert ran.returncode == 3, ran.stderr
    assert "deadline" in ran.one_line() or "in time" in ran.one_line()
    assert ran.seconds < 2 * 2 + 10  # the deadline, plus the CLI's start on a busy machine


def test_redirect_to_a_malformed_address_is_a_protocol_error() -> None:
    def redirect(peer: Peer) -> None:
        req, _ = peer.recv_login()
        peer.send(peer.login_response(req, [("TargetAddress", "evil\x1b[2J:3260,1")],
                                      status=(1, 1)))

    with FakeTarget(redirect) as fake:
        ran = check(fake)
    assert ran.returncode == 7
    assert "redirect TargetAddress" in ran.one_line()


def test_mount_logins_expect_the_listed_tpgt_and_cap_the_count() -> None:
    from iscsi_handoff.cli import mount_logins
    from iscsi_handoff.options import Auth
    from userland.discovery.sendtargets import DiscoveredTarget
    from userland.errors import ConfigError
    from userland.portal import Portal

    auth = Auth(initiator_name=INITIATOR, credentials=None, mutual=None,
                chap_algorithms=(5,), timeout=5)
    here = Portal("127.0.0.1", 3260)
    listed = [DiscoveredTarget(f"{TARGET}{i}", [Portal("10.0.0.1", 3260, 4)])
              for i in range(3)]
    logins = mount_logins(here, listed, auth, max_targets=3)
    assert [(p.tpgt, c.expected_tpgt, c.expected_tpgt_from) for p, c in logins] == \
        [(4, 4, "the SendTargets answer")] * 3
    with pytest.raises(ConfigError, match="lists 3 targets, more than --max-targets 2"):
        mount_logins(here, listed, auth, max_targets=2)
    with pytest.raises(ConfigError, match="lists no targets"):
        mount_logins(here, [], auth, max_targets=2)
