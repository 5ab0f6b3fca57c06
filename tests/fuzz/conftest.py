"""The fuzz run's figures, printed at the end of pytest's output for CI's log."""

from __future__ import annotations

import pytest

from .engine import RESULTS, RUNS


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not RESULTS:
        return
    terminalreporter.section("fuzz")
    for line in RESULTS:
        terminalreporter.write_line(line)
    cases, seconds = sum(n for n, _ in RUNS), sum(t for _, t in RUNS)
    terminalreporter.write_line(f"fuzz: {cases} cases in {seconds:.1f} s "
                                f"({len(RUNS)} targets)")
