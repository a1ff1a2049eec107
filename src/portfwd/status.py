"""Rows of `portfwd status`: recorded bindings against what the kernel holds."""

from __future__ import annotations

from . import display, rules
from .plan import Binding

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Dict, Sequence, Tuple


def row(b: Binding, status: str, address_from: str = "") -> Dict[str, str]:
    """One row per binding: a range kept as one element is one row."""
    target = display.target_text(b.target, b.family, b.guest_ports)
    return {"guest": b.guest, "proto": b.proto, "listen": display.listen_text(b), "target": target,
            "sources": b.sources, "state": status, "address_from": address_from,
            "comment": b.comment}


def live_state(b: Binding, maps: Dict[str, Dict[Tuple[Any, ...], Any]]) -> str:
    key = _norm_key(b)
    if b.is_range:
        ip = maps.get(rules.map_name(b.kind, b.family, "range"), {}).get(key)
        if ip is None:
            return "missing"
        return "active" if str(ip) == b.address else f"differs (table: {ip})"
    to = maps.get(rules.map_name(b.kind, b.family, "to"), {}).get(key)
    if isinstance(to, dict) and "concat" in to:  # the concat variant: address . port
        ip, port = to["concat"]
    else:  # the split variant: address and port maps side by side
        ip = maps.get(rules.map_name(b.kind, b.family, "ip"), {}).get(key)
        port = maps.get(rules.map_name(b.kind, b.family, "port"), {}).get(key)
    if ip is None or port is None:
        return "missing"
    if str(ip) != b.address or int(port) != b.port:
        return f"differs (table: {ip}:{port})"
    return "active"


def _norm_key(b: Binding) -> Tuple[Any, ...]:
    return tuple(str(p) for p in b.key)


def live_elements(objects: Sequence[Dict[str, Any]]) -> Dict[str, Dict[Tuple[Any, ...], Any]]:
    """Map name → {normalised key: value} from a JSON table listing: the keys as
    bindings write them (``src`` addresses as prefixes, a port interval as
    ``"FIRST-LAST"``)."""
    out: Dict[str, Dict[Tuple[Any, ...], Any]] = {}
    for obj in objects:
        m = obj.get("map")
        if not m:
            continue
        if m["name"] not in rules.MAPS:
            continue
        kind, family, _ = rules.MAPS[m["name"]]
        prefixes = kind == "src"
        full = 32 if family == 4 else 128
        elems: Dict[Tuple[Any, ...], Any] = {}
        for key, value in m.get("elem", []):
            if isinstance(key, dict) and "elem" in key:
                key = key["elem"]["val"]
            parts = key["concat"] if isinstance(key, dict) and "concat" in key else [key]
            norm = []
            for i, part in enumerate(parts):
                if isinstance(part, dict) and "prefix" in part:
                    norm.append(f"{part['prefix']['addr']}/{part['prefix']['len']}")
                elif isinstance(part, dict) and "range" in part:
                    first, last = part["range"]
                    if prefixes and i < 2:  # an address range: not what portfwd writes
                        norm.append(f"{first}-{last}")
                    else:
                        norm.append(str(first) if first == last else f"{first}-{last}")
                elif prefixes and i < 2:
                    norm.append(f"{part}/{full}")
                else:
                    norm.append(str(part))
            elems[tuple(norm)] = value
        out[m["name"]] = elems
    return out
