"""Findings already filed: signature (engine.signature) -> the xfail test that shows it.

The fuzz run reports these but does not fail on them; when the owner fixes one, its
test in test_regressions.py starts passing (strict xfail: the run fails), and the line
here and the xfail marker go together.
"""

from __future__ import annotations

KNOWN: dict[str, str] = {}
