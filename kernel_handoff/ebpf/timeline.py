"""Show TraceEvents: a timeline for people, JSON lines for scripts."""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import TextIO

from kernel_handoff.ebpf.events import TraceEvent

HEADER = f"{'TIME(s)':>10}  {'PID':>7}  {'COMM':<15}  {'EVENT':<16}  DETAILS"

# Shown in the DETAILS column for these events, in this order, as key=value.
_DETAIL_KEYS: dict[str, tuple[str, ...]] = {
    "CREATE_SESSION": ("initial_cmdsn", "cmds_max", "queue_depth"),
    "CREATE_BOUND_SESSION": ("ep_handle", "initial_cmdsn", "cmds_max", "queue_depth"),
    "BIND_CONN": ("fd", "is_leading"),
    "conn_bind": ("fd", "is_leading", "local", "peer"),
    "conn_bind_done": ("retval",),
    "conn_start_done": ("retval",),
    "STOP_CONN": ("flag_name",),
    "conn_stop": ("flag_name",),
    "SEND_PDU": ("hdr_size", "data_size"),
}


def details(event: TraceEvent) -> str:
    parts: list[str] = []
    if event.sid is not None:
        parts.append(f"sid={event.sid}")
    if event.cid is not None:
        parts.append(f"cid={event.cid}")
    f = event.fields
    if event.name == "SET_PARAM":
        parts.append(f"{f.get('param_name')}={f.get('value', '?')}")
    elif event.name in ("CONN_ERROR", "conn_failure"):
        parts.append(f"error={f.get('error_name')} ({f.get('error')})")
    elif event.name == "trace":
        parts = [f"{f.get('device')}: {f.get('message')}"]
    else:
        parts.extend(f"{key.removesuffix('_name')}={f[key]}"
                     for key in _DETAIL_KEYS.get(event.name, ()) if key in f)
    if event.source != "iscsi_if_rx":  # a request's source is implied by its name
        parts.append(f"({event.source})")
    return " ".join(parts)


def format_line(event: TraceEvent, start_ns: int) -> str:
    seconds = (event.ts_ns - start_ns) / 1e9
    return (f"{seconds:>+10.6f}  {event.pid:>7}  {event.comm:<15.15}  {event.name:<16}  "
            f"{details(event)}").rstrip()


def json_line(event: TraceEvent, *, wall_offset_ns: int | None = None) -> str:
    return json.dumps(event.to_json(wall_offset_ns=wall_offset_ns), sort_keys=False)


def print_timeline(events: Iterable[TraceEvent], out: TextIO, *,
                   start_ns: int | None = None) -> None:
    """A header and one line per event, times relative to start_ns (default: the first)."""
    events = list(events)
    out.write(HEADER + "\n")
    if not events:
        out.write("(no events: the kernel received no NETLINK_ISCSI request)\n")
        return
    origin = events[0].ts_ns if start_ns is None else start_ns
    for event in events:
        out.write(format_line(event, origin) + "\n")
