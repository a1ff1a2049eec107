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

    from .model import Forward

    from .values import Target

    # a listen interface stands in a key as a ListenIface until resolve expands it
    KeyPart = Union[str, int, ListenIface]
    # a binding without its guest, as the compiled configuration stores it (marshal:
    # plain data): (kind, family, key, target, port, where, entry); the key ends with
    # the host port, or with "FIRST-LAST" for a range kept as one element; a listen
    # interface in the key is "@NAME", a target to discover "?mac=…" (see values.py);
    # where = "forward[0].ports[2] 8080:80/tcp", entry = "forward[0].ports[2]"
    Template = Tuple[str, int, Tuple[Union[str, int], ...], str, int, str, str]

from .constants import COMMENT_MAX
from .values import ListenIface, Selector, Value, key_part_from_text, target_from_text


class Binding(Value):
    """One host port of one forward, or one range of host ports forwarded to the
    same guest ports (the key ends with ``"FIRST-LAST"``, ``guest_port`` is FIRST):
    a key and its DNAT target. ``entry`` names the configuration entry it comes from
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
            from .errors import BugError

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
    def is_range(self) -> bool:
        """One element for a whole range (host port = guest port), in the ``range`` maps."""
        return isinstance(self.key[-1], str)

    @property
    def host_port(self) -> int:
        """The (first) host port."""
        last = self.key[-1]
        return last if isinstance(last, int) else int(str(last).partition("-")[0])

    @property
    def host_ports(self) -> str:
        """``"80"`` or ``"1024-65535"``."""
        return str(self.key[-1])

    @property
    def guest_ports(self) -> str:
        """The guest port(s): a range keeps its ports."""
        return str(self.key[-1]) if self.is_range else str(self.guest_port)

    def span(self) -> Tuple[int, int]:
        """(first, last) host port."""
        port = self.key[-1]
        if isinstance(port, int):
            return port, port
        first, _, last = str(port).partition("-")
        return int(first), int(last or first)

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
        key = [str(p) if isinstance(p, ListenIface) else p for p in self.key]
        return [self.kind, self.family, key, str(self.target), self.guest_port, self.guest,
                self.comment, self.entry]

    @classmethod
    def from_json(cls, raw: Sequence[Any]) -> "Binding":
        kind, family, key, target, port, guest, comment = raw[:7]
        entry = str(raw[7]) if len(raw) > 7 else ""
        return cls(str(kind), int(family), tuple(key_part_from_text(p) for p in key),
                   target_from_text(str(target)), int(port), str(guest), str(comment), entry)


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
                    pairs: List[Tuple[Union[str, int], int]] = [(f"{rng.host_first}-{rng.host_last}",
                                                          rng.guest_first)]
                else:
                    pairs = list(rng.pairs())
                if family == 4 and pf.localhost:
                    if not pf.listen:  # every address: that one needs its own key
                        for host_port, guest_port in pairs:
                            for key, kind in _keys(family, ["127.0.0.1"], sources,
                                                   rng.proto, host_port):
                                out.append((kind, family, key, target, guest_port, where,
                                            entry))
                    else:
                        listen.append("127.0.0.1")
                for host_port, guest_port in pairs:
                    for key, kind in _keys(family, listen, sources, rng.proto, host_port):
                        out.append((kind, family, key, target, guest_port, where, entry))
    return out


def bind(items: Iterable[Template], guest_name: str) -> List[Binding]:
    """Templates tied to a guest; the comment names the guest and the config entry.
    The text a template carries becomes typed values here (values.py)."""
    comments: Dict[str, str] = {}
    out = []
    for kind, family, key, target, port, where, entry in items:
        comment = comments.get(where)
        if comment is None:
            comment = comments[where] = _comment(f"{guest_name} {where}")
        first = key[0]  # only a listen address can be an interface ("@eth0")
        parts: Tuple[KeyPart, ...] = (
            (key_part_from_text(first),) + tuple(key[1:])
            if isinstance(first, str) and first[:1] == "@" else tuple(key))
        out.append(Binding(kind, family, parts, target_from_text(target), port, guest_name,
                           comment, entry))
    return out


def _keys(family: int, listen: List[str], sources: List[str], proto: str,
          port: Union[str, int]) -> List[Tuple[Tuple[Union[str, int], ...], str]]:
    if sources:
        host_len = 32 if family == 4 else 128
        everywhere = "0.0.0.0/0" if family == 4 else "::/0"
        daddrs = [f"{a}/{host_len}" for a in listen] or [everywhere]
        return [((d, s, proto, port), "src") for d in daddrs for s in sources]
    if listen:
        return [((a, proto, port), "fwd") for a in listen]
    return [((proto, port), "any")]


def _comment(text: str) -> str:
    data = text.encode("utf-8")
    if len(data) <= COMMENT_MAX:
        return text
    return data[:COMMENT_MAX - 3].decode("utf-8", "ignore") + "..."

