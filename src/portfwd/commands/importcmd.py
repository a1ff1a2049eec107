"""``portfwd import``: hooks.json in, forward.toml out, and how to retire the old hook."""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from portfwd.rundir import atomicfile
from portfwd.console import say
from portfwd.errors import EXIT_OK, EXIT_USAGE, ConfigError, HostError
from portfwd.suggest import count


def cmd_import(args: argparse.Namespace) -> int:
    from portfwd.commands import importer

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
    from portfwd.commands.installpaths import packaged

    for step in retire_steps(result.guests, args.output, args.hooks_json,
                                      packaged() is not None):
        say(step, err=True)
    return EXIT_OK


def _default_route_interface() -> Optional[str]:
    """The interface of the default IPv4 route with the lowest metric, or None."""
    from portfwd.host.hostnet import RouteTable

    return RouteTable().default_interface(4)


def retire_steps(guests: List[str], output: Optional[str], hooks_json: str,
                 packaged: bool = False) -> List[str]:
    """How to move from the old hook to portfwd without a moment without forwards;
    ``packaged``: the Debian package installed portfwd (its hooks and units are in
    place, and its /etc/portfwd/forward.toml exists).

    Why this order: portfwd's nat chain (priority dstnat - 5) sees a new
    connection before iptables' nat PREROUTING (dstnat), and the first nat
    chain that binds a connection wins (later nat chains are not consulted for
    it), so once ``portfwd sync`` has run, portfwd carries every new connection
    while the old rules are still there, shadowed. libvirt stops calling the old
    hook only after it is moved aside and libvirtd restarts (one command, so no
    guest starts in between); its rules then stay until the old hook, which
    reads hooks.json beside itself, removes them. Established connections keep
    their conntrack binding when rules go.
    """
    default = "/etc/portfwd/forward.toml"
    hooks = "/etc/libvirt/hooks"
    old = f"{hooks}/qemu.libvirt-hook-qemu.disabled"
    names = " ".join(_shell_word(g) for g in guests) or "GUEST..."
    src = _shell_word(hooks_json)
    if not packaged:
        config = output or default
        check = "portfwd check" + ("" if config == default else f" --config {_shell_word(config)}")
        write = "(done)" if output else f"(portfwd import {src} -o {config})"
        first = [f"  1. write the converted configuration to {config} {write}; {check}",
                 f"  2. portfwd install   (adds {hooks}/qemu.d/portfwd and the units; leaves"
                 f" {hooks}/qemu)"]
    else:  # the package's hooks read /etc/portfwd/forward.toml, which it ships
        if output in (None, default):
            write = "(done)" if output else (
                f"(portfwd import {src} -o {default} --force: it replaces the package's"
                " example, whose forwards are commented out; merge by hand instead if you"
                " added forwards there)")
        else:
            write = f"(cp {_shell_word(str(output))} {default}: the package's hooks read that file)"
        first = [f"  1. write the converted configuration to {default} {write}",
                 f"  2. portfwd check     (the Debian package installed {hooks}/qemu.d/portfwd"
                 " and the units: nothing to install)"]
    return [_INTRO, *first, *_rest(hooks, old, names)]


_INTRO = "to retire libvirt-hook-qemu without a moment without forwards:"


def _rest(hooks: str, old: str, names: str) -> List[str]:
    """Steps 3 to 6, the same for both kinds of install."""
    return [
        "  3. portfwd sync      (portfwd forwards the running guests now; its nat chain runs"
        " before iptables' PREROUTING and the first DNAT wins, so the old rules, still there,"
        " no longer see new connections)",
        f"  4. mv {hooks}/qemu {old} && systemctl restart libvirtd   (one command: libvirt looks"
        " for hooks only when it starts; running guests keep running and get portfwd's"
        " forwards again on reconnect. If that qemu script does more than forwarding, take"
        " only its forwarding out instead)",
        "  5. let the old hook remove its iptables rules, for every guest it knew (a guest"
        " without rules just makes iptables complain):",
        f"     for g in {names}; do {old} \"$g\" stopped end - </dev/null; done",
        "  6. check: portfwd status shows every forward active; iptables -t nat -S and"
        " iptables -S show no DNAT-*, SNAT-* or FWD-* chains left",
    ]


def _shell_word(text: str) -> str:
    import shlex

    return shlex.quote(text)
