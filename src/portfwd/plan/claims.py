"""Which guest may hold what, when several guests want the same thing: a guest
address (discovered by two guests) or a host port (two guests' listen interfaces
expanded to one address). Pure: works on planned and recorded state only."""

from __future__ import annotations

from portfwd.plan import display
from portfwd.rundir.record import GuestState
from portfwd.values import Reason

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Dict, List, Optional, Set, Tuple

    from portfwd.plan import Binding


def refuse_shared_discoveries(wanted: Dict[str, GuestState]) -> None:
    """A discovered address that two running guests lead to belongs to neither: both
    are refused (pending), so no guest can pull another's forward to itself."""
    owners: Dict[str, Set[str]] = {}
    for st in wanted.values():
        for b in st.bindings:
            owners.setdefault(b.address, set()).add(st.guest)
    for st in wanted.values():
        keep = []
        for b in st.bindings:
            others = sorted(owners[b.address] - {st.guest})
            if others and b.address in st.address_from:  # discovered, and another guest has it
                why = (f"refused {b.address} from {st.address_from[b.address]}: also the address of"
                       f" guest {others[0]}")
                st.pending.append((b, Reason(Reason.REFUSED, why)))
            else:
                keep.append(b)
        st.bindings = keep


def slot(b: Binding) -> Tuple[Any, ...]:
    """What two bindings must share to compete for host ports: all but the port(s)."""
    return (b.kind, b.family) + tuple(b.key[:-1])


class Claims:
    """Who holds which host ports, per slot: single ports in a dict (10,000 forwards
    stay linear), ranges in a list (there are few)."""

    def __init__(self) -> None:
        self.single: Dict[Tuple[Any, ...], Dict[int, str]] = {}
        self.ranges: Dict[Tuple[Any, ...], List[Tuple[int, int, str]]] = {}

    def add(self, b: Binding, owner: str) -> None:
        self._add(slot(b), b, owner)

    def _add(self, where: Tuple[Any, ...], b: Binding, owner: str) -> None:
        first, last = b.host_ports.first, b.host_ports.last
        if first == last:
            self.single.setdefault(where, {})[first] = owner
        else:
            self.ranges.setdefault(where, []).append((first, last, owner))

    def claim(self, b: Binding, owner: str) -> Optional[str]:
        """``b``'s ports for ``owner`` unless another holds one of them: that one
        (one slot computed where ``holder`` then ``add`` would compute two)."""
        where = slot(b)
        holder = self._holder(where, b)
        if holder is None or holder == owner:
            self._add(where, b, owner)
            return None
        return holder

    def holder(self, b: Binding) -> Optional[str]:
        """Who holds a port of ``b``'s span in its slot, if anyone."""
        return self._holder(slot(b), b)

    def _holder(self, where: Tuple[Any, ...], b: Binding) -> Optional[str]:
        first, last = b.host_ports.first, b.host_ports.last
        singles = self.single.get(where, {})
        if first == last:
            if first in singles:
                return singles[first]
        else:
            hit = next((owner for port, owner in singles.items() if first <= port <= last), None)
            if hit is not None:
                return hit
        return next((owner for lo, hi, owner in self.ranges.get(where, [])
                     if lo <= last and first <= hi), None)


def refuse_shared_keys(wanted: Dict[str, GuestState]) -> None:
    """Host ports two guests claim after their listen interfaces were expanded to
    addresses (invisible in the file alone): the first guest by name keeps them."""
    held = Claims()
    for name in sorted(wanted):
        st = wanted[name]
        keep = []
        for b in st.bindings:
            holder = held.claim(b, name)
            if holder is None:
                keep.append(b)
            else:
                st.pending.append((b, Reason(Reason.HELD, f"host port {display.listen_text(b)}/"
                                                          f"{b.proto} is held by guest {holder};"
                                                          " fix the configuration (`portfwd check`)")))
        st.bindings = keep
