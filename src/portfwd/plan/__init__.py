"""Pure planning, first step: configuration → bindings (``rules`` turns them into
nftables JSON, ``display`` into text).

Imports neither nftables nor libvirt, and nothing of portfwd's but constants at run
time: the hook imports it on every guest start.
The keys follow the maps of ``rules`` (see there): ``fwd``, ``any`` and ``src``.
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Dict, Iterable, List, Sequence, Tuple, Union

    from portfwd.config.model import Forward

    from portfwd.values import Target

    # a listen interface stands in a key as a ListenIface until resolve expands it;
    # the key ends with the protocol and the host port(s)
    KeyPart = Union[str, ListenIface, PortSpan]
    # a binding without its guest, as the compiled configuration stores it (marshal:
    # plain data), one dict per binding: "kind", "family", "match" (the key's parts
    # before the host ports: a listen interface "@NAME"), "ports" [first, last] (host),
    # "target" (an address, or "?mac=…" to discover: see values.py), "guest_port"
    # (the first), "where" ("forward[0].ports[2] 8080:80/tcp") and "entry"
    # ("forward[0].ports[2]")
    Template = Dict[str, Any]

from portfwd.constants import COMMENT_MAX
from portfwd.values import ListenIface, PortSpan, Selector, Value, key_part_from_text, target_from_text


class Binding(Value):
    """One host port of one forward, or one range of host ports forwarded to the
    same guest ports (the key ends with a ``PortSpan`` that is a range,
    ``guest_port`` is its first): a key and its DNAT target. ``entry`` names the configuration entry it comes from
    (``forward[0].ports[2]``; "" in state recorded by earlier versions); it counts in
    equality, as in the record (``record.Recorded.same``).

    A plain class, not a dataclass: the hook imports this module on every
    guest start, and ``dataclasses`` alone costs more than the start itself.
    """

    __slots__ = ("kind", "family", "key", "target", "guest_port", "guest", "comment", "entry")

    def __init__(self, kind: str, family: int, key: Tuple[KeyPart, ...], target: Target,
                 guest_port: int, guest: str, comment: str, entry: str = "") -> None:
        self.kind = kind  # "fwd", "any" or "src"
        self.family = family  # 4 or 6
        self.key = key
        self.target = target
        self.guest_port = guest_port  # the (first) guest port
        self.guest = guest
        self.comment = comment
        self.entry = entry

    def _fields(self) -> Tuple[Any, ...]:
        return (self.kind, self.family, self.key, self.target, self.guest_port, self.guest,
                self.comment, self.entry)

    @property
    def address(self) -> str:
        """The guest address (of a binding ``resolve`` made ready for the kernel)."""
        if isinstance(self.target, Selector):
            from portfwd.errors import BugError

            raise BugError(f"binding {self!r} has no address yet")
        return self.target

    def with_target(self, target: Target) -> "Binding":
        return Binding(self.kind, self.family, self.key, target, self.guest_port, self.guest,
                       self.comment, self.entry)

    def with_key(self, key: Tuple[KeyPart, ...]) -> "Binding":
        return Binding(self.kind, self.family, key, self.target, self.guest_port, self.guest,
                       self.comment, self.entry)

    @property
    def proto(self) -> str:
        return str(self.key[-2])

    @property
    def host_ports(self) -> PortSpan:
        """The host port, or the range kept as one element (the key's last part)."""
        ports = self.key[-1]
        if not isinstance(ports, PortSpan):
            from portfwd.errors import BugError

            raise BugError(f"binding {self!r}: its key does not end with its host ports")
        return ports

    @property
    def is_range(self) -> bool:
        """One element for a whole range (host port = guest port), in the ``range`` maps."""
        return self.host_ports.is_range

    @property
    def host_port(self) -> int:
        """The (first) host port."""
        return self.host_ports.first

    @property
    def guest_ports(self) -> PortSpan:
        """The guest port(s): a range keeps its ports."""
        return self.host_ports if self.is_range else PortSpan(self.guest_port)

    @property
    def listen(self) -> str:
        """The listen address, or ``*`` for every local address."""
        if self.kind == "any":
            return "*"
        daddr = str(self.key[0])
        if self.kind == "src":
            return "*" if daddr.endswith("/0") else daddr.split("/")[0]
        return daddr

    @property
    def via_loopback(self) -> bool:
        """Whether it listens on an IPv4 loopback address (127.0.0.0/8): DNAT from
        there needs ``route_localnet`` on the bridge the guest is on."""
        return self.family == 4 and self.listen.startswith("127.")

    @property
    def sources(self) -> str:
        return str(self.key[1]) if self.kind == "src" else "*"

    def to_json(self) -> List[Any]:
        """As recorded in /run/portfwd (``entry`` last: earlier versions wrote 7 fields)."""
        key = [p.to_json() if isinstance(p, PortSpan) else str(p) for p in self.key]
        return [self.kind, self.family, key, str(self.target), self.guest_port, self.guest,
                self.comment, self.entry]

    @classmethod
    def from_json(cls, raw: Sequence[Any]) -> "Binding":
        kind, family, key, target, port, guest, comment = raw[:7]
        entry = str(raw[7]) if len(raw) > 7 else ""
        parts = tuple(key_part_from_text(p) for p in key[:-1]) + (PortSpan.from_json(key[-1]),)
        return cls(str(kind), int(family), parts, target_from_text(str(target)), int(port),
                   str(guest), str(comment), entry)


def forwards_bindings(forwards: Iterable[Forward], guest_name: str) -> List[Binding]:
    return bind(templates(forwards), guest_name)


def templates(forwards: Iterable[Forward]) -> List[Template]:
    """The bindings of these forwards, not yet tied to a guest name: plain
    tuples, so that the compiled configuration the hook reads needs no parsing."""
    out: List[Template] = []
    for fwd in forwards:
        for pf in fwd.ports:
            entry = pf.where.path
            where = f"{entry} {pf.ports}"
            for family in fwd.families(pf):
                target = str(fwd.target(family))  # an address or "?mac=…"
                sources = [str(n) for n in pf.sources if n.version == family]
                # an interface name stands as "@NAME" until the hook finds its addresses
                listen = [f"@{a}" if isinstance(a, str) else str(a) for a in pf.listen
                          if isinstance(a, str) or a.version == family]
                rng = pf.ports
                if rng.count > 1 and rng.guest_first == rng.host_first:
                    # one interval element; the DNAT leaves the port as it is
                    pairs = [([rng.host_first, rng.host_last], rng.guest_first)]
                else:
                    pairs = [([host, host], guest) for host, guest in rng.pairs()]
                if family == 4 and pf.localhost:
                    if not pf.listen:  # every address: that one needs its own key
                        for ports, guest_port in pairs:
                            for match, kind in _matches(family, ["127.0.0.1"], sources,
                                                        rng.proto):
                                out.append({"kind": kind, "family": family, "match": match,
                                            "ports": ports, "target": target,
                                            "guest_port": guest_port, "where": where,
                                            "entry": entry})
                    else:
                        listen.append("127.0.0.1")
                for ports, guest_port in pairs:
                    for match, kind in _matches(family, listen, sources, rng.proto):
                        out.append({"kind": kind, "family": family, "match": match,
                                    "ports": ports, "target": target, "guest_port": guest_port,
                                    "where": where, "entry": entry})
    return out


def bind(items: Iterable[Template], guest_name: str) -> List[Binding]:
    """Templates tied to a guest; the comment names the guest and the config entry.
    The text a template carries becomes typed values here (values.py)."""
    comments: Dict[str, str] = {}
    out = []
    for t in items:
        where = t["where"]
        comment = comments.get(where)
        if comment is None:
            comment = comments[where] = _comment(f"{guest_name} {where}")
        match = t["match"]
        first = match[0]  # only a listen address can be an interface ("@eth0")
        parts: Tuple[KeyPart, ...] = (
            (key_part_from_text(first),) + tuple(match[1:])
            if first[:1] == "@" else tuple(match))
        out.append(Binding(t["kind"], t["family"], parts + (PortSpan(*t["ports"]),),
                           target_from_text(t["target"]), t["guest_port"], guest_name,
                           comment, t["entry"]))
    return out


def _matches(family: int, listen: List[str], sources: List[str], proto: str
             ) -> List[Tuple[List[str], str]]:
    """The key's parts before the host ports, and the kind of map they go in."""
    if sources:
        host_len = 32 if family == 4 else 128
        everywhere = "0.0.0.0/0" if family == 4 else "::/0"
        daddrs = [f"{a}/{host_len}" for a in listen] or [everywhere]
        return [([d, s, proto], "src") for d in daddrs for s in sources]
    if listen:
        return [([a, proto], "fwd") for a in listen]
    return [([proto], "any")]


def _comment(text: str) -> str:
    data = text.encode("utf-8")
    if len(data) <= COMMENT_MAX:
        return text
    return data[:COMMENT_MAX - 3].decode("utf-8", "ignore") + "..."

