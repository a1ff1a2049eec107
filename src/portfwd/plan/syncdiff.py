"""What `portfwd sync --dry-run` would change: the bindings recorded now against
those a sync would apply, as added / removed / unchanged forwards. A range
stored port by port (guest ports shifted) is folded back into one line."""

from __future__ import annotations

from typing import Any, Dict, List, Sequence, Tuple

from portfwd.plan import display
from portfwd.plan import Binding
from portfwd.values import PortSpan

Item = Dict[str, Any]


class Diff:
    __slots__ = ("added", "removed", "unchanged")

    def __init__(self, added: List[Item], removed: List[Item], unchanged: List[Item]) -> None:
        self.added = added
        self.removed = removed
        self.unchanged = unchanged

    def counts(self) -> Dict[str, int]:
        return {"added": len(self.added), "removed": len(self.removed),
                "unchanged": len(self.unchanged)}


def diff(before: Sequence[Binding], after: Sequence[Binding]) -> Diff:
    """Bindings in ``after`` only, in ``before`` only, and in both; each folded."""
    old, new = set(before), set(after)
    return Diff(fold([b for b in after if b not in old]), fold([b for b in before if b not in new]),
                fold([b for b in after if b in old]))


def fold(bindings: Sequence[Binding]) -> List[Item]:
    """One item per forward: bindings of one configuration entry whose host ports
    follow each other, with the same offset to their guest ports, become one."""
    runs: Dict[Tuple[Any, ...], List[List[Binding]]] = {}
    for b in sorted(bindings, key=lambda b: (b.guest, b.family, b.proto, b.listen, b.sources,
                                             str(b.target), b.comment, b.host_ports.first,
                                             b.host_ports.last)):
        if b.is_range:
            runs.setdefault(_identity(b) + ("range", b.host_ports), []).append([b])
            continue
        group = runs.setdefault(_identity(b) + (b.guest_port - b.host_port,), [])
        if group and group[-1][-1].host_port + 1 == b.host_port:
            group[-1].append(b)
        else:
            group.append([b])
    items = [_item(run) for group in runs.values() for run in group]
    return sorted(items, key=lambda i: (i["guest"], i["family"], i["proto"], i["first"],
                                        i["listen"]))


def _identity(b: Binding) -> Tuple[Any, ...]:
    return (b.guest, b.kind, b.family, b.proto, b.listen, b.sources, str(b.target), b.comment)


def _item(run: List[Binding]) -> Item:
    first, last = run[0], run[-1]
    if first.is_range:
        host = guest = first.host_ports
    else:
        host = PortSpan(first.host_port, last.host_port)
        guest = PortSpan(first.guest_port, last.guest_port)
    listen = display.listen_text(first).rpartition(":")[0]
    return {"guest": first.guest, "family": first.family, "proto": first.proto,
            "listen": f"{listen}:{host}", "target": display.target_text(first.target,
                                                                         first.family, guest),
            "sources": [] if first.sources == "*" else [first.sources],
            "comment": first.comment, "first": first.host_port, "bindings": len(run)}


def line(mark: str, item: Item) -> str:
    """``+ web1  tcp  *:8080 -> 192.168.122.10:80  from *  # comment``."""
    sources = ",".join(item["sources"]) or "*"
    return (f"{mark} {item['guest']}\t{item['proto']}\t{item['listen']} -> {item['target']}"
            f"\tfrom {sources}\t# {item['comment']}")


def to_json(item: Item) -> Item:
    return {k: v for k, v in item.items() if k != "first"}
