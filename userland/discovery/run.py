"""SendTargets=All on a discovery session: login, one Text exchange, logout.

The whole of it (connect, login, SendTargets, logout) runs under one deadline.
"""

from __future__ import annotations

import time

from userland.discovery.sendtargets import (
    MAX_SENDTARGETS_BYTES,
    DiscoveredTarget,
    SendTargetsParser,
)
from userland.exchange import Exchange
from userland.login.chap import Credentials
from userland.login.machine import LoginConfig, new_isid
from userland.login.run import DEFAULT_LOGIN_TIMEOUT, login
from userland.portal import Portal


def discover(portal: Portal, *, initiator_name: str, credentials: Credentials | None = None,
             mutual: Credentials | None = None, chap_algorithms: tuple[int, ...] = (5,),
             timeout: float = DEFAULT_LOGIN_TIMEOUT,
             max_bytes: int = MAX_SENDTARGETS_BYTES) -> list[DiscoveredTarget]:
    deadline = time.monotonic() + timeout
    config = LoginConfig(initiator_name=initiator_name, target_name=None, isid=new_isid(),
                         credentials=credentials, mutual=mutual,
                         chap_algorithms=chap_algorithms)
    session = login(portal, config, deadline=deadline)
    with session.connection:
        exchange = Exchange(session.connection, session.result)
        parser = SendTargetsParser(discovery_portal=session.portal)
        exchange.text([("SendTargets", "All")], deadline=deadline, consume=parser.feed,
                      max_bytes=max_bytes)
        exchange.logout(deadline=deadline)
    return parser.result()
