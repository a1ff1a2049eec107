"""Which port forwards claim the same listen address, protocol and host port."""

from __future__ import annotations

import heapq
from dataclasses import dataclass, replace
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from ipaddress import IPv4Address, ip_address

from portfwd.config.model import Config, Forward, IPAddress, Listen, PortForward, Where

# interface name, family (4 or 6) → the interface's addresses of that family
AddressesOf = Callable[[str, int], Sequence[str]]

LOCALHOST = IPv4Address("127.0.0.1")


@dataclass(frozen=True)
class Claim:
    """A forward answering on ``address`` (None: every non-loopback address of
    ``family``; a string: the addresses of that interface)."""

    family: int
    address: Optional[Listen]
    proto: str
    first: int
    last: int
    owner: int  # index of the claiming item, for reporting

    def overlaps(self, other: "Claim") -> bool:
        if not (self.family == other.family and self.proto == other.proto
                and self.first <= other.last and other.first <= self.last):
            return False
        if self.address is None or other.address is None:  # every address, but loopback
            return LOCALHOST not in (self.address, other.address)
        return self.address == other.address


def claims_of(item: PortForward, families: "tuple[int, ...]", owner: int) -> List[Claim]:
    """What one port forward claims in each family it is active in."""
    rng = item.ports
    out: List[Claim] = []
    for family in families:
        addresses: List[Optional[Listen]] = [
            a for a in item.listen if isinstance(a, str) or a.version == family]
        if not item.listen:
            addresses = [None]
        if family == 4 and item.localhost:
            addresses.append(LOCALHOST)
        for address in dict.fromkeys(addresses):
            out.append(Claim(family, address, rng.proto, rng.host_first, rng.host_last, owner))
    return out


def find_conflicts(claims: List[Claim]) -> List[Tuple[Claim, Claim]]:
    """Pairs (earlier, later) of overlapping claims from different owners.

    Sweeps each (family, proto) group in port order, so the cost follows the
    number of claims that overlap a port rather than the square of all claims.
    """
    groups: Dict[Tuple[int, str], List[Claim]] = {}
    for claim in claims:
        groups.setdefault((claim.family, claim.proto), []).append(claim)
    found: Dict[Tuple[int, int], Tuple[Claim, Claim]] = {}
    for group in groups.values():
        group.sort(key=lambda c: (c.first, c.owner))
        active: List[Tuple[int, int, Claim]] = []  # heap of (last, seq, claim)
        for seq, claim in enumerate(group):
            while active and active[0][0] < claim.first:
                heapq.heappop(active)
            for _, _, other in active:
                if other.owner != claim.owner and other.overlaps(claim):
                    first, second = sorted((other, claim), key=lambda c: c.owner)
                    found.setdefault((first.owner, second.owner), (first, second))
            heapq.heappush(active, (claim.last, seq, claim))
    return [found[k] for k in sorted(found)]


def clash_message(first: Claim, second: Claim, where: str, label: str, there: str,
                  there_path: str, other_label: str) -> str:
    """The text of a conflict, the same for every kind: ``second`` (``label``, the
    entry the message is located at) overlaps ``first`` (``other_label``, at ``there``)."""
    low, high = max(first.first, second.first), min(first.last, second.last)
    ports = str(low) if low == high else f"{low}-{high}"
    return (f"host port {ports}/{first.proto} on {where} is claimed twice:"
            f" here for {label} and at {there} ({there_path}) for {other_label};"
            " use another host port or listen address")


def group_conflicts(pairs: Sequence[Tuple[Claim, Claim]]) -> List[Tuple[Claim, List[Claim]]]:
    """The pairs of ``find_conflicts`` as (earliest claim, every later claim that
    overlaps it first): 200 forwards on one port make one group, not 19,900 pairs.
    Each later claim appears once, with the earliest claim it overlaps."""
    earliest: Dict[Claim, Claim] = {}
    for first, second in pairs:
        if second not in earliest or first.owner < earliest[second].owner:
            earliest[second] = first
    groups: Dict[Claim, List[Claim]] = {}
    for second in sorted(earliest, key=lambda c: c.owner):
        groups.setdefault(earliest[second], []).append(second)
    return sorted(groups.items(), key=lambda g: (g[0].owner, g[1][0].owner))


def crowd_message(claims: Sequence[Claim], where: str, label: str,
                  others: Sequence[Tuple[str, str, str]]) -> str:
    """The text of three or more ``claims`` of one port: ``claims[0]`` the earliest,
    which every later one overlaps, ``claims[1]`` the one of ``label`` the message
    is located at; ``others``: (location, key path, label) of ``claims[0]`` and
    ``claims[2:]``. Names the ports that collide, and at most a few of the others."""
    from portfwd.suggest import some

    low, high = max(c.first for c in claims), min(c.last for c in claims)
    if low <= high:  # one port (or range) every claim holds
        there = [f"at {loc} ({path}) for {other}" for loc, path, other in others]
        return (f"host port {_span(low, high)}/{claims[0].proto} on {where} is claimed by"
                f" {len(claims)} forwards: here for {label}, {some(there)}; give each its own"
                " host port or listen address")
    first = claims[0]
    loc, path, other = others[0]
    rest = [f"{_span(max(c.first, first.first), min(c.last, first.last))} at {loc2} ({path2})"
            f" for {other2}" for c, (loc2, path2, other2) in zip(claims[2:], others[1:])]
    here = claims[1]
    return (f"host ports {_span(first.first, first.last)}/{first.proto} on {where} of {other} at"
            f" {loc} ({path}) are claimed again by {len(claims) - 1} forwards: here"
            f" {_span(max(here.first, first.first), min(here.last, first.last))} for {label},"
            f" {some(rest)}; give each its own host ports or listen address")


def _span(low: int, high: int) -> str:
    return str(low) if low == high else f"{low}-{high}"


def claimed_where(first: Claim, second: Claim) -> str:
    """The address two overlapping claims share, as a message names it."""
    if first.address is not None:
        return str(first.address)
    if second.address is not None:
        return str(second.address)
    return f"every IPv{first.family} address"


def interface_conflicts(config: Config, addresses_of: AddressesOf,
                        locate: Callable[[Where], str] = lambda where: where.file) -> List[str]:
    """Conflicts only the host's addresses reveal, one message each (as ``check``
    prints the static ones): an interface named in one ``listen`` and one of its
    addresses (or another interface with that address) in another, for the same
    protocol and host port. ``locate`` turns a Where into ``FILE:LINE:COL``."""
    items: List[Tuple[Forward, PortForward]] = []
    claims: List[Claim] = []
    via: Dict[Tuple[int, Optional[Listen]], str] = {}  # (owner, address) → its interface
    known: Dict[Tuple[str, int], List[IPAddress]] = {}
    for fwd in config.forwards:
        for pf in fwd.ports:
            owner = len(items)
            items.append((fwd, pf))
            for claim in claims_of(pf, fwd.families(pf), owner):
                if not isinstance(claim.address, str):
                    claims.append(claim)
                    continue
                key = (claim.address, claim.family)
                if key not in known:
                    known[key] = _parse_addresses(addresses_of(*key), claim.family)
                for address in known[key]:
                    via.setdefault((owner, address), claim.address)
                    claims.append(replace(claim, address=address))
    dynamic = [(first, second) for first, second in find_conflicts(claims)
               if (first.owner, first.address) in via or (second.owner, second.address) in via]
    out = []  # a static conflict (no interface in it): parsing reports those
    for first, laters in group_conflicts(dynamic):
        interfaces = [via[(c.owner, c.address)] for c in [first] + laters
                      if (c.owner, c.address) in via]
        (fa, pa), (fb, pb) = items[first.owner], items[laters[0].owner]
        names = " and of ".join(dict.fromkeys(interfaces))
        where = f"{claimed_where(first, laters[0])} (an address of {names})"
        if len(laters) == 1:
            text = clash_message(first, laters[0], where, fb.label, locate(pa.where),
                                 pa.where.path, fa.label)
        else:
            others = [(locate(items[c.owner][1].where), items[c.owner][1].where.path,
                       items[c.owner][0].label) for c in [first] + laters[1:]]
            text = crowd_message([first] + laters, where, fb.label, others)
        out.append(f"{locate(pb.where)}: {pb.where.path}: {text}")
    return out


def _parse_addresses(found: Sequence[str], family: int) -> List[IPAddress]:
    out: List[IPAddress] = []
    for text in found:
        try:
            address = ip_address(text.split("%", 1)[0])
        except ValueError:
            continue
        if address.version == family:
            out.append(address)
    return out
