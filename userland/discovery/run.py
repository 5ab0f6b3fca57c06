"""SendTargets=All on a discovery session: login, one Text exchange, logout."""

from __future__ import annotations

from userland.discovery.sendtargets import DiscoveredTarget, parse_send_targets
from userland.exchange import Exchange
from userland.login.chap import Credentials
from userland.login.machine import LoginConfig, new_isid
from userland.login.run import DEFAULT_LOGIN_TIMEOUT, login
from userland.portal import Portal


def discover(portal: Portal, *, initiator_name: str, credentials: Credentials | None = None,
             mutual: Credentials | None = None, chap_algorithms: tuple[int, ...] = (5,),
             timeout: float = DEFAULT_LOGIN_TIMEOUT) -> list[DiscoveredTarget]:
    config = LoginConfig(initiator_name=initiator_name, target_name=None, isid=new_isid(),
                         credentials=credentials, mutual=mutual,
                         chap_algorithms=chap_algorithms)
    session = login(portal, config, timeout=timeout)
    with session.connection:
        exchange = Exchange(session.connection, session.result)
        pairs = exchange.text([("SendTargets", "All")], timeout=timeout)
        exchange.logout(timeout=timeout)
    return parse_send_targets(pairs, discovery_portal=session.portal)
