"""Names for the numbers the observer sees: uevent types, parameters, errors, stop flags.

They come from kernel_handoff/uevent.py's enums, which tests/kernel_handoff/
test_uevent_header.py checks against the kernel's own include/scsi/iscsi_if.h. A number
those enums do not know (a newer kernel) still shows, as TYPE_<n>, PARAM_<n>, ...
"""

from __future__ import annotations

import enum

from kernel_handoff import uevent as ue

SECRET_PARAMS = ue.SECRET_PARAMS  # values the probe never copies (probes.c checks 24, 25)


def _name(kinds: tuple[type[enum.IntEnum], ...], code: int, unknown: str) -> str:
    for kind in kinds:
        try:
            return kind(code).name
        except ValueError:
            continue
    return f"{unknown}_{code}"


def type_name(code: int) -> str:
    """A request's name (what iscsi_if_rx receives), else a kernel event's."""
    return _name((ue.Request, ue.Event), code, "TYPE")


def param_name(code: int) -> str:
    return _name((ue.Param,), code, "PARAM")


def error_name(code: int) -> str:
    return _name((ue.ConnErr,), code, "ERR")


def stop_flag_name(code: int) -> str:
    return _name((ue.StopConn,), code, "FLAG")
