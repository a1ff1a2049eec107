"""``portfwd sync``: apply the configuration to every running guest (or --dry-run)."""

from __future__ import annotations

import argparse
import json
from typing import List, Tuple

from portfwd.libvirt import libvirtapi
from portfwd.rundir import state
from portfwd.engine import wholehost
from portfwd.console import load_config, say
from portfwd.libvirt.domainxml import status_files_tell
from portfwd.engine import Engine
from portfwd.errors import EXIT_OK
from portfwd.config.model import Config
from portfwd.plan import Binding
from portfwd.suggest import count
from portfwd.values import Reason


def cmd_sync(args: argparse.Namespace) -> int:
    config = load_config(args)
    conn = libvirtapi.connect(args.connect)
    try:
        guests, resolvers = libvirtapi.running_guests(conn, config)  # never under the lock
    finally:
        conn.close()
    with state.locked():
        engine = Engine(config.path)
        before = [b for st in engine.all_states() for b in st.bindings]
        synced = wholehost.sync(engine, config, guests, dry_run=args.dry_run,
                                resolvers=resolvers, settle=status_files_tell(args.connect))
        if not args.dry_run:
            engine.compile()
    bindings = synced.applied
    if args.dry_run:
        return _print_dry_run(config, len(guests), before, bindings, synced.pending, args.json)
    owners = {b.guest for b in bindings}
    if args.json:
        print(json.dumps({"table": config.options.table, "bindings": len(bindings),
                          "guests": len(owners), "pending": len(synced.pending)}, indent=2))
    else:
        say(f"synced: {count(len(bindings), 'forward')} for {count(len(owners), 'guest')}"
            f" in table inet {config.options.table}")
    return EXIT_OK


def _print_dry_run(config: Config, running: int, before: List[Binding], after: List[Binding],
                   pending: List[Tuple[Binding, Reason]], as_json: bool) -> int:
    from portfwd.plan import syncdiff

    diff = syncdiff.diff(before, after)
    waiting = [dict(syncdiff.fold([b])[0], reason=str(why)) for b, why in pending]
    if as_json:
        print(json.dumps({"table": config.options.table, "running_guests": running,
                          "applied": False, "counts": dict(diff.counts(), pending=len(waiting)),
                          "added": [syncdiff.to_json(i) for i in diff.added],
                          "removed": [syncdiff.to_json(i) for i in diff.removed],
                          "unchanged": [syncdiff.to_json(i) for i in diff.unchanged],
                          "pending": [syncdiff.to_json(i) for i in waiting]}, indent=2))
        return EXIT_OK
    counts = diff.counts()
    say(f"# table inet {config.options.table}, {count(running, 'running guest')}: dry run, nothing"
        " applied (nftables accepted the batch)")
    for mark, items in (("+", diff.added), ("-", diff.removed), ("=", diff.unchanged)):
        for item in items:
            say(syncdiff.line(mark, item))
    for item in waiting:
        say(syncdiff.line("?", item) + f" (pending: {item['reason']})")
    say(f"added {counts['added']}, removed {counts['removed']}, unchanged"
        f" {counts['unchanged']}" + (f", pending {len(waiting)}" if waiting else ""))
    return EXIT_OK
