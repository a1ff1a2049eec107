"""What the commands share: printing for people, usage errors, config, GUEST arguments."""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from portfwd import escape
from portfwd.rundir import state
from portfwd.config import load
from portfwd.engine import Engine
from portfwd.errors import EXIT_USAGE, ConfigError
from portfwd.config.model import Config


def say(*lines: str, err: bool = False) -> None:
    """Print text for people, each of ``lines`` as one line through
    ``escape.printable`` (names that come from guests, processes or interfaces are
    shown, not obeyed; a newline in one is shown too). JSON output needs no such
    help: ``json.dumps`` escapes everything but printable ASCII."""
    out = sys.stderr if err else sys.stdout
    for line in lines:
        print(escape.printable(line), file=out)


def load_config(args: argparse.Namespace) -> Config:
    config = load(state.config_path(args.config))
    for warning in config.warnings:
        say(warning, err=True)
    return config


def unknown_asked(asked: List[str], config: Optional[Config], config_arg: Optional[str]
                    ) -> List[str]:
    """A line for each guest of ``asked`` neither configured (in ``config``, else in
    the file ``config_arg`` names) nor recorded; none when the configuration is
    invalid (the command says so itself, and which guests it names is unknown)."""
    from portfwd.suggest import unknown_guests

    if not asked:
        return []
    path = state.config_path(config_arg)
    if config is None:
        try:
            config = load(path)
        except ConfigError:
            return []
    known = {f.label for f in config.forwards}
    if not set(asked) <= known:
        known |= {st.guest for st in Engine(path).all_states() if not st.empty}
    return unknown_guests(asked, known)


def usage_error(command: str, lines: List[str]) -> int:
    for line in lines:
        say(f"portfwd {command}: error: {line}", err=True)
    return EXIT_USAGE
