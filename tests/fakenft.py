"""An nftables in memory, for engine tests without root: ``FakeNft`` answers what
``portfwd.host.nft.NftLike`` asks from a model of the objects portfwd uses (tables,
sets and maps with their elements, chains and rules), and records every call.

The model (``Ruleset``) outlives one ``FakeNft``, as the kernel outlives a
process: a hook run is one process with one ``Nft``, so a test makes a FakeNft
per event over one Ruleset. ``concat`` says what ``concat_values`` answers:
False as nftables 1.0.6 (Debian 12), True as 1.1.

What the engine depends on behaves as nftables 1.0.6 and the kernel do, which
tests/test_fakenft.py checks by replaying the engine's calls through the real
``Nft`` in a network namespace:

- a transaction is atomic: one refused command and nothing of it stays
  (``HostError``, as ``Nft.apply`` raises); a dry run is refused alike and
  changes nothing;
- ``add`` of a table, chain, set or map that exists changes nothing, but a set
  or map declared otherwise (type, value, flags, counter) is refused (EEXIST);
  ``create`` of one that exists is refused;
- any operation on an object whose table, chain or set is missing is refused
  (ENOENT), and so is deleting an absent element, rule, set or table;
- an element whose key is there with another value is refused (EEXIST); with
  the same value it changes nothing (the comment stays as it was); in an
  interval set, an element whose first or last key lies in another element is
  refused (the kernel's concatenated interval sets, "pipapo", look up those two
  points: an element that contains another whole goes in);
- a set a rule refers to (``@name``) cannot be deleted (EBUSY);
- JSON ignores the comment of a table or a set (nftables 1.0.6): only the text
  declarations (``create_table``, ``mark_table``) give one;
- a map with a concatenated value is an AssertionError where ``concat`` is
  False: nftables 1.0.6 makes a plain set of it and crashes on the next element.

Handles are numbered per table as the kernel numbers them (sets, chains and
rules share one count), so compat's ``delete rule`` by handle finds its rule; a
refused transaction here uses up no handles (none of the replayed scenarios
depends on whether the kernel's does).

Anything else the engine might send (a verb or object the model does not know)
is an AssertionError, so that a new use is modelled, not silently accepted.
"""

from __future__ import annotations

import copy
import ipaddress
import json
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Sequence, Tuple, TypeVar

from portfwd.constants import GUARD_CHAIN, GUARD_COMMENT
from portfwd.errors import HostError

if TYPE_CHECKING:
    from portfwd.host.nft import Nft, NftLike

Json = Dict[str, Any]
Part = Tuple[Any, ...]  # ("i", low, high): a number, address, prefix or range; ("s", text)
Key = Tuple[Part, ...]
A = TypeVar("A")

ENOENT = "Could not process rule: No such file or directory"
EEXIST = "Could not process rule: File exists"
EBUSY = "Could not process rule: Device or resource busy"
NO_INTERVAL = ("You must add 'flags interval' to your {} declaration if you want to add"
               " range elements")  # set or map

# calls that change the ruleset (when not a dry run), and those that only read it
WRITES = ("apply", "create_table", "mark_table")
READS = ("list", "list_table", "set_comment", "table_comment", "concat_values")


class Refused(Exception):
    """What nftables says when it refuses a command."""


class Element:
    __slots__ = ("val", "value", "comment")

    def __init__(self, val: Any, value: Any, comment: Optional[str]) -> None:
        self.val = val  # the key as sent
        self.value = value  # a map's value, None in a set
        self.comment = comment


class Set:
    """A set or a map."""

    __slots__ = ("kind", "spec", "comment", "handle", "elements")

    def __init__(self, kind: str, spec: Json, comment: str, handle: int) -> None:
        self.kind = kind  # "set" or "map"
        self.spec = {k: spec[k] for k in ("type", "map", "flags", "stmt") if k in spec}
        self.comment = comment
        self.handle = handle
        self.elements: Dict[Key, Element] = {}

    def declaration(self) -> Tuple[Any, ...]:
        """What nftables compares when a set is declared again."""
        types = self.spec["type"]
        return (self.kind, json.dumps(types), json.dumps(self.spec.get("map")),
                tuple(sorted(self.spec.get("flags", []))), bool(self.spec.get("stmt")))

    @property
    def interval(self) -> bool:
        return "interval" in self.spec.get("flags", [])

    @property
    def counted(self) -> bool:
        return any("counter" in s for s in self.spec.get("stmt", []))


class Chain:
    __slots__ = ("base", "handle", "rules")

    def __init__(self, base: Json, handle: int) -> None:
        self.base = base  # type, hook, prio, policy of a base chain; {} otherwise
        self.handle = handle
        self.rules: List[Json] = []  # each with its "handle"


class Table:
    __slots__ = ("family", "name", "comment", "handle", "sets", "chains", "last_handle")

    def __init__(self, family: str, name: str, comment: str, handle: int) -> None:
        self.family = family
        self.name = name
        self.comment = comment
        self.handle = handle
        self.sets: Dict[str, Set] = {}
        self.chains: Dict[str, Chain] = {}
        self.last_handle = 0  # sets, chains and rules share the table's handles

    def next_handle(self) -> int:
        self.last_handle += 1
        return self.last_handle


class Ruleset:
    """The kernel's nftables objects, as far as portfwd and libvirt use them, and
    every call each FakeNft over it made (``log``, in order)."""

    def __init__(self) -> None:
        self.tables: Dict[Tuple[str, str], Table] = {}
        self.last_handle = 0
        self.log: List[Call] = []

    def table(self, family: str, name: str) -> Table:
        found = self.tables.get((family, name))
        if found is None:
            raise Refused(ENOENT)
        return found


class Call:
    """One call of a FakeNft: its kind (the method's name), what it was given, what
    nftables said if it refused, and what a read answered."""

    __slots__ = ("kind", "payload", "refused", "answer")

    def __init__(self, kind: str, payload: Json, refused: Optional[str] = None,
                 answer: Any = None) -> None:
        self.kind = kind
        self.payload = payload
        self.refused = refused
        self.answer = answer

    @property
    def is_write(self) -> bool:
        return self.kind in WRITES and not self.payload.get("dry_run")

    def to_json(self) -> Json:
        out = {"call": self.kind, **self.payload}
        if self.refused is not None:
            out["refused"] = self.refused
        return out


class FakeNft:
    """``NftLike`` over a ``Ruleset``; every call that would reach nftables is in
    ``calls`` (and in the ruleset's ``log``)."""

    def __init__(self, ruleset: Optional[Ruleset] = None, concat: bool = False) -> None:
        self.ruleset = ruleset if ruleset is not None else Ruleset()
        self.concat = concat
        self.calls: List[Call] = []
        self._probed = False

    def _record(self, kind: str, payload: Json, refused: Optional[str] = None,
                answer: Any = None) -> None:
        call = Call(kind, copy.deepcopy(payload), refused, copy.deepcopy(answer))
        self.calls.append(call)
        self.ruleset.log.append(call)

    def _read(self, kind: str, payload: Json, answer: A) -> A:
        self._record(kind, payload, answer=answer)
        return answer

    # -- changes ---------------------------------------------------------------------
    def apply(self, commands: Sequence[Json], dry_run: bool = False) -> None:
        if not commands:
            return  # Nft.apply sends nothing
        payload = {"commands": list(commands), "dry_run": dry_run}
        self._transaction("apply", payload, lambda rs: _execute_all(rs, commands, self.concat),
                          commit=not dry_run, message="nftables refused the change: ")

    def create_table(self, table: str, comment: str, marker: str, replace: bool = False) -> None:
        def run(rs: Ruleset) -> None:
            if replace:
                _delete_table(rs, "inet", table)
            if ("inet", table) not in rs.tables:
                rs.last_handle += 1
                rs.tables[("inet", table)] = Table("inet", table, comment, rs.last_handle)
            _marker(rs, table, comment, marker)

        self._transaction("create_table", {"table": table, "comment": comment, "marker": marker,
                                           "replace": replace}, run, commit=True,
                          message=f"nftables refused to create table inet {table} or its set"
                                  f" {marker}: ")

    def mark_table(self, table: str, comment: str, marker: str) -> None:
        self._transaction("mark_table", {"table": table, "comment": comment, "marker": marker},
                          lambda rs: _marker(rs, table, comment, marker), commit=True,
                          message=f"nftables refused to create table inet {table} or its set"
                                  f" {marker}: ")

    def _transaction(self, kind: str, payload: Json, run: Callable[[Ruleset], None], commit: bool,
                     message: str) -> None:
        """Run ``run`` on a copy of the ruleset; keep the copy if it went through."""
        work = Ruleset()
        work.tables = copy.deepcopy(self.ruleset.tables)
        work.last_handle = self.ruleset.last_handle
        try:
            run(work)
        except Refused as e:
            self._record(kind, payload, str(e))
            raise HostError(f"{message}internal:0:0-0: Error: {e}") from None
        self._record(kind, payload)
        if commit:
            self.ruleset.tables, self.ruleset.last_handle = work.tables, work.last_handle

    # -- reads -----------------------------------------------------------------------
    def concat_values(self) -> bool:
        if not self._probed:  # Nft probes once per process
            self._probed = True
            self._read("concat_values", {}, self.concat)
        return self.concat

    def set_comment(self, table: str, name: str) -> Optional[str]:
        found = self.ruleset.tables.get(("inet", table))
        s = found.sets.get(name) if found else None
        answer = s.comment if s is not None and s.kind == "set" else None
        return self._read("set_comment", {"table": table, "name": name}, answer)

    def table_comment(self, table: str) -> Optional[str]:
        found = self.ruleset.tables.get(("inet", table))
        return self._read("table_comment", {"table": table}, found.comment if found else None)

    def list_table(self, table: str) -> Optional[List[Json]]:
        return self._read("list_table", {"table": table}, listing(self.ruleset, "inet", table))

    def list(self, what: Json) -> Optional[List[Json]]:
        return self._read("list", {"what": what}, _list(self.ruleset, what))

    def guarded(self, table: str) -> bool:
        """``guard.present``: chain raw_prerouting of ``inet TABLE`` holds the drop rule
        for 127.0.0.0/8 (a netlink dump in the kernel, recorded as ``guard``)."""
        found = self.ruleset.tables.get(("inet", table))
        chain = found.chains.get(GUARD_CHAIN) if found else None
        answer = chain is not None and any(
            r.get("comment") == GUARD_COMMENT and r["expr"][-1:] == [{"drop": None}]
            for r in chain.rules)
        return self._read("guard", {"table": table}, answer)


if TYPE_CHECKING:  # mypy checks that both speak NftLike
    def _fake_satisfies(fake: FakeNft) -> NftLike:
        return fake

    def _nft_satisfies(nft: Nft) -> NftLike:
        return nft


def counts(calls: Sequence[Call]) -> Dict[str, int]:
    """How many nftables transactions (dry runs apart), reads and netlink dumps."""
    return {"transactions": sum(c.is_write for c in calls),
            "dry_runs": sum(c.kind == "apply" and bool(c.payload["dry_run"]) for c in calls),
            "reads": sum(c.kind in READS for c in calls),
            "netlink_dumps": sum(c.kind == "guard" for c in calls)}


# -- the commands ----------------------------------------------------------------------

def _execute_all(rs: Ruleset, commands: Sequence[Json], concat: bool) -> None:
    for cmd in commands:
        _execute(rs, cmd, concat)


def _execute(rs: Ruleset, cmd: Json, concat: bool) -> None:
    (verb, body), = cmd.items()
    (what, spec), = body.items()
    if what == "table":
        _table(rs, verb, spec)
    elif what == "chain":
        _chain(rs.table(spec["family"], spec["table"]), verb, spec)
    elif what == "rule":
        _rule(rs.table(spec["family"], spec["table"]), verb, spec)
    elif what in ("set", "map"):
        _set(rs.table(spec["family"], spec["table"]), verb, what, spec, concat)
    elif what == "element":
        _elements(rs.table(spec["family"], spec["table"]), verb, spec)
    else:
        raise AssertionError(f"FakeNft does not model {verb} {what}")


def _table(rs: Ruleset, verb: str, spec: Json) -> None:
    key = (spec["family"], spec["name"])
    if verb in ("add", "create"):
        if key in rs.tables:
            if verb == "create":
                raise Refused(EEXIST)
            return
        rs.last_handle += 1
        rs.tables[key] = Table(spec["family"], spec["name"], "", rs.last_handle)  # no JSON comment
    elif verb == "delete":
        _delete_table(rs, *key)
    elif verb == "flush":
        table = rs.table(*key)
        for chain in table.chains.values():
            chain.rules.clear()
        for s in table.sets.values():
            s.elements.clear()
    else:
        raise AssertionError(f"FakeNft does not model {verb} table")


def _delete_table(rs: Ruleset, family: str, name: str) -> None:
    if (family, name) not in rs.tables:
        raise Refused(ENOENT)
    del rs.tables[(family, name)]


def _chain(table: Table, verb: str, spec: Json) -> None:
    name = spec["name"]
    chain = table.chains.get(name)
    if verb in ("add", "create"):
        if chain is not None:
            if verb == "create":
                raise Refused(EEXIST)
            return
        base: Json = {k: spec[k] for k in ("type", "hook", "prio", "policy") if k in spec}
        table.chains[name] = Chain(base, table.next_handle())
    elif chain is None:
        raise Refused(ENOENT)
    elif verb == "flush":
        chain.rules.clear()
    elif verb == "delete":
        del table.chains[name]
    else:
        raise AssertionError(f"FakeNft does not model {verb} chain")


def _rule(table: Table, verb: str, spec: Json) -> None:
    chain = table.chains.get(spec["chain"])
    if chain is None:
        raise Refused(ENOENT)
    if verb == "delete":
        before = len(chain.rules)
        chain.rules = [r for r in chain.rules if r["handle"] != spec["handle"]]
        if len(chain.rules) == before:
            raise Refused(ENOENT)
        return
    if verb not in ("add", "insert") or "handle" in spec or "index" in spec:
        raise AssertionError(f"FakeNft does not model {verb} rule {spec}")
    for name in _set_references(spec["expr"]):
        if name not in table.sets:
            raise Refused(ENOENT)
    rule = {"handle": table.next_handle(), "expr": copy.deepcopy(spec["expr"])}
    if "comment" in spec:
        rule["comment"] = spec["comment"]
    if verb == "add":
        chain.rules.append(rule)
    else:
        chain.rules.insert(0, rule)


def _set_references(obj: Any) -> List[str]:
    """The sets and maps an expression names (``"@NAME"``)."""
    if isinstance(obj, str):
        return [obj[1:]] if obj.startswith("@") else []
    if isinstance(obj, dict):
        return [n for v in obj.values() for n in _set_references(v)]
    if isinstance(obj, list):
        return [n for v in obj for n in _set_references(v)]
    return []


def _set(table: Table, verb: str, kind: str, spec: Json, concat: bool) -> None:
    name = spec["name"]
    found = table.sets.get(name)
    if verb in ("add", "create"):
        if kind == "map" and isinstance(spec.get("map"), list) and not concat:
            raise AssertionError(f"map {name} with a concatenated value declared through JSON:"
                                 " nftables 1.0.6 makes a set of it, then crashes")
        new = Set(kind, spec, "", 0)  # JSON gives no comment (nftables 1.0.6)
        if found is not None:
            if verb == "create" or found.declaration() != new.declaration():
                raise Refused(EEXIST)
            return
        new.handle = table.next_handle()
        table.sets[name] = new
    elif found is None:
        raise Refused(ENOENT)
    elif verb == "flush":
        found.elements.clear()
    elif verb == "delete":
        if any(name in _set_references(r["expr"]) for c in table.chains.values()
               for r in c.rules):
            raise Refused(EBUSY)
        del table.sets[name]
    else:
        raise AssertionError(f"FakeNft does not model {verb} {kind}")


def _marker(rs: Ruleset, table: str, comment: str, marker: str) -> None:
    """``add set inet TABLE MARKER { type inet_service; comment "…"; }`` as text."""
    found = rs.table("inet", table)
    new = Set("set", {"type": "inet_service"}, comment, 0)
    old = found.sets.get(marker)
    if old is not None:
        if old.declaration() != new.declaration():
            raise Refused(EEXIST)
        return
    new.handle = found.next_handle()
    found.sets[marker] = new


def _elements(table: Table, verb: str, spec: Json) -> None:
    s = table.sets.get(spec["name"])
    if s is None:
        raise Refused(ENOENT)
    for item in spec["elem"]:
        if s.kind == "map" and verb != "delete":
            keyed, value = item
        else:
            keyed, value = item, None
        val, comment = keyed, None
        if isinstance(keyed, dict) and "elem" in keyed:
            val, comment = keyed["elem"]["val"], keyed["elem"].get("comment")
        key = _key(val, s)
        old = s.elements.get(key)
        if verb == "delete":
            if old is None:
                raise Refused(ENOENT)
            del s.elements[key]
        elif verb in ("add", "create"):
            if old is not None:
                if verb == "create" or old.value != value:
                    raise Refused(EEXIST)
                continue
            if s.interval and any(_inside(point, other) for other in s.elements
                                  for point in _ends(key)):
                raise Refused(EEXIST)
            s.elements[key] = Element(copy.deepcopy(val), copy.deepcopy(value), comment)
        else:
            raise AssertionError(f"FakeNft does not model {verb} element")


def _key(val: Any, s: Set) -> Key:
    """A key as the kernel compares it: each part a number interval (port, address,
    prefix, range) or a text (protocol, interface name)."""
    parts = val["concat"] if isinstance(val, dict) and "concat" in val else [val]
    types = s.spec["type"]
    assert len(parts) == (len(types) if isinstance(types, list) else 1), (val, types)
    key = tuple(_part(p) for p in parts)
    if not s.interval and any(p[0] == "i" and p[1] != p[2] for p in key):
        raise Refused(NO_INTERVAL.format(s.kind))
    return key


def _part(part: Any) -> Part:
    if isinstance(part, int):
        return ("i", part, part)
    if isinstance(part, dict) and "range" in part:
        low, high = part["range"]
        return ("i",) + _bounds(low)[:1] + _bounds(high)[1:]
    if isinstance(part, dict) and "prefix" in part:
        net = ipaddress.ip_network(f"{part['prefix']['addr']}/{part['prefix']['len']}",
                                   strict=False)
        return ("i", int(net.network_address), int(net.broadcast_address))
    assert isinstance(part, str), part
    return ("i",) + _bounds(part) if _bounds(part) else ("s", part)


def _bounds(value: Any) -> Tuple[int, ...]:
    """(low, high) of a number or an address; () for other text."""
    if isinstance(value, int):
        return (value, value)
    try:
        number = int(ipaddress.ip_address(value))
    except ValueError:
        return ()
    return (number, number)


def _ends(key: Key) -> List[Key]:
    """The first and the last key an interval element holds."""
    return [tuple(p if p[0] == "s" else ("i", p[i], p[i]) for p in key) for i in (1, 2)]


def _inside(point: Key, element: Key) -> bool:
    return all(p[0] == q[0] and (p == q if p[0] == "s" else q[1] <= p[1] <= q[2])
               for p, q in zip(point, element))


# -- listings, shaped as nftables 1.0.6 prints them --------------------------------------

def _list(rs: Ruleset, what: Json) -> Optional[List[Json]]:
    if "table" in what:
        return listing(rs, what["table"]["family"], what["table"]["name"])
    if "chains" in what:  # every chain: nftables 1.0.6 ignores a table given here
        return [{"chain": _chain_json(t, name, c)} for t in rs.tables.values()
                for name, c in t.chains.items()]
    if "chain" in what:
        spec = what["chain"]
        found = rs.tables.get((spec["family"], spec["table"]))
        chain = found.chains.get(spec["name"]) if found else None
        if found is None or chain is None:
            return None
        return [{"chain": _chain_json(found, spec["name"], chain)}] + [
            {"rule": _rule_json(found, spec["name"], r)} for r in chain.rules]
    raise AssertionError(f"FakeNft does not model the listing {what}")


def listing(rs: Ruleset, family: str, name: str) -> Optional[List[Json]]:
    """``list table FAMILY NAME`` of the ruleset (None: no such table)."""
    table = rs.tables.get((family, name))
    if table is None:
        return None
    out: List[Json] = [{"table": {"family": family, "name": name, "handle": table.handle}}]
    for set_name, s in table.sets.items():
        out.append({s.kind: _set_json(table, set_name, s)})
    out += [{"chain": _chain_json(table, n, c)} for n, c in table.chains.items()]
    out += [{"rule": _rule_json(table, n, r)} for n, c in table.chains.items() for r in c.rules]
    return out


def _set_json(table: Table, name: str, s: Set) -> Json:
    out: Json = {"family": table.family, "name": name, "table": table.name,
                 "type": s.spec["type"], "handle": s.handle}
    for key in ("map", "flags"):
        if key in s.spec:
            out[key] = s.spec[key]
    if s.comment:
        out["comment"] = s.comment
    if s.elements:
        out["elem"] = [_element_json(s, e) for e in s.elements.values()]
    if "stmt" in s.spec:
        out["stmt"] = s.spec["stmt"]
    return out


def _element_json(s: Set, e: Element) -> Any:
    key: Any = e.val
    if e.comment is not None or s.counted:
        inner: Json = {"val": e.val}
        if e.comment is not None:
            inner["comment"] = e.comment
        if s.counted:
            inner["counter"] = {"packets": 0, "bytes": 0}
        key = {"elem": inner}
    return [key, e.value] if s.kind == "map" else key


def _chain_json(table: Table, name: str, chain: Chain) -> Json:
    return dict({"family": table.family, "table": table.name, "name": name,
                 "handle": chain.handle}, **chain.base)


def _rule_json(table: Table, chain: str, rule: Json) -> Json:
    out = {"family": table.family, "table": table.name, "chain": chain, "handle": rule["handle"]}
    if "comment" in rule:
        out["comment"] = rule["comment"]
    out["expr"] = [{"counter": {"packets": 0, "bytes": 0}} if e == {"counter": None} else e
                   for e in rule["expr"]]
    return out


# -- comparing a listing with the kernel's -------------------------------------------------

def normalised(objects: Optional[Sequence[Json]]) -> Any:
    """A listing as the kernel's and the fake's can be compared: declarations, chains,
    each chain's rules (comment, and for foreign rules the verdict and the output
    interface compat reads), elements as keys the kernel compares, without handles,
    counters' values or the order nftables happens to print elements in."""
    if objects is None:
        return None
    out: List[Any] = []
    for obj in objects:
        (kind, spec), = obj.items()
        if kind == "table":
            out.append(["table", spec["family"], spec["name"]])
        elif kind in ("set", "map"):
            s = Set(kind, spec, spec.get("comment", ""), 0)
            elements = []
            for item in spec.get("elem", []):
                keyed, value = item if kind == "map" else (item, None)
                inner = keyed["elem"] if isinstance(keyed, dict) and "elem" in keyed else {
                    "val": keyed}
                elements.append(json.dumps([_key(inner["val"], s), value, inner.get("comment"),
                                            "counter" in inner]))
            out.append([kind, spec["table"], spec["name"], list(s.declaration()), s.comment,
                        sorted(elements)])
        elif kind == "chain":
            out.append(["chain", spec["family"], spec["table"], spec["name"],
                        [spec.get(k) for k in ("type", "hook", "prio", "policy")]])
        elif kind == "rule":
            out.append(["rule", spec["family"], spec["table"], spec["chain"], spec.get("comment"),
                        _verdicts(spec["expr"])])
    # in nftables' order of objects, but a chain's rules in theirs (a stable sort)
    return sorted(out, key=lambda o: json.dumps(o[:4]))


def _verdicts(exprs: List[Json]) -> List[str]:
    """The statements of a rule that end or redirect it, and the output interface it
    matches: what compat classifies libvirt's rules by."""
    out: List[str] = []
    for e in exprs:
        for key in ("accept", "drop", "reject", "jump", "goto", "masquerade", "dnat"):
            if key in e:
                out.append(key)
        m = e.get("match", {})
        if isinstance(m.get("left"), dict) and m["left"].get("meta", {}).get("key") in (
                "oif", "oifname"):
            out.append(f"oif {m['right']}")
    return out


def libvirt_network(bridge: str, subnet: str) -> List[Json]:
    """libvirt's nftables backend for one NAT network, as ``table ip libvirt_network``
    holds it: chain forward jumping to guest_input, which accepts established
    connections to ``subnet`` on ``bridge`` and rejects the rest."""
    where = {"family": "ip", "table": "libvirt_network"}
    addr, length = subnet.split("/")
    oif = {"match": {"op": "==", "left": {"meta": {"key": "oifname"}}, "right": bridge}}
    return [
        {"add": {"table": {"family": "ip", "name": "libvirt_network"}}},
        {"add": {"chain": dict(where, name="forward", type="filter", hook="forward", prio=0,
                               policy="accept")}},
        {"add": {"chain": dict(where, name="guest_input")}},
        {"add": {"rule": dict(where, chain="forward", expr=[{"jump": {"target": "guest_input"}}])}},
        {"add": {"rule": dict(where, chain="guest_input", expr=[
            oif,
            {"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "daddr"}},
                       "right": {"prefix": {"addr": addr, "len": int(length)}}}},
            {"match": {"op": "in", "left": {"ct": {"key": "state"}},
                       "right": ["established", "related"]}},
            {"counter": None}, {"accept": None}])}},
        {"add": {"rule": dict(where, chain="guest_input", expr=[
            oif, {"counter": None}, {"reject": None}])}},
    ]
