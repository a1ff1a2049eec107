"""``portfwd reapply``: rebuild the tables from the records in the run directory."""

from __future__ import annotations

import argparse

from portfwd.rundir import state
from portfwd.engine import wholehost
from portfwd.console import say
from portfwd.engine import Engine
from portfwd.errors import EXIT_OK
from portfwd.suggest import count


def cmd_reapply(args: argparse.Namespace) -> int:
    with state.locked():
        bindings = wholehost.reapply(Engine(state.config_path(args.config)))
    owners = {b.guest for b in bindings}
    say(f"reapplied: {count(len(bindings), 'forward')} for {count(len(owners), 'guest')}"
        f" from {state.run_dir()}")
    return EXIT_OK
