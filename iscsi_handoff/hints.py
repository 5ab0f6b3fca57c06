"""The next step, added to an error's one line: what the user can do about it.

The command records the facts a hint needs (our initiator name, the CHAP algorithms
offered, the portal) as it parses options; the error handler asks for a hint at the end.
"""

from __future__ import annotations

from typing import Any

from userland.errors import IscsiError, TargetNotFoundError

facts: dict[str, Any] = {}

MD5 = 5


def note(**values: Any) -> None:
    facts.update({k: v for k, v in values.items() if v is not None})


def hint(exc: BaseException) -> str | None:
    text = str(exc)
    if isinstance(exc, TargetNotFoundError) and "0x0203" in text:
        portal = facts.get("portal", "PORTAL")
        name = facts.get("initiator_name")
        who = f"; we are {name}" if name else ""
        return (f"list the targets it offers with `iscsi-handoff discover {portal}` "
                f"(some targets list only those this initiator may see{who})")
    algs = tuple(facts.get("chap_algorithms", (MD5,)))
    # tgt answers an offer of SHA-256 alone with status 0x0200, "initiator error".
    if isinstance(exc, IscsiError) and algs != (MD5,) and facts.get("chap") and (
            "CHAP" in text or "status 0x02" in text):
        return "many targets know only MD5: try --chap-algs md5"
    return None


def with_hint(exc: BaseException) -> str:
    more = hint(exc)
    return f"{exc}; {more}" if more else str(exc)


def report_error(exc: BaseException, *, prefix: str = "", exit_code: int | None = None) -> None:
    """The one line on stderr, with its next step; a JSON object instead under --json."""
    import click

    from iscsi_handoff.output import error_json, json_mode
    from userland.printable import escape

    # The last net under every message that may carry a target's words: each source
    # escapes them already; this catches the rest (no control characters on a terminal).
    text = escape(prefix + with_hint(exc), limit=4000, backslashes=False)
    code = exit_code if exit_code is not None else int(getattr(exc, "exit_code", 1))
    if json_mode():
        click.echo(error_json(text, code, type(exc).__name__), err=True)
    else:
        click.echo(f"iscsi-handoff: {text}", err=True)
