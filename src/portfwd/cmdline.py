"""portfwd's command line grammar: every command, option and help text
(``parser``), and the checks of option values. ``cli`` dispatches what it parses;
``docs`` writes the manual page and the bash completion from it.
"""

from __future__ import annotations

import argparse

from portfwd.libvirt import libvirtapi
from portfwd.rundir import state

INTERVAL_MIN, INTERVAL_MAX = 0.05, 3600.0  # daemon --interval, seconds
TRACE_TIMEOUT_MIN, TRACE_TIMEOUT_MAX = 0.1, 600.0  # trace --timeout, seconds


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


def _libvirt_options(p: argparse.ArgumentParser) -> None:
    """--connect and --libvirt-status: where to learn which guests run."""
    p.add_argument("--connect", metavar="URI", default=libvirtapi.DEFAULT_URI,
                   help=f"libvirt connection URI (default: {libvirtapi.DEFAULT_URI})")
    p.add_argument("--libvirt-status", metavar="DIR",
                   help="read running domains from libvirt's status files in DIR instead of"
                        " asking libvirt (it is asked for at most 10 s, then /run/libvirt/qemu"
                        " is read)")


def parser() -> argparse.ArgumentParser:
    """portfwd's argument parser; the chosen command is ``command``."""
    from portfwd import __version__


    config_help = f"configuration file (default: ${state.ENV_CONFIG} or {state.DEFAULT_CONFIG})"
    # -c works before and after the command: the subcommands' copy leaves the value
    # given before the command alone unless given again
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-c", "--config", metavar="PATH", default=argparse.SUPPRESS,
                        help=config_help)
    top = argparse.ArgumentParser(
        prog="portfwd", description="Port forwarding for libvirt guests through one nftables table.",
        epilog="exit codes: 0 ok, 1 invalid configuration, 2 bad command line,"
               " 3 the host refused (nftables, libvirt, files), 4 internal error,"
               " 5 status: a forward is missing, differs, blocked or not applied; doctor: a layer"
               " is broken; trace: the probe was not delivered, 130 interrupted (Ctrl-C)",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    top.add_argument("--version", action="version", version=f"portfwd {__version__}")
    top.add_argument("-c", "--config", metavar="PATH", help=config_help)
    sub = top.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    p = sub.add_parser("check", parents=[common], help="validate the configuration",
                       description="Validate the configuration; every error as PATH:LINE:COL:"
                                   " message. Warns about forwards that would take a port a host"
                                   " service listens on, listen interfaces or addresses the host"
                                   " lacks, forwards that forward nothing, guests sharing an"
                                   " address, and what blocks forwarded traffic.")
    p.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    p.add_argument("--strict", action="store_true", help="fail (exit 1) on warnings too")
    p = sub.add_parser("sync", parents=[common], help="reconcile the table with running guests",
                       description="Make the table hold exactly the forwards of the guests"
                                   " libvirt reports running, in one transaction.")
    p.add_argument("--connect", metavar="URI", default=libvirtapi.DEFAULT_URI,
                   help=f"libvirt connection URI (default: {libvirtapi.DEFAULT_URI})")
    p.add_argument("--dry-run", action="store_true",
                   help="print what would be added, removed and kept; let nftables check the"
                        " batch, change nothing")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p = sub.add_parser("status", parents=[common], help="show forwards and whether they are live",
                       description="Show each forward: guest, protocol, listen -> target,"
                                   " sources, connections its DNAT counted, state. A configured"
                                   " forward nothing applied is \"guest not running\", or \"not"
                                   " applied\" when libvirt says the guest runs (its hook has not"
                                   " run). Exits 1 when the configuration is invalid, 2 for a"
                                   " GUEST not configured, 5 when a forward is missing, differs,"
                                   " is blocked or not applied.")
    p.add_argument("guest", nargs="*", metavar="GUEST", help="only these guests (default: all)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    _libvirt_options(p)
    p = sub.add_parser("show", parents=[common], help="print the configured forwards",
                       description="Print the forwards as the configuration says them, one line"
                                   " each: guest, protocol, listen -> target, sources. Reads the"
                                   " configuration alone (no root, no libvirt). Exits 1 when it is"
                                   " invalid, 2 for a GUEST not configured.")
    p.add_argument("guest", nargs="*", metavar="GUEST", help="only these guests (default: all)")
    p.add_argument("--json", action="store_true", help="a JSON list of {guest, family, proto,"
                                                        " listen, target, sources, entry}")
    p.add_argument("--names", action="store_true",
                   help="print the configured guests' names alone, one a line")
    p = sub.add_parser("doctor", parents=[common], help="find the first broken layer of a forward",
                       description="Walk the path of a forwarded packet (whether libvirt's"
                                   " AppArmor profile lets it run the hooks, forwarding, IPv6,"
                                   " guest, bridge, tap, MAC, address, neighbour, table, filter,"
                                   " host listener, hairpin, and a TCP connection from the host"
                                   " to the guest's port) and stop at the first broken layer,"
                                   " with its fix. Changes nothing. Exit 0 only when every layer"
                                   " passes (or no forward is configured), 2 for a GUEST not"
                                   " configured, 5 when one fails.")
    p.add_argument("guest", nargs="?", metavar="GUEST", help="one guest (default: every guest"
                                                             " with forwards)")
    p.add_argument("--json", action="store_true", help="a JSON list of {layer, guest, ok,"
                                                        " detail, fix, skipped}")
    _libvirt_options(p)
    p = sub.add_parser("trace", parents=[common], help="follow one probe through the forward",
                       description="Send one probe (a TCP SYN or a UDP datagram) to a forward"
                                   " with nftables tracing on for it alone, and print table by"
                                   " table, chain by chain the verdicts it met, up to where it"
                                   " was delivered or dropped. Exit 0 when it reached the guest's"
                                   " bridge, 5 otherwise.")
    p.add_argument("guest", metavar="GUEST", help="the guest (libvirt domain name) whose"
                                                  " applied forward to probe")
    p.add_argument("port", metavar="PORT", type=_probe_port,
                   help="the forwarded host port, 1 to 65535")
    p.add_argument("--proto", choices=("tcp", "udp"), default="tcp",
                   help="the forward's protocol (default tcp); sctp forwards cannot be traced:"
                        " the probe is a TCP SYN or a UDP datagram")
    p.add_argument("--from", dest="source", metavar="ADDR", type=_probe_source,
                   help="the probe's source address: not one of the host's, the probe enters"
                        " like a client's packet (prerouting, forward); one of the host's, it"
                        " is the host's own connection (output). Default: 192.0.2.1 / 2001:db8::1"
                        " (documentation addresses)")
    p.add_argument("-6", dest="family", action="store_const", const=6, default=4,
                   help="probe the IPv6 forward (default IPv4)")
    p.add_argument("--timeout", type=_probe_timeout, default=2.0, metavar="SECONDS",
                   help="how long to follow the probe (default 2)")
    from portfwd.commands.editcmd import add_parsers

    add_parsers(sub, common)
    p = sub.add_parser("flush", parents=[common], help="remove everything portfwd installed",
                       description="Remove portfwd's nftables tables, its accepts in"
                                   " libvirt's chains (iptables and nftables backends) and its"
                                   " recorded state. Works with a broken configuration too.")
    p = sub.add_parser("daemon", parents=[common],
                       help="apply forwards on libvirt events, lease and config changes",
                       description="Keep the table in step with libvirt's guests, their DHCP"
                                   " leases and the configuration: reconnects to libvirtd,"
                                   " applies a valid edit of the configuration within 2 s,"
                                   " logs an invalid one and keeps the rules. A lease change"
                                   " reconciles at most once per --interval. Between reconciles"
                                   " it puts back portfwd's table and its drop rule for outside"
                                   " packets to 127.0.0.0/8 when they are gone, and applies a"
                                   " discovered address once the kernel shows it is its NIC's.")
    p.add_argument("--connect", metavar="URI", default=libvirtapi.DEFAULT_URI,
                   help=f"libvirt connection URI (default: {libvirtapi.DEFAULT_URI})")
    p.add_argument("--interval", type=_interval, default=0.5, metavar="SECONDS",
                   help="how often to look at the configuration and lease files (default 0.5;"
                        f" {INTERVAL_MIN} to {INTERVAL_MAX:g})")
    p = sub.add_parser("reapply",
                       help="re-apply recorded forwards (after nft flush ruleset, firewall reloads)",
                       description="Rebuild portfwd's table and its accepts in libvirt's chains"
                                   f" from what {state.DEFAULT_RUN_DIR} records, without asking"
                                   " libvirt and without reading the configuration.")
    p = sub.add_parser("install", help="install the hooks, example config, units, link and"
                                       " manual pages (pip install)",
                       description="Install the libvirt hooks (qemu and network), an example"
                                   " configuration (if none exists), the portfwd link, the"
                                   " systemd units, the manual pages and the bash completion:"
                                   " the set-up of a pip install. Refuses where the Debian package portfwd is"
                                   " installed (it has done all this), unless --force.")
    p.add_argument("--root", default="/", metavar="DIR", help="install below DIR (default: /)")
    p.add_argument("-c", "--config", metavar="PATH", default=argparse.SUPPRESS,
                   help=f"configuration the hooks read (default: {state.DEFAULT_CONFIG})")
    p.add_argument("--run-dir", metavar="DIR",
                   help=f"state directory of the hooks (default: {state.DEFAULT_RUN_DIR})")
    p.add_argument("--force", action="store_true",
                   help="install even where the Debian package portfwd is installed")
    p = sub.add_parser("uninstall", parents=[common],
                       help="remove what install put in place and every rule portfwd made",
                       description="Stop and disable the units, remove portfwd's tables, its"
                                   " accepts in libvirt's chains and its state, the hooks, the"
                                   " units and the portfwd link. The configuration stays unless"
                                   " --purge. Files are looked for below --root; rules are"
                                   " removed from the running system.")
    p.add_argument("--root", default="/", metavar="DIR", help="installed below DIR (default: /)")
    p.add_argument("--purge", action="store_true", help="remove the configuration file too")
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
    return top
