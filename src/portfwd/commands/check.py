"""``portfwd check``: validate the configuration against the host, as text or JSON."""

from __future__ import annotations

import argparse
import json
import os
from typing import Any, Dict, List

from portfwd.engine import bridgeupkeep, tables
from portfwd.rundir import state
from portfwd.console import say
from portfwd.engine import Engine
from portfwd.errors import EXIT_CONFIG, EXIT_OK, ConfigError, HostError
from portfwd.config.model import Where


def cmd_check(args: argparse.Namespace) -> int:
    from portfwd.commands import checks
    from portfwd.host import hostnet
    from portfwd.config import locator, parse
    from portfwd.config.configtrust import read
    from portfwd.config.conflicts import interface_conflicts
    from portfwd.errors import diagnostic
    from portfwd.suggest import count

    path = state.config_path(args.config)
    report: Dict[str, Any] = {"path": path, "valid": False, "strict": args.strict,
                              "errors": [], "warnings": [], "blocked": []}
    root = os.geteuid() == 0  # nftables lists nothing to anyone else
    try:
        text = read(path)
        config = parse(text, path)
        locate = locator(text, path)
        # listen interfaces stand for their addresses now: a clash with a listed address
        clashes = interface_conflicts(
            config, lambda name, family: hostnet.usable_addresses(name, family)[0], locate)
        if clashes:
            raise ConfigError(clashes)
        engine = Engine(config.path)
        table = config.options.table
        try:
            foreign = root and tables.table_owner(engine, table) is False
        except HostError:
            foreign = False  # the firewall inspection below says so
        if foreign:
            raise ConfigError([f"{locate(Where(path, 'options.table'))}: options.table:"
                               f" table inet {table} exists and was not made by portfwd;"
                               " portfwd never changes it: choose another name"])
    except ConfigError as e:
        if not args.json:
            raise
        report["errors"] = [diagnostic(line, path) for line in e.lines]
        print(json.dumps(report, indent=2))
        return EXIT_CONFIG
    warnings = list(config.warnings) + checks.warnings(config, checks.Host.read(), locate)
    if not config.forwards:
        warnings.insert(0, f"{path}: warning: no forwards configured; add one, e.g. [[forward]]"
                           ' guest = "web1" ports = ["8080:80"] (one key a line)')
    guests = {f.label for f in config.forwards}
    ports = sum(len(f.ports) for f in config.forwards)
    targets = {str(a) for f in config.forwards for a in (f.ipv4, f.ipv6) if a is not None}
    blocked: List[str] = []
    if not root:
        warnings.append(f"{path}: warning: not root: cannot see the firewall (nftables lists it"
                        " to root alone); the configuration was checked, run `portfwd check` as"
                        " root to see whether anything blocks forwarded traffic")
    else:
        try:
            blocked = [str(b) for b in bridgeupkeep.firewall(engine, targets)[1]]
        except HostError as e:
            warnings.append(f"{path}: warning: could not inspect the host's firewall: {e}")
    failed = args.strict and bool(warnings or blocked)
    report.update(valid=True, table=config.options.table, guests=len(guests), ports=ports,
                  warnings=[diagnostic(w, path) for w in warnings], blocked=blocked)
    if args.json:
        print(json.dumps(report, indent=2))
        return EXIT_CONFIG if failed else EXIT_OK
    for warning in warnings:
        say(warning, err=True)
    for line in blocked:
        say(f"{path}: warning: forwarded traffic blocked: {line}", err=True)
    noted = count(len(warnings) + len(blocked), "warning")
    say(f"{config.path}: OK: {count(ports, 'port forward')} for {count(len(guests), 'guest')},"
        f" table inet {config.options.table}" + (f"; {noted}" if warnings or blocked else ""))
    if failed:
        say(f"{path}: failed: --strict and {noted}", err=True)
        return EXIT_CONFIG
    return EXIT_OK
