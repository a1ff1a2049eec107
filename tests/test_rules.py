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
from typing import Any, List

import pytest

from portfwd import constants, rules
from portfwd.engine import layout_id
from portfwd.plan import Binding

GOLDEN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "golden")

# layout id (engine.layout_id: LAYOUT, "+concat" for that variant) → sha256 of
# json.dumps(rules.skeleton("portfwd", variant=...), sort_keys=True); a new layout
# adds lines, an old line never changes
SKELETON_DIGESTS = {
    "4": "edb57721fcd44899d1aa7bf08276a028b88ae9059b7fae589a671ca57f2ca77d",
    "5": "158001dc96da4407e9ca750a62604cf2136a1cb4a3f418a16e0569a184bda79b",
    "6": "852ea18a2e148a717d60d8af875f37e62794c531b947c6e8d8b288ed0549ed94",
    "6+concat": "df8116d2d3e3bc1c4bf2d88f39b29cf40ea878946827372c452a5ed59036da62",
}
VARIANTS = pytest.mark.parametrize("variant", rules.VARIANTS)


def _suffix(variant: str) -> str:
    return "" if variant == rules.SPLIT else f"-{variant}"


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
    return Binding(kind, family, tuple(key), target, port, guest, comment)


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
def test_skeleton_is_golden(variant: str) -> None:
    _golden(f"skeleton{_suffix(variant)}.json", rules.skeleton("portfwd", variant=variant))


def test_skeleton_without_ipv6_is_golden() -> None:
    _golden("skeleton-ipv4.json", rules.skeleton("portfwd", ipv6=False))


@VARIANTS
def test_skeleton_change_needs_a_layout_bump(variant: str) -> None:
    digest = _digest(rules.skeleton("portfwd", variant=variant))
    layout = layout_id(variant)
    assert layout in SKELETON_DIGESTS, \
        f"new layout {layout}: add it to SKELETON_DIGESTS with {digest}"
    assert SKELETON_DIGESTS[layout] == digest, \
        "rules.skeleton() changed: bump constants.LAYOUT and add lines to SKELETON_DIGESTS"
    assert len(set(SKELETON_DIGESTS.values())) == len(SKELETON_DIGESTS)
    assert layout.startswith(constants.LAYOUT)


@VARIANTS
def test_guest_update_is_golden(variant: str) -> None:
    _golden(f"guest-update{_suffix(variant)}.json",
            rules.guest_update("portfwd", OLD, NEW, variant))


def test_guest_update_of_nothing_changes_nothing() -> None:
    assert rules.guest_update("portfwd", NEW, NEW) == rules.guest_update("portfwd", [], NEW)
    assert rules.guest_update("portfwd", [], []) == []


@VARIANTS
def test_full_rebuild_is_golden(variant: str) -> None:
    _golden(f"full-rebuild{_suffix(variant)}.json",
            rules.full_rebuild("portfwd", NEW + OTHER, variant))


@VARIANTS
def test_full_rebuild_starts_with_the_skeleton_and_flushes_every_map(variant: str) -> None:
    cmds = rules.full_rebuild("portfwd", [], variant)
    skeleton = rules.skeleton("portfwd", variant=variant)
    assert cmds[:len(skeleton)] == skeleton
    flushed = {c["flush"]["map"]["name"] for c in cmds[len(skeleton):] if "flush" in c}
    declared = {c["add"]["map"]["name"] for c in skeleton if "map" in c.get("add", {})}
    assert flushed == declared == set(rules.maps_of(variant))
    assert len(declared) == (18 if variant == rules.SPLIT else 12)
    # the concat variant takes the maps of a split table away (declared first: no error
    # where they are absent); the split variant leaves the table's maps alone
    deleted = {c["delete"]["map"]["name"] for c in cmds if "delete" in c}
    assert deleted == (set() if variant == rules.SPLIT
                       else set(rules.maps_of(rules.SPLIT)) - declared)


def test_concat_maps_hold_address_and_port() -> None:
    cmds = rules.guest_update("portfwd", [], OLD[:1], rules.CONCAT)
    assert cmds == [{"add": {"element": {"family": "inet", "table": "portfwd", "name": "any4_to",
                                         "elem": [[{"elem": {"val": {"concat": ["tcp", 8080]},
                                                             "comment": OLD[0].comment}},
                                                   {"concat": ["192.168.122.10", 80]}]]}}}]


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
