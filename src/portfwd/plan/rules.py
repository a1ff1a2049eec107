"""Pure planning, second step: bindings → nftables JSON commands, through small
builders that return data (only ``nft.py`` executes). ``skeleton`` builds the
table; a change to what it builds needs a new ``constants.LAYOUT`` (tests/test_rules.py
holds a golden copy). The table, per family F (4, 6):

- ``fwdF_ip``/``fwdF_port``: listen address . protocol . port → guest address / port
- ``anyF_ip``/``anyF_port``: protocol . port → …, for forwards on every local address
- ``srcF_ip``/``srcF_port``: listen prefix . source prefix . protocol . port → …,
  interval maps for forwards with a ``from`` list (listen 0/0 = every address)
- or, in the ``concat`` variant, ``fwdF_to``, ``anyF_to``, ``srcF_to`` in their
  place (the same keys → guest address . guest port: one map, one lookup) and
  ``fwdF_keys``, ``anyF_keys``, ``srcF_keys``: their keys alone (sets)
- ``fwdF_range``, ``anyF_range``, ``srcF_range``: the same keys with a port
  *interval* → guest address only, for ranges whose host and guest ports are
  equal: one element per range, and the DNAT keeps the destination port;
  ``fwdF_rkeys``, ``anyF_rkeys``, ``srcF_rkeys``: the same keys alone (a set),
  which the range rule tests before it marks the connection
- ``hairpin``: the bridges whose hairpin connections are masqueraded
- ``managed_by_portfwd``: an empty set whose comment marks the table as portfwd's
  (``constants.MARKER_SET``; the table carries the same comment)

The ``ip`` and ``range`` maps carry a counter per element, which is what
``portfwd status`` shows per forward (the ``to`` maps in the ``concat``
variant). Each is looked up exactly once per connection that portfwd DNATs
(the membership tests before the mark use the ``port`` maps, the ``keys`` and
the ``rkeys`` sets, which count nothing), and only the first
packet of a connection passes a nat chain: the counters count connections
(and the bytes of their first packets) at no cost to the packets that follow.

One rule per map pair (and one per range map) in chain ``prerouting`` DNATs
through them, so the cost per packet does not grow with the number of
forwards. nftables 1.0.6 cannot declare a map with a concatenated value
through JSON, hence the address and port maps side by side (``split``, the
variant it gets); where nftables can (1.1), the ``concat`` variant holds one
map per kind instead (``nft.Nft.concat_values`` probes it). The builders take
the variant the table was built with. nftables 1.0.6 cannot shift a
port range either (the kernel's NAT port offset, iptables' ``DNAT
--to-destination A:B-C/BASE``), so a range whose guest ports differ from its
host ports is stored port by port (``portspec.SHIFTED_MAX`` ports at most).
"""

from __future__ import annotations

from enum import Enum

from portfwd.constants import (GUARD_CHAIN, GUARD_COMMENT, HAIRPIN_MARK, HAIRPIN_SET, KINDS, MARK,
                        MARKER_SET, PRIORITY, PROTOCOLS, TABLE_COMMENT)

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Dict, Iterable, List, Sequence, Tuple

    from portfwd.plan import Binding

    Command = Dict[str, Any]


def _addr_type(family: int) -> str:
    return "ipv4_addr" if family == 4 else "ipv6_addr"


def map_name(kind: str, family: int, what: str) -> str:
    return f"{kind}{family}_{what}"


class Variant(Enum):
    """The table's variants (see above); the value is how layout.TABLE names one."""

    SPLIT = "split"
    CONCAT = "concat"


SPLIT, CONCAT = Variant.SPLIT, Variant.CONCAT
VARIANTS = (SPLIT, CONCAT)
# the maps of single ports per variant, and the key sets (beside "rkeys" of the ranges)
_SINGLE = {SPLIT: ("ip", "port"), CONCAT: ("to",)}
_KEY_SETS = {SPLIT: ("rkeys",), CONCAT: ("keys", "rkeys")}

# every map of either variant: name → (kind, family, what)
MAPS = {map_name(k, f, w): (k, f, w) for f in (4, 6) for k in KINDS
        for w in ("ip", "port", "range", "to")}
# the maps whose elements count the connections they DNAT (see the module's docstring)
COUNTED = ("ip", "range", "to")
# the key sets of either variant: name → (kind, family, what)
KEY_SETS = {map_name(k, f, w): (k, f, w) for f in (4, 6) for k in KINDS for w in ("keys", "rkeys")}


def maps_of(variant: Variant) -> List[str]:
    """The names of every map the ``variant`` table holds (both families)."""
    whats = _SINGLE[variant] + ("range",)
    return [name for name, (_, _, w) in MAPS.items() if w in whats]


def sets_of(variant: Variant) -> List[str]:
    """The names of the key sets the ``variant`` table holds (both families)."""
    return [name for name, (_, _, w) in KEY_SETS.items() if w in _KEY_SETS[variant]]


def _value_type(family: int, what: str) -> Any:
    if what == "port":
        return "inet_service"
    if what == "to":
        return [_addr_type(family), "inet_service"]
    return _addr_type(family)


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


def skeleton(table: str, ipv6: bool = True, variant: Variant = SPLIT) -> List[Command]:
    """Commands that (re)create the table, maps, chains and rules; safe to rerun.

    - ``prerouting`` (nat): DNAT of connections arriving from elsewhere;
    - ``output`` (nat): the same for connections the host itself opens, never
      catching its loopback traffic (127.0.0.1 only for ``localhost`` keys);
    - ``forward`` (filter): marks hairpin connections (in and out of the same
      bridge: another guest, or a guest reaching its own forward) with
      ``HAIRPIN_MARK``; here, unlike in postrouting, both interfaces are known
      also where br_netfilter bridges the DNATed packet instead of routing it;
    - ``postrouting`` (nat): masquerade of those marked connections and of
      connections from 127.0.0.1, nothing else;
    - ``raw_prerouting``: drops packets to 127.0.0.0/8 that arrive from
      outside, as ``route_localnet`` would otherwise let them in.
    ``ipv6 = False`` leaves IPv6 out, for kernels without IPv6. ``variant``:
    ``SPLIT`` (address and port maps side by side) or ``CONCAT`` (one map).
    """
    families = (4, 6) if ipv6 else (4,)
    cmds: List[Command] = [{"add": {"table": {"family": "inet", "name": table,
                                              "comment": TABLE_COMMENT}}}]
    for family in families:
        for kind in KINDS:
            for what in _SINGLE[variant] + ("range",):
                spec: Dict[str, Any] = {"family": "inet", "table": table,
                                        "name": map_name(kind, family, what),
                                        "type": _key_types(kind, family),
                                        "map": _value_type(family, what)}
                if kind == "src" or what == "range":
                    spec["flags"] = ["interval"]
                if what in COUNTED:
                    spec["stmt"] = [{"counter": None}]
                cmds.append({"add": {"map": spec}})
            for what in _KEY_SETS[variant]:
                keys: Dict[str, Any] = {"family": "inet", "table": table,
                                        "name": map_name(kind, family, what),
                                        "type": _key_types(kind, family)}
                if kind == "src" or what == "rkeys":
                    keys["flags"] = ["interval"]
                cmds.append({"add": {"set": keys}})
    cmds.append({"add": {"set": {"family": "inet", "table": table, "name": HAIRPIN_SET,
                                 "type": ["ifname", "ifname"]}}})
    # portfwd's marker: nft.create_table gives it the comment (JSON cannot on nftables 1.0.6)
    cmds.append({"add": {"set": {"family": "inet", "table": table, "name": MARKER_SET,
                                 "type": "inet_service", "comment": TABLE_COMMENT}}})
    chains = [("prerouting", "nat", "prerouting", PRIORITY),
              ("output", "nat", "output", PRIORITY),
              ("forward", "filter", "forward", -5),  # marks only: before others' filters
              ("postrouting", "nat", "postrouting", 100 - 5),  # before srcnat (100)
              (GUARD_CHAIN, "filter", "prerouting", -300)]
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
            cmds.append(rule("prerouting", _lookup_rule(kind, family, ranges, variant),
                             f"portfwd {name}"))
            out = _lookup_rule(kind, family, ranges, variant)
            if kind != "fwd":  # only keys naming 127.0.0.1 itself reach loopback
                out.insert(1, _not_loopback(family))
            cmds.append(rule("output", out, f"portfwd {name} from the host"))
    mark = {"ct": {"key": "mark"}}
    ours = {"match": {"op": "==", "left": {"&": [mark, MARK]}, "right": MARK}}
    both = MARK | HAIRPIN_MARK
    cmds.append(rule("forward", [
        ours,
        {"match": {"op": "==", "left": {"concat": [{"meta": {"key": "iifname"}},
                                                    {"meta": {"key": "oifname"}}]},
                   "right": "@" + HAIRPIN_SET}},
        {"mangle": {"key": mark, "value": {"|": [mark, HAIRPIN_MARK]}}}],
        "portfwd hairpin: back out of the bridge it came from"))
    cmds.append(rule("postrouting", [
        {"match": {"op": "==", "left": {"&": [mark, both]}, "right": both}},
        {"masquerade": None}], "portfwd hairpin"))
    cmds.append(rule("postrouting", [
        ours,
        {"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "saddr"}},
                   "right": {"prefix": {"addr": "127.0.0.0", "len": 8}}}},
        {"masquerade": None}], "portfwd localhost"))
    cmds.append(rule(GUARD_CHAIN, [
        {"match": {"op": "!=", "left": {"meta": {"key": "iifname"}}, "right": "lo"}},
        {"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "daddr"}},
                   "right": {"prefix": {"addr": "127.0.0.0", "len": 8}}}},
        {"drop": None}], GUARD_COMMENT))
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


# small builders of the DNAT rules' expressions
_MARK = {"ct": {"key": "mark"}}
_SET_MARK = {"mangle": {"key": _MARK, "value": {"|": [_MARK, MARK]}}}
_LOCAL = {"match": {"op": "==", "left": {"fib": {"result": "type", "flags": ["daddr"]}},
                    "right": "local"}}
# nft accepts a port mapping only after a transport protocol match
_L4PROTO = {"match": {"op": "==", "left": {"meta": {"key": "l4proto"}},
                      "right": {"set": list(PROTOCOLS)}}}


def _nfproto(family: int) -> Dict[str, Any]:
    return {"match": {"op": "==", "left": {"meta": {"key": "nfproto"}},
                      "right": "ipv4" if family == 4 else "ipv6"}}


def _lookup_key(kind: str, family: int) -> Any:
    exprs = _key_exprs(kind, family)
    return exprs[0] if len(exprs) == 1 else {"concat": exprs}


def _in_map(key: Any, name: str) -> Dict[str, Any]:
    return {"match": {"op": "==", "left": key, "right": "@" + name}}


def _dnat_rule(kind: str, family: int, variant: Variant) -> List[Dict[str, Any]]:
    key = _lookup_key(kind, family)
    nat_family = "ip" if family == 4 else "ip6"
    # only connections that hit a map get the mark, which libvirt's chains let through
    if variant == CONCAT:  # address . port from one map: `dnat ip to KEY map @fwd4_to`
        to = map_name(kind, family, "to")
        return [_nfproto(family), _LOCAL, _L4PROTO, _in_map(key, map_name(kind, family, "keys")),
                _SET_MARK, {"dnat": {"family": nat_family,
                                     "addr": {"map": {"key": key, "data": "@" + to}}}}]
    ip, port = map_name(kind, family, "ip"), map_name(kind, family, "port")
    return [_nfproto(family), _LOCAL, _L4PROTO, _in_map(key, port), _SET_MARK,
            {"dnat": {"family": nat_family,
                      "addr": {"map": {"key": key, "data": "@" + ip}},
                      "port": {"map": {"key": key, "data": "@" + port}}}}]


def _lookup_rule(kind: str, family: int, ranges: bool, variant: Variant) -> List[Dict[str, Any]]:
    return _range_rule(kind, family) if ranges else _dnat_rule(kind, family, variant)


def _range_rule(kind: str, family: int) -> List[Dict[str, Any]]:
    """DNAT to the address of an equal-port range; the destination port stays.
    The map lookup comes before ``fib``: a packet no range matches skips the
    route lookup."""
    key = _lookup_key(kind, family)
    name = map_name(kind, family, "range")
    return [_nfproto(family), _L4PROTO, _in_map(key, map_name(kind, family, "rkeys")), _LOCAL,
            _SET_MARK,
            {"dnat": {"family": "ip" if family == 4 else "ip6",
                      "addr": {"map": {"key": key, "data": "@" + name}}}}]


def _key_json(b: Binding) -> Dict[str, Any]:
    ports = b.host_ports
    port: Any = {"range": [ports.first, ports.last]} if ports.is_range else ports.first
    if b.kind != "src" and not ports.is_range:  # addresses, protocol, port as they are
        return {"concat": list(b.key[:-1]) + [port]}
    parts: List[Any] = []
    for i, part in enumerate(b.key[:-1]):
        if b.kind == "src" and i < 2:
            addr, _, length = str(part).partition("/")
            parts.append({"prefix": {"addr": addr, "len": int(length)}})
        else:
            parts.append(part)
    return {"concat": parts + [port]}


def _elements(table: str, bindings: Iterable[Binding], op: str, variant: Variant) -> List[Command]:
    """One command per map, carrying all its elements."""
    grouped: Dict[str, List[Any]] = {}
    for b in bindings:
        key = _key_json(b)
        values: Tuple[Tuple[str, Any], ...]
        if b.is_range:
            values = (("range", b.address),)
        elif variant == CONCAT:
            values = (("to", {"concat": [b.address, b.guest_port]}),)
        else:
            values = (("ip", b.address), ("port", b.guest_port))
        elem = {"elem": {"val": key, "comment": b.comment}}  # shared by the maps
        for what, value in values:
            name = map_name(b.kind, b.family, what)
            if op == "delete":
                grouped.setdefault(name, []).append(key)
            else:
                grouped.setdefault(name, []).append([elem, value])
        if b.is_range or variant == CONCAT:
            name = map_name(b.kind, b.family, "rkeys" if b.is_range else "keys")
            grouped.setdefault(name, []).append(key if op == "delete" else elem)
    return [{op: {"element": {"family": "inet", "table": table, "name": name, "elem": elems}}}
            for name, elems in sorted(grouped.items())]


def guest_update(table: str, old: Sequence[Binding], new: Sequence[Binding],
                 variant: Variant = SPLIT) -> List[Command]:
    """Drop ``old`` bindings no longer wanted, ensure ``new`` (the table's layout,
    of this ``variant``, must exist: prefix ``skeleton(table)`` when unsure).

    Dropping adds the element first, so a binding already gone is no error.
    """
    wanted = set(new)
    gone = [b for b in old if b not in wanted]
    return (_elements(table, gone, "add", variant) + _elements(table, gone, "delete", variant)
            + _elements(table, new, "add", variant))


def full_rebuild(table: str, bindings: Sequence[Binding], variant: Variant = SPLIT) -> List[Command]:
    """One transaction: the table holds exactly ``bindings`` afterwards."""
    flushes = [{"flush": {"map": {"family": "inet", "table": table, "name": name}}}
               for name in maps_of(variant)]
    flushes += [{"flush": {"set": {"family": "inet", "table": table, "name": name}}}
                for name in sets_of(variant)]
    return (skeleton(table, variant=variant) + flushes
            + _elements(table, bindings, "add", variant))


def migration(table: str, objects: Sequence[Dict[str, Any]],
              variant: Variant = SPLIT) -> List[Command]:
    """For a listed table that an earlier layout or another variant built: commands
    that empty its chains and drop the maps and sets it declared otherwise (type,
    flags, counters) than ``skeleton`` does, which nftables refuses to declare
    anew, and those of the other variant. [] when there are none. Follow them
    with ``full_rebuild`` in the same transaction, so that no packet sees a gap."""
    wanted: Dict[str, Tuple[Any, ...]] = {}
    for cmd in skeleton(table, variant=variant):
        for kind in ("map", "set"):
            spec = cmd.get("add", {}).get(kind)
            if spec is not None:
                wanted[spec["name"]] = _declaration(kind, spec)
    stale: List[Command] = []
    chains: List[Command] = []
    for obj in objects:
        if "chain" in obj and obj["chain"].get("table") == table:
            chains.append({"flush": {"chain": {"family": "inet", "table": table,
                                               "name": obj["chain"]["name"]}}})
        for kind in ("map", "set"):
            spec = obj.get(kind)
            if spec is None:
                continue
            name = spec["name"]
            other_variant = name not in wanted and (name in MAPS or name in KEY_SETS)
            if other_variant or (name in wanted and _declaration(kind, spec) != wanted[name]):
                stale.append({"delete": {kind: {"family": "inet", "table": table,
                                                "name": name}}})
    return chains + stale if stale else []


def _declaration(kind: str, spec: Dict[str, Any]) -> Tuple[Any, ...]:
    types = spec["type"]
    return (kind, tuple(types) if isinstance(types, list) else (types,), spec.get("map"),
            tuple(sorted(spec.get("flags", []))), bool(spec.get("stmt")))


def drop_table(table: str) -> List[Command]:
    """One transaction removing the table; no error when it is absent."""
    t = {"family": "inet", "name": table}
    return [{"add": {"table": t}}, {"delete": {"table": t}}]
