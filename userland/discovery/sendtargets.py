"""SendTargets answers (RFC 7143 section 13.3 and Appendix C): targets and their portals."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from userland.errors import ConfigError, ProtocolError
from userland.names import validate_name
from userland.portal import Portal


@dataclass
class DiscoveredTarget:
    name: str
    portals: list[Portal] = field(default_factory=list)


def parse_send_targets(pairs: Sequence[tuple[str, str]], *,
                       discovery_portal: Portal) -> list[DiscoveredTarget]:
    """TargetName starts a record; the TargetAddress lines after it are its portals.

    A target listed with no TargetAddress is reachable at the portal we asked
    (RFC 7143 Appendix C: "the target is reached through the same portal").
    """
    targets: list[DiscoveredTarget] = []
    for key, value in pairs:
        if key == "TargetName":
            try:
                validate_name(value)
            except ConfigError as exc:
                raise ProtocolError(f"SendTargets: {exc}") from None
            targets.append(DiscoveredTarget(value))
        elif key == "TargetAddress":
            if not targets:
                raise ProtocolError("SendTargets: TargetAddress before any TargetName")
            try:
                targets[-1].portals.append(Portal.parse(value, what="TargetAddress"))
            except ConfigError as exc:
                raise ProtocolError(f"SendTargets: {exc}") from None
        elif key == "TargetAlias":
            continue  # allowed in SendTargets answers; nothing we show
        else:
            raise ProtocolError(f"SendTargets: unexpected key {key!r} in the answer")
    for target in targets:
        if not target.portals:
            target.portals.append(discovery_portal)
    return targets
