"""``portfwd status``: print ``status.report`` (records against the kernel), text or JSON."""

from __future__ import annotations

import argparse
import json
from typing import List, Optional, Set

from portfwd import log
from portfwd.rundir import state
from portfwd.config import load
from portfwd.console import say, unknown_asked, usage_error
from portfwd.engine import Engine
from portfwd.errors import EXIT_CONFIG, EXIT_DEGRADED, EXIT_OK, ConfigError
from portfwd.config.model import Config


def cmd_status(args: argparse.Namespace) -> int:
    from portfwd.commands import doctorfacts, status

    path = state.config_path(args.config)
    config: Optional[Config] = None
    errors: List[str] = []
    try:
        config = load(path)
    except ConfigError as e:
        errors = e.lines
    unknown = unknown_asked(args.guest, config, args.config)
    if unknown:
        return usage_error("status", unknown)
    running: Optional[Set[str]] = set()
    source = ""
    if config is not None and _unrecorded(config, Engine(path)):
        # whether those guests run: asked before the lock, libvirt may be slow
        domains, source = doctorfacts.running_domains(args.connect, args.libvirt_status)
        running = None if domains is None else doctorfacts.running_names(domains)
    with state.locked():
        report = status.report(Engine(path), config, running, source, args.guest)
    code = EXIT_CONFIG if errors else EXIT_OK if report.healthy else EXIT_DEGRADED
    if args.json:
        print(json.dumps({
            "config": {"path": path, "valid": not errors, "errors": errors,
                       "warnings": list(config.warnings) if config else []},
            "healthy": report.healthy and not errors, "forwards": report.rows,
            "warnings": report.warnings,
            "firewall": {"seen": report.firewall, "blocked": report.blocked}}, indent=2))
        return code
    for line in errors:
        log.warning(line)
    if errors:
        log.warning("configuration invalid: showing applied forwards only")
    for line in status.table_lines(report.rows):
        say(line)
    if not report.rows:
        say("(no forwards)")
    for line in report.warnings:
        say(f"warning: {line}")
    for line in report.firewall:
        say(f"firewall: {line}")
    for line in report.blocked:
        say(f"blocked: {line}")
    return code


def _unrecorded(config: Config, engine: Engine) -> bool:
    """Whether a configured forward's guest has no records (a look without the lock)."""
    recorded = {name for st in engine.all_states() for name in (st.guest, st.uuid) if name}
    return any(f.guest not in recorded and f.uuid not in recorded for f in config.forwards)
