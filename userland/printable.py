"""Strings a target sent us, made safe to print: no control characters reach a terminal.

Target names, aliases, rejected values, INQUIRY vendor/product/serial and reason texts
come from the peer. A terminal obeys ESC sequences and CR rewrites a line, so every
such string goes through ``escape`` before it reaches output, a log or an error text.
"""

from __future__ import annotations

MAX_SHOWN = 256  # characters of one target string in a line; the rest is elided


def escape(text: str | bytes, *, limit: int = MAX_SHOWN, backslashes: bool = True) -> str:
    r"""``text`` with every non-printable character as ``\xNN``/``\uNNNN``.

    Printable means ``str.isprintable()`` or a plain space: C0/C1 controls, DEL, line
    and paragraph separators and format characters (bidi overrides) are all escaped.
    A backslash is doubled so an escaped form cannot be forged (``backslashes=False``
    leaves them alone: the last net over a line we composed, whose target parts were
    escaped already). Bytes are decoded as
    UTF-8 with undecodable bytes shown as ``\xNN``. More than ``limit`` characters are
    cut, with ``...`` and the original length appended.
    """
    from_bytes = isinstance(text, bytes | bytearray | memoryview)
    if isinstance(text, bytes | bytearray | memoryview):
        text = bytes(text).decode("utf-8", "surrogateescape")
    shown = text[:limit]
    out: list[str] = []
    for ch in shown:
        code = ord(ch)
        if ch == "\\" and backslashes:
            out.append("\\\\")
        elif from_bytes and 0xDC80 <= code <= 0xDCFF:  # an undecodable byte
            out.append(f"\\x{code - 0xDC00:02x}")
        elif ch == " " or ch.isprintable():
            out.append(ch)
        else:
            out.append(f"\\x{code:02x}" if code < 0x100 else
                       f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}")
    if len(text) > limit:
        out.append(f"...({len(text)} characters)")
    return "".join(out)
