"""Which port forwards claim the same listen address, protocol and host port."""

from __future__ import annotations

import heapq
from dataclasses import dataclass, replace
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from ipaddress import IPv4Address, ip_address

from .model import Config, Forward, IPAddress, Listen, PortForward, Where

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
    out = []
    for first, second in find_conflicts(claims):
        interfaces = [via[(c.owner, c.address)] for c in (first, second)
                      if (c.owner, c.address) in via]
        if not interfaces:  # a static conflict: parsing reports those
            continue
        (fa, pa), (fb, pb) = items[first.owner], items[second.owner]
        names = " and of ".join(dict.fromkeys(interfaces))
        where = f"{claimed_where(first, second)} (an address of {names})"
        out.append(f"{locate(pb.where)}: {pb.where.path}: "
                   + clash_message(first, second, where, fb.label, locate(pa.where), pa.where.path,
                                   fa.label))
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
