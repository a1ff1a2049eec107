"""Pure planning: configuration + guests → bindings → nftables JSON commands.

Imports neither nftables nor libvirt. The table layout, per family F (4, 6):

- ``fwdF_ip``/``fwdF_port``: listen address . protocol . port → guest address / port
- ``anyF_ip``/``anyF_port``: protocol . port → …, for forwards on every local address
- ``srcF_ip``/``srcF_port``: listen prefix . source prefix . protocol . port → …,
  interval maps for forwards with a ``from`` list (listen 0/0 = every address)
- ``fwdF_range``, ``anyF_range``, ``srcF_range``: the same keys with a port
  *interval* → guest address only, for ranges whose host and guest ports are
  equal: one element per range, and the DNAT keeps the destination port

One rule per map pair (and one per range map) in chain ``prerouting`` DNATs
through them, so the cost per packet does not grow with the number of
forwards. nftables 1.0.6 cannot declare a map with a concatenated value
through JSON, hence the address and port maps side by side. It cannot shift a
port range either (the kernel's NAT port offset, iptables' ``DNAT
--to-destination A:B-C/BASE``), so a range whose guest ports differ from its
host ports is stored port by port (``portspec.SHIFTED_MAX`` ports at most).
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Dict, Iterable, List, Sequence, Tuple, Union

    from .model import Config, Forward, Guest

    KeyPart = Union[str, int]
    Command = Dict[str, Any]
    # a binding without its guest: (kind, family, key, target, port, where); the key
    # ends with the host port, or with "FIRST-LAST" for a range kept as one element
    Template = Tuple[str, int, Tuple[KeyPart, ...], str, int, str]

from .constants import COMMENT_MAX, HAIRPIN_SET, KINDS, MARK, PRIORITY, PROTOCOLS, TABLE_COMMENT

class Binding:
    """One host port of one forward, or one range of host ports forwarded to the
    same guest ports (the key ends with ``"FIRST-LAST"``, ``port`` is FIRST): a
    key and its DNAT target.

    A plain class, not a dataclass: the hook imports this module on every
    guest start, and ``dataclasses`` alone costs more than the start itself.
    """

    __slots__ = ("kind", "family", "key", "target", "port", "guest", "comment")

    def __init__(self, kind: str, family: int, key: Tuple[KeyPart, ...], target: str, port: int,
                 guest: str, comment: str) -> None:
        self.kind = kind  # "fwd", "any" or "src"
        self.family = family  # 4 or 6
        self.key = key
        self.target = target
        self.port = port
        self.guest = guest
        self.comment = comment

    def _fields(self) -> Tuple[Any, ...]:
        return (self.kind, self.family, self.key, self.target, self.port, self.guest, self.comment)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Binding) and self._fields() == other._fields()

    def __hash__(self) -> int:
        return hash(self._fields())

    def __repr__(self) -> str:
        return f"Binding{self._fields()!r}"

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
        return int(last.partition("-")[0]) if isinstance(last, str) else int(last)

    @property
    def host_ports(self) -> str:
        """``"80"`` or ``"1024-65535"``."""
        return str(self.key[-1])

    @property
    def guest_ports(self) -> str:
        """The guest port(s): a range keeps its ports."""
        return str(self.key[-1]) if self.is_range else str(self.port)

    def span(self) -> Tuple[int, int]:
        """(first, last) host port."""
        first, _, last = str(self.key[-1]).partition("-")
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
    def sources(self) -> str:
        return str(self.key[1]) if self.kind == "src" else "*"

    def to_json(self) -> List[Any]:
        return [self.kind, self.family, list(self.key), self.target, self.port, self.guest, self.comment]

    @classmethod
    def from_json(cls, raw: Sequence[Any]) -> "Binding":
        kind, family, key, target, port, guest, comment = raw
        return cls(str(kind), int(family), tuple(key), str(target), int(port), str(guest), str(comment))


def guest_bindings(config: Config, guest: Guest) -> List[Binding]:
    """Every binding the configuration asks for this guest."""
    return bind(templates(config.forwards_for(guest.name, guest.uuid)), guest.name)


def forwards_bindings(forwards: Iterable[Forward], guest_name: str) -> List[Binding]:
    return bind(templates(forwards), guest_name)


def templates(forwards: Iterable[Forward]) -> List[Template]:
    """The bindings of these forwards, not yet tied to a guest name: plain
    tuples, so that the compiled configuration the hook reads needs no parsing."""
    from .model import families_of

    out: List[Template] = []
    for fwd in forwards:
        for pf in fwd.ports:
            where = f"{pf.where.path} {pf.ports}"
            for family in families_of(fwd, pf):
                target = str(fwd.target(family))
                sources = [str(n) for n in pf.sources if n.version == family]
                # an interface name stands as "@NAME" until the hook finds its addresses
                listen = [f"@{a}" if isinstance(a, str) else str(a) for a in pf.listen
                          if isinstance(a, str) or a.version == family]
                rng = pf.ports
                if rng.count > 1 and rng.guest_first == rng.host_first:
                    # one interval element; the DNAT leaves the port as it is
                    pairs: List[Tuple[KeyPart, int]] = [(f"{rng.host_first}-{rng.host_last}",
                                                          rng.guest_first)]
                else:
                    pairs = list(rng.pairs())
                if family == 4 and pf.localhost:
                    if not pf.listen:  # every address: that one needs its own key
                        for host_port, guest_port in pairs:
                            for key, kind in _keys(family, ["127.0.0.1"], sources,
                                                   rng.proto, host_port):
                                out.append((kind, family, key, target, guest_port, where))
                    else:
                        listen.append("127.0.0.1")
                for host_port, guest_port in pairs:
                    for key, kind in _keys(family, listen, sources, rng.proto, host_port):
                        out.append((kind, family, key, target, guest_port, where))
    return out


def bind(items: Iterable[Template], guest_name: str) -> List[Binding]:
    """Templates tied to a guest; the comment names the guest and the config entry."""
    comments: Dict[str, str] = {}
    out = []
    for kind, family, key, target, port, where in items:
        comment = comments.get(where)
        if comment is None:
            comment = comments[where] = _comment(f"{guest_name} {where}")
        out.append(Binding(kind, family, tuple(key), target, port, guest_name, comment))
    return out


def _keys(family: int, listen: List[str], sources: List[str], proto: str,
          port: KeyPart) -> List[Tuple[Tuple[KeyPart, ...], str]]:
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


# -- nftables JSON ---------------------------------------------------------

def _addr_type(family: int) -> str:
    return "ipv4_addr" if family == 4 else "ipv6_addr"


def map_name(kind: str, family: int, what: str) -> str:
    return f"{kind}{family}_{what}"


def _key_types(kind: str, family: int) -> List[str]:
    addr = _addr_type(family)
    if kind == "src":
        return [addr, addr, "inet_proto", "inet_service"]
    if kind == "fwd":
        return [addr, "inet_proto", "inet_service"]
    return ["inet_proto", "inet_service"]


def _key_exprs(kind: str, family: int) -> List[Dict[str, Any]]:
    proto = "ip" if family == 4 else "ip6"
    daddr = {"payload": {"protocol": proto, "field": "daddr"}}
    saddr = {"payload": {"protocol": proto, "field": "saddr"}}
    tail = [{"meta": {"key": "l4proto"}}, {"payload": {"protocol": "th", "field": "dport"}}]
    if kind == "src":
        return [daddr, saddr] + tail
    if kind == "fwd":
        return [daddr] + tail
    return tail


def skeleton(table: str, ipv6: bool = True) -> List[Command]:
    """Commands that (re)create the table, maps, chains and rules; safe to rerun.

    - ``prerouting`` (nat): DNAT of connections arriving from elsewhere;
    - ``output`` (nat): the same for connections the host itself opens, never
      catching its loopback traffic (127.0.0.1 only for ``localhost`` keys);
    - ``postrouting`` (nat): masquerade of hairpin connections (in and out of
      the same bridge: another guest, or a guest reaching its own forward) and
      of connections from 127.0.0.1, nothing else;
    - ``raw_prerouting``: drops packets to 127.0.0.0/8 that arrive from
      outside, as ``route_localnet`` would otherwise let them in.
    ``ipv6 = False`` leaves IPv6 out, for kernels without IPv6.
    """
    families = (4, 6) if ipv6 else (4,)
    cmds: List[Command] = [{"add": {"table": {"family": "inet", "name": table,
                                              "comment": TABLE_COMMENT}}}]
    for family in families:
        for kind in KINDS:
            for what, value_type in (("ip", _addr_type(family)), ("port", "inet_service"),
                                     ("range", _addr_type(family))):
                spec: Dict[str, Any] = {"family": "inet", "table": table,
                                        "name": map_name(kind, family, what),
                                        "type": _key_types(kind, family), "map": value_type}
                if kind == "src" or what == "range":
                    spec["flags"] = ["interval"]
                cmds.append({"add": {"map": spec}})
    cmds.append({"add": {"set": {"family": "inet", "table": table, "name": HAIRPIN_SET,
                                 "type": ["ifname", "ifname"]}}})
    chains = [("prerouting", "nat", "prerouting", PRIORITY),
              ("output", "nat", "output", PRIORITY),
              ("postrouting", "nat", "postrouting", 100 - 5),  # before srcnat (100)
              ("raw_prerouting", "filter", "prerouting", -300)]
    for name, kind_, hook, prio in chains:
        chain = {"family": "inet", "table": table, "name": name}
        cmds.append({"add": {"chain": dict(chain, type=kind_, hook=hook, prio=prio,
                                           policy="accept")}})
        cmds.append({"flush": {"chain": chain}})

    def rule(chain: str, expr: List[Dict[str, Any]], comment: str) -> Command:
        return {"add": {"rule": {"family": "inet", "table": table, "chain": chain,
                                 "expr": expr, "comment": comment}}}

    for family in families:
        # single ports first, as before; a range and a single port never share a port
        # (the configuration refuses that), so the order decides nothing else
        for kind, ranges in [(k, False) for k in KINDS] + [(k, True) for k in KINDS]:
            name = f"{kind}{family}" + (" ranges" if ranges else "")
            build = _range_rule if ranges else _dnat_rule
            cmds.append(rule("prerouting", build(kind, family), f"portfwd {name}"))
            out = build(kind, family)
            if kind != "fwd":  # only keys naming 127.0.0.1 itself reach loopback
                out.insert(1, _not_loopback(family))
            cmds.append(rule("output", out, f"portfwd {name} from the host"))
    mark = {"ct": {"key": "mark"}}
    ours = {"match": {"op": "==", "left": {"&": [mark, MARK]}, "right": MARK}}
    cmds.append(rule("postrouting", [
        ours,
        {"match": {"op": "==", "left": {"concat": [{"meta": {"key": "iifname"}},
                                                    {"meta": {"key": "oifname"}}]},
                   "right": "@" + HAIRPIN_SET}},
        {"masquerade": None}], "portfwd hairpin: back out of the bridge it came from"))
    cmds.append(rule("postrouting", [
        ours,
        {"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "saddr"}},
                   "right": {"prefix": {"addr": "127.0.0.0", "len": 8}}}},
        {"masquerade": None}], "portfwd localhost"))
    cmds.append(rule("raw_prerouting", [
        {"match": {"op": "!=", "left": {"meta": {"key": "iifname"}}, "right": "lo"}},
        {"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "daddr"}},
                   "right": {"prefix": {"addr": "127.0.0.0", "len": 8}}}},
        {"drop": None}], "portfwd: loopback addresses are not reachable from outside"))
    return cmds


def _not_loopback(family: int) -> Dict[str, Any]:
    if family == 4:
        return {"match": {"op": "!=", "left": {"payload": {"protocol": "ip", "field": "daddr"}},
                          "right": {"prefix": {"addr": "127.0.0.0", "len": 8}}}}
    return {"match": {"op": "!=", "left": {"payload": {"protocol": "ip6", "field": "daddr"}},
                      "right": "::1"}}


def hairpin(table: str, bridges: Sequence[str]) -> List[Command]:
    """Make the hairpin set hold exactly these bridges (``BRIDGE . BRIDGE``)."""
    where = {"family": "inet", "table": table, "name": HAIRPIN_SET}
    cmds: List[Command] = [{"flush": {"set": where}}]
    if bridges:
        cmds.append({"add": {"element": dict(where, elem=[{"concat": [b, b]}
                                                          for b in sorted(bridges)])}})
    return cmds


def _dnat_rule(kind: str, family: int) -> List[Dict[str, Any]]:
    exprs = _key_exprs(kind, family)
    key = exprs[0] if len(exprs) == 1 else {"concat": exprs}
    mark = {"ct": {"key": "mark"}}
    return [
        {"match": {"op": "==", "left": {"meta": {"key": "nfproto"}},
                   "right": "ipv4" if family == 4 else "ipv6"}},
        {"match": {"op": "==", "left": {"fib": {"result": "type", "flags": ["daddr"]}},
                   "right": "local"}},
        # nft accepts a port mapping only after a transport protocol match
        {"match": {"op": "==", "left": {"meta": {"key": "l4proto"}},
                   "right": {"set": list(PROTOCOLS)}}},
        # only connections that hit a map get the mark, which libvirt's chains let through
        {"match": {"op": "==", "left": key, "right": "@" + map_name(kind, family, "port")}},
        {"mangle": {"key": mark, "value": {"|": [mark, MARK]}}},
        {"dnat": {"family": "ip" if family == 4 else "ip6",
                  "addr": {"map": {"key": key, "data": "@" + map_name(kind, family, "ip")}},
                  "port": {"map": {"key": key, "data": "@" + map_name(kind, family, "port")}}}},
    ]


def _range_rule(kind: str, family: int) -> List[Dict[str, Any]]:
    """DNAT to the address of an equal-port range; the destination port stays.
    The map lookup comes before ``fib``: a packet no range matches skips the
    route lookup."""
    exprs = _key_exprs(kind, family)
    key = exprs[0] if len(exprs) == 1 else {"concat": exprs}
    mark = {"ct": {"key": "mark"}}
    return [
        {"match": {"op": "==", "left": {"meta": {"key": "nfproto"}},
                   "right": "ipv4" if family == 4 else "ipv6"}},
        {"match": {"op": "==", "left": {"meta": {"key": "l4proto"}},
                   "right": {"set": list(PROTOCOLS)}}},
        {"match": {"op": "==", "left": key, "right": "@" + map_name(kind, family, "range")}},
        {"match": {"op": "==", "left": {"fib": {"result": "type", "flags": ["daddr"]}},
                   "right": "local"}},
        {"mangle": {"key": mark, "value": {"|": [mark, MARK]}}},
        {"dnat": {"family": "ip" if family == 4 else "ip6",
                  "addr": {"map": {"key": key, "data": "@" + map_name(kind, family, "range")}}}},
    ]


def _key_json(b: Binding) -> Dict[str, Any]:
    parts: List[Any] = []
    for i, part in enumerate(b.key):
        if b.kind == "src" and i < 2:
            addr, _, length = str(part).partition("/")
            parts.append({"prefix": {"addr": addr, "len": int(length)}})
        elif isinstance(part, str) and i == len(b.key) - 1:  # "FIRST-LAST"
            first, last = b.span()
            parts.append({"range": [first, last]})
        else:
            parts.append(part)
    return {"concat": parts}


def _elements(table: str, bindings: Iterable[Binding], op: str) -> List[Command]:
    """One command per map, carrying all its elements."""
    grouped: Dict[str, List[Any]] = {}
    for b in bindings:
        key = _key_json(b)
        values: Tuple[Tuple[str, Any], ...] = ((("range", b.target),) if b.is_range
                                               else (("ip", b.target), ("port", b.port)))
        for what, value in values:
            name = map_name(b.kind, b.family, what)
            if op == "delete":
                grouped.setdefault(name, []).append(key)
            else:
                grouped.setdefault(name, []).append([{"elem": {"val": key, "comment": b.comment}}, value])
    return [{op: {"element": {"family": "inet", "table": table, "name": name, "elem": elems}}}
            for name, elems in sorted(grouped.items())]


def guest_update(table: str, old: Sequence[Binding], new: Sequence[Binding]) -> List[Command]:
    """Drop ``old`` bindings no longer wanted, ensure ``new`` (the table's layout
    must exist: prefix ``skeleton(table)`` when unsure).

    Dropping adds the element first, so a binding already gone is no error.
    """
    wanted = set(new)
    gone = [b for b in old if b not in wanted]
    return (_elements(table, gone, "add") + _elements(table, gone, "delete")
            + _elements(table, new, "add"))


def full_rebuild(table: str, bindings: Sequence[Binding]) -> List[Command]:
    """One transaction: the table holds exactly ``bindings`` afterwards."""
    flushes = [{"flush": {"map": {"family": "inet", "table": table, "name": map_name(k, f, w)}}}
               for f in (4, 6) for k in KINDS for w in ("ip", "port", "range")]
    return skeleton(table) + flushes + _elements(table, bindings, "add")


def drop_table(table: str) -> List[Command]:
    """One transaction removing the table; no error when it is absent."""
    t = {"family": "inet", "name": table}
    return [{"add": {"table": t}}, {"delete": {"table": t}}]


def parse_selector(target: str) -> Tuple[str, str]:
    """``?mac=M&suffix=S`` → (M, S); either may be empty (M empty: the first NIC)."""
    fields = dict(part.partition("=")[::2] for part in target[1:].split("&"))
    return fields.get("mac", ""), fields.get("suffix", "")


def target_text(target: str, family: int, port: Union[int, str]) -> str:
    """``192.0.2.1:80``, ``[2001:db8::1]:80``, or what a discovered address will be."""
    if target.startswith("?"):
        mac, suffix = parse_selector(target)
        what = f"IPv{family} of {mac or 'the first NIC'}" + (f", suffix {suffix}" if suffix else "")
        return f"<{what}>:{port}"
    return f"[{target}]:{port}" if family == 6 else f"{target}:{port}"


def describe(bindings: Sequence[Binding]) -> List[str]:
    """Human-readable lines, one per binding, for --dry-run."""
    lines = []
    for b in sorted(bindings, key=lambda b: (b.guest, b.family, b.proto, b.host_port, b.listen)):
        target = target_text(b.target, b.family, b.guest_ports)
        lines.append(f"{b.guest}\t{b.proto}\t{listen_text(b)} -> {target}\tfrom {b.sources}"
                     f"\t# {b.comment}")
    return lines


def listen_text(b: Binding) -> str:
    listen = b.listen
    if listen == "*":
        listen = "*" if b.family == 4 else "[*]"
    elif b.family == 6:
        listen = f"[{listen}]"
    return f"{listen}:{b.host_ports}"


