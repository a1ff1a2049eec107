"""Kernel facts read from /proc: which interface routes to an address.

Cheap to import (no ipaddress, no dataclasses): the hook uses it on every start.
"""

from __future__ import annotations

from _socket import AF_INET, AF_INET6, inet_pton

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Dict, List, Optional, Tuple

    Route = Tuple[int, int, int, str]  # network, prefix length, metric, interface

RTF_UP = 0x0001
RTF_REJECT = 0x0200


def _ipv4_routes(text: str) -> List[Route]:
    routes = []
    for line in text.splitlines()[1:]:
        f = line.split()
        if len(f) < 8:
            continue
        flags = int(f[3], 16)
        if not flags & RTF_UP or flags & RTF_REJECT:
            continue
        # the kernel prints the network-order word as a little-endian number
        dest = int.from_bytes(bytes.fromhex(f[1]), "little")
        mask = int.from_bytes(bytes.fromhex(f[7]), "little")
        routes.append((dest, bin(mask).count("1"), int(f[6]), f[0]))
    return routes


def _ipv6_routes(text: str) -> List[Route]:
    routes = []
    for line in text.splitlines():
        f = line.split()
        if len(f) < 10:
            continue
        flags = int(f[8], 16)
        if not flags & RTF_UP or flags & RTF_REJECT or f[9] == "lo":
            continue
        routes.append((int(f[0], 16), int(f[1], 16), int(f[5], 16), f[9]))
    return routes


def _read(path: str) -> str:
    try:
        with open(path, encoding="ascii") as f:
            return f.read()
    except OSError:
        return ""


class RouteTable:
    """The main routing table of both families, read once."""

    def __init__(self, ipv4_text: Optional[str] = None, ipv6_text: Optional[str] = None) -> None:
        self.routes: Dict[int, List[Route]] = {
            4: _ipv4_routes(_read("/proc/net/route") if ipv4_text is None else ipv4_text),
            6: _ipv6_routes(_read("/proc/net/ipv6_route") if ipv6_text is None else ipv6_text),
        }

    def interface_for(self, address: str) -> Optional[str]:
        """The interface of the most specific route to ``address`` (never a default route)."""
        family, bits = (6, 128) if ":" in address else (4, 32)
        try:
            value = int.from_bytes(inet_pton(AF_INET6 if family == 6 else AF_INET, address), "big")
        except OSError:
            return None
        best: Optional[Route] = None
        for route in self.routes[family]:
            network, prefix, metric, _ = route
            if prefix == 0 or value >> (bits - prefix) != network >> (bits - prefix):
                continue
            if best is None or (prefix, -metric) > (best[1], -best[2]):
                best = route
        return best[3] if best else None
