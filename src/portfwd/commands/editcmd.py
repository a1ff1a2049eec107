"""``portfwd add`` and ``portfwd remove``: declare a guest's forwards in forward.toml
from the command line (``configedit`` makes the edit, ``editfile`` writes it), then
apply that guest as ``sync`` would apply it, and show its forwards as ``status`` does.
"""

from __future__ import annotations

import argparse
from typing import Any, Callable, List, Optional

from portfwd.libvirt import domainforwards, libvirtapi
from portfwd.engine import guestpass
from portfwd import plan
from portfwd.rundir import state
from portfwd.commands import status
from portfwd.suggest import count
from portfwd.config.configedit import PROTOS, Edit, Request, add, remove
from portfwd.config.editfile import edit
from portfwd.errors import EXIT_HOST, EXIT_OK, EXIT_USAGE, HostError


def add_parsers(sub: Any, common: argparse.ArgumentParser) -> None:
    """The ``add`` and ``remove`` subcommands."""
    p = add = sub.add_parser("add", parents=[common], help="add a guest's forward to the configuration",
                       description="Append a [[forward]] for GUEST to the configuration (every"
                                   " other byte of the file stays), validated as check validates"
                                   " it, then apply that guest's forwards if it runs.")
    p.add_argument("guest", metavar="GUEST", help="libvirt domain name")
    p.add_argument("ports", metavar="PORTSPEC", nargs="+",
                   help="[HOST[-END]:]GUEST[-END][/tcp|udp|sctp], as in the ports key")
    p.add_argument("--ipv4", metavar="ADDR", help="the guest's IPv4 address (default: found)")
    p.add_argument("--ipv6", metavar="ADDR", help="the guest's IPv6 address or ::SUFFIX")
    p.add_argument("--uuid", metavar="UUID", help="name the guest by UUID in the file instead"
                                                  " (not with --domain)")
    p.add_argument("--from", dest="sources", metavar="CIDR", nargs="+", action="extend",
                   default=[], help="only these source networks may use the forward")
    p.add_argument("--listen", metavar="ADDR", nargs="+", action="extend", default=[],
                   help="host addresses or interface names to answer on (default: [options])")
    p.add_argument("--proto", metavar="PROTO", nargs="+", action="extend", default=[],
                   choices=PROTOS, help="protocol(s) of the PORTSPECs without /PROTO (default tcp)")
    p = sub.add_parser("remove", parents=[common],
                       help="remove a guest's forwards from the configuration",
                       description="Remove GUEST's [[forward]] tables, or only the ports"
                                   " PORTSPEC names (8080 names the port whose host side is"
                                   " 8080), from the configuration (every other byte of the file"
                                   " stays), then apply that guest's forwards if it runs.")
    p.add_argument("guest", metavar="GUEST", help="libvirt domain name (or the UUID the file"
                                                  " names it by)")
    p.add_argument("ports", metavar="PORTSPEC", nargs="*", help="only these ports")
    p.add_argument("--uuid", metavar="UUID", help="also the [[forward]] tables naming this UUID")
    for p in (add, p):
        p.add_argument("--domain", action="store_true",
                       help="edit the forwards in the guest's own <metadata> (through libvirt)"
                            " instead of the configuration; needs [options] domain_forwards")
        p.add_argument("--no-apply", action="store_true",
                       help="only edit the configuration; apply nothing now")
        p.add_argument("--connect", metavar="URI", default=libvirtapi.DEFAULT_URI,
                       help=f"libvirt connection URI (default: {libvirtapi.DEFAULT_URI})")


def run(args: argparse.Namespace, say: Callable[..., None]) -> int:
    """Edit the configuration (or with --domain the guest's <metadata>), then apply the
    guest unless --no-apply."""
    path = state.config_path(args.config)
    if args.domain and args.uuid:
        say("portfwd: error: --uuid: a domain's own forwards name no guest; leave it out",
            err=True)
        return EXIT_USAGE
    say(*(_edit_domain(args, path) if args.domain else _edit_file(args, path)))
    if args.no_apply:
        say("not applied (--no-apply): portfwd sync, the daemon or the guest's next start"
            " apply it")
        return EXIT_OK
    try:
        lines = apply(path, args.guest, args.uuid, args.connect)
    except HostError as e:
        changed = f"guest {args.guest}'s <metadata>" if args.domain else path
        say(f"{changed} was changed, but not applied: {e}", err=True)
        return EXIT_HOST
    say(*lines)
    return EXIT_OK


def _edit_file(args: argparse.Namespace, path: str) -> List[str]:
    if args.command == "add":
        request = Request(args.guest, args.ports, args.uuid, args.ipv4, args.ipv6,
                          args.sources, args.listen, args.proto)
        return edit(path, lambda text: add(text, path, request), _text).changes
    return edit(path, lambda text: remove(text, path, args.guest, args.uuid, args.ports),
                _text).changes


def _edit_domain(args: argparse.Namespace, path: str) -> List[str]:
    from portfwd.libvirt import domainedit

    if args.command == "remove":
        return domainedit.edit(args.connect, path, args.guest, None, args.ports)
    return domainedit.edit(args.connect, path, args.guest, domainedit.attributes(
        args.ports, args.proto, args.ipv4, args.ipv6, args.sources, args.listen), ())


def _text(done: Edit) -> str:
    return done.text


def apply(path: str, name: str, uuid: Optional[str], uri: str) -> List[str]:
    """Apply one guest's forwards as ``sync`` would (libvirt is asked first, never
    under the lock) and describe them as ``status`` does."""
    from portfwd.config import load
    from portfwd.engine import Engine
    from portfwd.plan import bind

    conn = libvirtapi.connect(uri)
    try:
        found = libvirtapi.running_guest(conn, name, uuid, load(path))
    finally:
        conn.close()
    with state.locked():
        engine = Engine(path)
        config = engine.compile()  # what the hook reads from now on
        if found is not None:
            guest, resolver = found
            wanted = engine.guest_config(guest.name, guest.uuid)
            templates = wanted.templates + plan.templates(domainforwards.forwards(
                resolver.forwards, guest.name, guest.uuid, config, engine.all_states())[0])
            guestpass.apply_guest(engine, guest.name, guest.uuid, wanted,
                                  bind(templates, guest.name), resolver, resolver.taps)
        report = status.report(engine, config)
    names = {name} | ({found[0].name} if found else set())
    rows = [r for r in report.rows if r["guest"] in names or r["guest"] == uuid]
    out = status.table_lines(rows) if rows else [f"guest {name}: no forwards"]
    if found is None:
        out.append(f"guest {name} is not running: its forwards apply when it starts")
    pending = (status.RowState.PENDING, status.RowState.INACTIVE)
    waiting = [r for r in rows if r["state"] in pending]
    if waiting:
        out.append(f"{count(len(waiting), 'forward')} {'waits' if len(waiting) == 1 else 'wait'}: the daemon, or portfwd sync once the"
                   " guest has its address, applies them")
    return out


def cmd_edit(args: argparse.Namespace) -> int:
    from portfwd.console import say

    return run(args, say)
