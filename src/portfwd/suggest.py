"""Naming what a user asked for that does not exist: a did-you-mean from the names
that do; long lists of names cut to a readable length; counted nouns."""

from __future__ import annotations

import difflib

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Iterable, List, Sequence

LIST_MAX = 3  # names shown before "and N more"


def did_you_mean(word: str, choices: Iterable[str], cutoff: float = 0.6) -> str:
    """The closest of ``choices`` to ``word`` (``"did you mean 'x'? "``), or ''."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=cutoff)
    return f"did you mean {close[0]!r}? " if close else ""


def some(names: Sequence[str], limit: int = LIST_MAX) -> str:
    """``a, b, c and 297 more``: at most ``limit`` names, the rest counted."""
    if len(names) > limit + 1:
        return f"{', '.join(names[:limit])} and {len(names) - limit} more"
    if len(names) < 2:
        return "".join(names)
    return f"{', '.join(names[:-1])} and {names[-1]}"


def count(n: int, noun: str) -> str:
    """``1 port forward``, ``2 port forwards``."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def unknown_guests(asked: Sequence[str], known: Iterable[str]) -> List[str]:
    """One line per guest of ``asked`` that is not in ``known``: why, and what is."""
    names = sorted(set(known))
    listed = f"configured guests: {some(names)}" if names else "no guest is configured"
    return [f"guest {g!r} is not configured; {did_you_mean(g, names)}{listed}"
            for g in asked if g not in names]
