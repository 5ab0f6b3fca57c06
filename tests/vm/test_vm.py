"""The VM lab from the host: one boot of Debian's stock kernel runs the whole guest suite
(tests/vm/guest), and it must pass with tests actually run.

The guest's console is printed as it comes (prefixed `vm| `), so CI's log shows the guest
suite's progress and its summary line. VMLAB_PYTEST_ARGS adds pytest arguments for the
guest (e.g. `-k open_iscsi`).
"""

from __future__ import annotations

import os
import shlex
import sys

import pytest

from .vmlab import boot

pytestmark = [pytest.mark.vm, pytest.mark.root]


def _echo(line: str) -> None:
    sys.stdout.write(f"vm| {line}\n")
    sys.stdout.flush()


@pytest.mark.parametrize("part", [0, 1, 2], ids=["first", "second", "third"])
def test_guest_suite_passes_on_the_stock_kernel(part: int,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    why = boot.unavailable_reason()
    if why is not None:
        pytest.skip(why)
    extra = shlex.split(os.environ.get("VMLAB_PYTEST_ARGS", ""))
    boots = boot.suite_boots(extra)
    if part >= len(boots):
        pytest.skip("VMLAB_PYTEST_ARGS narrows the guest suite to one boot (the first)")
    # the slowest guest tests in CI's log: each boot must stay under 10 minutes
    args = ["--durations=10", *boots[part]]
    with capsys.disabled():
        _echo("")
        result = boot.run_suite(args, echo=_echo)
        boot_time = "?" if result.boot_seconds is None else f"{result.boot_seconds:.1f} s"
        _echo(f"guest kernel {result.release}: root ready after {boot_time}, QEMU ran "
              f"{result.seconds:.1f} s, guest status {result.status}")
        _echo(f"guest summary: {result.summary or '(none)'}")
    problems = result.problems()
    assert not problems, "; ".join(problems) + f" (console and logs: {result.run_dir})"
