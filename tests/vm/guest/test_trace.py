"""The bcc observer in Debian's stock kernel: `iscsi-handoff trace --json` watches
open-iscsi's iscsid, then our own `iscsi-handoff login --kernel`, each logging in to a
tgtd on the guest's loopback, losing its connection to `ss -K`, recovering, logging out.

Everything asserted comes from the trace, checked against what the test knows on its
own: the PIDs, tgtd's port, the target name, the sockets `ss -tnp` and /proc/net/tcp
show. One trace process serves the whole module: compiling the probes takes minutes
under TCG on a busy host.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from iscsi_handoff.tgtlab import LunSpec, Tgt

from .kernel_login import KernelLogin
from .openiscsi import Iscsid, session_disks, wait_for

IQN = "iqn.2024-01.test.vmlab:trace"
ATTACH_TIMEOUT = 420.0  # bcc compiles probes.c with clang, under TCG
EVENT_TIMEOUT = 60.0
# The CLI entry point; registers `trace` itself should cli.py not have it yet.
TRACE_MAIN = ("import sys; from iscsi_handoff.cli import cli, main; "
              "from iscsi_handoff import cli_trace; "
              "'trace' in cli.commands or cli_trace.register(cli); "
              "sys.argv[0] = 'iscsi-handoff'; main()")

Event = dict[str, Any]


class Tracer:
    """`iscsi-handoff trace --json` in the background; its JSON lines, parsed."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.stderr: list[str] = []
        self._attached = threading.Event()
        with out.open("w") as stdout:
            self.proc = subprocess.Popen([sys.executable, "-c", TRACE_MAIN, "trace", "--json"],
                                         stdin=subprocess.DEVNULL, stdout=stdout,
                                         stderr=subprocess.PIPE, text=True)
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.stderr.append(line.rstrip("\n"))
            if line.startswith("trace: attached"):
                self._attached.set()
        self._attached.set()

    def wait_attached(self) -> str:
        started = time.monotonic()
        self._attached.wait(ATTACH_TIMEOUT)
        line = next((ln for ln in self.stderr if ln.startswith("trace: attached")), None)
        if line is None:
            self.stop()
            raise AssertionError(f"trace never attached (exit {self.proc.returncode}, "
                                 f"{time.monotonic() - started:.0f} s):\n"
                                 + "\n".join(self.stderr))
        self.stderr.append(f"(test: attached after {time.monotonic() - started:.1f} s)")
        return line

    def events(self, since_ns: int = 0) -> list[Event]:
        """Events in time order (each CPU's perf buffer is read in turn), from since_ns."""
        text = self.out.read_text()
        events = [json.loads(ln) for ln in text.splitlines() if ln.endswith("}")]
        return sorted((e for e in events if e["ts_ns"] >= since_ns), key=lambda e: e["ts_ns"])

    def wait_for(self, what: str, found: Callable[[list[Event]], bool],
                 timeout: float = EVENT_TIMEOUT, since_ns: int = 0) -> list[Event]:
        deadline = time.monotonic() + timeout
        while True:
            events = self.events(since_ns)
            if found(events):
                return events
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise AssertionError(f"no {what} in the trace within {timeout:g} s:\n"
                                     + "\n".join(json.dumps(e) for e in events[-40:])
                                     + "\n" + "\n".join(self.stderr))
            time.sleep(0.2)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        return self.proc.returncode

    def keep(self) -> None:
        """Leave the trace in the lab's results folder, for a person to read."""
        results = os.environ.get("VMLAB_RESULTS")
        if results and Path(results).is_dir():
            shutil.copyfile(self.out, Path(results) / "trace.jsonl")
            (Path(results) / "trace.stderr").write_text("\n".join(self.stderr) + "\n")


def tcp_connections() -> set[tuple[int, int, str]]:
    """(local port, remote port, state) of every IPv4 TCP socket, from /proc/net/tcp."""
    found = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, remote, state = line.split()[1:4]
        found.add((int(local.split(":")[1], 16), int(remote.split(":")[1], 16), state))
    return found


ESTABLISHED = "01"


def index_of(events: list[Event], start: int, pred: Callable[[Event], bool]) -> int:
    for i in range(start, len(events)):
        if pred(events[i]):
            return i
    raise AssertionError("not found after index "
                         f"{start}:\n" + "\n".join(json.dumps(e) for e in events[start:]))


@pytest.fixture(scope="module")
def tracer(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    t = Tracer(tmp_path_factory.mktemp("trace") / "trace.jsonl")
    try:
        attached = t.wait_attached()
        for probe in ("iscsi_if_rx", "iscsi_sw_tcp_conn_bind", "iscsi_conn_error_event",
                      "iscsi_conn_start", "iscsi_conn_stop", "iscsi:iscsi_dbg_trans_conn"):
            assert probe in attached
        yield t
    finally:
        status = t.stop()
        t.keep()
    # SIGTERM ends a trace cleanly: exit status 0, nothing lost on the way
    assert status == 0, "\n".join(t.stderr)
    assert not any("lost" in line for line in t.stderr), t.stderr


USERS = re.compile(r'users:\(\("([^"]+)",pid=(\d+),fd=(\d+)\)')


def socket_owner(local_port: int | None, peer_port: int) -> tuple[str, int, int, int]:
    """(command, pid, fd, local port) of the one socket connected to peer_port, by ss."""
    out = subprocess.run(["ss", "-tnpH", "state", "established", "dst", f"127.0.0.1:{peer_port}"],
                         capture_output=True, text=True, check=True, timeout=30).stdout
    for line in out.splitlines():
        fields = line.split()
        port = int(fields[2].rsplit(":", 1)[1])
        m = USERS.search(line)
        if m and (local_port is None or port == local_port):
            return m[1], int(m[2]), int(m[3]), port
    raise AssertionError(f"no process owns a socket to :{peer_port}:\n{out}")


def in_order(events: list[Event], *preds: Callable[[Event], bool]) -> list[int]:
    """Indexes of the first event matching each predicate, each after the previous."""
    found, at = [], 0
    for pred in preds:
        at = index_of(events, at, pred)
        found.append(at)
        at += 1
    return found


def test_trace_of_open_iscsi(tgt: Tgt, iscsid: Iscsid, tracer: Tracer) -> None:
    """The reference: iscsid binds the fd it holds, and recovers by itself."""
    iqn = "iqn.2024-01.test.vmlab:trace-open-iscsi"
    tgt.add_target(iqn, luns=[LunSpec(size=32 << 20)])
    iscsid.discover(tgt.portal)
    iscsid.login(iqn, tgt.portal)
    wait_for(lambda: session_disks(iqn) or None, timeout=30, what="the disk after login")
    command, pid, fd, local_port = socket_owner(None, tgt.port)
    assert command == "iscsid"

    def req(name: str) -> Callable[[Event], bool]:
        return lambda e: bool(e["pid"] == pid and e["source"] == "iscsi_if_rx"
                              and e["event"] == name)

    events = tracer.wait_for("iscsid's START_CONN", lambda evs: any(
        req("START_CONN")(e) for e in evs))
    create, _conn, bind, start = in_order(events, req("CREATE_SESSION"), req("CREATE_CONN"),
                                          req("BIND_CONN"), req("START_CONN"))
    sid = events[bind]["sid"]
    assert events[bind]["fd"] == fd  # the fd ss sees iscsid holding
    kbind = index_of(events, create, lambda e: e["event"] == "conn_bind" and e["pid"] == pid)
    assert events[kbind]["fd"] == fd and events[kbind]["local"] == f"127.0.0.1:{local_port}"
    params = {e["param_name"]: e["value"] for e in events[bind:start]
              if e["event"] == "SET_PARAM" and e["pid"] == pid}
    assert params["TARGET_NAME"] == iqn and params["PERSISTENT_PORT"] == str(tgt.port)
    assert Path(f"/sys/class/iscsi_session/session{sid}/targetname").read_text().strip() == iqn

    cut_ns = time.monotonic_ns()  # CLOCK_MONOTONIC, as the probes' timestamps
    subprocess.run(["ss", "-K", "dst", "127.0.0.1", "dport", "=", f":{tgt.port}"],
                   check=True, timeout=30, capture_output=True)
    after = tracer.wait_for("iscsid's second START_CONN", lambda evs: any(
        req("START_CONN")(e) for e in evs), timeout=90, since_ns=cut_ns)
    err, rebind, _ = in_order(
        after, lambda e: e["event"] == "CONN_ERROR" and e["sid"] == sid,
        req("BIND_CONN"), req("START_CONN"))
    assert after[err]["error_name"] == "TCP_CONN_CLOSE"
    new_fd = after[rebind]["fd"]
    assert socket_owner(None, tgt.port)[:3] == ("iscsid", pid, new_fd)

    iscsid.logout(iqn, tgt.portal)
    tracer.wait_for("iscsid's DESTROY_SESSION", lambda evs: any(
        req("DESTROY_SESSION")(e) and e["sid"] == sid for e in evs), since_ns=cut_ns)


def test_trace_of_our_login_recovery_and_logout(tgt: Tgt, tracer: Tracer) -> None:
    tgt.add_target(IQN, luns=[LunSpec(size=64 << 20)])
    began_ns = time.monotonic_ns()
    with KernelLogin(tgt.portal, IQN) as run:
        pid = run.proc.pid
        sid = run.disks[0].sid

        def mine(e: Event) -> bool:
            return bool(e["pid"] == pid and e["source"] == "iscsi_if_rx")

        events = tracer.wait_for("START_CONN from our login", lambda evs: any(
            mine(e) and e["event"] == "START_CONN" for e in evs), since_ns=began_ns)
        ours = [e for e in events if mine(e)]
        names = [e["event"] for e in ours]

        # The order the kernel saw: CREATE_SESSION, CREATE_CONN, BIND_CONN, SET_PARAMs,
        # START_CONN; every request carried our session and connection ids.
        create = names.index("CREATE_SESSION")
        conn = names.index("CREATE_CONN", create)
        bind = names.index("BIND_CONN", conn)
        start = names.index("START_CONN", bind)
        assert all(e["sid"] == sid for e in ours[conn:start + 1]), ours
        params = {e["param_name"]: e["value"] for e in ours[bind:start]
                  if e["event"] == "SET_PARAM"}
        assert params["TARGET_NAME"] == IQN
        assert params["PERSISTENT_ADDRESS"] == "127.0.0.1"
        assert params["PERSISTENT_PORT"] == str(tgt.port)
        for negotiated in ("MAX_RECV_DLENGTH", "MAX_XMIT_DLENGTH", "FIRST_BURST",
                           "MAX_BURST", "EXP_STATSN"):
            assert int(params[negotiated]) > 0, (negotiated, params)
        assert ours[create]["initial_cmdsn"] >= 0 and ours[create]["cmds_max"] > 0

        # BIND_CONN's fd is the socket our process logged in on: iscsi_tcp's bind got
        # the same fd in the same process, and behind it the TCP connection to tgtd,
        # which the kernel now drives (still established in /proc/net/tcp).
        fd = ours[bind]["fd"]
        assert ours[bind]["is_leading"] == 1
        binds = [e for e in events if e["event"] == "conn_bind" and e["pid"] == pid]
        assert [b["fd"] for b in binds] == [fd] and binds[0]["sid"] == sid
        assert binds[0]["peer"] == f"127.0.0.1:{tgt.port}"
        local_port = int(binds[0]["local"].rsplit(":", 1)[1])
        assert (local_port, tgt.port, ESTABLISHED) in tcp_connections()
        assert [e["retval"] for e in events if e["event"] == "conn_bind_done"
                and e["pid"] == pid] == [0]
        assert any(e["event"] == "conn_start_done" and e["retval"] == 0 and e["sid"] == sid
                   for e in events)

        # Cut the kernel's connection: the kernel reports CONN_ERROR, and our login
        # binds a new socket to the same session and connection, then starts it again.
        cut_ns = time.monotonic_ns()  # CLOCK_MONOTONIC, as the probes' timestamps
        subprocess.run(["ss", "-K", "dst", "127.0.0.1", "dport", "=", f":{tgt.port}"],
                       check=True, timeout=30, capture_output=True)
        assert (local_port, tgt.port, ESTABLISHED) not in tcp_connections()
        run.wait_line(rf"session {sid}: recovered in", timeout=120)
        after = tracer.wait_for("our second START_CONN", lambda evs: any(
            mine(e) and e["event"] == "START_CONN" for e in evs), since_ns=cut_ns)
        err, rebind, _ = in_order(
            after, lambda e: e["event"] == "CONN_ERROR" and e["sid"] == sid,
            lambda e: mine(e) and e["event"] == "BIND_CONN",
            lambda e: mine(e) and e["event"] == "START_CONN")
        assert after[err]["error_name"] == "TCP_CONN_CLOSE", after[err]
        assert (after[rebind]["sid"], after[rebind]["cid"]) == (sid, 0)
        new_bind = [e for e in after if e["event"] == "conn_bind" and e["pid"] == pid]
        assert [b["fd"] for b in new_bind] == [after[rebind]["fd"]]
        assert new_bind[0]["peer"] == f"127.0.0.1:{tgt.port}"
        new_port = int(new_bind[0]["local"].rsplit(":", 1)[1])
        assert new_port != local_port  # a new TCP connection, which the kernel now drives
        assert (new_port, tgt.port, ESTABLISHED) in tcp_connections()
        assert run.stop() == 0, run.output()

    # The logout tore the session down through the same interface.
    tracer.wait_for("DESTROY_SESSION", lambda evs: any(
        e["pid"] == pid and e["event"] == "DESTROY_SESSION" and e["sid"] == sid
        for e in evs), since_ns=began_ns)
    # Every line is one JSON event with a wall-clock time.
    assert all(isinstance(e["time"], float) and e["event"] for e in tracer.events())
