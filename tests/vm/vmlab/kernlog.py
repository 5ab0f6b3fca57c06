"""What in a guest kernel's log fails a run, whatever the tests said.

A BUG, an Oops, a WARNING splat, a panic, a general protection fault, or any Call
Trace (a hung task's, a lockdep report's) means the kernel met something our sessions
did to it. init.sh greps the same patterns (KERNEL_BAD there: keep both in step; a
test checks they agree) and fails the guest's status; the host reads them again from
dmesg.txt, and from the console when the guest died before it could write anything.
"""

from __future__ import annotations

import re

# The kernel's own words (include/asm-generic/bug.h, kernel/panic.c, arch/x86/kernel/
# dumpstack.c and traps.c): "BUG: ...", "Oops: ...", "WARNING: CPU: 0 PID: 1 at ...",
# "Kernel panic - not syncing", "general protection fault", "Call Trace:".
BAD = (r"BUG: |Oops|WARNING: CPU|------------\[ cut here \]|Kernel panic"
       r"|general protection fault|Call Trace:")
_BAD_RE = re.compile(BAD)


def bad_lines(text: str) -> list[str]:
    """The lines of a kernel log (dmesg or console) that fail the run."""
    return [line.rstrip() for line in text.splitlines() if _BAD_RE.search(line)]
