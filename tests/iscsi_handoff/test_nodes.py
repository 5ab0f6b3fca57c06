"""Node records, the defaults file, `--set`, iscsi:// URLs and the grammar around them:
what a user types wrong gets one clear line and exit 2. No target needed."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from iscsi_handoff.config import parse_settings, read_defaults
from iscsi_handoff.nodes import Node, apply_sets, find_one, load_nodes, save_node
from iscsi_handoff.nodes_cli import boot_unit
from iscsi_handoff.options import resolve_where
from iscsi_handoff.urls import parse_url
from userland.errors import ConfigError, TargetNotFoundError
from userland.portal import Portal

IQN = "iqn.2024-01.org.iscsi-handoff.test:nodes"


def run(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "iscsi_handoff", *args], capture_output=True,
                          text=True, timeout=60, env=dict(os.environ), input=stdin)


def one_line(proc: subprocess.CompletedProcess[str]) -> str:
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    return lines[0]


def nodes_dir() -> Path:
    return Path(os.environ["ISCSI_HANDOFF_CONFIG_DIR"]) / "nodes"


def test_a_node_round_trips_through_its_file() -> None:
    node = Node(IQN, Portal("192.0.2.7", 3261, 1), {"startup": "automatic"})
    path = save_node(node)
    assert path.parent == nodes_dir() and path.name == f"{IQN},192.0.2.7,3261.conf"
    assert path.stat().st_mode & 0o777 == 0o644
    [back] = load_nodes()
    assert (back.target, back.portal, back.settings) == (IQN, node.portal, node.settings)
    assert find_one(IQN).path == path
    with pytest.raises(TargetNotFoundError, match="discover PORTAL --save"):
        find_one(IQN, Portal("192.0.2.8"))


def test_a_node_file_others_may_write_is_refused() -> None:
    path = save_node(Node(IQN, Portal("192.0.2.7")))
    path.chmod(0o666)
    with pytest.raises(ConfigError, match=r"writable by group or others .*chmod 644"):
        load_nodes()


def test_defaults_file_under_the_node_and_identity_keys_refused_there() -> None:
    conf = Path(os.environ["ISCSI_HANDOFF_CONFIG_DIR"])
    conf.mkdir(parents=True)
    (conf / "iscsi-handoff.conf").write_text("# every node\nqueue_depth = 8\n"
                                             "node.startup = automatic\n")
    assert read_defaults() == {"queue_depth": "8", "startup": "automatic"}
    node = Node(IQN, Portal("192.0.2.7"), {"queue_depth": "64"})
    assert node.effective() == {"queue_depth": "64", "startup": "automatic"}
    (conf / "iscsi-handoff.conf").write_text("target = iqn.2024-01.x:y\n")
    with pytest.raises(ConfigError, match="belongs in a node file"):
        read_defaults()


@pytest.mark.parametrize(("text", "message"), [
    ("target = iqn.2024-01.x:y\nportal = h\nchap_secret = hunter2hunter2\n",
     "chap_secret refused: a secret is never kept in a node file"),
    ("node.session.auth.password = hunter2\n", "node.session.auth.password refused"),
    ("startup = sometimes\n", "startup=sometimes: startup must be one of automatic, manual"),
    ("queue_depth = 0\n", "queue_depth must be a whole number 1..1024"),
    ("chap_secret_file = secret.txt\n", "must be an absolute path"),
    ("colour = blue\n", "unknown key 'colour'"),
    ("just words\n", ":1: expected key = value"),
    ("chap_secret_file = /a\nchap_secret_env = B\n", "not both"),
])
def test_bad_node_text_is_one_clear_error(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")) as info:
        parse_settings(text, where="n.conf")
    assert "hunter2" not in str(info.value)


def test_set_values_checked_and_a_secret_comes_from_one_place() -> None:
    node = Node(IQN, Portal("h"), {"chap_secret_env": "ISCSI_SECRET"})
    apply_sets(node, ["startup=automatic", "path=fuse", "chap_user=alice",
                      "chap_secret_file=/etc/iscsi-handoff/alice.secret",
                      "header_digest=crc32c", "replacement_timeout=30", "mountpoint=/srv/i"])
    assert node.settings == {"startup": "automatic", "path": "fuse", "chap_user": "alice",
                             "chap_secret_file": "/etc/iscsi-handoff/alice.secret",
                             "header_digest": "crc32c", "replacement_timeout": "30",
                             "mountpoint": "/srv/i"}
    apply_sets(node, ["mountpoint="])
    assert "mountpoint" not in node.settings
    for bad, message in (("path=nfs", "path must be one of auto, kernel, fuse"),
                         ("timeout=soon", "timeout must be seconds"),
                         ("portal=h:1", "names the node"),
                         ("mutual_secret=x", "refused"),
                         ("startup", "write KEY=VALUE")):
        with pytest.raises(ConfigError, match=message):
            apply_sets(node, [bad])


def test_cli_bad_node_file_and_bad_set_value_one_line_exit_2() -> None:
    save_node(Node(IQN, Portal("192.0.2.7")))
    bad = run("node", "update", "-T", IQN, "--set", "queue_depth=many")
    assert bad.returncode == 2
    assert one_line(bad) == ("iscsi-handoff: --set: queue_depth=many: queue_depth must be a "
                             "whole number 1..1024")
    (nodes_dir() / "broken.conf").write_text("target = iqn.2024-01.x:y\nportal = h\n"
                                              "password = s3cretvalue\n")
    for args in (["node", "list"], ["login", "--all"], ["login", "--node", IQN]):
        proc = run(*args)
        assert proc.returncode == 2, (args, proc.stdout, proc.stderr)
        line = one_line(proc)
        assert "broken.conf:3: password refused" in line and "s3cretvalue" not in line


def test_cli_node_update_list_delete_json() -> None:
    save_node(Node(IQN, Portal("192.0.2.7", 3260, 1)))
    save_node(Node(IQN, Portal("192.0.2.8", 3260, 1)))
    done = run("node", "update", "--target", IQN, "--portal", "192.0.2.8",
               "--set", "startup=automatic", "--json")
    assert done.returncode == 0, done.stderr
    assert [n["portal"] for n in json.loads(done.stdout)["nodes"]] == ["192.0.2.8:3260,1"]
    listed = json.loads(run("node", "list", "--json").stdout)["nodes"]
    assert [(n["portal"], n["startup"]) for n in listed] == [("192.0.2.7:3260,1", "manual"),
                                                             ("192.0.2.8:3260,1", "automatic")]
    # Two portals, no --portal: the login must be told which.
    which = run("login", "--node", IQN, "--check")
    assert which.returncode == 2 and "say which with --portal" in one_line(which)
    gone = run("node", "delete", "-T", IQN, "-p", "192.0.2.7")
    assert gone.returncode == 0 and [n.portal.host for n in load_nodes()] == ["192.0.2.8"]
    missing = run("node", "delete", "-T", f"{IQN}x", "--json")
    assert missing.returncode == 5
    error = json.loads(one_line(missing))["error"]
    assert error["exit_code"] == 5 and "no node record" in error["message"]


def test_iscsi_urls() -> None:
    url = parse_url(f"iscsi://[::1]:3262/{IQN}/2")
    assert (url.portal, url.target, url.lun, url.user) == (Portal("::1", 3262), IQN, 2, None)
    assert parse_url(f"iscsi://alice@san1/{IQN}").user == "alice"
    for bad in (f"iscsi://alice%hunter2@san1/{IQN}", f"iscsi://alice:hunter2@san1/{IQN}",
                f"iscsi://san1/{IQN}/1?target_password=hunter2"):
        with pytest.raises(ConfigError, match="password refused: argv is visible") as info:
            parse_url(bad)
        assert "hunter2" not in str(info.value)
    with pytest.raises(ConfigError, match="empty port"):
        parse_url(f"iscsi://san1:/{IQN}")
    with pytest.raises(ConfigError, match="LUN 'x'"):
        parse_url(f"iscsi://san1/{IQN}/x")


def test_where_grammar() -> None:
    assert resolve_where(("h:3261", IQN), None, None).target == IQN
    assert resolve_where((), "h", IQN).portal == Portal("h")
    assert resolve_where((f"iscsi://h/{IQN}",), None, IQN).target == IQN
    assert resolve_where((), "h:3260,2", IQN).portal == Portal("h", 3260, 2)
    with pytest.raises(ConfigError, match="differs"):
        resolve_where((f"iscsi://h/{IQN}",), None, f"{IQN}x")
    with pytest.raises(ConfigError, match="empty port"):
        resolve_where(("h:", IQN), None, None)
    with pytest.raises(ConfigError, match="unexpected argument"):
        resolve_where(("h", IQN, "more"), None, None)


def test_cli_grammar_errors_one_line_and_json() -> None:
    refused = run("login", f"iscsi://alice%hunter2@127.0.0.1/{IQN}")
    assert refused.returncode == 2 and "hunter2" not in refused.stderr
    assert "password refused" in one_line(refused)
    empty = run("discover", "-p", "127.0.0.1:", "--json")
    assert empty.returncode == 2
    assert "empty port" in json.loads(one_line(empty))["error"]["message"]
    usage = run("node", "update", "--json")  # click's own usage error, as JSON too
    assert usage.returncode == 2
    assert json.loads(one_line(usage))["error"]["kind"] == "UsageError"
    # -v after the subcommand is accepted (and --json on a command that had none)
    assert run("doctor", "-v", "--no-modprobe", "--json").returncode == 0
    assert run("node", "list", "-v").returncode == 0


def test_closed_pipe_is_quiet() -> None:
    for i in range(30):
        save_node(Node(f"{IQN}{i}", Portal("192.0.2.7")))
    proc = subprocess.run(f"{sys.executable} -m iscsi_handoff node list --json | head -c0",
                          shell=True, capture_output=True, text=True, timeout=60,
                          env=dict(os.environ))
    assert proc.stderr == "" and proc.returncode == 0
    alone = subprocess.Popen([sys.executable, "-m", "iscsi_handoff", "node", "list"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert alone.stdout is not None and alone.stderr is not None
    alone.stdout.close()  # the reader is gone before the first byte
    assert alone.wait(60) == 0 and alone.stderr.read() == b""


def test_boot_unit_and_install() -> None:
    text = boot_unit(["/usr/bin/iscsi-handoff", "login", "--all"])
    lines = text.splitlines()
    for expected in ("Type=notify", "After=network-online.target",
                     "Before=remote-fs-pre.target remote-fs.target shutdown.target",
                     "ExecStart=/usr/bin/iscsi-handoff login --all",
                     "KillMode=mixed", "OOMScoreAdjust=-1000",
                     "WantedBy=remote-fs.target"):
        assert expected in lines, text
    # A stop or restart leaves kernel sessions to the next keeper: only shutdown logs out.
    stop = next(line for line in lines if line.startswith("ExecStop="))
    assert "is-system-running" in stop and "/usr/bin/iscsi-handoff logout --all" in stop
    unit_dir = Path(os.environ["ISCSI_HANDOFF_CONFIG_DIR"]).parent / "units"
    done = run("node", "install-boot", "--unit-dir", str(unit_dir))
    assert done.returncode == 0, done.stderr
    written = (unit_dir / "iscsi-handoff-boot.service").read_text()
    assert "login --all" in written and "Type=notify" in written
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze (Debian package systemd) is not installed")
    verify = subprocess.run(["systemd-analyze", "verify",
                             str(unit_dir / "iscsi-handoff-boot.service")],
                            capture_output=True, text=True, timeout=60, check=False)
    assert verify.returncode == 0 and verify.stderr == "", verify.stderr


def test_login_all_with_no_automatic_node_says_how_to_make_one() -> None:
    save_node(Node(IQN, Portal("192.0.2.7")))
    proc = run("login", "--all")
    assert proc.returncode == 0 and "--set startup=automatic" in proc.stdout
    extra = run("login", "--all", "--queue-depth", "4")
    assert extra.returncode == 2 and "--all takes only --daemon and --json" in one_line(extra)


def test_discovery_credentials_apart_from_the_session_ones(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from iscsi_handoff.options import Auth, discovery_auth_from
    from userland.login.chap import Credentials, Secret

    session = Auth("iqn.2024-01.x:i", Credentials("alice", Secret(b"alice-secret-123")),
                   None, (5,), 15.0)
    none = {f"discovery_{side}_{what}": None for side in ("chap", "mutual")
            for what in ("user", "secret_file", "secret_env")}
    assert discovery_auth_from(dict(none), session, fall_back=False) == (None, None)
    assert discovery_auth_from(dict(none), session, fall_back=True)[0] is session.credentials
    monkeypatch.setenv("DISC_SECRET", "discovery-secret-1")
    given = {**none, "discovery_chap_user": "disc", "discovery_chap_secret_env": "DISC_SECRET"}
    credentials, mutual = discovery_auth_from(given, session, fall_back=True)
    assert credentials is not None and credentials.user == "disc" and mutual is None
    with pytest.raises(ConfigError, match="--discovery-chap-secret-file"):
        discovery_auth_from({**none, "discovery_chap_user": "disc"}, session, fall_back=True)


def test_a_broken_record_does_not_stop_a_login_that_names_its_portal() -> None:
    nodes_dir().mkdir(parents=True)
    (nodes_dir() / "broken.conf").write_text("colour = blue\n")
    # Port 1 on loopback refuses: the login gets as far as the network (exit 3).
    proc = run("login", "127.0.0.1:1", IQN, "--check", "--timeout", "5")
    assert proc.returncode == 3, proc.stderr
    assert "node records not used: " in proc.stderr and "unknown key 'colour'" in proc.stderr
