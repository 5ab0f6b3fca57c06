"""Attach the probes with bcc, collect TraceEvents, detach.

    with observe() as obs:          # compiles and attaches: seconds on real hardware,
        do_the_handoff()            # minutes under QEMU's TCG on a busy host
    print_timeline(obs.events(), sys.stderr)

    with traced(sys.stderr):        # `login --trace`: the same, and the timeline after
        do_the_handoff()

bcc is imported here, when an Observer starts, never at import time: nothing else in the
project needs it (ARCHITECTURE.md: ebpf/ only observes).
"""

from __future__ import annotations

import ctypes
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from importlib import resources
from typing import Any, TextIO

from kernel_handoff.ebpf import preflight
from kernel_handoff.ebpf.events import (
    PER_PDU_TRACEPOINTS,
    TRACEPOINTS,
    TraceEvent,
    decode_record,
)
from kernel_handoff.ebpf.preflight import Machine, ObserverUnavailable
from kernel_handoff.ebpf.timeline import print_timeline

# (kernel function, BPF function, kretprobe function or None, required)
KPROBES: tuple[tuple[str, str, str | None, bool], ...] = (
    ("iscsi_if_rx", "probe_iscsi_if_rx", None, True),
    ("iscsi_sw_tcp_conn_bind", "probe_conn_bind", "probe_conn_bind_ret", False),
    ("iscsi_conn_start", "probe_conn_start", "probe_conn_start_ret", False),
    ("iscsi_conn_stop", "probe_conn_stop", None, False),
    ("iscsi_conn_failure", "probe_conn_failure", None, False),
    ("iscsi_conn_error_event", "probe_conn_error_event", None, False),
)
POLL_MS = 100
PERF_PAGES = 64  # per CPU: 256 KiB; a login is ~30 records of 424 bytes


def probe_source(tracepoints: list[str]) -> str:
    """probes.c plus one handler per tracepoint the running kernel has."""
    text = resources.files("kernel_handoff.ebpf").joinpath("probes.c").read_text()
    handlers = [
        f"TRACEPOINT_PROBE(iscsi, {tp})\n{{\n\treturn submit_log_msg(args, "
        f"args->data_loc_dname, args->data_loc_msg, {TRACEPOINTS.index(tp)});\n}}\n"
        for tp in tracepoints
    ]
    return text + "\n" + "\n".join(handlers)


class Observer:
    """Probes on the kernel's iSCSI paths; events() returns what they saw, in order."""

    def __init__(self, *, on_event: Callable[[TraceEvent], None] | None = None,
                 machine: Machine | None = None, tracepoints: bool = True,
                 per_pdu: bool = False) -> None:
        self.machine = machine or Machine()
        self.on_event = on_event
        self.want_tracepoints = tracepoints
        self.per_pdu = per_pdu  # also the tracepoints that fire for every command/PDU
        self.attached: list[str] = []
        self.skipped: list[str] = []  # "what: why", for a note on stderr
        self.lost = 0
        # time.time_ns() - time.monotonic_ns(): bpf_ktime_get_ns is CLOCK_MONOTONIC
        self.wall_offset_ns = time.time_ns() - time.monotonic_ns()
        self.started_ns = 0
        self._events: list[TraceEvent] = []
        self._batch: list[TraceEvent] = []  # decoded in the current poll (poll thread only)
        self._lock = threading.Lock()
        self._bpf: Any = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._errors: list[BaseException] = []

    # --- lifecycle -----------------------------------------------------------------

    def start(self) -> None:
        preflight.check(self.machine)
        bcc = preflight.import_bcc(self.machine.bcc_dirs)
        tracepoints = self._tracepoints_present()
        try:
            self._bpf = bcc.BPF(text=probe_source(tracepoints))
        except Exception as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ObserverUnavailable(
                f"bcc could not compile the probes ({first}); are the headers at "
                f"/lib/modules/{self.machine.release}/build those of the running kernel?"
            ) from None
        self.attached.extend(f"iscsi:{tp}" for tp in tracepoints)  # bcc attached them
        try:
            self._attach_kprobes()
            self._bpf["events"].open_perf_buffer(self._on_raw, page_cnt=PERF_PAGES,
                                                 lost_cb=self._on_lost)
        except BaseException:
            self._bpf.cleanup()
            self._bpf = None
            raise
        self.started_ns = time.monotonic_ns()
        self._thread = threading.Thread(target=self._poll, name="ebpf-observer", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Read what is still buffered, then detach every probe."""
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
        if self._bpf is not None:
            try:
                self._bpf.perf_buffer_poll(timeout=0)  # what arrived after the last poll
                self._flush()
            finally:
                self._bpf.cleanup()
                self._bpf = None
        if self._errors:
            raise self._errors[0]

    def __enter__(self) -> Observer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def events(self) -> list[TraceEvent]:
        with self._lock:
            return sorted(self._events, key=lambda e: e.ts_ns)

    # --- internals -----------------------------------------------------------------

    def _tracepoints_present(self) -> list[str]:
        if not self.want_tracepoints:
            return []
        tracefs = preflight.tracefs_dir(self.machine)
        if tracefs is None:
            self.skipped.append("iscsi:* tracepoints: tracefs is not mounted "
                                "(mount -t tracefs tracefs /sys/kernel/tracing)")
            return []
        wanted = [tp for tp in TRACEPOINTS if self.per_pdu or tp not in PER_PDU_TRACEPOINTS]
        present = [tp for tp in wanted
                   if (tracefs / "events" / "iscsi" / tp / "format").exists()]
        if not present:
            self.skipped.append("iscsi:* tracepoints: none in this kernel")
        return present

    def _attach_kprobes(self) -> None:
        present = preflight.kallsyms_has(self.machine, [k[0] for k in KPROBES])
        for function, entry, ret, required in KPROBES:
            if function not in present:
                if required:
                    raise ObserverUnavailable(f"cannot trace: {function} is not in "
                                              "/proc/kallsyms: modprobe iscsi_tcp")
                self.skipped.append(f"{function}: not in /proc/kallsyms "
                                    "(module not loaded, or inlined by this kernel)")
                continue
            try:
                self._bpf.attach_kprobe(event=function, fn_name=entry)
                if ret is not None:
                    self._bpf.attach_kretprobe(event=function, fn_name=ret)
            except Exception as exc:
                if required:
                    raise ObserverUnavailable(
                        f"cannot trace: kprobe on {function} failed ({exc})") from None
                self.skipped.append(f"{function}: kprobe failed ({exc})")
                continue
            self.attached.append(function)

    def _poll(self) -> None:
        try:
            while not self._stop.is_set():
                self._bpf.perf_buffer_poll(timeout=POLL_MS)
                self._flush()
        except BaseException as exc:  # surfaced by stop(); a dead poller must not hide
            self._errors.append(exc)

    def _on_raw(self, _cpu: int, data: Any, size: int) -> None:
        # ctypes would print and drop an exception raised here: keep it for stop()
        try:
            self._batch.append(decode_record(ctypes.string_at(data, size)))
        except BaseException as exc:
            self._errors.append(exc)
            self._stop.set()

    def _flush(self) -> None:
        """Hand on one poll's events in time order.

        Each CPU has its own perf buffer and a poll drains them one after the other:
        a process that moved between CPUs would otherwise show its requests out of order.
        """
        batch, self._batch = sorted(self._batch, key=lambda e: e.ts_ns), []
        with self._lock:
            self._events.extend(batch)
        if self.on_event is not None:
            for event in batch:
                self.on_event(event)

    def _on_lost(self, count: int) -> None:
        self.lost += count


@contextmanager
def observe(*, on_event: Callable[[TraceEvent], None] | None = None,
            machine: Machine | None = None) -> Iterator[Observer]:
    """Probes attached for the body of the with block; the Observer keeps the events."""
    observer = Observer(on_event=on_event, machine=machine)
    observer.start()
    try:
        yield observer
    finally:
        observer.stop()


@contextmanager
def traced(out: TextIO) -> Iterator[Observer]:
    """For `login --trace`: probes around the body, then the timeline on `out`.

    The timeline is printed even when the body raises: a failed handoff is when it
    matters most.
    """
    observer = Observer()
    observer.start()
    failed = False
    try:
        yield observer
    except BaseException:
        failed = True
        raise
    finally:
        try:
            observer.stop()
        except Exception:
            if not failed:  # the body's own error matters more than the observer's
                raise
        finally:
            print_notes(observer, out)
            print_timeline(observer.events(), out)


def print_notes(observer: Observer, out: TextIO) -> None:
    """What was not attached, and lost events: a timeline with gaps must say so."""
    for note in observer.skipped:
        out.write(f"trace: not traced: {note}\n")
    if observer.lost:
        out.write(f"trace: {observer.lost} events lost (perf buffer full)\n")
