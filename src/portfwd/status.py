"""Rows of `portfwd status`: recorded bindings against what the kernel holds."""

from __future__ import annotations

from . import plan
from .plan import Binding

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Dict, Sequence, Tuple


def row(b: Binding, status: str, address_from: str = "") -> Dict[str, str]:
    target = plan.target_text(b.target, b.family, b.port)
    return {"guest": b.guest, "proto": b.proto, "listen": plan.listen_text(b), "target": target,
            "sources": b.sources, "state": status, "address_from": address_from,
            "comment": b.comment}


def live_state(b: Binding, maps: Dict[str, Dict[Tuple[Any, ...], Any]]) -> str:
    ip = maps.get(plan.map_name(b.kind, b.family, "ip"), {}).get(_norm_key(b))
    port = maps.get(plan.map_name(b.kind, b.family, "port"), {}).get(_norm_key(b))
    if ip is None or port is None:
        return "missing"
    if str(ip) != b.target or int(port) != b.port:
        return f"differs (table: {ip}:{port})"
    return "active"


def _norm_key(b: Binding) -> Tuple[Any, ...]:
    return tuple(str(p) for p in b.key)


def live_elements(objects: Sequence[Dict[str, Any]]) -> Dict[str, Dict[Tuple[Any, ...], Any]]:
    """Map name → {normalised key: value} from a JSON table listing."""
    out: Dict[str, Dict[Tuple[Any, ...], Any]] = {}
    for obj in objects:
        m = obj.get("map")
        if not m:
            continue
        interval = "interval" in m.get("flags", [])
        full = 32 if m["name"][3] == "4" else 128
        elems: Dict[Tuple[Any, ...], Any] = {}
        for key, value in m.get("elem", []):
            if isinstance(key, dict) and "elem" in key:
                key = key["elem"]["val"]
            parts = key["concat"] if isinstance(key, dict) and "concat" in key else [key]
            norm = []
            for i, part in enumerate(parts):
                if isinstance(part, dict) and "prefix" in part:
                    norm.append(f"{part['prefix']['addr']}/{part['prefix']['len']}")
                elif interval and i < 2:
                    norm.append(f"{part}/{full}")
                else:
                    norm.append(str(part))
            elems[tuple(norm)] = value
        out[m["name"]] = elems
    return out
