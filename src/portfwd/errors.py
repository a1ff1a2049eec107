"""Error classes: who is at fault decides the exit code (see cli.py)."""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Sequence


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
