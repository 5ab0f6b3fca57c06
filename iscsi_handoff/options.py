"""Click options shared by commands, and turning them into protocol configuration."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import click

from iscsi_handoff import hints
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
    auth = Auth(initiator_name=initiator_name(kw.pop("initiator_name")),
                credentials=credentials, mutual=mutual,
                chap_algorithms=parse_algorithms(kw.pop("chap_algs")),
                timeout=kw.pop("timeout"))
    hints.note(initiator_name=auth.initiator_name, chap_algorithms=auth.chap_algorithms,
               chap=credentials is not None)
    return auth


class PortalType(click.ParamType):  # type: ignore[type-arg]
    name = "PORTAL"

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> Portal:
        if isinstance(value, Portal):
            return value
        try:
            text = str(value)
            if text.lower().startswith("iscsi://"):  # the portal part of a URL
                from iscsi_handoff.urls import parse_url

                portal = parse_url(text).portal
            else:
                portal = parse_portal(text)
        except ConfigError as exc:
            self.fail(str(exc), param, ctx)
        hints.note(portal=str(portal))
        return portal


def check_port(text: str) -> None:
    """`host:` would silently mean port 3260: refuse it, the user meant to write a port."""
    raw = text.strip().rpartition(",")[0] if "," in text else text.strip()
    if raw.endswith(":") and not raw.endswith("::"):
        raise ConfigError(f"portal {text!r}: empty port after ':' (write host:3260, or "
                          "leave out the ':')")


def parse_portal(text: str) -> Portal:
    check_port(text)
    portal = Portal.parse(text)
    hints.note(portal=portal.address())
    return portal


# ---- the target a command acts on: -p/-T, `PORTAL IQN`, iscsi:// URLs, node records ----

@dataclass
class Where:
    """What the user named: a portal, a target, a LUN, a CHAP user from a URL."""

    portal: Portal | None = None
    target: str | None = None
    lun: int | None = None
    url_user: str | None = None


def resolve_where(positional: tuple[str, ...], portal: str | None,
                  target: str | None) -> Where:
    """`PORTAL IQN`, `iscsi://HOST/IQN`, `-p PORTAL -T IQN` (or `-p URL`), any mix that
    names each thing once."""
    from iscsi_handoff.urls import is_url, parse_url

    where = Where()
    items = list(positional)
    if portal is not None:
        items.insert(0, portal)
    seen_portal = False
    for item in items:
        if is_url(item):
            url = parse_url(item)
            if seen_portal:
                raise ConfigError(f"{item.split('@')[-1]}: the portal was already given")
            where.portal, where.lun, where.url_user = url.portal, url.lun, url.user
            seen_portal = True
            if url.target is not None:
                if where.target is not None and where.target != url.target:
                    raise ConfigError("two different targets given")
                where.target = url.target
        elif not seen_portal:
            where.portal = parse_portal(item)
            seen_portal = True
        elif where.target is None:
            from userland.names import validate_name
            where.target = validate_name(item)
        else:
            raise ConfigError(f"unexpected argument {item!r} (expected PORTAL IQN)")
    if target is not None:
        from userland.names import validate_name
        if where.target is not None and where.target != target:
            raise ConfigError(f"-T {target} differs from the target in the arguments "
                              f"({where.target})")
        where.target = validate_name(target)
    return where


WHERE_METAVAR = "[PORTAL [IQN] | iscsi://HOST[:PORT]/IQN[/LUN]]"


def where_options(func: F) -> F:
    """Positional PORTAL IQN (or a URL), -p/--portal and -T/--target, resolved together."""
    return _stack(
        click.argument("where_args", nargs=-1, metavar=WHERE_METAVAR),
        click.option("-p", "--portal", "portal_text", metavar="PORTAL",
                     help="host[:port][,tpgt] or iscsi://HOST[:PORT]/IQN[/LUN]."),
        click.option("-T", "--target", "target_text", metavar="IQN", help="Target name."),
    )(func)


def pop_where(kw: dict[str, Any]) -> Where:
    return resolve_where(tuple(kw.pop("where_args")), kw.pop("portal_text"),
                         kw.pop("target_text"))


# ---- discovery credentials, apart from the session's (iscsiadm: discovery.sendtargets.auth
# vs node.session.auth) ----

def discovery_auth_options(func: F) -> F:
    path = click.Path(dir_okay=False, path_type=Path)
    return _stack(
        click.option("--discovery-chap-user", metavar="USER",
                     help="CHAP name for the SendTargets (discovery) session only."),
        click.option("--discovery-chap-secret-file", type=path, metavar="FILE",
                     help="File holding the discovery CHAP secret (mode 600)."),
        click.option("--discovery-chap-secret-env", metavar="VAR",
                     help="Environment variable holding the discovery CHAP secret."),
        click.option("--discovery-mutual-user", metavar="USER",
                     help="The target's CHAP name on the discovery session (mutual)."),
        click.option("--discovery-mutual-secret-file", type=path, metavar="FILE",
                     help="File holding the target's discovery CHAP secret."),
        click.option("--discovery-mutual-secret-env", metavar="VAR",
                     help="Environment variable holding the target's discovery secret."),
    )(func)


def discovery_auth_from(kw: dict[str, Any], session: Auth, *,
                        fall_back: bool) -> tuple[Credentials | None, Credentials | None]:
    """The discovery session's (credentials, mutual); with ``fall_back`` the session's
    own when no --discovery-* option was given (`discover`, where they are the same)."""
    names = ("chap_user", "chap_secret_file", "chap_secret_env",
             "mutual_user", "mutual_secret_file", "mutual_secret_env")
    given = {n: kw.pop(f"discovery_{n}") for n in names}
    if not any(v is not None for v in given.values()):
        return (session.credentials, session.mutual) if fall_back else (None, None)
    credentials = load_credentials(given["chap_user"], given["chap_secret_file"],
                                   given["chap_secret_env"], label="discovery CHAP",
                                   option="discovery-chap")
    mutual = load_credentials(given["mutual_user"], given["mutual_secret_file"],
                              given["mutual_secret_env"], label="discovery mutual CHAP",
                              option="discovery-mutual")
    if mutual is not None and credentials is None:
        raise ConfigError("--discovery-mutual-user needs --discovery-chap-user too")
    return credentials, mutual


# ---- options every command takes: -v after the subcommand, --json, -p/-T short forms ----

def _more_verbose(ctx: click.Context, param: click.Parameter, value: int) -> None:
    if not value:
        return
    import logging

    root = ctx.find_root()
    level = int(root.obj.get("verbose", 0) if isinstance(root.obj, dict) else 0) + value
    if isinstance(root.obj, dict):
        root.obj["verbose"] = level
    logging.getLogger().setLevel(logging.INFO if level == 1 else logging.DEBUG)


def _json_on(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
    from iscsi_handoff.output import set_json_mode

    if value:
        set_json_mode(True)
    return value


def add_common_options(command: click.Command) -> None:
    """Give every subcommand -v, --json (errors as JSON at least), -p/-T where it has
    --portal/--target. Done once over the finished tree, so that each command's own file
    stays as its owner wrote it."""
    if isinstance(command, click.Group):
        for sub in command.commands.values():
            add_common_options(sub)
        return  # groups: -v goes before the command (top) or after the subcommand
    names = {p.name for p in command.params}
    if "verbose" not in names:
        command.params.append(click.Option(["-v", "--verbose"], count=True,
                                           expose_value=False, callback=_more_verbose,
                                           help="More detail (as -v before the command)."))
    json_param = next((p for p in command.params if p.name == "as_json"), None)
    if json_param is not None:
        if json_param.callback is None:
            json_param.callback = _json_on
        json_param.is_eager = True
    else:
        command.params.append(click.Option(["--json"], is_flag=True, expose_value=False,
                                           is_eager=True, callback=_json_on,
                                           help="Errors as JSON on stderr."))
    for param in command.params:
        if not isinstance(param, click.Option):
            continue
        for long, short in (("--portal", "-p"), ("--target", "-T")):
            if long in param.opts and short not in param.opts and not any(
                    short in p.opts for p in command.params if isinstance(p, click.Option)):
                param.opts.insert(0, short)


def node_settings_from(kw: dict[str, Any]) -> dict[str, str]:
    """What `discover --save` records of the session credentials typed: where each secret
    is (an absolute file path, a variable name), never the secret itself."""
    out: dict[str, str] = {}
    for side in ("chap", "mutual"):
        user = kw.get(f"{side}_user")
        path = kw.get(f"{side}_secret_file")
        env = kw.get(f"{side}_secret_env")
        if user is None:
            continue
        if path is None and env is None:
            raise ConfigError(f"--save keeps where the secret is, never the secret: give "
                              f"--{side}-secret-file FILE or --{side}-secret-env VAR")
        out[f"{side}_user"] = user
        if path is not None:
            out[f"{side}_secret_file"] = str(Path(path).absolute())
        if env is not None:
            out[f"{side}_secret_env"] = env
    if kw.get("chap_algs") not in (None, "md5"):
        out["chap_algs"] = kw["chap_algs"]
    if kw.get("initiator_name"):
        out["initiator_name"] = kw["initiator_name"]
    return out
