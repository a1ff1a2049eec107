"""Error classes and exit codes: who is at fault decides the exit code (cli.py
maps the first to the second)."""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Dict, Optional, Sequence, Union


# 0 success; 1 the configuration is invalid; 2 the command line is wrong; 3 the host
# refused; 4 a bug in portfwd; 5 status: a forward is missing, differs or is blocked
EXIT_OK, EXIT_CONFIG, EXIT_USAGE, EXIT_HOST, EXIT_BUG, EXIT_DEGRADED = 0, 1, 2, 3, 4, 5


class PortfwdError(Exception):
    """Base of every error portfwd reports to a user."""


class ConfigError(PortfwdError):
    """The configuration is wrong; each line says where and what to do."""

    def __init__(self, lines: Sequence[str]) -> None:
        self.lines = list(lines)
        super().__init__("\n".join(self.lines))


class HostError(PortfwdError):
    """nftables, libvirt or the file system refused; carries what it said."""


class BugError(PortfwdError):
    """An internal inconsistency: a bug in portfwd."""


def diagnostic(line: str, path: str) -> Dict[str, Union[str, int, None]]:
    """One error or warning line about the file ``path`` (``PATH:LINE:COL: [warning: ]
    message; hint``) as ``{file, line, column, message, hint}``; line and column are
    None when the line names no position, hint is "" when it gives none."""
    import re

    file: Optional[str] = None
    row = col = None
    rest = line
    if line.startswith(path + ":"):
        file, rest = path, line[len(path) + 1:]
        m = re.match(r"(\d+):(\d+): ", rest)
        if m:
            row, col, rest = int(m.group(1)), int(m.group(2)), rest[m.end():]
        rest = rest.lstrip()
    if rest.startswith("warning: "):
        rest = rest[len("warning: "):]
    message, _, hint = rest.partition("; ")
    return {"file": file, "line": row, "column": col, "message": message, "hint": hint}
