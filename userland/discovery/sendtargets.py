"""SendTargets answers (RFC 7143 section 13.3 and Appendix C): targets and their portals.

The answer is parsed as it arrives (``SendTargetsParser.feed`` per batch of pairs), so a
target's long list is checked pair by pair and bounded, never built whole first.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from userland.errors import ConfigError, ProtocolError
from userland.names import validate_name
from userland.portal import Portal

# Bounds on what a portal may list: far above any real SAN (each target costs ~100
# bytes of text), far below what would hurt us. Past them: a ProtocolError, one line.
MAX_SENDTARGETS_BYTES = 1 << 20  # key=value text of one SendTargets answer
MAX_TARGETS = 10000
MAX_PORTALS_PER_TARGET = 256


@dataclass
class DiscoveredTarget:
    name: str
    portals: list[Portal] = field(default_factory=list)


class SendTargetsParser:
    """TargetName starts a record; the TargetAddress lines after it are its portals.

    A target listed with no TargetAddress is reachable at the portal we asked
    (RFC 7143 Appendix C: "the target is reached through the same portal").
    """

    def __init__(self, *, discovery_portal: Portal, max_targets: int = MAX_TARGETS) -> None:
        self.discovery_portal = discovery_portal
        self.max_targets = max_targets
        self.targets: list[DiscoveredTarget] = []
        self._names: set[str] = set()

    def feed(self, pairs: Sequence[tuple[str, str]]) -> None:
        for key, value in pairs:
            if key == "TargetName":
                self._target(value)
            elif key == "TargetAddress":
                self._address(value)
            elif key == "TargetAlias":
                continue  # allowed in SendTargets answers; nothing we show
            else:
                raise ProtocolError(f"SendTargets: unexpected key {key!r} in the answer")

    def _target(self, name: str) -> None:
        try:
            validate_name(name)
        except ConfigError as exc:
            raise ProtocolError(f"SendTargets: {exc}") from None
        if name in self._names:
            raise ProtocolError(f"SendTargets: target {name} listed twice")
        if len(self.targets) >= self.max_targets:
            raise ProtocolError(f"SendTargets: the portal lists more than {self.max_targets} "
                                "targets; refused past that bound")
        self._names.add(name)
        self.targets.append(DiscoveredTarget(name))

    def _address(self, value: str) -> None:
        if not self.targets:
            raise ProtocolError("SendTargets: TargetAddress before any TargetName")
        portals = self.targets[-1].portals
        if len(portals) >= MAX_PORTALS_PER_TARGET:
            raise ProtocolError(f"SendTargets: more than {MAX_PORTALS_PER_TARGET} addresses "
                                f"for {self.targets[-1].name}")
        try:
            portals.append(Portal.parse(value, what="TargetAddress"))
        except ConfigError as exc:
            raise ProtocolError(f"SendTargets: {exc}") from None

    def result(self) -> list[DiscoveredTarget]:
        for target in self.targets:
            if not target.portals:
                target.portals.append(self.discovery_portal)
        return self.targets


def parse_send_targets(pairs: Sequence[tuple[str, str]], *,
                       discovery_portal: Portal) -> list[DiscoveredTarget]:
    """The whole answer at once (tests, small answers)."""
    parser = SendTargetsParser(discovery_portal=discovery_portal)
    parser.feed(pairs)
    return parser.result()
