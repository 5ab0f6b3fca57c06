"""Findings already filed: signature (engine.signature) -> the xfail test that shows it.

The fuzz run reports these but does not fail on them; when the owner fixes one, its
test in test_regressions.py starts passing (strict xfail: the run fails), and the line
here and the xfail marker go together.
"""

from __future__ import annotations

KNOWN: dict[str, str] = {
    # userland/login/machine.py _security: keys = dict(pairs) drops repeated AuthMethod
    # and CHAP_* keys silently (RFC 7143 6.3 wants a refusal); issue 10.
    "InvariantBroken at tests/fuzz/targets.py:_check_no_repeated_key":
        "test_regressions.py::test_repeated_auth_method_refused, "
        "test_regressions.py::test_repeated_chap_challenge_refused",
    # userland/login/chap.py answer_challenge: int(CHAP_I, 0) takes "00", "0b101", "5_0";
    # issue 10, strict CHAP number parsing.
    "InvariantBroken at tests/fuzz/targets.py:chap":
        "test_regressions.py::test_chap_identifier_must_be_an_rfc_number",
    # userland/session.py _response/_data_in: a read ends GOOD with fewer bytes than asked
    # and no residual; the caller gets zeros the target never sent. Issue 10.
    "InvariantBroken at tests/fuzz/targets.py:_check_done":
        "test_regressions.py::test_read_ending_good_without_its_data_is_refused, "
        "test_regressions.py::test_short_data_in_with_good_status_and_no_residual_is_refused",
    # userland/lun.py _vpd and report_luns: lengths from the target go straight into
    # inquiry_vpd_cdb/report_luns_cdb, whose range checks raise ValueError. Issue 10.
    "ValueError at userland/scsi.py:_check":
        "test_regressions.py::test_vpd_page_length_beyond_any_inquiry_is_a_project_error, "
        "test_regressions.py::test_report_luns_length_beyond_any_allocation_is_a_project_error",
}
