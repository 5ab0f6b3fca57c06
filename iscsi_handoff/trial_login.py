"""`mount` logs in to what it can: each target tried once before the tree is built, the
ones that refuse reported (one line each, JSON under --json) and left out."""

from __future__ import annotations

from iscsi_handoff.hints import report_error
from userland.errors import IscsiError
from userland.exchange import Exchange
from userland.login.machine import LoginConfig
from userland.login.run import login as do_login
from userland.portal import Portal


def usable(logins: list[tuple[Portal, LoginConfig]], *,
           timeout: float) -> list[tuple[Portal, LoginConfig]]:
    """The logins that work (each tried: login, logout). None works: the first failure
    is the command's error."""
    good: list[tuple[Portal, LoginConfig]] = []
    first: IscsiError | None = None
    for portal, config in logins:
        try:
            session = do_login(portal, config, timeout=timeout)
            with session.connection:
                Exchange(session.connection, session.result).logout(timeout=timeout)
        except IscsiError as exc:
            first = first or exc
            report_error(exc, prefix=f"{config.target_name}: not mounted: ")
            continue
        good.append((portal, config))
    if not good:
        assert first is not None
        raise first
    return good
