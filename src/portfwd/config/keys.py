"""Every key forward.toml knows, in one table: ``config`` accepts exactly these keys,
and ``docs`` writes forward.toml(5) from the same rows, so the validator and the
manual page cannot drift apart. A leaf: data only, no imports but ``constants``.

Each row: the table it belongs in (``options``: ``[options]``; ``forward``: a
``[[forward]]``; ``port``: a port written as an inline table in ``ports``), the
key, its type, its default as TOML text (empty: none), an example value as TOML
text, and what it means.
"""

from __future__ import annotations

from portfwd.constants import DEFAULT_DISCOVER, DEFAULT_TABLE, DISCOVER_SOURCES, PROTOCOLS

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Tuple


def _toml_list(words: Tuple[str, ...]) -> str:
    return "[" + ", ".join(f'"{w}"' for w in words) + "]"


class Key:
    """One key of forward.toml."""

    __slots__ = ("section", "name", "type", "default", "example", "meaning")

    def __init__(self, section: str, name: str, type: str, default: str, example: str,
                 meaning: str) -> None:
        self.section = section
        self.name = name
        self.type = type
        self.default = default
        self.example = example
        self.meaning = meaning


SECTIONS = (
    ("options", "[options]", "Settings for every forward; the table and each of its keys"
     " are optional."),
    ("forward", "[[forward]]", "One table per guest, or several for the same guest. guest"
     " (or uuid) and ports are required."),
    ("port", "ports = [{ ... }]", "A port written as an inline table in ports, for what a"
     " string cannot say (TOML wants such a table on one line)."),
)

KEYS = (
    Key("options", "table", "string", f'"{DEFAULT_TABLE}"', '"portfwd"',
        "the nftables table (family inet) portfwd owns wholly: a letter, then letters,"
        " digits or _ (at most 64). A table of that name that portfwd did not make is never"
        " changed: portfwd check refuses the name."),
    Key("options", "listen", "list of strings", "[]", '["203.0.113.5", "eth0"]',
        "host addresses or interface names every forward answers on unless it says"
        " otherwise; [] means every local address. An interface stands for its addresses"
        " when the guest starts (or at sync, or the daemon's next reconcile)."),
    Key("options", "strict", "boolean", "false", "true",
        "true: a configuration or nftables error during the hook's prepare, start or started"
        " makes the hook fail, so libvirt does not start the guest. false: log and go on."),
    Key("options", "localhost", "boolean", "false", "true",
        "true: forwards also answer on 127.0.0.1 for the host's own connections (IPv4 only;"
        " the kernel cannot DNAT ::1)."),
    Key("options", "discover", "list of strings", _toml_list(DEFAULT_DISCOVER),
        _toml_list(DISCOVER_SOURCES),
        "where the addresses of a [[forward]] without ipv4 and ipv6 may be found, among "
        + ", ".join(f'"{s}"' for s in DISCOVER_SOURCES) + ". The guest itself answers"
        ' "agent" and "arp": list them only for guests you trust (used by sync and the'
        " daemon only)."),
    Key("options", "domain_forwards", "boolean", "false", "true",
        "true: forwards written in a domain's own XML (<metadata>, namespace"
        " urn:portfwd:forwards:1) count too, within domain_ports; forward.toml wins any"
        " conflict. false: domains' <metadata> is ignored."),
    Key("options", "domain_ports", "list of strings", "[]", '["10000-19999"]',
        "required with domain_forwards = true: the host ports (a port or \"FIRST-LAST\")"
        " that forwards in a domain's <metadata> may claim; anyone who can define a domain"
        " can claim only these."),
    Key("forward", "guest", "string", "", '"web1"',
        "the libvirt domain name (or uuid instead)."),
    Key("forward", "uuid", "string", "", '"5b0e1e4c-3f55-4c3b-9a0c-2f7c3b1c9d10"',
        "instead of guest: the domain's UUID, as virsh domuuid prints it (any case)."),
    Key("forward", "interface", "string", "", '"52:54:00:12:34:56"',
        "the MAC of the guest NIC whose addresses to find (default: the first NIC on a"
        " libvirt network); six octets, unicast, not all zero."),
    Key("forward", "ipv4", "string", "", '"192.168.122.10"',
        "the guest's IPv4 address; a family is forwarded only if its address is set, or"
        " found when both ipv4 and ipv6 are left out."),
    Key("forward", "ipv6", "string", "", '"fd00:122::10"',
        "the guest's IPv6 address. A value whose upper 64 bits are zero (\"::10\") is a"
        " suffix joined to the IPv6 prefix of the guest's network."),
    Key("forward", "ports", "list of port specs", "", '["8080:80", "5000-5010/udp", 443]',
        "what to forward, not empty: strings \"[HOST[-END]:]GUEST[-END][/tcp|udp|sctp]\","
        " numbers (the same port on both sides, tcp) or inline tables (below)."),
    Key("forward", "listen", "list of strings", "[options] listen", '["eth0"]',
        "overrides [options] listen for this entry's ports."),
    Key("forward", "from", "list of strings", "every source", '["198.51.100.0/24", "2001:db8::/32"]',
        "source allowlist (networks or single addresses, both families) for this entry's"
        " ports: other sources get no DNAT, and a family with no network in the list gets"
        " no forward at all. Not empty; the networks of one entry may not overlap."),
    Key("forward", "localhost", "boolean", "[options] localhost", "true",
        "overrides [options] localhost for this entry."),
    Key("port", "host", "integer or string", "guest", '"8000-8009"',
        "the host port, or a range \"FIRST-LAST\" as long as the guest's."),
    Key("port", "guest", "integer or string", "", "80", "the guest port or range (required)."),
    Key("port", "proto", "string", f'"{PROTOCOLS[0]}"', '"udp"',
        "the protocol: " + ", ".join(PROTOCOLS) + " (lower case)."),
    Key("port", "listen", "list of strings", "the entry's listen", '["203.0.113.5"]',
        "as listen above, for this port alone ([] means every address again)."),
    Key("port", "from", "list of strings", "the entry's from", '["198.51.100.0/24"]',
        "as from above, for this port alone."),
)


def names(section: str) -> Tuple[str, ...]:
    """The keys a table of ``section`` accepts, in the order messages list them."""
    return tuple(k.name for k in KEYS if k.section == section)
