"""``portfwd show``: the configured forwards (or guest names), as a table or JSON."""

from __future__ import annotations

import argparse
import json

from portfwd.console import load_config, say, unknown_asked, usage_error
from portfwd.errors import EXIT_OK


def cmd_show(args: argparse.Namespace) -> int:
    from portfwd import plan
    from portfwd.commands import status

    config = load_config(args)
    if args.names:
        say(*sorted({f.label for f in config.forwards}))
        return EXIT_OK
    unknown = unknown_asked(args.guest, config, args.config)
    if unknown:
        return usage_error("show", unknown)
    forwards = [f for f in config.forwards if not args.guest or f.label in args.guest]
    rows = status.merge_sources(status.row(b) for f in forwards
                                for b in plan.forwards_bindings([f], f.label))
    if args.json:
        keys = ("guest", "family", "proto", "listen", "target", "sources", "entry")
        print(json.dumps([{k: r[k] for k in keys} for r in rows], indent=2))
        return EXIT_OK
    say(*status.table_lines(rows, status.SHOWN) if rows else ["(no forwards)"])
    return EXIT_OK
