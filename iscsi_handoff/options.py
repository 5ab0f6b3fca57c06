"""Click options shared by commands, and turning them into protocol configuration."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import click

from iscsi_handoff.datapath import FuseOptions
from iscsi_handoff.identity import initiator_name
from iscsi_handoff.secrets import load_credentials
from userland.errors import ConfigError
from userland.login.chap import Credentials, parse_algorithms
from userland.portal import Portal

F = TypeVar("F", bound=Callable[..., Any])

DIGEST_CHOICES = {
    "none": ("None",),
    "crc32c": ("CRC32C",),
    "prefer-none": ("None", "CRC32C"),
    "prefer-crc32c": ("CRC32C", "None"),
}


def _stack(*decorators: Callable[[F], F]) -> Callable[[F], F]:
    def apply(func: F) -> F:
        for decorator in reversed(decorators):
            func = decorator(func)
        return func
    return apply


def auth_options(func: F) -> F:
    path = click.Path(dir_okay=False, path_type=Path)
    return _stack(
        click.option("--chap-user", metavar="USER", help="Our CHAP user name (CHAP_N)."),
        click.option("--chap-secret-file", type=path, metavar="FILE",
                     help="File holding our CHAP secret; must not be group/world readable."),
        click.option("--chap-secret-env", metavar="VAR",
                     help="Environment variable holding our CHAP secret."),
        click.option("--mutual-user", metavar="USER",
                     help="The target's CHAP user name, for mutual CHAP."),
        click.option("--mutual-secret-file", type=path, metavar="FILE",
                     help="File holding the target's CHAP secret (mutual CHAP)."),
        click.option("--mutual-secret-env", metavar="VAR",
                     help="Environment variable holding the target's CHAP secret."),
        click.option("--chap-algs", default="md5", show_default=True, metavar="LIST",
                     help="CHAP algorithms to offer, in order: md5, sha1, sha256, sha3-256. "
                          "Some older targets reject a list, hence MD5 alone by default."),
        click.option("--initiator-name", metavar="IQN",
                     help="Our iSCSI name. Default: /etc/iscsi/initiatorname.iscsi, else "
                          "one generated once and kept in the state directory."),
        click.option("--timeout", type=click.FloatRange(0.1, 3600), default=15.0,
                     show_default=True, help="Seconds allowed for connect and login."),
    )(func)


def fuse_options(func: F) -> F:
    return _stack(
        click.option("--fuse", type=click.Path(file_okay=False, path_type=Path),
                     metavar="MOUNT", help="Serve the LUNs as files under MOUNT (FUSE)."),
        click.option("--loop", is_flag=True,
                     help="Also attach each storage file as /dev/loopN (direct I/O)."),
        click.option("--allow-other", is_flag=True,
                     help="Let other users see the FUSE tree (default: only its owner)."),
        click.option("--queue-depth", type=click.IntRange(1, 1024), default=32,
                     show_default=True, help="Commands in flight per session."),
        click.option("--replacement-timeout", type=click.FloatRange(1, 86400), default=120.0,
                     show_default=True,
                     help="Seconds to keep retrying a lost connection before I/O fails."),
    )(func)


def fuse_options_from(kw: dict[str, Any], mountpoint: Path | None) -> FuseOptions | None:
    """Pop the data-path options; None when there is no mount point."""
    opts = FuseOptions(mountpoint=Path("."), loop=kw.pop("loop"),
                       allow_other=kw.pop("allow_other"), queue_depth=kw.pop("queue_depth"),
                       replacement_timeout=kw.pop("replacement_timeout"))
    if mountpoint is None:
        if opts.loop or opts.allow_other:
            raise ConfigError("--loop and --allow-other need --fuse MOUNT")
        return None
    opts.mountpoint = mountpoint
    return opts


@dataclass
class Auth:
    initiator_name: str
    credentials: Credentials | None
    mutual: Credentials | None
    chap_algorithms: tuple[int, ...]
    timeout: float


def auth_from(kw: dict[str, Any]) -> Auth:
    """Pop the auth options out of a command's keyword arguments."""
    def prompt(text: str) -> str:
        return str(click.prompt(text, hide_input=True, default="", show_default=False))

    credentials = load_credentials(kw.pop("chap_user"), kw.pop("chap_secret_file"),
                                   kw.pop("chap_secret_env"), label="CHAP", option="chap",
                                   prompt=prompt)
    mutual = load_credentials(kw.pop("mutual_user"), kw.pop("mutual_secret_file"),
                              kw.pop("mutual_secret_env"), label="mutual CHAP",
                              option="mutual", prompt=prompt)
    if mutual is not None and credentials is None:
        raise ConfigError("mutual CHAP (--mutual-user) needs --chap-user too")
    return Auth(initiator_name=initiator_name(kw.pop("initiator_name")),
                credentials=credentials, mutual=mutual,
                chap_algorithms=parse_algorithms(kw.pop("chap_algs")),
                timeout=kw.pop("timeout"))


class PortalType(click.ParamType):  # type: ignore[type-arg]
    name = "PORTAL"

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> Portal:
        if isinstance(value, Portal):
            return value
        try:
            return Portal.parse(str(value))
        except ConfigError as exc:
            self.fail(str(exc), param, ctx)
