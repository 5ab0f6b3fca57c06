"""iSCSI names and portal addresses as users and SendTargets write them."""

from __future__ import annotations

import pytest

from userland.errors import ConfigError
from userland.names import short_name, validate_name
from userland.portal import Portal


@pytest.mark.parametrize("name", [
    "iqn.2024-01.org.example:disk1", "iqn.1994-05.com.redhat:5a2b3c", "iqn.2001-04.com.example",
    "eui.02004567A425678D", "naa.52004567BA64678D", "naa.62004567BA64678D0123456789ABCDEF"])
def test_valid_names(name: str) -> None:
    assert validate_name(name) == name


@pytest.mark.parametrize(("name", "why"), [
    ("", "empty"), ("disk1", "must start with"), ("iqn.2024-13.org.x", "iqn."),
    ("iqn.24-01.org.x", "iqn."), ("iqn.2024-01.Org.Example", "iqn."),
    ("eui.123", "eui."), ("naa.XYZ", "naa."), ("iqn.2024-01.org.x:" + "a" * 300, "longer")])
def test_invalid_names(name: str, why: str) -> None:
    with pytest.raises(ConfigError, match=why):
        validate_name(name)


def test_short_name_is_after_the_last_colon() -> None:
    assert short_name("iqn.2024-01.org.example:storage:disk1") == "disk1"
    assert short_name("iqn.2024-01.org.example") == "iqn.2024-01.org.example"


@pytest.mark.parametrize(("text", "portal"), [
    ("127.0.0.1", Portal("127.0.0.1", 3260)),
    ("127.0.0.1:3261", Portal("127.0.0.1", 3261)),
    ("127.0.0.1:3260,1", Portal("127.0.0.1", 3260, 1)),
    ("[::1]:3262,7", Portal("::1", 3262, 7)),
    ("[::1]", Portal("::1", 3260)),
    ("::1", Portal("::1", 3260)),
    ("san1.example.com:860", Portal("san1.example.com", 860)),
])
def test_portal_forms(text: str, portal: Portal) -> None:
    assert Portal.parse(text) == portal


def test_portal_str_round_trips() -> None:
    for text in ("127.0.0.1:3260,1", "[::1]:3262,7", "host:1"):
        assert str(Portal.parse(text)) == text


@pytest.mark.parametrize("bad", ["", ":3260", "h:0", "h:70000", "h:x", "[::1", "[zz]:1",
                                 "h:1,x", "1:2:3:4:5:6:7:g"])
def test_bad_portals(bad: str) -> None:
    with pytest.raises(ConfigError):
        Portal.parse(bad)
