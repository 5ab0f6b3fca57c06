"""The fuzz loop: N cases of one target, each bounded in time and in memory.

Case i of target T under run seed S draws everything from ``Random(f"{S}:{T}:{i}")``, so
``FUZZ_SEED=S`` and the case number bring any case back (``replay_case``). Per case:
- a non-project exception (anything but an ``IscsiError``) is a finding;
- so is a case running past ``CASE_SECONDS`` (SIGALRM) - a hang;
- and a case whose Python allocations peak above ``PEAK_BYTES`` (tracemalloc, one case
  in ``TRACE_EVERY``): memory sized by what the target sent. The whole run sits under an
  address-space limit, so a huge allocation in any case becomes a MemoryError finding
  instead of a swapping machine, and the process's max RSS may grow by at most
  ``RSS_GROWTH_KIB`` over a run (test_fuzz.py checks it).
Findings are grouped by signature (exception type and the innermost userland frame);
signatures in known.py are bugs already filed as xfail tests in test_regressions.py.
"""

from __future__ import annotations

import contextlib
import os
import random
import resource
import signal
import time
import traceback
import tracemalloc
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Protocol

from userland.errors import IscsiError

from .targets import Case

CASE_SECONDS = 5.0
PEAK_BYTES = 32 << 20  # per case; inputs are at most a few hundred KiB
TRACE_EVERY = 8  # cases between two traced ones; the address-space limit covers the rest
RSS_GROWTH_KIB = 256 << 10  # max RSS may grow by this much over one target's run
ADDRESS_SPACE_HEADROOM = 2 << 30
ROOT = Path(__file__).resolve().parents[2]
RESULTS: list[str] = []  # lines per fuzzed target, for the terminal summary
RUNS: list[tuple[int, float]] = []  # (cases, seconds) per fuzzed target, for the total


class Hang(BaseException):
    """A case ran past CASE_SECONDS (BaseException: the code under test cannot catch it)."""


class Target(Protocol):
    name: str

    def make(self, rng: random.Random) -> Case | None: ...


@dataclass
class Finding:
    signature: str
    case: int
    description: str
    trace: str
    count: int = 1


@dataclass
class Stats:
    target: str
    seed: str
    cases: int = 0
    skipped: int = 0  # mutations our own encoder could not pack
    project_errors: int = 0
    seconds: float = 0.0
    peak_case_bytes: int = 0
    rss_before_kib: int = 0
    rss_after_kib: int = 0
    findings: dict[str, Finding] = field(default_factory=dict)
    outcomes: Counter[str] = field(default_factory=Counter)

    def line(self) -> str:
        return (f"fuzz: {self.target}: {self.cases} cases in {self.seconds:.1f} s "
                f"(seed {self.seed}; "
                f"peak per case {self.peak_case_bytes / 1024:.0f} KiB; max RSS "
                f"{self.rss_after_kib // 1024} MiB; {len(self.findings)} finding kinds)")

    def outcome_lines(self) -> list[str]:
        return [f"    {n:7d}  {what}" for what, n in self.outcomes.most_common(8)]


def signature(exc: BaseException) -> str:
    """Exception type and the innermost frame in userland/ (else the innermost of all)."""
    frames = traceback.extract_tb(exc.__traceback__)
    ours = [f for f in frames if "/userland/" in f.filename] or frames
    where = "?"
    if ours:
        f = ours[-1]
        where = f"{os.path.relpath(f.filename, ROOT)}:{f.name}"
    return f"{type(exc).__name__} at {where}"


def _alarm(signum: int, frame: FrameType | None) -> None:
    raise Hang(f"case ran past {CASE_SECONDS:g} s")


@contextlib.contextmanager
def guards() -> Iterator[None]:
    old_handler = signal.signal(signal.SIGALRM, _alarm)
    old_limit = resource.getrlimit(resource.RLIMIT_AS)
    vm = _vm_size()
    if vm and old_limit[0] == resource.RLIM_INFINITY:
        resource.setrlimit(resource.RLIMIT_AS, (vm + ADDRESS_SPACE_HEADROOM, old_limit[1]))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old_handler)
        resource.setrlimit(resource.RLIMIT_AS, old_limit)


def _vm_size() -> int:
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    return 0


def run_case(case: Case, *, traced: bool = True) -> tuple[int, str | None]:
    """Run one case: its peak traced bytes (0 untraced), how it ended. Raises what makes
    a finding. Tracing costs ~5x, so the loop traces one case in TRACE_EVERY."""
    already = tracemalloc.is_tracing()  # PYTHONTRACEMALLOC, or a plugin: measure, keep it
    own = traced and not already
    base = 0
    if own:
        tracemalloc.start(1)
    elif already:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
    signal.setitimer(signal.ITIMER_REAL, CASE_SECONDS)
    try:
        outcome = case.run()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        peak = tracemalloc.get_traced_memory()[1] - base if own or already else 0
        if own:
            tracemalloc.stop()
    if peak > PEAK_BYTES:
        raise MemoryBound(f"case allocated {peak} bytes at its peak (bound {PEAK_BYTES}) "
                          f"from {case.size} bytes of input")
    return peak, outcome


class MemoryBound(AssertionError):
    """A case's allocations grew beyond PEAK_BYTES."""


def fuzz(target: Target, cases: int, seed: str) -> Stats:
    stats = Stats(target.name, seed)
    stats.rss_before_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    with guards():
        i = -1
        while stats.cases < cases and i < 2 * cases:
            i += 1
            case = target.make(random.Random(f"{seed}:{target.name}:{i}"))
            if case is None:
                stats.skipped += 1
                continue
            stats.cases += 1
            try:
                peak, outcome = run_case(case, traced=i % TRACE_EVERY == 0)
                stats.peak_case_bytes = max(stats.peak_case_bytes, peak)
                if outcome:
                    stats.outcomes[outcome] += 1
            except IscsiError as exc:
                stats.project_errors += 1
                stats.outcomes[type(exc).__name__] += 1
            except (Exception, Hang) as exc:
                sig = signature(exc)
                known = stats.findings.get(sig)
                if known is not None:
                    known.count += 1
                else:
                    trace = "".join(traceback.format_exception(exc)[-12:])
                    stats.findings[sig] = Finding(sig, i, case.describe()[:4000], trace)
    stats.seconds = time.perf_counter() - started
    stats.rss_after_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return stats


def replay_case(target: Target, seed: str, i: int) -> Case | None:
    """Case i of a run, to run again under a debugger: ``replay_case(t, seed, i).run()``."""
    return target.make(random.Random(f"{seed}:{target.name}:{i}"))
