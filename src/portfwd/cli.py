"""portfwd's command line: runs the command ``cmdline`` parsed; the only module
that prints and picks exit codes.

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
from typing import Any, Callable, Dict, List, Optional, Set, Tuple

from . import atomicfile, bridgeupkeep, escape, libvirtapi, log, state, tables, wholehost
from .suggest import count
from .cmdline import parser
from .config import load
from .domainxml import status_files_tell
from .engine import Engine
from .errors import BugError, ConfigError, HostError
from .model import Config, Where
from .plan import Binding
from .values import Reason

EXIT_OK, EXIT_CONFIG, EXIT_USAGE, EXIT_HOST, EXIT_BUG, EXIT_DEGRADED = 0, 1, 2, 3, 4, 5
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
    from .errors import diagnostic
    from .suggest import count

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


def _unknown_guests(asked: List[str], config: Optional[Config], config_arg: Optional[str]
                    ) -> List[str]:
    """A line for each guest of ``asked`` neither configured (in ``config``, else in
    the file ``config_arg`` names) nor recorded; none when the configuration is
    invalid (the command says so itself, and which guests it names is unknown)."""
    from .suggest import unknown_guests

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


def _unrecorded(config: Config, engine: Engine) -> bool:
    """Whether a configured forward's guest has no records (a look without the lock)."""
    recorded = {name for st in engine.all_states() for name in (st.guest, st.uuid) if name}
    return any(f.guest not in recorded and f.uuid not in recorded for f in config.forwards)


def _usage_error(command: str, lines: List[str]) -> int:
    for line in lines:
        say(f"portfwd {command}: error: {line}", err=True)
    return EXIT_USAGE


def cmd_status(args: argparse.Namespace) -> int:
    from . import doctorfacts, status

    path = state.config_path(args.config)
    config: Optional[Config] = None
    errors: List[str] = []
    try:
        config = load(path)
    except ConfigError as e:
        errors = e.lines
    unknown = _unknown_guests(args.guest, config, args.config)
    if unknown:
        return _usage_error("status", unknown)
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


def cmd_show(args: argparse.Namespace) -> int:
    from . import plan, status

    config = _load(args)
    if args.names:
        say(*sorted({f.label for f in config.forwards}))
        return EXIT_OK
    unknown = _unknown_guests(args.guest, config, args.config)
    if unknown:
        return _usage_error("show", unknown)
    forwards = [f for f in config.forwards if not args.guest or f.label in args.guest]
    rows = status.merge_sources(status.row(b) for f in forwards
                                for b in plan.forwards_bindings([f], f.label))
    if args.json:
        keys = ("guest", "family", "proto", "listen", "target", "sources", "entry")
        print(json.dumps([{k: r[k] for k in keys} for r in rows], indent=2))
        return EXIT_OK
    say(*status.table_lines(rows, status.SHOWN) if rows else ["(no forwards)"])
    return EXIT_OK


def cmd_doctor(args: argparse.Namespace) -> int:
    from . import doctor, doctorfacts

    unknown = _unknown_guests([args.guest] if args.guest else [], None, args.config)
    if unknown:
        return _usage_error("doctor", unknown)
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
    unknown = _unknown_guests([args.guest], None, args.config)
    if unknown:
        return _usage_error("trace", unknown)
    result = trace.run(state.config_path(args.config), args.guest, args.port, args.proto,
                       args.source, args.family, args.timeout)
    say(*trace.render(result))
    return EXIT_OK if result.delivered else trace.EXIT_NOT_DELIVERED


def cmd_daemon(args: argparse.Namespace) -> int:
    from . import daemon

    return daemon.run(state.config_path(args.config), args.connect, args.interval)


def cmd_reapply(args: argparse.Namespace) -> int:
    with state.locked():
        bindings = wholehost.reapply(Engine(state.config_path(args.config)))
    owners = {b.guest for b in bindings}
    say(f"reapplied: {count(len(bindings), 'forward')} for {count(len(owners), 'guest')}"
        f" from {state.run_dir()}")
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
        removed, foreign = wholehost.flush(Engine(path), table)
    for t in foreign:
        log.warning(f"table inet {t} left alone: portfwd did not make it")
    return removed


def cmd_flush(args: argparse.Namespace) -> int:
    removed = _flush(state.config_path(args.config))
    say("removed: " + (", ".join(f"table inet {t}" for t in removed) or "nothing (no portfwd table)"))
    return EXIT_OK


def cmd_install(args: argparse.Namespace) -> int:
    import shlex

    from . import installpaths
    from .pathwalk import at

    root = args.root
    owner = installpaths.packaged(root)
    if owner is not None and not args.force:
        log.error(f"not installing: {owner}; it put the hooks, units, manual page and"
                  " completion in place, and `portfwd install` would add a second set beside"
                  f" them. Edit {state.DEFAULT_CONFIG}, run `portfwd check`, then"
                  " `portfwd sync`; or remove the package first (apt remove portfwd);"
                  " `portfwd install --force` installs anyway")
        return EXIT_USAGE
    done: List[str] = []
    # libvirt runs hooks with an empty environment: a non-default path goes into the hook
    settings = "".join(f"import os; os.environ[{name!r}] = {value!r}\n" for name, value in (
        (state.ENV_CONFIG, args.config), (state.ENV_RUN_DIR, args.run_dir)) if value)
    # … and into its sh lines, which look at the same files (the hook index)
    for value in (args.config, args.run_dir):
        if value and ("\\" in value or "'''" in value or "\n" in value):
            raise HostError(f"cannot name {value!r} in the hook: choose a path without"
                            " backslashes, newlines or '''")
    exports = "".join(f"{name}={shlex.quote(value)}; export {name}\n" for name, value in (
        (state.ENV_CONFIG, args.config), (state.ENV_RUN_DIR, args.run_dir)) if value)
    # the hook is `#!/bin/sh` starting `py=INTERPRETER` on itself (a missing interpreter
    # must not fail the guest); sh's lines sit in a Python string: no backslash there
    python = sys.executable
    if not python or "\\" in python or "\n" in python:
        raise HostError(f"cannot name the interpreter {python!r} in the hook: install portfwd"
                        " for a Python with a plain path")
    import site

    from . import codetrust

    # the hooks run this Python and this package as root: root alone may change them
    refused = codetrust.problems(python, os.path.dirname(os.path.abspath(__file__)),
                                 site.getsitepackages())
    if refused:
        for line in refused:
            log.error(line)
        raise HostError("nothing installed")

    for kind in installpaths.HOOK_KINDS:
        hook_dst = at(root, installpaths.hook(kind))
        with open(os.path.join(DATA_DIR, kind), encoding="utf-8") as f:
            template = f.read()
        head, sep, body = template.partition("\n'''\n")  # the end of the sh lines
        if not sep or "\npy=/usr/bin/python3\n" not in head:
            raise BugError(f"{f.name}: no `py=/usr/bin/python3` line before the closing '''")
        head = head.replace("\npy=/usr/bin/python3\n", f"\npy={shlex.quote(python)}\n{exports}", 1)
        os.makedirs(os.path.dirname(hook_dst), mode=0o755, exist_ok=True)
        atomicfile.write_atomic(hook_dst, f"{head}{sep}{settings}{body}".encode(), mode=0o755)
        done.append(f"hook {hook_dst}")

    config_dst = at(root, args.config or state.DEFAULT_CONFIG)
    os.makedirs(os.path.dirname(config_dst), mode=0o755, exist_ok=True)
    if not os.path.exists(config_dst):
        with open(os.path.join(DATA_DIR, "forward.toml"), encoding="utf-8") as f:
            example = f.read()
        atomicfile.write_atomic(config_dst, _commented_out_forwards(example).encode())
        os.chmod(config_dst, 0o644)
        done.append(f"example configuration {config_dst} (its forwards commented out)")
    else:
        done.append(f"kept existing {config_dst}")

    # the console script beside this interpreter (the venv's bin), else one on PATH
    beside = os.path.join(os.path.dirname(sys.executable), "portfwd")
    exe = beside if os.access(beside, os.X_OK) else shutil.which("portfwd")
    link = at(root, installpaths.COMMAND)
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

    unit_dir = at(root, installpaths.UNIT_DIR)
    for unit in sorted(os.listdir(DATA_DIR)):
        if not unit.endswith(".service"):
            continue
        with open(os.path.join(DATA_DIR, unit), encoding="utf-8") as f:
            text = f.read().replace("@PORTFWD@", link)
        os.makedirs(unit_dir, exist_ok=True)
        atomicfile.write_atomic(os.path.join(unit_dir, unit), text.encode())
        done.append(f"unit {os.path.join(unit_dir, unit)}")
    from . import docs

    for what, path, text in (
            ("manual page", installpaths.MAN_PAGE, docs.man_page(parser())),
            ("manual page", installpaths.CONFIG_MAN_PAGE, docs.config_page()),
            ("bash completion", installpaths.COMPLETION, docs.bash_completion(parser()))):
        path = at(root, path)
        os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
        atomicfile.write_atomic(path, text.encode(), mode=0o644)
        done.append(f"{what} {path}")
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
            atomicfile.write_atomic(args.output, data, mode=0o644, replace=args.force, durable=True)
        except FileExistsError:
            say(f"{args.output}: exists; not overwritten (use --force to replace it)", err=True)
            return EXIT_USAGE
        except OSError as e:
            raise HostError(f"{args.output}: cannot write: {e.strerror or e}") from None
        say(f"wrote {args.output}: {count(len(result.guests), 'guest')}", err=True)
    from .installpaths import packaged

    for step in importer.retire_steps(result.guests, args.output, args.hooks_json,
                                      packaged() is not None):
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


def cmd_edit(args: argparse.Namespace) -> int:
    from . import editcmd

    return editcmd.run(args, say)


COMMANDS: Dict[str, Callable[[argparse.Namespace], int]] = {
    "check": cmd_check, "sync": cmd_sync, "status": cmd_status, "show": cmd_show,
    "doctor": cmd_doctor,
    "trace": cmd_trace, "flush": cmd_flush, "daemon": cmd_daemon, "reapply": cmd_reapply,
    "install": cmd_install, "uninstall": cmd_uninstall, "import": cmd_import,
    "add": cmd_edit, "remove": cmd_edit}


def main(argv: Optional[List[str]] = None) -> int:
    args = parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
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
