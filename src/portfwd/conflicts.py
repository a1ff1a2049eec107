"""Which port forwards claim the same listen address, protocol and host port."""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

from ipaddress import IPv4Address

from .model import Listen, PortForward

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
