"""``portfwd flush``: remove every table and accept portfwd made, and its records."""

from __future__ import annotations

import argparse
from typing import List, Optional

from portfwd import log
from portfwd.rundir import state
from portfwd.engine import wholehost
from portfwd.config import load
from portfwd.console import say
from portfwd.engine import Engine
from portfwd.errors import EXIT_OK, ConfigError


def flush(path: str) -> List[str]:
    """Remove every table and accept portfwd made and its state (whatever the
    configuration says, a broken one too); returns the tables removed."""
    table: Optional[str] = None
    try:
        table = load(path).options.table
    except ConfigError:
        pass  # the configured table name is all it is asked for
    with state.locked():
        removed, foreign = wholehost.flush(Engine(path), table)
    for t in foreign:
        log.warning(f"table inet {t} left alone: portfwd did not make it")
    return removed


def cmd_flush(args: argparse.Namespace) -> int:
    removed = flush(state.config_path(args.config))
    say("removed: " + (", ".join(f"table inet {t}" for t in removed) or "nothing (no portfwd table)"))
    return EXIT_OK
