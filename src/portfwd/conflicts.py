"""Which port forwards claim the same listen address, protocol and host port."""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

from .model import IPAddress, PortForward


@dataclass(frozen=True)
class Claim:
    """A forward answering on ``address`` (None: every address of ``family``)."""

    family: int
    address: Optional[IPAddress]
    proto: str
    first: int
    last: int
    owner: int  # index of the claiming item, for reporting

    def overlaps(self, other: "Claim") -> bool:
        return (self.family == other.family and self.proto == other.proto
                and self.first <= other.last and other.first <= self.last
                and (self.address is None or other.address is None
                     or self.address == other.address))


def claims_of(item: PortForward, families: "tuple[int, ...]", owner: int) -> List[Claim]:
    """What one port forward claims in each family it is active in."""
    rng = item.ports
    out: List[Claim] = []
    for family in families:
        if item.listen:
            for address in dict.fromkeys(a for a in item.listen if a.version == family):
                out.append(Claim(family, address, rng.proto, rng.host_first, rng.host_last, owner))
        else:
            out.append(Claim(family, None, rng.proto, rng.host_first, rng.host_last, owner))
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
