from __future__ import annotations

from ipaddress import ip_address
from typing import List, Optional, Tuple

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from portfwd.config.conflicts import Claim, find_conflicts, group_conflicts
from portfwd.errors import ConfigError

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


def brute_force(items: List[Claim]) -> "set[Tuple[int, int]]":
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


# -- conflicts only the host's addresses reveal (issue "Safe to leave running on a
#    production host": an interface in listen and one of its addresses) ----------

from typing import Dict, Sequence, Tuple  # noqa: E402

from portfwd import config  # noqa: E402
from portfwd.config.conflicts import interface_conflicts  # noqa: E402

LIVE = '''\
[[forward]]
guest = "a"
ipv4 = "192.168.122.10"
ipv6 = "fd00:122::10"
listen = ["eth0"]
ports = ["80", "53/udp"]

[[forward]]
guest = "b"
ipv4 = "192.168.122.11"
ipv6 = "fd00:122::11"
ports = [
  { guest = 80, listen = ["203.0.113.5"] },
  { guest = 80, listen = ["2001:db8::5"] },
  { guest = 53, proto = "tcp", listen = ["203.0.113.5"] },
  { guest = 81, listen = ["eth1"] },
]

[[forward]]
guest = "c"
ipv4 = "192.168.122.12"
listen = ["eth2"]
ports = ["81"]
'''
HOST: Dict[Tuple[str, int], Sequence[str]] = {
    ("eth0", 4): ["203.0.113.5", "203.0.113.6"], ("eth0", 6): ["2001:db8::5"],
    ("eth1", 4): ["198.51.100.1"], ("eth2", 4): ["198.51.100.1"],
}


def fake_host(name: str, family: int) -> Sequence[str]:
    return HOST.get((name, family), [])


def test_interface_and_its_address_on_the_same_port_conflict() -> None:
    parsed = config.parse(LIVE, "f.toml")  # statically fine: eth0 is not 203.0.113.5 on paper
    assert interface_conflicts(parsed, fake_host, config.locator(LIVE, "f.toml")) == [
        "f.toml:13:3: forward[1].ports[0]: host port 80/tcp on 203.0.113.5 (an address of eth0)"
        " is claimed twice: here for b and at f.toml:6:10 (forward[0].ports[0]) for a;"
        " use another host port or listen address",
        "f.toml:14:3: forward[1].ports[1]: host port 80/tcp on 2001:db8::5 (an address of eth0)"
        " is claimed twice: here for b and at f.toml:6:10 (forward[0].ports[0]) for a;"
        " use another host port or listen address",
        "f.toml:23:10: forward[2].ports[0]: host port 81/tcp on 198.51.100.1 (an address of eth1"
        " and of eth2) is claimed twice: here for c and at f.toml:16:3 (forward[1].ports[3])"
        " for b; use another host port or listen address",
    ]


def test_without_a_locator_messages_name_the_file() -> None:
    found = interface_conflicts(config.parse(LIVE, "f.toml"), fake_host)
    assert found[0].startswith("f.toml: forward[1].ports[0]: host port 80/tcp on 203.0.113.5")


def test_interfaces_without_shared_addresses_do_not_conflict() -> None:
    parsed = config.parse(LIVE, "f.toml")
    asked = []

    def elsewhere(name: str, family: int) -> Sequence[str]:
        asked.append((name, family))
        return {"eth0": ["192.0.2.1", "2001:db8::99"], "eth1": ["192.0.2.2"],
                "eth2": ["192.0.2.3", "not an address", "fe80::1%eth2"]}[name]

    assert interface_conflicts(parsed, elsewhere) == []
    assert interface_conflicts(parsed, lambda name, family: []) == []  # interfaces gone
    assert len(asked) == len(set(asked))  # each interface and family asked once


def test_many_claimants_of_one_port_are_one_error_listing_them() -> None:
    """200 guests on one port: one error naming every claimant, not 19,900 pairs."""
    text = "".join(f'[[forward]]\nguest = "g{i}"\nipv4 = "10.0.{i // 250}.{i % 250 + 1}"\n'
                   'ports = ["8080:80", "9000"]\n\n' for i in range(200))
    with pytest.raises(ConfigError) as e:
        config.parse(text, "f.toml")
    assert len(e.value.lines) == 2  # one per port
    first = e.value.lines[0]
    assert first.startswith("f.toml:9:10: forward[1].ports[0]: host port 8080/tcp on every IPv4"
                            " address is claimed by 200 forwards: here for g1, at f.toml:4:10"
                            " (forward[0].ports[0]) for g0, at f.toml:14:10 (forward[2].ports[0])"
                            " for g2, ")
    # the rest counted, not listed: 300 guests gave a 30 kB line
    assert first.endswith(" for g3 and 196 more; give each its own host port or listen address")
    assert len(first) < 400


def test_ranges_overlapping_in_a_chain_name_the_ports_that_collide() -> None:
    text = ('[[forward]]\nguest = "web1"\nipv4 = "10.0.0.1"\nports = ["5000-5100"]\n'
            '[[forward]]\nguest = "web2"\nipv4 = "10.0.0.2"\nports = ["5050-5060", "5100-5200"]\n')
    with pytest.raises(ConfigError) as e:
        config.parse(text, "f.toml")
    assert e.value.lines == [
        "f.toml:8:10: forward[1].ports[0]: host ports 5000-5100/tcp on every IPv4 address of web1"
        " at f.toml:4:10 (forward[0].ports[0]) are claimed again by 2 forwards: here 5050-5060"
        " for web2, 5100 at f.toml:8:23 (forward[1].ports[1]) for web2; give each its own host"
        " ports or listen address"]


def test_group_conflicts_names_each_later_claim_once() -> None:
    a, b, c = (Claim(4, None, "tcp", 80, 80, owner) for owner in range(3))
    assert group_conflicts(find_conflicts([a, b, c])) == [(a, [b, c])]
    # a chain of ranges: c overlaps b but not a
    x, y, z = Claim(4, None, "tcp", 1, 10, 0), Claim(4, None, "tcp", 10, 20, 1), \
        Claim(4, None, "tcp", 15, 30, 2)
    assert group_conflicts(find_conflicts([x, y, z])) == [(x, [y]), (y, [z])]
