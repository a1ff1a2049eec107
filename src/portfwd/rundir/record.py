"""What portfwd applied for each guest, as recorded under /run/portfwd."""

from __future__ import annotations

from portfwd.plan import Binding
from portfwd.values import Reason

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Dict, List, Optional, Set, Tuple


class GuestState:
    """What portfwd applied for one guest, as recorded under /run/portfwd: the
    bindings in the kernel, where each address came from, and the bindings
    still waiting for an address (each with the reason)."""

    __slots__ = ("guest", "uuid", "table", "bindings", "pending", "address_from", "warnings",
                 "removing")

    def __init__(self, guest: str, uuid: Optional[str], table: str, bindings: List[Binding],
                 pending: Optional[List[Tuple[Binding, Reason]]] = None,
                 address_from: Optional[Dict[str, str]] = None,
                 warnings: Optional[List[str]] = None,
                 removing: Optional[List[Binding]] = None) -> None:
        self.guest = guest
        self.uuid = uuid
        self.table = table
        self.bindings = bindings
        self.pending = pending or []  # (binding, why it is not applied)
        self.address_from = address_from or {}  # discovered address → where it came from
        self.warnings = warnings or []  # e.g. a tentative listen address skipped
        # bindings being removed, possibly still in the kernel (a removal killed halfway):
        # the next removal or rebuild takes them out, nothing brings them back
        self.removing = removing or []

    @property
    def empty(self) -> bool:
        return not self.bindings and not self.pending and not self.removing

    def discovered(self) -> Set[str]:
        """The discovered addresses its applied forwards lead to."""
        return {b.address for b in self.bindings if b.address in self.address_from}

    def to_json(self) -> Dict[str, Any]:
        return {"guest": self.guest, "uuid": self.uuid, "table": self.table,
                "bindings": [b.to_json() for b in self.bindings],
                "pending": [b.to_json() + [why.to_json()] for b, why in self.pending],
                "address_from": self.address_from, "warnings": self.warnings,
                **({"removing": [b.to_json() for b in self.removing]} if self.removing else {})}

    @classmethod
    def from_json(cls, raw: Dict[str, Any]) -> "GuestState":
        return cls(str(raw["guest"]), raw.get("uuid"), str(raw["table"]),
                   [Binding.from_json(b) for b in raw["bindings"]],
                   [(Binding.from_json(p[:-1]), Reason.from_json(p[-1]))
                    for p in raw.get("pending", [])],
                   {str(k): str(v)  # "sources": as earlier versions named it
                    for k, v in raw.get("address_from", raw.get("sources", {})).items()},
                   [str(w) for w in raw.get("warnings", [])],
                   [Binding.from_json(b) for b in raw.get("removing", [])])


class Recorded:
    """A guest's state file as read, parsed only as far as a sync needs: whose it is,
    its table, and the reasons of its pending bindings; ``same`` compares it whole."""

    __slots__ = ("guest", "uuid", "table", "raw")

    def __init__(self, raw: Dict[str, Any]) -> None:
        self.guest = str(raw["guest"])
        uuid = raw.get("uuid")
        self.uuid = None if uuid is None else str(uuid)
        self.table = str(raw["table"])
        self.raw = raw

    def discovered(self) -> Set[str]:
        """The discovered addresses its applied forwards lead to (the target, field 3
        of each recorded binding, where ``address_from`` names its source)."""
        found = self.raw.get("address_from", self.raw.get("sources", {}))
        return {str(b[3]) for b in self.raw.get("bindings", []) if str(b[3]) in found}

    def reasons(self) -> Set[Reason]:
        return {Reason.from_json(p[-1]) for p in self.raw.get("pending", [])}

    def state(self) -> Optional[GuestState]:
        """The whole record (None if its bindings cannot be read)."""
        try:
            return GuestState.from_json(self.raw)
        except (ValueError, KeyError, TypeError, AttributeError, IndexError):
            return None

    def same(self, state: GuestState) -> bool:
        """Whether ``state`` would be written as exactly this file."""
        return bool(self.raw == state.to_json())
