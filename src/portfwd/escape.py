"""Text for terminals and logs: what guests, processes, interfaces and domains
name is shown, never obeyed.

Names portfwd prints come from others: a domain name, a process's ``comm`` (any
bytes), an interface name (any bytes but ``/``, ``:`` and ASCII spaces), rules of
someone else's table. Printed as they are, an escape sequence would restyle or
rewrite the terminal, a newline would forge a log line, and bidi or zero-width
characters would make one name look like another. Every line portfwd prints or
logs goes through ``printable``: each character that is not printable (Python's
``str.isprintable``: control, format, surrogate, private-use, unassigned,
separator other than the space; the tab stays, columns use it) is shown as an
escape, ``\\x1b``, ``\\u202e``; a byte that was not UTF-8 (decoded with
``surrogateescape``) as ``\\xNN``. A newline too: one message is one line,
and callers with several lines hand them over one by one.

Cheap to import (nothing): the hook logs through it.
"""

from __future__ import annotations


def printable(text: str) -> str:
    """``text`` with every character that is not printable (but the tab) escaped."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() or c == "\t" else _escaped(c) for c in text)


def _escaped(c: str) -> str:
    n = ord(c)
    if 0xDC80 <= n <= 0xDCFF:  # a byte that was not UTF-8, kept by surrogateescape
        return f"\\x{n - 0xDC00:02x}"
    if n < 0x100:
        return f"\\x{n:02x}"
    return f"\\u{n:04x}" if n < 0x10000 else f"\\U{n:08x}"

