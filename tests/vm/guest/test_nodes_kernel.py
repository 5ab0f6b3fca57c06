"""From `discover --save` to kernel disks at boot, in the guest's stock kernel (issue 9):
node records (one target plain, one with CHAP from a mode-600 file), the boot unit's own
ExecStart (`login --all`) under a NOTIFY_SOCKET of ours, READY=1 only once both /dev/sdX
exist, a restart as systemd does it (KillMode=mixed: SIGTERM to `login --all`, which
passes it on to keepers run with --service) that leaves the sessions, adoption by the
restarted unit, then shutdown's ExecStop (`logout --all`)."""

from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from click.testing import CliRunner, Result

from iscsi_handoff.cli import cli as main_cli
from iscsi_handoff.tgtlab import LunSpec, Target, Tgt

from .kernel_login import drop_caches, sessions_in_sysfs
from .openiscsi import disk_bytes, read_direct, wait_for, write_direct

IQN = "iqn.2024-01.test.vmlab:node"
USER, SECRET = "alice", "alice-node-secret-0123"
READY_WAIT = 240.0  # two logins, three Python start-ups under TCG on a shared machine


def cli(*args: str) -> Result:
    """The CLI in-process: under emulation a new Python costs seconds, this nothing."""
    return CliRunner().invoke(main_cli, list(args), catch_exceptions=False)


def _unit() -> tuple[list[str], dict[str, str], str]:
    """The boot unit as `node install-boot --print` writes it: ExecStart, Environment."""
    shown = cli("node", "install-boot", "--print")
    assert shown.exit_code == 0, shown.output
    lines = shown.output.splitlines()
    assert "Type=notify" in lines, shown.output
    (exec_start,) = [ln.removeprefix("ExecStart=") for ln in lines
                     if ln.startswith("ExecStart=")]
    env = dict(ln.removeprefix("Environment=").partition("=")[::2] for ln in lines
               if ln.startswith("Environment="))
    argv = shlex.split(exec_start)
    assert argv[-2:] == ["login", "--all"], exec_start
    return argv, env, shown.output


class Unit:
    """`systemctl start` of the unit, as far as a test can: its ExecStart in a process
    group of its own (the unit's control group) with NOTIFY_SOCKET naming our socket."""

    def __init__(self, argv: list[str], env: dict[str, str], notify: Path,
                 log: Path) -> None:
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify.bind(str(notify))
        self.notify.settimeout(READY_WAIT)
        self.log = log
        self.started = time.monotonic()
        self.ready_after = 0.0
        with log.open("wb") as out:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out,
                                         stderr=subprocess.STDOUT, start_new_session=True,
                                         env={**os.environ, **env,
                                              "NOTIFY_SOCKET": str(notify)})

    def ready(self) -> list[str]:
        """The first datagram (READY=1 and STATUS=...), as systemd would take it."""
        try:
            message = self.notify.recv(4096).decode().splitlines()
            self.ready_after = time.monotonic() - self.started
            return message
        except TimeoutError:
            raise AssertionError(f"no READY=1 within {READY_WAIT:g} s (exit "
                                 f"{self.proc.poll()}):\n{self.output()}") from None

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def signal_group(self, signum: int) -> None:
        """KillMode=control-group: the signal goes to every process of the unit."""
        os.killpg(self.proc.pid, signum)

    def wait(self, timeout: float = 120) -> int:
        code = self.proc.wait(timeout=timeout)
        self.notify.close()
        return code

    def end(self) -> None:
        if self.proc.poll() is None:
            self.signal_group(signal.SIGTERM)
            try:
                self.proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                self.signal_group(signal.SIGKILL)
                self.proc.wait(timeout=30)
        self.notify.close()


def _ours(targets: dict[str, Target]) -> dict[str, dict[str, Any]]:
    """`session list --json`: target IQN -> its kernel session, for our targets."""
    listed = cli("session", "list", "--json")
    assert listed.exit_code == 0, listed.output
    rows: dict[str, dict[str, Any]] = {}
    for row in json.loads(listed.output)["sessions"]:
        if row.get("target_name") in targets:
            assert row["target_name"] not in rows, f"two sessions to {row['target_name']}"
            rows[row["target_name"]] = row
    return rows


def _check_sessions(targets: dict[str, Target], portal: str) -> dict[str, dict[str, Any]]:
    rows = _ours(targets)
    assert set(rows) == set(targets), rows
    for iqn, row in rows.items():
        assert row["path"] == "kernel" and row["ours"] and row["state"] == "LOGGED_IN", row
        assert row["portal"] == portal and row["registry"]["state"] == "live", row
        [disk] = row["disks"]
        assert disk["lun"] == 1 and Path(disk["dev"]).is_block_device(), row
        assert disk_bytes(Path(disk["dev"]).name) == 32 << 20, iqn
    return rows


def test_discover_save_to_kernel_disks_at_boot(tgt: Tgt, tmp_path: Path,
                                               figure: Callable[[str], None]) -> None:
    plain = tgt.add_target(f"{IQN}-plain", luns=[LunSpec(size=32 << 20)])
    chap = tgt.add_target(f"{IQN}-chap", luns=[LunSpec(size=32 << 20)], chap=(USER, SECRET))
    targets = {plain.iqn: plain, chap.iqn: chap}
    secret = tmp_path / "alice.secret"
    secret.write_text(SECRET + "\n")
    secret.chmod(0o600)

    # The CHAP target's session credentials are saved as the secret's file path; then
    # everything the portal lists (the CHAP node keeps what it has).
    saved = cli("discover", "-p", tgt.portal, "-T", chap.iqn, "--save",
                "--chap-user", USER, "--chap-secret-file", str(secret))
    assert saved.exit_code == 0, saved.output
    saved = cli("discover", tgt.portal, "--save")
    assert saved.exit_code == 0, saved.output
    nodes = {n["target"]: n for n in json.loads(cli("node", "list", "--json").output)["nodes"]}
    assert set(nodes) == set(targets) and {n["startup"] for n in nodes.values()} == {"manual"}
    node_dir = Path(os.environ["ISCSI_HANDOFF_CONFIG_DIR"]) / "nodes"
    chap_text = (node_dir / f"{chap.iqn},127.0.0.1,{tgt.port}.conf").read_text()
    assert f"chap_secret_file = {secret}" in chap_text and f"chap_user = {USER}" in chap_text
    assert "chap" not in (node_dir / f"{plain.iqn},127.0.0.1,{tgt.port}.conf").read_text()
    assert all(SECRET not in p.read_text() for p in node_dir.iterdir())
    for iqn in targets:
        done = cli("node", "update", "-T", iqn, "--set", "startup=automatic")
        assert done.exit_code == 0, done.output

    argv, unit_env, unit_text = _unit()
    assert SECRET not in unit_text

    # Boot: the unit's ExecStart. READY=1 must come only once both disks exist.
    boot = Unit(argv, unit_env, tmp_path / "notify-1", tmp_path / "boot-1.log")
    try:
        told = boot.ready()
        rows = _check_sessions(targets, tgt.portal)  # at once: the disks are there now
        assert told[:2] == ["READY=1", "STATUS=2 of 2 nodes logged in"], told
        assert boot.proc.poll() is None, boot.output()  # serving
        out = boot.output()
        assert all(f"{iqn} at {tgt.portal},1: logged in" in out for iqn in targets), out
        sids = {iqn: row["sid"] for iqn, row in rows.items()}
        devs = {iqn: row["disks"][0]["dev"] for iqn, row in rows.items()}
        keepers = {iqn: row["registry"]["pid"] for iqn, row in rows.items()}
        figure(f"boot login --all: READY=1 with both kernel disks after "
               f"{boot.ready_after:.1f} s, sids {sorted(sids.values())}")
        data = {iqn: (iqn.encode() * (1 << 20))[:1 << 20] for iqn in targets}
        for iqn, target in targets.items():
            write_direct(devs[iqn], 1 << 20, data[iqn])
            with target.lun_paths[0].open("rb") as f:  # tgtd's file: it went over the wire
                f.seek(1 << 20)
                assert f.read(1 << 20) == data[iqn]
            assert read_direct(devs[iqn], 1 << 20, 1 << 20) == data[iqn]

        # `systemctl restart` (a package upgrade): KillMode=mixed sends SIGTERM to the
        # main process, which passes it on; keepers run with --service leave their
        # sessions to the next keeper: no logout under mounted filesystems.
        boot.proc.send_signal(signal.SIGTERM)
        assert boot.wait() == 0, boot.output()
        assert "Traceback" not in boot.output()
        assert set(sids.values()) <= sessions_in_sysfs(), boot.output()
        assert all(Path(dev).exists() for dev in devs.values())
    finally:
        boot.end()

    # The unit restarted: each node's login adopts its session, no second login.
    again = Unit(argv, unit_env, tmp_path / "notify-2", tmp_path / "boot-2.log")
    try:
        told = again.ready()
        rows = _check_sessions(targets, tgt.portal)
        assert told[:2] == ["READY=1", "STATUS=2 of 2 nodes logged in"], told
        assert {iqn: row["sid"] for iqn, row in rows.items()} == sids, again.output()
        assert {iqn: row["disks"][0]["dev"] for iqn, row in rows.items()} == devs
        assert all(row["registry"]["pid"] != keepers[iqn] for iqn, row in rows.items())
        assert again.output().count("adopted (its keeper was gone)") == 2, again.output()
        drop_caches()
        for iqn in targets:
            assert read_direct(devs[iqn], 1 << 20, 1 << 20) == data[iqn]
        figure(f"restarted unit: READY=1 after {again.ready_after:.1f} s, "
               "both sessions adopted (same sids, same disks)")

        # Shutdown: ExecStop (systemd says `stopping`) runs `logout --all` first: each
        # keeper is asked to log out; then the stop's SIGTERM finds nothing left to keep.
        stop = cli("logout", "--all")
        assert stop.exit_code == 0, stop.output
        if again.proc.poll() is None:
            again.proc.send_signal(signal.SIGTERM)
        again.wait()
    finally:
        again.end()
    assert "Traceback" not in again.output()
    assert set(sids.values()).isdisjoint(sessions_in_sysfs()), again.output()
    for dev in devs.values():
        block = Path("/sys/block") / Path(dev).name

        def gone(block: Path = block) -> bool | None:
            return True if not block.exists() else None

        wait_for(gone, timeout=30, what=f"{dev} to go")
    assert _ours(targets) == {}

    done = cli("logout", "--all")
    assert done.exit_code == 0, done.output
    assert _ours(targets) == {}
    left = json.loads(cli("session", "list", "--json").output)["sessions"]
    assert [s for s in left if s.get("ours")] == [], left
