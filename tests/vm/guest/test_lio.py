"""LIO, the kernel's own target, as a second real peer (runs in the QEMU guest).

LIO is configured through iscsi_handoff.liolab on the guest's loopback; our `discover`
and `login --check` (without CHAP, one-way, mutual, and the refusals) and libiscsi's
iscsi-inq meet it. The CLI runs in this process through its real entry point
(iscsi_handoff.cli.main): a new Python process costs seconds under TCG.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from iscsi_handoff.cli import main
from iscsi_handoff.lio_target import backstore_name, listening
from iscsi_handoff.liolab import Lio, LioError, LunSpec
from userland.errors import EXIT_AUTH, EXIT_NETWORK
from vm.guest.lio_fixtures import (  # noqa: F401  (fixtures)
    CHAP_SECRET,
    INITIATOR,
    MUTUAL_SECRET,
    MUTUAL_USER,
    LioCase,
    lio,
    lio_chap,
    lio_mutual,
    lio_open,
    lio_session,
    make_case,
    unique_iqn,
    write_secret,
)

TOOL_TIMEOUT = 120  # libiscsi under TCG: well under that
CONFIGFS = Path("/sys/kernel/config/target")


@dataclass
class Ran:
    code: int
    out: str
    err: str


@pytest.fixture
def run_cli(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> Any:
    """`iscsi-handoff ARGS` through the console script's own function, in this process."""

    def run(*args: str) -> Ran:
        capsys.readouterr()
        monkeypatch.setattr(sys, "argv", ["iscsi-handoff", *args])
        try:
            main()
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        captured = capsys.readouterr()
        return Ran(code, captured.out, captured.err)

    return run


def check_login(run_cli: Any, case: LioCase, *args: str) -> dict[str, Any]:
    ran = run_cli("login", *(args or case.login_args), "--check", "--json")
    assert ran.code == 0, ran.err
    result: dict[str, Any] = json.loads(ran.out)
    assert result["target"] == case.iqn
    return result


def replaced(args: list[str], option: str, value: str) -> list[str]:
    out = list(args)
    out[out.index(option) + 1] = value
    return out


def test_discover_lists_every_lio_target_on_the_portal(
        run_cli: Any, lio_open: LioCase, lio_mutual: LioCase) -> None:  # noqa: F811
    ran = run_cli("discover", lio_open.lio.portal, "--initiator-name", INITIATOR, "--json")
    assert ran.code == 0, ran.err
    found = {t["name"]: t["portals"] for t in json.loads(ran.out)["targets"]}
    assert {lio_open.iqn, lio_mutual.iqn} <= set(found)
    for iqn in (lio_open.iqn, lio_mutual.iqn):
        assert [(p["host"], p["port"], p["tpgt"]) for p in found[iqn]] == \
            [("127.0.0.1", lio_open.lio.port, 1)]


def test_login_check_without_chap(run_cli: Any, lio_open: LioCase) -> None:  # noqa: F811
    result = check_login(run_cli, lio_open)
    assert result["auth_method"] == "None"
    assert result["tsih"] != 0  # LIO gave the session its handle
    assert result["parameters"]["TargetPortalGroupTag"]["value"] == 1


def test_login_check_with_one_way_and_mutual_chap(
        run_cli: Any, lio_chap: LioCase, lio_mutual: LioCase) -> None:  # noqa: F811
    assert check_login(run_cli, lio_chap)["auth_method"] == "CHAP"
    assert check_login(run_cli, lio_mutual)["auth_method"] == "CHAP"


def test_refusals_each_way(run_cli: Any, lio_open: LioCase, lio_chap: LioCase,  # noqa: F811
                           lio_mutual: LioCase, tmp_path: Path) -> None:  # noqa: F811
    wrong = str(write_secret(tmp_path, "wrong", "not-the-right-secret"))
    cases = {
        # LIO refuses our CHAP response
        "wrong secret": replaced(lio_chap.login_args, "--chap-secret-file", wrong),
        # LIO proves a secret we do not expect: we refuse it
        "target proves another secret": replaced(lio_mutual.login_args,
                                                 "--mutual-secret-file", wrong),
        # LIO's ACL has no entry for this initiator
        "stranger": replaced(lio_open.login_args, "--initiator-name",
                             "iqn.2024-01.org.iscsi-handoff.test:stranger"),
        # LIO requires CHAP; we offer AuthMethod=None only. LIO (6.1) logs "Proposer's
        # value list "None" contains no valid values" and closes the connection without
        # a Login Response, so all we can say is the network's answer.
        "no credentials": lio_chap.login_args[:6],
    }
    expected = {"no credentials": (EXIT_AUTH, EXIT_NETWORK)}
    for why, args in cases.items():
        ran = run_cli("login", *args, "--check")
        assert ran.code in expected.get(why, (EXIT_AUTH,)), \
            f"{why}: exit {ran.code}: {ran.out}{ran.err}"
        assert len(ran.err.strip().splitlines()) == 1, f"{why}: {ran.err}"  # one line
        for secret in ("not-the-right-secret", CHAP_SECRET, MUTUAL_SECRET):
            assert secret not in ran.out + ran.err, why


def test_demo_mode_and_parameters_reach_lio(run_cli: Any,
                                            lio_session: Lio) -> None:  # noqa: F811
    """No ACL: any initiator gets in. --param: LIO insists on CRC32C header digests."""
    iqn = unique_iqn("demo")
    target = lio_session.add_target(iqn, luns=[LunSpec(size=1 << 20)],
                                    params={"HeaderDigest": "CRC32C"})
    try:
        stranger = "iqn.2024-01.org.iscsi-handoff.test:anyone"
        case = LioCase(lio_session, target, ["--portal", lio_session.portal,
                                             "--target", iqn, "--initiator-name", stranger])
        result = check_login(run_cli, case)
        assert result["parameters"]["HeaderDigest"]["value"] == "CRC32C"
        assert (CONFIGFS / "iscsi" / iqn / "tpgt_1" / "attrib" / "generate_node_acls"
                ).read_text().strip() == "1"
    finally:
        lio_session.delete_target(iqn)


@pytest.mark.parametrize("kind", ["open", "mutual"])
def test_libiscsi_iscsi_inq_sees_lio(kind: str, lio_open: LioCase,  # noqa: F811
                                     lio_mutual: LioCase) -> None:  # noqa: F811
    case = lio_open if kind == "open" else lio_mutual
    if shutil.which("iscsi-inq") is None:
        pytest.skip("iscsi-inq not found: install Debian's libiscsi-bin (./scripts/setup)")
    # CHAP secrets through libiscsi's environment variables, not the URL: argv is public
    done = subprocess.run(["iscsi-inq", "-i", INITIATOR, case.url()], capture_output=True,
                          text=True, timeout=TOOL_TIMEOUT, stdin=subprocess.DEVNULL,
                          env={**os.environ, **case.libiscsi_env})
    assert done.returncode == 0, done.stdout + done.stderr
    assert "LIO-ORG" in done.stdout, done.stdout  # LIO's T10 vendor identification
    assert "DIRECT_ACCESS" in done.stdout, done.stdout  # LUN 0 is a disk: no controller


def test_stop_leaves_nothing_and_touches_no_other_target(
        lio: Lio, lio_open: LioCase, tmp_path: Path) -> None:  # noqa: F811
    case = make_case(lio, tmp_path, unique_iqn("gone"), chap=True, mutual=True,
                     size=1 << 20)
    tpg = CONFIGFS / "iscsi" / case.iqn / "tpgt_1"
    acl = tpg / "acls" / INITIATOR
    assert (tpg / "attrib" / "authentication").read_text().strip() == "1"
    assert (acl / "auth" / "userid_mutual").read_text().strip() == MUTUAL_USER
    assert (tpg / "np" / f"127.0.0.1:{lio.port}").is_dir()
    assert (acl / "lun_0").is_dir()
    shown = json.dumps(lio.show(case.iqn))
    assert CHAP_SECRET not in shown and MUTUAL_SECRET not in shown  # user names only
    # a second lab may not take a name LIO already has, nor harm that target
    with pytest.raises(LioError, match="already exists"):
        lio.add_target(lio_open.iqn, luns=[LunSpec(size=1 << 20)])
    files = list(case.target.lun_paths)
    assert all(f.exists() for f in files)
    port = lio.port
    lio.stop()
    assert not (CONFIGFS / "iscsi" / case.iqn).exists()
    assert backstore_name(case.iqn, 0) not in {p.name for p in
                                               (CONFIGFS / "core").glob("fileio_*/*")}
    assert not any(f.exists() for f in files)
    assert not listening(port)
    assert (CONFIGFS / "iscsi" / lio_open.iqn / "tpgt_1" / "lun" / "lun_0").is_dir()
    assert backstore_name(lio_open.iqn, 0) in {p.name for p in
                                               (CONFIGFS / "core").glob("fileio_*/*")}
