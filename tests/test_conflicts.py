from __future__ import annotations

from ipaddress import ip_address
from typing import List, Optional

from hypothesis import given, settings
from hypothesis import strategies as st

from portfwd.conflicts import Claim, find_conflicts

addresses = st.sampled_from([None, ip_address("203.0.113.5"), ip_address("203.0.113.6"),
                             ip_address("2001:db8::5")])


@st.composite
def claims(draw: st.DrawFn) -> List[Claim]:
    out = []
    for owner in range(draw(st.integers(0, 12))):
        address = draw(addresses)
        family = address.version if address is not None else draw(st.sampled_from([4, 6]))
        first = draw(st.integers(1, 40))
        last = first + draw(st.integers(0, 10))
        proto = draw(st.sampled_from(["tcp", "udp"]))
        out.append(Claim(family, address, proto, first, last, owner))
    return out


def brute_force(items: List[Claim]) -> set:
    found = set()
    for a in items:
        for b in items:
            if a.owner < b.owner and a.family == b.family and a.proto == b.proto \
                    and max(a.first, b.first) <= min(a.last, b.last) \
                    and (a.address is None or b.address is None or a.address == b.address):
                found.add((a.owner, b.owner))
    return found


@settings(max_examples=300)
@given(claims())
def test_finds_exactly_the_overlapping_pairs(items: List[Claim]) -> None:
    found = find_conflicts(list(items))
    assert {(a.owner, b.owner) for a, b in found} == brute_force(items)
    for a, b in found:
        assert a.owner < b.owner and a.overlaps(b)


def claim(owner: int, first: int, last: int, address: Optional[str] = None, family: int = 4,
          proto: str = "tcp") -> Claim:
    addr = ip_address(address) if address else None
    return Claim(addr.version if addr else family, addr, proto, first, last, owner)


def test_wildcard_overlaps_every_specific_address() -> None:
    found = find_conflicts([claim(0, 80, 80), claim(1, 80, 80, "203.0.113.5")])
    assert [(a.owner, b.owner) for a, b in found] == [(0, 1)]


def test_families_protocols_and_addresses_keep_apart() -> None:
    assert find_conflicts([
        claim(0, 80, 80, family=4), claim(1, 80, 80, family=6),
        claim(2, 80, 80, "203.0.113.5", proto="udp"),
        claim(3, 81, 90), claim(4, 91, 100),
        claim(5, 53, 53, "203.0.113.5"), claim(6, 53, 53, "203.0.113.6"),
    ]) == []


def test_claims_of_one_owner_never_conflict() -> None:
    assert find_conflicts([claim(0, 80, 80, "203.0.113.5"), claim(0, 80, 80)]) == []
