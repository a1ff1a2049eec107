"""Golden nftables JSON of the pure builders (no root, no nftables).

A change to what ``rules.skeleton`` builds must come with a new
``constants.LAYOUT``: tables made by the old layout are then rebuilt on the
next guest start. ``SKELETON_DIGESTS`` pins each layout to what it builds.

To rewrite the golden files after a deliberate change:
``PORTFWD_GOLDEN=write .venv/bin/python -m pytest tests/test_rules.py``.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Dict, List

import pytest

from portfwd import constants
from portfwd.plan import rules
from portfwd.engine.tables import layout_id
from portfwd.plan import Binding
from portfwd.values import PortSpan

GOLDEN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "golden")

# LAYOUT → sha256 of json.dumps(rules.skeleton("portfwd"), sort_keys=True); a new layout
# adds a line, an old line never changes
SKELETON_DIGESTS = {
    "4": "edb57721fcd44899d1aa7bf08276a028b88ae9059b7fae589a671ca57f2ca77d",
    "5": "158001dc96da4407e9ca750a62604cf2136a1cb4a3f418a16e0569a184bda79b",
    "6": "852ea18a2e148a717d60d8af875f37e62794c531b947c6e8d8b288ed0549ed94",
    "7": "27405b031cbd72e5a8fc59b2b1e0bd4718de71713758ff113db9b8a09291005b",
    "7+concat": "3ca30cb9f251a14b0f78ac59a46b28cae6194607fd238a6a5b90870961d97bec",
}
VARIANTS = pytest.mark.parametrize("variant", rules.VARIANTS)


def _suffix(variant: rules.Variant) -> str:
    return "" if variant is rules.SPLIT else f"-{variant.value}"


def _digest(cmds: List[Any]) -> str:
    return hashlib.sha256(json.dumps(cmds, sort_keys=True).encode()).hexdigest()


def _golden(name: str, cmds: List[Any]) -> None:
    path = os.path.join(GOLDEN, name)
    text = json.dumps(cmds, indent=1, sort_keys=True) + "\n"
    if os.environ.get("PORTFWD_GOLDEN") == "write":
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
    with open(path, encoding="utf-8") as f:
        assert json.loads(f.read()) == json.loads(text), f"{name} differs from the builders' output"


def _b(kind: str, family: int, key: Any, target: str, port: int, guest: str = "web1",
       comment: str = "web1 forward[0].ports[0] 8080:80/tcp") -> Binding:
    """``key`` ends with the host port(s) as the record writes them (8080, "5000-5010")."""
    return Binding(kind, family, tuple(key[:-1]) + (PortSpan.from_json(key[-1]),), target, port,
                   guest, comment)


OLD = [
    _b("any", 4, ("tcp", 8080), "192.168.122.10", 80),
    _b("any", 6, ("tcp", 8080), "fd00:122::10", 80),
    _b("fwd", 4, ("203.0.113.5", "udp", 5353), "192.168.122.10", 53,
       comment="web1 forward[0].ports[1] 5353:53/udp"),
]
NEW = [
    _b("any", 4, ("tcp", 8080), "192.168.122.10", 80),
    _b("any", 6, ("tcp", 8080), "fd00:122::10", 80),
    _b("src", 4, ("0.0.0.0/0", "198.51.100.0/24", "tcp", 2222), "192.168.122.10", 22,
       comment="web1 forward[0].ports[2] 2222:22/tcp"),
    _b("src", 6, ("2001:db8::5/128", "2001:db8:1::/48", "tcp", 2222), "fd00:122::10", 22,
       comment="web1 forward[0].ports[2] 2222:22/tcp"),
    _b("any", 4, ("udp", "5000-5010"), "192.168.122.10", 5000,
       comment="web1 forward[0].ports[3] 5000-5010:5000-5010/udp"),
    _b("fwd", 6, ("2001:db8::5", "sctp", "6000-6009"), "fd00:122::10", 6000,
       comment="web1 forward[0].ports[4] 6000-6009:6000-6009/sctp"),
]
OTHER = [_b("fwd", 4, ("127.0.0.1", "tcp", 9000), "192.168.122.11", 90, guest="db1",
            comment="db1 forward[1].ports[0] 9000:90/tcp")]


@VARIANTS
def test_skeleton_is_golden(variant: rules.Variant) -> None:
    _golden(f"skeleton{_suffix(variant)}.json", rules.skeleton("portfwd", variant=variant))


def test_skeleton_without_ipv6_is_golden() -> None:
    _golden("skeleton-ipv4.json", rules.skeleton("portfwd", ipv6=False))


@VARIANTS
def test_skeleton_change_needs_a_layout_bump(variant: rules.Variant) -> None:
    """Layout ids: tables.layout_id (LAYOUT, "+concat" for that variant)."""
    digest = _digest(rules.skeleton("portfwd", variant=variant))
    layout = layout_id(variant)
    assert layout.startswith(constants.LAYOUT)
    assert layout in SKELETON_DIGESTS, \
        f"new layout {layout}: add it to SKELETON_DIGESTS with {digest}"
    assert SKELETON_DIGESTS[layout] == digest, \
        "rules.skeleton() changed: bump constants.LAYOUT and add a line to SKELETON_DIGESTS"
    assert len(set(SKELETON_DIGESTS.values())) == len(SKELETON_DIGESTS)


@VARIANTS
def test_guest_update_is_golden(variant: rules.Variant) -> None:
    _golden(f"guest-update{_suffix(variant)}.json",
            rules.guest_update("portfwd", OLD, NEW, variant))


def test_guest_update_of_nothing_changes_nothing() -> None:
    assert rules.guest_update("portfwd", NEW, NEW) == rules.guest_update("portfwd", [], NEW)
    assert rules.guest_update("portfwd", [], []) == []


@VARIANTS
def test_full_rebuild_is_golden(variant: rules.Variant) -> None:
    _golden(f"full-rebuild{_suffix(variant)}.json",
            rules.full_rebuild("portfwd", NEW + OTHER, variant))


@VARIANTS
def test_full_rebuild_starts_with_the_skeleton_and_flushes_every_map(variant: rules.Variant) -> None:
    cmds = rules.full_rebuild("portfwd", [], variant)
    skeleton = rules.skeleton("portfwd", variant=variant)
    assert cmds[:len(skeleton)] == skeleton
    flushed = {(kind, c["flush"][kind]["name"]) for c in cmds[len(skeleton):]
               for kind in c["flush"]}
    declared = {(kind, c["add"][kind]["name"]) for c in skeleton for kind in ("map", "set")
                if kind in c.get("add", {})}
    declared -= {("set", "hairpin"), ("set", "managed_by_portfwd")}  # hairpin() keeps one; a marker
    assert flushed == declared
    assert len(declared) == (18 + 6 if variant == rules.SPLIT else 12 + 12)


def test_concat_maps_hold_address_and_port() -> None:
    cmds = rules.guest_update("portfwd", [], OLD[:1], rules.CONCAT)
    elem = {"elem": {"val": {"concat": ["tcp", 8080]}, "comment": OLD[0].comment}}
    where = {"family": "inet", "table": "portfwd"}
    assert cmds == [
        {"add": {"element": dict(where, name="any4_keys", elem=[elem])}},
        {"add": {"element": dict(where, name="any4_to",
                                 elem=[[elem, {"concat": ["192.168.122.10", 80]}]])}}]


def test_migration_to_concat_drops_the_split_maps() -> None:
    listing = [c["add"] for c in rules.skeleton("portfwd") if "add" in c]
    dropped = {(kind, c["delete"][kind]["name"])
               for c in rules.migration("portfwd", listing, rules.CONCAT) if "delete" in c
               for kind in c["delete"]}
    assert dropped == {("map", n) for n in rules.maps_of(rules.SPLIT)
                       if n not in rules.maps_of(rules.CONCAT)}
    assert rules.migration("portfwd", listing, rules.SPLIT) == []


def test_counters_sit_on_maps_looked_up_once_per_connection() -> None:
    """A counter advances on every lookup of its element: only the maps the DNAT reads
    (and nothing tests before the mark) may carry one, or a connection counts twice."""
    skeleton = rules.skeleton("portfwd")
    counted = {c["add"]["map"]["name"] for c in skeleton
               if "map" in c.get("add", {}) and c["add"]["map"].get("stmt")}
    assert counted == {n for n, (_, _, what) in rules.MAPS.items() if what in ("ip", "range")}
    for cmd in skeleton:
        rule = cmd.get("add", {}).get("rule")
        if rule is None:
            continue
        lookups = [json.dumps(e) for e in rule["expr"]]
        for name in counted:
            assert sum(text.count(f'"@{name}"') for text in lookups) <= 1, (rule["comment"], name)


def test_migration_drops_maps_an_earlier_layout_declared_otherwise() -> None:
    old: List[Dict[str, Any]] = [{"chain": {"family": "inet", "table": "portfwd", "name": "prerouting"}},
           {"map": {"family": "inet", "table": "portfwd", "name": "any4_ip",
                    "type": ["inet_proto", "inet_service"], "map": "ipv4_addr"}},
           {"map": {"family": "inet", "table": "portfwd", "name": "any4_port",
                    "type": ["inet_proto", "inet_service"], "map": "inet_service"}}]
    assert rules.migration("portfwd", old) == [
        {"flush": {"chain": {"family": "inet", "table": "portfwd", "name": "prerouting"}}},
        {"delete": {"map": {"family": "inet", "table": "portfwd", "name": "any4_ip"}}}]
    current = [{"map": dict(c["add"]["map"])} for c in rules.skeleton("portfwd")
               if "map" in c.get("add", {})]
    assert rules.migration("portfwd", current) == []


def test_every_dnat_names_its_family() -> None:
    for cmd in rules.skeleton("portfwd"):
        rule = cmd.get("add", {}).get("rule")
        for expr in rule["expr"] if rule else []:
            if "dnat" in expr:
                assert expr["dnat"]["family"] in ("ip", "ip6")


def test_hairpin_and_drop_table() -> None:
    assert rules.hairpin("t", ["virbr1", "virbr0"]) == [
        {"flush": {"set": {"family": "inet", "table": "t", "name": "hairpin"}}},
        {"add": {"element": {"family": "inet", "table": "t", "name": "hairpin",
                             "elem": [{"concat": ["virbr0", "virbr0"]},
                                      {"concat": ["virbr1", "virbr1"]}]}}}]
    assert rules.hairpin("t", []) == [
        {"flush": {"set": {"family": "inet", "table": "t", "name": "hairpin"}}}]
    assert rules.drop_table("t") == [{"add": {"table": {"family": "inet", "name": "t"}}},
                                     {"delete": {"table": {"family": "inet", "name": "t"}}}]


@pytest.mark.parametrize("table", ["portfwd", "other_1"])
def test_builders_touch_only_their_table(table: str) -> None:
    def tables(obj: Any) -> List[str]:
        if isinstance(obj, dict):
            found = [obj["table"]] if isinstance(obj.get("table"), str) else []
            if "name" in obj and "family" in obj and set(obj) <= {"family", "name", "comment"}:
                found.append(obj["name"])
            return found + [t for v in obj.values() for t in tables(v)]
        if isinstance(obj, list):
            return [t for v in obj for t in tables(v)]
        return []

    cmds = rules.full_rebuild(table, NEW) + rules.guest_update(table, OLD, NEW)
    assert set(tables(cmds)) == {table}
