"""portfwd's command line; the only module that prints and picks exit codes.

Exit codes:
  0  success
  1  the configuration is invalid (every problem printed as PATH:LINE:COL: message)
  2  the command line is wrong
  3  the host refused: nftables, libvirt or the file system said no
  4  internal error (a bug in portfwd; please report it)
  5  status: a forward is missing from the table, differs from it or is blocked
     (doctor and trace: a broken layer, an undelivered probe)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from typing import Any, Callable, Dict, List, Optional, Tuple

from . import display, escape, libvirtapi, log, state
from .config import load
from .discover import status_files_tell
from .engine import Engine
from .errors import BugError, ConfigError, HostError
from .model import Config, Where
from .plan import Binding
from .values import Reason

EXIT_OK, EXIT_CONFIG, EXIT_USAGE, EXIT_HOST, EXIT_BUG, EXIT_DEGRADED = 0, 1, 2, 3, 4, 5
INTERVAL_MIN, INTERVAL_MAX = 0.05, 3600.0  # daemon --interval, seconds
TRACE_TIMEOUT_MIN, TRACE_TIMEOUT_MAX = 0.1, 600.0  # trace --timeout, seconds
DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")


def say(*lines: str, err: bool = False) -> None:
    """Print text for people, each of ``lines`` as one line through
    ``escape.printable`` (names that come from guests, processes or interfaces are
    shown, not obeyed; a newline in one is shown too). JSON output needs no such
    help: ``json.dumps`` escapes everything but printable ASCII."""
    out = sys.stderr if err else sys.stdout
    for line in lines:
        print(escape.printable(line), file=out)


def _load(args: argparse.Namespace) -> Config:
    config = load(state.config_path(args.config))
    for warning in config.warnings:
        say(warning, err=True)
    return config


def cmd_check(args: argparse.Namespace) -> int:
    from . import checks, hostnet
    from .config import locator, parse, read
    from .conflicts import interface_conflicts

    path = state.config_path(args.config)
    report: Dict[str, Any] = {"path": path, "valid": False, "strict": args.strict,
                              "errors": [], "warnings": [], "blocked": []}
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
            foreign = engine.table_owner(table) is False
        except HostError:
            foreign = False  # not root: the firewall inspection below says so
        if foreign:
            raise ConfigError([f"{locate(Where(path, 'options.table'))}: options.table:"
                               f" table inet {table} exists and was not made by portfwd;"
                               " portfwd never changes it: choose another name"])
    except ConfigError as e:
        if not args.json:
            raise
        report["errors"] = e.lines
        print(json.dumps(report, indent=2))
        return EXIT_CONFIG
    warnings = list(config.warnings) + checks.warnings(config, checks.Host.read(), locate)
    guests = {f.label for f in config.forwards}
    ports = sum(len(f.ports) for f in config.forwards)
    targets = {str(a) for f in config.forwards for a in (f.ipv4, f.ipv6) if a is not None}
    blocked: List[str] = []
    try:
        blocked = engine.firewall(targets)[1]
    except HostError as e:
        warnings.append(f"{path}: warning: could not inspect the host's firewall ({e}); run"
                        " check as root to see whether anything blocks forwarded traffic")
    failed = args.strict and bool(warnings or blocked)
    report.update(valid=True, table=config.options.table, guests=len(guests), ports=ports,
                  warnings=warnings, blocked=blocked)
    if args.json:
        print(json.dumps(report, indent=2))
        return EXIT_CONFIG if failed else EXIT_OK
    for warning in warnings:
        say(warning, err=True)
    for line in blocked:
        say(f"{path}: warning: forwarded traffic blocked: {line}", err=True)
    say(f"{config.path}: OK: {ports} port forward(s) for {len(guests)} guest(s),"
        f" table inet {config.options.table}"
        + (f"; {len(warnings) + len(blocked)} warning(s)" if warnings or blocked else ""))
    if failed:
        say(f"{path}: failed: --strict and {len(warnings) + len(blocked)} warning(s)", err=True)
        return EXIT_CONFIG
    return EXIT_OK


def cmd_sync(args: argparse.Namespace) -> int:
    config = _load(args)
    conn = libvirtapi.connect(args.connect)
    try:
        guests, resolvers = libvirtapi.running_guests(conn, config)  # never under the lock
    finally:
        conn.close()
    with state.locked():
        engine = Engine(config.path)
        before = [b for st in engine.all_states() for b in st.bindings]
        bindings = engine.sync(config, guests, dry_run=args.dry_run, resolvers=resolvers,
                               settle=status_files_tell(args.connect))
        if not args.dry_run:
            engine.compile()
    if args.dry_run:
        return _print_dry_run(config, len(guests), before, bindings, engine.pending, args.json)
    owners = {b.guest for b in bindings}
    if args.json:
        print(json.dumps({"table": config.options.table, "bindings": len(bindings),
                          "guests": len(owners), "pending": len(engine.pending)}, indent=2))
    else:
        say(f"synced: {len(bindings)} binding(s) for {len(owners)} guest(s)"
            f" in table inet {config.options.table}")
    return EXIT_OK


def _print_dry_run(config: Config, running: int, before: List[Binding], after: List[Binding],
                   pending: List[Tuple[Binding, Reason]], as_json: bool) -> int:
    from . import syncdiff

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
    say(f"# table inet {config.options.table}, {running} running guest(s): dry run, nothing"
        " applied (nftables accepted the batch)")
    for mark, items in (("+", diff.added), ("-", diff.removed), ("=", diff.unchanged)):
        for item in items:
            say(syncdiff.line(mark, item))
    for item in waiting:
        say(syncdiff.line("?", item) + f" (pending: {item['reason']})")
    say(f"added {counts['added']}, removed {counts['removed']}, unchanged"
        f" {counts['unchanged']}" + (f", pending {len(waiting)}" if waiting else ""))
    return EXIT_OK


def cmd_status(args: argparse.Namespace) -> int:
    from . import status

    path = state.config_path(args.config)
    config: Optional[Config] = None
    errors: List[str] = []
    try:
        config = load(path)
    except ConfigError as e:
        errors = e.lines
    with state.locked():
        report = status.report(Engine(path), config)
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


def cmd_doctor(args: argparse.Namespace) -> int:
    from . import doctor, doctorfacts

    checks = doctorfacts.diagnose(state.config_path(args.config), args.guest, args.connect,
                                  args.libvirt_status)
    if args.json:
        print(json.dumps([c.to_json() for c in checks], indent=2))
    else:
        say(*doctor.render(checks))
    return EXIT_OK if all(c.ok for c in checks) else doctor.EXIT_BROKEN


def cmd_trace(args: argparse.Namespace) -> int:
    from . import trace

    if args.source is not None and args.family == 6 and ":" not in args.source:
        say(f"portfwd trace: error: argument --from: {args.source} is an IPv4 address, and -6"
            " asks for the IPv6 forward: give an IPv6 address, or leave out -6", err=True)
        return EXIT_USAGE
    result = trace.run(state.config_path(args.config), args.guest, args.port, args.proto,
                       args.source, args.family, args.timeout)
    say(*trace.render(result))
    return EXIT_OK if result.delivered else trace.EXIT_NOT_DELIVERED


def cmd_daemon(args: argparse.Namespace) -> int:
    from . import daemon

    return daemon.run(state.config_path(args.config), args.connect, args.interval)


def cmd_reapply(args: argparse.Namespace) -> int:
    with state.locked():
        bindings = Engine(state.config_path(args.config)).reapply()
    owners = {b.guest for b in bindings}
    say(f"reapplied: {len(bindings)} binding(s) for {len(owners)} guest(s) from {state.run_dir()}")
    return EXIT_OK


def _flush(path: str) -> List[str]:
    """Remove every table and accept portfwd made and its state (whatever the
    configuration says, a broken one too); returns the tables removed."""
    table: Optional[str] = None
    try:
        table = load(path).options.table
    except ConfigError:
        pass  # the configured table name is all it is asked for
    with state.locked():
        removed, foreign = Engine(path).flush(table)
    for t in foreign:
        log.warning(f"table inet {t} left alone: portfwd did not make it")
    return removed


def cmd_flush(args: argparse.Namespace) -> int:
    removed = _flush(state.config_path(args.config))
    say("removed: " + (", ".join(f"table inet {t}" for t in removed) or "nothing (no portfwd table)"))
    return EXIT_OK


def cmd_install(args: argparse.Namespace) -> int:
    root = args.root
    def at(path: str) -> str:
        return os.path.join(root, path.lstrip("/"))

    done: List[str] = []
    # libvirt runs hooks with an empty environment: a non-default path goes into the hook
    settings = "".join(f"import os; os.environ[{name!r}] = {value!r}\n" for name, value in (
        (state.ENV_CONFIG, args.config), (state.ENV_RUN_DIR, args.run_dir)) if value)
    # the hook is `#!/bin/sh` starting `py=INTERPRETER` on itself (a missing interpreter
    # must not fail the guest); sh's lines sit in a Python string: no backslash there
    python = sys.executable
    if not python or "\\" in python or "\n" in python:
        raise HostError(f"cannot name the interpreter {python!r} in the hook: install portfwd"
                        " for a Python with a plain path")
    import shlex
    import site

    from . import codetrust

    # the hooks run this Python and this package as root: root alone may change them
    refused = codetrust.problems(python, os.path.dirname(os.path.abspath(__file__)),
                                 site.getsitepackages())
    if refused:
        for line in refused:
            log.error(line)
        raise HostError("nothing installed")

    for kind in ("qemu", "network"):
        hook_dst = at(f"/etc/libvirt/hooks/{kind}.d/portfwd")
        with open(os.path.join(DATA_DIR, kind), encoding="utf-8") as f:
            template = f.read()
        head, sep, body = template.partition("\n'''\n")  # the end of the sh lines
        if not sep or "\npy=/usr/bin/python3\n" not in head:
            raise BugError(f"{f.name}: no `py=/usr/bin/python3` line before the closing '''")
        head = head.replace("\npy=/usr/bin/python3\n", f"\npy={shlex.quote(python)}\n", 1)
        os.makedirs(os.path.dirname(hook_dst), mode=0o755, exist_ok=True)
        state.write_atomic(hook_dst, f"{head}{sep}{settings}{body}".encode(), mode=0o755)
        done.append(f"hook {hook_dst}")

    config_dst = at(args.config or state.DEFAULT_CONFIG)
    os.makedirs(os.path.dirname(config_dst), mode=0o755, exist_ok=True)
    if not os.path.exists(config_dst):
        with open(os.path.join(DATA_DIR, "forward.toml"), encoding="utf-8") as f:
            example = f.read()
        state.write_atomic(config_dst, _commented_out_forwards(example).encode())
        os.chmod(config_dst, 0o644)
        done.append(f"example configuration {config_dst} (its forwards commented out)")
    else:
        done.append(f"kept existing {config_dst}")

    # the console script beside this interpreter (the venv's bin), else one on PATH
    beside = os.path.join(os.path.dirname(sys.executable), "portfwd")
    exe = beside if os.access(beside, os.X_OK) else shutil.which("portfwd")
    link = at("/usr/local/sbin/portfwd")
    if exe is None:
        done.append("no portfwd command found to link (install the package with pip first)")
        exe = link
    elif os.path.abspath(exe) != os.path.abspath(link):
        os.makedirs(os.path.dirname(link), exist_ok=True)
        if os.path.islink(link) or not os.path.exists(link):
            if os.path.lexists(link):
                os.unlink(link)
            os.symlink(exe, link)
            done.append(f"command {link} -> {exe}")

    unit_dir = at("/etc/systemd/system")
    for unit in sorted(os.listdir(DATA_DIR)):
        if not unit.endswith(".service"):
            continue
        with open(os.path.join(DATA_DIR, unit), encoding="utf-8") as f:
            text = f.read().replace("@PORTFWD@", link)
        os.makedirs(unit_dir, exist_ok=True)
        state.write_atomic(os.path.join(unit_dir, unit), text.encode())
        done.append(f"unit {os.path.join(unit_dir, unit)}")
    from . import docs

    for path, text in ((at("/usr/local/share/man/man8/portfwd.8"), docs.man_page(_parser())),
                       (at("/usr/local/share/bash-completion/completions/portfwd"),
                        docs.bash_completion(_parser()))):
        os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
        state.write_atomic(path, text.encode(), mode=0o644)
        done.append(f"{'manual page' if path.endswith('.8') else 'bash completion'} {path}")
    for line in done:
        say(f"installed: {line}")
    if root == "/" and os.path.isdir("/run/systemd/system") and shutil.which("systemctl"):
        from .uninstall import systemctl

        systemctl(["daemon-reload"])
        systemctl(["enable", "portfwd-sync.service", "portfwd-reapply.service",
                   "portfwd.service"])
    say("next: edit the configuration, run `portfwd check`, then restart libvirtd once"
        " (systemctl restart libvirtd) so it finds the hook")
    return EXIT_OK


def cmd_uninstall(args: argparse.Namespace) -> int:
    from . import uninstall

    stopped = uninstall.stop_units(args.root, DATA_DIR)
    if stopped:
        say(stopped)
    for t in _flush(state.config_path(args.config)):
        say(f"removed: table inet {t} and portfwd's accepts in libvirt's chains")
    removed, kept = uninstall.remove_files(args.root, DATA_DIR,
                                           args.config or state.DEFAULT_CONFIG, args.purge)
    if uninstall.remove_run_dir(state.run_dir()):
        removed.append(state.run_dir())
    for path in removed:
        say(f"removed: {path}")
    for path in kept:
        say(f"kept: {path}")
    say("next: restart libvirtd once (systemctl restart libvirtd) so that it forgets the hooks")
    return EXIT_OK


def cmd_import(args: argparse.Namespace) -> int:
    from . import importer

    try:
        with open(args.hooks_json, "rb") as source:
            data = source.read()
    except OSError as e:
        raise ConfigError([f"{args.hooks_json}: cannot read: {e.strerror}"]) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        row = data[:e.start].count(b"\n") + 1
        col = e.start - data.rfind(b"\n", 0, e.start)
        raise ConfigError([f"{args.hooks_json}:{row}:{col}: not UTF-8 text"]) from None
    listen = args.listen
    if listen is None:  # the old hook's default: the interface of the default IPv4 route
        listen = _default_route_interface()
    result = importer.convert(text, args.hooks_json, None if listen == "all" else listen)
    for warning in result.warnings:
        say(warning, err=True)
    if result.errors:
        raise ConfigError(result.errors)
    data = result.toml.encode("utf-8")  # forward.toml is UTF-8, whatever the locale
    if args.output is None:
        sys.stdout.flush()
        sys.stdout.buffer.write(data)
        sys.stdout.flush()
    else:
        try:  # a new file beside the output, renamed (--force) or linked into place
            state.write_atomic(args.output, data, mode=0o644, replace=args.force, durable=True)
        except FileExistsError:
            say(f"{args.output}: exists; not overwritten (use --force to replace it)", err=True)
            return EXIT_USAGE
        except OSError as e:
            raise HostError(f"{args.output}: cannot write: {e.strerror or e}") from None
        say(f"wrote {args.output}: {len(result.guests)} guest(s)", err=True)
    for step in importer.retire_steps(result.guests, args.output, args.hooks_json):
        say(step, err=True)
    return EXIT_OK


def _default_route_interface() -> Optional[str]:
    """The interface of the default IPv4 route with the lowest metric, or None."""
    from .hostnet import RouteTable

    return RouteTable().default_interface(4)


def _commented_out_forwards(example: str) -> str:
    """The example with every line from the first [[forward]] on commented out,
    so that installing forwards nothing until the admin says so."""
    head, sep, tail = example.partition("\n[[forward]]")
    if not sep:
        return example
    lines = (sep.lstrip("\n") + tail).splitlines()
    return head + "\n" + "\n".join(("# " + line) if line else line for line in lines) + "\n"


def _seconds(text: str, low: float, high: float, default: str) -> float:
    """A number of seconds from ``low`` to ``high`` given on the command line."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not low <= value <= high:  # also refuses nan and inf
        raise argparse.ArgumentTypeError(f"{text} seconds: use {low:g} to {high:g}"
                                         f" (default {default})")
    return value


def _interval(text: str) -> float:
    """--interval: seconds between looks at the configuration and lease files."""
    return _seconds(text, INTERVAL_MIN, INTERVAL_MAX, "0.5")


def _probe_source(text: str) -> str:
    """trace --from: one unicast address (it goes into the trace table's rule and
    the probe's header), in canonical form."""
    from ipaddress import IPv6Address, ip_address

    try:
        address = ip_address(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not an IP address (write e.g. 198.51.100.7 or 2001:db8::7)") from None
    if address.is_multicast or address.is_unspecified or str(address) == "255.255.255.255":
        raise argparse.ArgumentTypeError(f"{address} is not a unicast address: a client's"
                                         " packet never comes from it")
    if isinstance(address, IPv6Address) and (address.ipv4_mapped or address.scope_id):
        raise argparse.ArgumentTypeError(
            f"{text}: write the IPv4 address itself" if address.ipv4_mapped
            else f"{text}: a source address has no zone index (%…)")
    return str(address)


def _probe_port(text: str) -> int:
    """trace PORT: a host port, 1 to 65535."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{text}: a port is 1 to 65535")
    return port


def _probe_timeout(text: str) -> float:
    """trace --timeout: how long to follow the probe."""
    return _seconds(text, TRACE_TIMEOUT_MIN, TRACE_TIMEOUT_MAX, "2")


def _parser() -> argparse.ArgumentParser:
    from . import __version__

    config_help = f"configuration file (default: ${state.ENV_CONFIG} or {state.DEFAULT_CONFIG})"
    # -c works before and after the command: the subcommands' copy leaves the value
    # given before the command alone unless given again
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-c", "--config", metavar="PATH", default=argparse.SUPPRESS,
                        help=config_help)
    parser = argparse.ArgumentParser(
        prog="portfwd", description="Port forwarding for libvirt guests through one nftables table.",
        epilog="exit codes: 0 ok, 1 invalid configuration, 2 bad command line,"
               " 3 the host refused (nftables, libvirt, files), 4 internal error,"
               " 5 status: a forward is missing, differs or is blocked; doctor: a layer"
               " is broken; trace: the probe was not delivered",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"portfwd {__version__}")
    parser.add_argument("-c", "--config", metavar="PATH", help=config_help)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    p = sub.add_parser("check", parents=[common], help="validate the configuration",
                       description="Validate the configuration; every error as PATH:LINE:COL:"
                                   " message. Warns about forwards that would take a port a host"
                                   " service listens on, listen interfaces or addresses the host"
                                   " lacks, forwards that forward nothing, guests sharing an"
                                   " address, and what blocks forwarded traffic.")
    p.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    p.add_argument("--strict", action="store_true", help="fail (exit 1) on warnings too")
    p.set_defaults(func=cmd_check)
    p = sub.add_parser("sync", parents=[common], help="reconcile the table with running guests",
                       description="Make the table hold exactly the forwards of the guests"
                                   " libvirt reports running, in one transaction.")
    p.add_argument("--connect", metavar="URI", default=libvirtapi.DEFAULT_URI,
                   help=f"libvirt connection URI (default: {libvirtapi.DEFAULT_URI})")
    p.add_argument("--dry-run", action="store_true",
                   help="print what would be added, removed and kept; let nftables check the"
                        " batch, change nothing")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(func=cmd_sync)
    p = sub.add_parser("status", parents=[common], help="show forwards and whether they are live",
                       description="Show each forward: guest, protocol, listen -> target,"
                                   " sources, connections its DNAT counted, state. Exits 1 when"
                                   " the configuration is invalid, 5 when a forward is missing,"
                                   " differs or is blocked.")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_status)
    p = sub.add_parser("doctor", parents=[common], help="find the first broken layer of a forward",
                       description="Walk the path of a forwarded packet (whether libvirt's"
                                   " AppArmor profile lets it run the hooks, forwarding, IPv6,"
                                   " guest, bridge, tap, MAC, address, neighbour, table, filter,"
                                   " host listener, hairpin) and stop at the first broken layer,"
                                   " with its fix. Read-only. Exit 0 only when every layer"
                                   " passes, 5 when one fails.")
    p.add_argument("guest", nargs="?", metavar="GUEST", help="one guest (default: every guest"
                                                             " with forwards)")
    p.add_argument("--json", action="store_true", help="a JSON list of {layer, guest, ok,"
                                                        " detail, fix}")
    p.add_argument("--connect", metavar="URI", default=libvirtapi.DEFAULT_URI,
                   help=f"libvirt connection URI (default: {libvirtapi.DEFAULT_URI})")
    p.add_argument("--libvirt-status", metavar="DIR",
                   help="read running domains from libvirt's status files in DIR instead of"
                        " asking libvirt (it is asked for at most 10 s, then /run/libvirt/qemu"
                        " is read)")
    p.set_defaults(func=cmd_doctor)
    p = sub.add_parser("trace", parents=[common], help="follow one probe through the forward",
                       description="Send one probe (a TCP SYN or a UDP datagram) to a forward"
                                   " with nftables tracing on for it alone, and print table by"
                                   " table, chain by chain the verdicts it met, up to where it"
                                   " was delivered or dropped. Exit 0 when it reached the guest's"
                                   " bridge, 5 otherwise.")
    p.add_argument("guest", metavar="GUEST")
    p.add_argument("port", metavar="PORT", type=_probe_port, help="the forwarded host port")
    p.add_argument("--proto", choices=("tcp", "udp"), default="tcp")
    p.add_argument("--from", dest="source", metavar="ADDR", type=_probe_source,
                   help="the probe's source address: not one of the host's, the probe enters"
                        " like a client's packet (prerouting, forward); one of the host's, it"
                        " is the host's own connection (output). Default: 192.0.2.1 / 2001:db8::1"
                        " (documentation addresses)")
    p.add_argument("-6", dest="family", action="store_const", const=6, default=4,
                   help="probe the IPv6 forward (default IPv4)")
    p.add_argument("--timeout", type=_probe_timeout, default=2.0, metavar="SECONDS",
                   help="how long to follow the probe (default 2)")
    p.set_defaults(func=cmd_trace)
    p = sub.add_parser("flush", parents=[common], help="remove everything portfwd installed",
                       description="Remove portfwd's nftables tables and its recorded state.")
    p.set_defaults(func=cmd_flush)
    p = sub.add_parser("daemon", parents=[common],
                       help="apply forwards on libvirt events, lease and config changes",
                       description="Keep the table in step with libvirt's guests, their DHCP"
                                   " leases and the configuration: reconnects to libvirtd,"
                                   " applies a valid edit of the configuration within 2 s,"
                                   " logs an invalid one and keeps the rules.")
    p.add_argument("--connect", metavar="URI", default=libvirtapi.DEFAULT_URI,
                   help=f"libvirt connection URI (default: {libvirtapi.DEFAULT_URI})")
    p.add_argument("--interval", type=_interval, default=0.5, metavar="SECONDS",
                   help="how often to look at the configuration and lease files (default 0.5;"
                        f" {INTERVAL_MIN} to {INTERVAL_MAX:g})")
    p.set_defaults(func=cmd_daemon)
    p = sub.add_parser("reapply", parents=[common],
                       help="re-apply recorded forwards (after nft flush ruleset, firewall reloads)",
                       description="Rebuild portfwd's table and its accepts in libvirt's chains"
                                   f" from what {state.DEFAULT_RUN_DIR} records, without asking"
                                   " libvirt and without reading the configuration.")
    p.set_defaults(func=cmd_reapply)
    p = sub.add_parser("install", help="install the libvirt hook, example config and units",
                       description="Install the qemu hook, an example configuration (if none"
                                   " exists) and the systemd units.")
    p.add_argument("--root", default="/", metavar="DIR", help="install below DIR (default: /)")
    p.add_argument("-c", "--config", metavar="PATH", default=argparse.SUPPRESS,
                   help=f"configuration the hooks read (default: {state.DEFAULT_CONFIG})")
    p.add_argument("--run-dir", metavar="DIR",
                   help=f"state directory of the hooks (default: {state.DEFAULT_RUN_DIR})")
    p.set_defaults(func=cmd_install)
    p = sub.add_parser("uninstall", parents=[common],
                       help="remove what install put in place and every rule portfwd made",
                       description="Stop and disable the units, remove portfwd's tables, its"
                                   " accepts in libvirt's chains and its state, the hooks, the"
                                   " units and the portfwd link. The configuration stays unless"
                                   " --purge. Files are looked for below --root; rules are"
                                   " removed from the running system.")
    p.add_argument("--root", default="/", metavar="DIR", help="installed below DIR (default: /)")
    p.add_argument("--purge", action="store_true", help="remove the configuration file too")
    p.set_defaults(func=cmd_uninstall)
    p = sub.add_parser("import", help="convert libvirt-hook-qemu's hooks.json to forward.toml",
                       description="Convert the hooks.json of libvirt-hook-qemu to forward.toml:"
                                   " printed, or written with -o; then how to retire the old"
                                   " hook without a gap (on stderr).")
    p.add_argument("hooks_json", metavar="HOOKS_JSON", help="e.g. /etc/libvirt/hooks/hooks.json")
    p.add_argument("-o", "--output", metavar="PATH", help="write here (mode 0644) instead of stdout")
    p.add_argument("--force", action="store_true", help="replace an existing -o file")
    p.add_argument("--listen", metavar="ADDRESS|INTERFACE|all",
                   help="where an entry without public_ip answers (default: the interface of"
                        " the default IPv4 route, whose address the old hook used; all: every"
                        " local address)")
    p.set_defaults(func=cmd_import)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = _parser().parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except ConfigError as e:
        for line in e.lines:
            say(line, err=True)
        return EXIT_CONFIG
    except HostError as e:
        log.error(str(e))
        return EXIT_HOST
    except BrokenPipeError:  # the reader left (`| head`): nothing more to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except PermissionError as e:
        log.error(f"{e.filename}: {e.strerror} (run portfwd as root)")
        return EXIT_HOST
    except OSError as e:
        log.error(f"{e.filename or ''}: {e.strerror or e}")
        return EXIT_HOST
    except BugError as e:
        log.error(f"internal error: {e}")
        return EXIT_BUG
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
