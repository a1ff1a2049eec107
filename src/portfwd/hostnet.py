"""Kernel facts read from /proc: which interface routes to an address."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from ipaddress import IPv4Address, ip_address
from typing import Dict, Iterable, List, Optional, Set

RTF_UP = 0x0001
RTF_REJECT = 0x0200


@dataclass(frozen=True)
class Route:
    network: int
    prefix: int
    metric: int
    interface: str


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
        dest = struct.unpack("<I", bytes.fromhex(f[1]))[0]
        mask = struct.unpack("<I", bytes.fromhex(f[7]))[0]
        routes.append(Route(dest, bin(mask).count("1"), int(f[6]), f[0]))
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
        routes.append(Route(int(f[0], 16), int(f[1], 16), int(f[5], 16), f[9]))
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
        """The interface of the most specific on-link route to ``address`` (not a default route)."""
        addr = ip_address(address)
        bits = 32 if isinstance(addr, IPv4Address) else 128
        value = int(addr)
        best: Optional[Route] = None
        for route in self.routes[addr.version]:
            if route.prefix == 0:
                continue
            shift = bits - route.prefix
            if value >> shift != route.network >> shift:
                continue
            if best is None or (route.prefix, -route.metric) > (best.prefix, -best.metric):
                best = route
        return best.interface if best else None


def bridges_for(addresses: Iterable[str], table: Optional[RouteTable] = None) -> Dict[int, Set[str]]:
    """Family → the interfaces that lead to these guest addresses."""
    table = table or RouteTable()
    out: Dict[int, Set[str]] = {4: set(), 6: set()}
    for address in addresses:
        iface = table.interface_for(address)
        if iface:
            out[ip_address(address).version].add(iface)
    return out
