"""`trace`: watch the kernel's side of the iSCSI handoff live, through bcc.

Registered on the main group by `register(cli)` at the end of iscsi_handoff/cli.py.
kernel_handoff.ebpf.observer (and so bcc) is imported only when the command runs.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from types import FrameType
from typing import TYPE_CHECKING

import click

if TYPE_CHECKING:
    from kernel_handoff.ebpf.events import TraceEvent


@click.command()
@click.option("--json", "as_json", is_flag=True,
              help="One JSON object per event and line, for scripts.")
@click.option("--duration", type=click.FloatRange(min=0, min_open=True), default=None,
              metavar="S", help="Stop after S seconds (default: at Ctrl-C or SIGTERM).")
@click.option("--per-pdu", is_flag=True,
              help="Also the kernel's per-command and per-PDU debug tracepoints "
                   "(iscsi_dbg_session, iscsi_dbg_tcp, iscsi_dbg_sw_tcp): busy under I/O.")
def trace(as_json: bool, duration: float | None, per_pdu: bool) -> None:
    """Show what the kernel's iSCSI layer is asked and does, as it happens.

    \b
    Probes (kprobes, through bcc) on iscsi_if_rx, where every NETLINK_ISCSI
    request arrives: each is decoded (CREATE_SESSION, CREATE_CONN, BIND_CONN
    with the socket's fd, SET_PARAM with the parameter and its value,
    START_CONN, STOP_CONN, ...). Also iscsi_tcp's bind, libiscsi's connection
    start, stop and failure, the CONN_ERROR the kernel sends up, and the
    kernel's iscsi:* debug tracepoints. Passwords are never read.
    It traces every process, ours, iscsid and others alike; the PID and COMM
    columns tell them apart. Needs root, bcc (apt install python3-bpfcc) and
    the running kernel's headers (apt install linux-headers-$(uname -r)).
    Prints "trace: attached ..." on stderr once the probes are in place.

    \b
    Examples:
      sudo iscsi-handoff trace
      sudo iscsi-handoff trace --json --duration 30 > handoff.jsonl
      sudo iscsi-handoff login --portal 127.0.0.1:3260 --target IQN --trace
    """
    from kernel_handoff.ebpf.observer import Observer, print_notes
    from kernel_handoff.ebpf.timeline import HEADER, format_line, json_line

    done = threading.Event()    # stop tracing
    closed = threading.Event()  # stdout's reader has gone
    observer: Observer

    def show(event: TraceEvent) -> None:
        if closed.is_set():
            return
        if as_json:
            line = json_line(event, wall_offset_ns=observer.wall_offset_ns)
        else:
            line = format_line(event, observer.started_ns)
        try:
            sys.stdout.write(line + "\n")
            sys.stdout.flush()
        except BrokenPipeError:  # `| head`: the reader has gone, so stop quietly
            closed.set()
            done.set()

    def on_sigterm(_signum: int, _frame: FrameType | None) -> None:
        done.set()

    observer = Observer(on_event=show, per_pdu=per_pdu)
    observer.start()
    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        until = f"for {duration:g} s" if duration else "Ctrl-C to stop"
        click.echo(f"trace: attached {', '.join(observer.attached)}; {until}", err=True)
        print_notes(observer, sys.stderr)
        if not as_json:
            sys.stdout.write(HEADER + "\n")
            sys.stdout.flush()
        with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C ends a live trace: no error
            done.wait(duration)
    finally:
        done.set()
        signal.signal(signal.SIGTERM, previous)
        observer.stop()
    if observer.lost:
        click.echo(f"trace: {observer.lost} events lost (perf buffer full)", err=True)


def register(group: click.Group) -> None:
    """Add `trace` to the main CLI group, with its epilog."""
    trace.epilog = group.epilog
    group.add_command(trace)
