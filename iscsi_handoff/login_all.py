"""`login --all`: every automatic node logged in, each by its own `login --node` process.

One process per node, so that one target's failure or recovery never touches another's,
and each takes the path its record asks for. A child says it is ready the way it would
to systemd: READY=1 on a NOTIFY_SOCKET, here ours (one per child). We report each node,
then, in the foreground, tell systemd READY=1 ourselves (Type=notify: the boot unit is up
only when the disks exist) and stay until SIGTERM, which we pass on. With --daemon each
child detaches once ready and we return. Exit status: the first failed node's.
"""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

import click

from iscsi_handoff.nodes import Node, load_nodes
from iscsi_handoff.output import READY_FIELD
from iscsi_handoff.sdnotify import notify
from userland.errors import EXIT_SESSION_EXISTS

READY_BOUND = 600.0  # seconds a node may take to be ready; each login has its own bounds


@dataclass
class Child:
    node: Node
    proc: subprocess.Popen[bytes]
    sock: socket.socket
    ready: dict[str, Any] | None = None
    code: int | None = None
    last_error: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"{self.node.target} at {self.node.portal}"


def _pump(child: Child, stream: Any) -> None:
    """Pass the child's stderr on, keeping its last line: the reason if it fails."""
    for raw in stream:
        line = raw.decode(errors="replace").rstrip("\n")
        if line:
            child.last_error[:] = [line]
        sys.stderr.write(line + "\n")
        sys.stderr.flush()


def _start(node: Node, index: int, *, daemon: bool, as_json: bool, verbose: int) -> Child:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
    name = f"iscsi-handoff-all-{os.getpid()}-{index}-{time.monotonic_ns()}"
    sock.bind("\0" + name)
    env = dict(os.environ, NOTIFY_SOCKET="@" + name)
    argv = [sys.executable, "-m", "iscsi_handoff", *(["-v"] * verbose), "login",
            "--node", node.target, "--portal", str(node.portal)]
    # --service: a SIGTERM passed on (systemd stopping or restarting the boot unit) leaves
    # a kernel session for the next keeper to adopt; logging out is `logout`'s job.
    argv.append("--daemon" if daemon else "--service")
    if as_json:
        argv.append("--json")
    proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL if as_json else None,
                            stderr=subprocess.PIPE)
    child = Child(node, proc, sock)
    threading.Thread(target=_pump, args=(child, proc.stderr), daemon=True).start()
    return child


def _settle(children: list[Child], *, daemon: bool) -> None:
    """Wait until each child is ready (foreground) or has returned (--daemon)."""
    deadline = time.monotonic() + READY_BOUND
    pending = list(children)
    while pending:
        readable, _, _ = select.select([c.sock for c in pending], [], [], 0.2)
        for child in pending:
            if child.sock in readable:
                message = child.sock.recv(65536).decode(errors="replace")
                fields = dict(line.partition("=")[::2] for line in message.splitlines())
                if fields.get("READY") == "1":
                    child.ready = _ready_object(fields.get(READY_FIELD))
        for child in list(pending):
            child.code = child.proc.poll()
            if (child.ready is not None and not daemon) or child.code is not None:
                pending.remove(child)
        if time.monotonic() > deadline:
            for child in pending:
                child.proc.terminate()
                child.code = child.proc.wait()
                child.last_error[:] = [f"not ready within {READY_BOUND:g} s"]
            return


def _ready_object(text: str | None) -> dict[str, Any]:
    try:
        obj = json.loads(text) if text else {}
    except ValueError:
        obj = {}
    return obj if isinstance(obj, dict) else {}


def _reason(line: str) -> str:
    """A child's last stderr line: its error's text (JSON under --json), prefix dropped."""
    try:
        obj = json.loads(line)
        line = str(obj["error"]["message"])
    except (ValueError, KeyError, TypeError):
        pass
    return line.removeprefix("iscsi-handoff: ")


def _already(child: Child) -> bool:
    """A live session of ours to it already (exit 15): nothing to do, as iscsiadm's
    login-all treats it; so a second `login --all` (a restarted unit) is no failure."""
    return child.code == EXIT_SESSION_EXISTS


def _ok(child: Child, daemon: bool) -> bool:
    if _already(child):
        return True
    return child.code == 0 if daemon else child.ready is not None and child.code is None


def _report(children: list[Child], *, daemon: bool, as_json: bool) -> int:
    first_failure = 0
    rows = []
    for child in children:
        ok = _ok(child, daemon)
        code = 0 if ok else (child.code if child.code not in (None, 0) else 1)
        assert code is not None
        if not ok and not first_failure:
            first_failure = code
        why = _reason(child.last_error[0]) if child.last_error else f"exit {code}"
        rows.append({"target": child.node.target, "portal": str(child.node.portal),
                     "ok": ok, "exit_code": code,
                     **({"ready": child.ready} if ok and child.ready else {}),
                     **({} if ok else {"error": why})})
        if ok and _already(child):
            rows[-1]["already"] = True
        if not as_json:
            done = "already logged in" if _already(child) else "logged in"
            click.echo(f"{child.name}: " + (done if ok else f"FAILED (exit {code}): {why}"))
    if as_json:
        click.echo(json.dumps({"event": "ready", "nodes": rows}))
    return first_failure


def login_all(*, daemon: bool, as_json: bool, verbose: int) -> None:
    nodes = [n for n in load_nodes() if n.startup == "automatic"]
    if not nodes:
        if as_json:
            click.echo(json.dumps({"event": "ready", "nodes": []}))
        else:
            click.echo("no automatic nodes (make one: iscsi-handoff node update "
                       "--target IQN --set startup=automatic)")
        notify("READY=1", "STATUS=no automatic nodes")
        return
    children = [_start(n, i, daemon=daemon, as_json=as_json, verbose=verbose)
                for i, n in enumerate(nodes)]
    stop = threading.Event()
    try:
        _settle(children, daemon=daemon)
        first_failure = _report(children, daemon=daemon, as_json=as_json)
        serving = [c for c in children if _ok(c, daemon) and not _already(c) and not daemon]
        done = len([c for c in children if _ok(c, daemon)])
        notify("READY=1", f"STATUS={done} of {len(children)} nodes logged in")
        if serving:
            _serve(serving, stop)
    finally:
        for child in children:
            child.sock.close()
            if child.proc.poll() is None:
                child.proc.terminate()
                child.proc.wait()
    if first_failure:
        sys.exit(first_failure)


def _serve(serving: list[Child], stop: threading.Event) -> None:
    """Stay while the sessions serve; SIGTERM, SIGINT and SIGHUP end them all."""
    def ask_stop(signum: int, frame: FrameType | None) -> None:
        stop.set()

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, ask_stop)
    if not any(c.proc.poll() is None for c in serving):
        return
    click.echo("serving; Ctrl-C or SIGTERM to log out every node")
    while not stop.wait(0.5):
        for child in serving:
            if child.proc.poll() is not None and child.code is None:
                child.code = child.proc.returncode
                click.echo(f"iscsi-handoff: {child.name} ended (exit {child.code})", err=True)
        if all(c.proc.poll() is not None for c in serving):
            return
    notify("STOPPING=1")
    for child in serving:
        if child.proc.poll() is None:
            child.proc.send_signal(signal.SIGTERM)
    for child in serving:
        child.proc.wait()
