"""Parsers of bytes a target sent: whatever slips past their checks is a ProtocolError.

A parser checks each length and field it reads; ``from_target`` is the net under those
checks, so that a gap in them shows as a protocol error (exit 7, EIO) in the project's
error tree, never as a ValueError, struct.error or IndexError crash.
"""

from __future__ import annotations

import functools
import struct
from collections.abc import Callable
from typing import ParamSpec, TypeVar

from userland.errors import ProtocolError

P = ParamSpec("P")
R = TypeVar("R")

_SLIPS = (ValueError, struct.error, IndexError, OverflowError, UnicodeError)


def from_target(func: Callable[P, R]) -> Callable[P, R]:
    @functools.wraps(func)
    def parse(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return func(*args, **kwargs)
        except ProtocolError:
            raise
        except _SLIPS as exc:
            raise ProtocolError(f"{func.__name__}: malformed data from the target "
                                f"({type(exc).__name__})") from None
    return parse
