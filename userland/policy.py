"""Bounds: every wait has a deadline and every retry a count. The one policy, here.

- A command's deadline runs from when it is SENT (handed to the connection), not from
  when a caller submitted it: ``command_timeout`` without status, then ABORT TASK.
- An ABORT TASK without an answer in ``abort_timeout`` costs the connection (ERL 0).
- A command that cannot be sent (CmdSN window closed, queue full, logout pending) waits
  at most ``window_timeout``, then fails.
- A command is issued at most ``max_attempts`` times. Every reissue counts: after an
  ABORT TASK, after a relogin, after a target's logout request. Then it fails.
- A command the target answered against what we asked (Data-In beyond the transfer,
  a read ending GOOD short of its data with no underflow to say so, a SenseLength
  beyond its segment, an R2T beyond the write, for 0 bytes or more than MaxBurstLength,
  a Reject naming it) fails at once, is aborted at the target, and is
  never reissued: a target that does it once does it again.
- The replacement timeout runs from the FIRST connection failure; a relogin that is not
  followed by progress (a command completing) does not restart it. DefaultTime2Wait (or
  an Async Message's Time2Wait) is clamped so that a relogin is still tried in time.
- Past the replacement timeout every waiting command fails and new ones fail at once,
  but the session keeps logging in again with backoff (``backoff_min`` doubling to
  ``backoff_max``) and serves new commands as soon as the target answers.
- A target's ping data is echoed while at most ``max_echo_pending`` echoes wait to go
  out; more pings are not answered until the target reads (memory stays bounded by
  these numbers, not by the target).

Whoever fails a command raises SessionFailed in the caller; FUSE answers EIO.
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_REPLACEMENT_TIMEOUT = 120.0
DEFAULT_COMMAND_TIMEOUT = 30.0
DEFAULT_ABORT_TIMEOUT = 10.0
DEFAULT_MAX_ATTEMPTS = 3


@dataclass(frozen=True)
class Bounds:
    command_timeout: float = DEFAULT_COMMAND_TIMEOUT
    abort_timeout: float = DEFAULT_ABORT_TIMEOUT
    window_timeout: float = DEFAULT_COMMAND_TIMEOUT
    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    replacement_timeout: float = DEFAULT_REPLACEMENT_TIMEOUT
    backoff_min: float = 1.0
    backoff_max: float = 30.0
    max_echo_pending: int = 1

    @classmethod
    def for_replacement_timeout(cls, replacement_timeout: float) -> Bounds:
        """The defaults, none longer than the replacement timeout: a user who says I/O
        may stall for 5 s at most does not wait 30 s for one stuck command."""
        return cls(command_timeout=min(DEFAULT_COMMAND_TIMEOUT, replacement_timeout),
                   abort_timeout=min(DEFAULT_ABORT_TIMEOUT, replacement_timeout),
                   window_timeout=min(DEFAULT_COMMAND_TIMEOUT, replacement_timeout),
                   replacement_timeout=replacement_timeout)

    def time2wait(self, asked: float, left: float) -> float:
        """The wait before a relogin: the target's, but never so long that no relogin
        fits before the replacement timeout (half of what is left at most)."""
        return max(0.0, min(asked, left / 2))
