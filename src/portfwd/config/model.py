"""The configuration as plain frozen data; no I/O here."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import List, Optional, Tuple, Union

from portfwd.constants import DEFAULT_DISCOVER, DEFAULT_TABLE
from portfwd.values import PortSpan, Selector

IPAddress = Union[IPv4Address, IPv6Address]
Listen = Union[IPv4Address, IPv6Address, str]  # an address, or an interface name
IPNetwork = Union[IPv4Network, IPv6Network]



@dataclass(frozen=True)
class PortRange:
    """Host ports ``host_first..host_last`` go to guest ports from ``guest_first``."""

    proto: str
    host_first: int
    host_last: int
    guest_first: int

    @property
    def count(self) -> int:
        return self.host_last - self.host_first + 1

    @property
    def guest_last(self) -> int:
        return self.guest_first + self.count - 1

    def pairs(self) -> "list[tuple[int, int]]":
        """Every (host port, guest port) pair of the range."""
        offset = self.guest_first - self.host_first
        return [(p, p + offset) for p in range(self.host_first, self.host_last + 1)]

    def __str__(self) -> str:
        host = PortSpan(self.host_first, self.host_last)
        guest = PortSpan(self.guest_first, self.guest_last)
        return f"{host}:{guest}/{self.proto}"


@dataclass(frozen=True)
class Where:
    """A place in the configuration: the file and the key path, e.g. ``forward[1].ports[2]``.

    Line and column are looked up only when a message needs them (config.py):
    finding them costs more than parsing a large file.
    """

    file: str
    path: str


@dataclass(frozen=True)
class PortForward:
    """One entry of ``ports``, with listen and from already resolved."""

    ports: PortRange
    listen: Tuple[Listen, ...]  # empty: every local address; str: an interface's addresses
    sources: Tuple[IPNetwork, ...]  # empty: any source
    where: Where
    localhost: bool = False  # also 127.0.0.1 (IPv4)
    listen_at: Optional[str] = None  # the key path listen came from (None: none given)


@dataclass(frozen=True)
class Forward:
    """One ``[[forward]]`` table."""

    index: int
    guest: Optional[str]
    uuid: Optional[str]
    ipv4: Optional[IPv4Address]
    ipv6: Optional[IPv6Address]
    ports: Tuple[PortForward, ...]
    where: Where
    interface: Optional[str] = None  # MAC of the guest NIC to forward to (None: the first)
    ipv6_suffix: Optional[IPv6Address] = None  # "::10": joined to the network's IPv6 prefix

    @property
    def label(self) -> str:
        return self.guest if self.guest is not None else f"uuid {self.uuid}"

    @property
    def discover(self) -> bool:
        """No address given: both families are found from libvirt's data."""
        return self.ipv4 is None and self.ipv6 is None and self.ipv6_suffix is None

    def target(self, family: int) -> Optional[Union[str, Selector]]:
        """The guest address of ``family``, or a selector for an address discovered
        when the guest runs, or None when not forwarded."""
        return self._targets[0 if family == 4 else 1]

    @cached_property
    def _targets(self) -> Tuple[Optional[Union[str, Selector]], ...]:
        """``target`` of IPv4 and IPv6, worked out once (a sync of 10,000 forwards
        asks for them per port and family)."""
        out: List[Optional[Union[str, Selector]]] = []
        for family, given in ((4, self.ipv4), (6, self.ipv6)):
            mac = self.interface or ""
            if given is not None:
                out.append(str(given))
            elif family == 6 and self.ipv6_suffix is not None:
                out.append(Selector(mac, str(self.ipv6_suffix)))
            else:
                out.append(Selector(mac) if self.discover else None)
        return tuple(out)

    def families(self, pf: PortForward) -> Tuple[int, ...]:
        """The address families (4, 6) in which this port forward is active.

        A family needs a guest address; a listen list or a from list that names
        only the other family shuts it out.
        """
        out = []
        for family in (4, 6):
            if self.target(family) is None:
                continue
            if pf.listen and not any(isinstance(a, str) or a.version == family for a in pf.listen) \
                    and not (family == 4 and pf.localhost):
                continue
            if pf.sources and not any(n.version == family for n in pf.sources):
                continue
            out.append(family)
        return tuple(out)


@dataclass(frozen=True)
class Options:
    table: str = DEFAULT_TABLE
    listen: Tuple[Listen, ...] = ()
    strict: bool = False
    localhost: bool = False
    discover: Tuple[str, ...] = DEFAULT_DISCOVER
    domain_forwards: bool = False  # forwards in the domains' <metadata> (domainforwards)
    domain_ports: Tuple[Tuple[int, int], ...] = ()  # the host port spans they may claim


@dataclass(frozen=True)
class Config:
    path: str
    options: Options
    forwards: Tuple[Forward, ...]
    warnings: Tuple[str, ...] = ()

    def forwards_for(self, name: str, uuid: Optional[str]) -> "list[Forward]":
        """The forwards that name this guest, by name or by UUID, in file order."""
        by_name, by_uuid = self._index
        hits = by_name.get(name, []) + (by_uuid.get(uuid.lower(), []) if uuid else [])
        return sorted({id(f): f for f in hits}.values(), key=lambda f: f.index)

    @cached_property
    def _index(self) -> "tuple[dict[str, list[Forward]], dict[str, list[Forward]]]":
        """Forwards by guest name and by UUID: a daemon asks for each of 1,000 guests."""
        by_name: "dict[str, list[Forward]]" = {}
        by_uuid: "dict[str, list[Forward]]" = {}
        for f in self.forwards:
            if f.guest is not None:
                by_name.setdefault(f.guest, []).append(f)
            if f.uuid is not None:
                by_uuid.setdefault(f.uuid, []).append(f)
        return by_name, by_uuid


@dataclass(frozen=True)
class Guest:
    """A running guest as the hook or libvirt reports it."""

    name: str
    uuid: Optional[str] = None

