"""Findings already filed: signature (engine.signature) -> the xfail test that shows it.

The fuzz run reports these but does not fail on them; when the owner fixes one, its
test in test_regressions.py starts passing (strict xfail: the run fails), and the line
here and the xfail marker go together.
"""

from __future__ import annotations

KNOWN: dict[str, str] = {
    # userland/session.py _response/_data_in: a read ends GOOD with fewer bytes than asked
    # and no residual; the caller gets zeros the target never sent. Issue 10.
    "InvariantBroken at tests/fuzz/targets.py:_check_done":
        "test_regressions.py::test_read_ending_good_without_its_data_is_refused, "
        "test_regressions.py::test_short_data_in_with_good_status_and_no_residual_is_refused",
}
