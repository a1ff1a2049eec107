"""Evidence that a discovered address belongs to a NIC: the host's neighbour table
and the bridges' forwarding databases (FDB), read over netlink (no subprocess:
the hook reads them, once, when it has discovered an address to check).

A discovered address X of a NIC with MAC M on bridge BR, tap T (its ``<target
dev>``) is *proven* when both hold:

- the host's neighbour entry for X on BR is usable (REACHABLE, STALE, DELAY,
  PROBE, PERMANENT, NOARP) and its link-layer address is M: what the host DNATs
  to X, it sends to M;
- BR's FDB has M on port T, and on no other port: frames to M leave by T.

Together they say that traffic DNATed to X reaches this NIC. Neither is enough
alone: the neighbour entry can be made from the lease itself (dnsmasq writes
the leased address with the DHCP chaddr into the host's ARP cache before the
client answers anything), and frames to a MAC the bridge has not learned are
flooded to every port; the FDB entry says nothing about who answers for X.

*Contrary* evidence is a usable neighbour entry for X with another MAC, or M in
the FDB on another port (or as the host's own address): the address is refused.
``Evidence.verdict`` tells which; the resolver decides what it means (an address
applied before and not contradicted stays, see ``discover.Resolver``).

Every address portfwd finds rather than reads from forward.toml needs it, a static
reservation of the network XML included: that says which MAC dnsmasq hands the
address to, not who answers for it (a guest can configure any address). The hook
asks the kernel for nothing (at ``started`` the guest has not even booted, and a
hook waits for nothing): ``sync`` solicits the addresses left waiting
(``solicit``), and the daemon looks again until the evidence is there (``Recheck``).

Cheap to import (os, _socket): the hook imports it when it discovers an address.
"""

from __future__ import annotations

import os
import time

from portfwd.values import Reason

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Dict, Iterable, List, Optional, Sequence, Set, Tuple

    Neighbour = Tuple[str, str, str, int]  # interface, address, MAC, NUD state
    FdbEntry = Tuple[str, str, str, int]  # bridge, port, MAC, NUD state
    Awaited = Tuple[str, str, str, str, str]  # guest, address, MAC, bridge, tap

# neighbour states (linux/neighbour.h)
NUD_INCOMPLETE, NUD_REACHABLE, NUD_STALE, NUD_DELAY = 0x01, 0x02, 0x04, 0x08
NUD_PROBE, NUD_FAILED, NUD_NOARP, NUD_PERMANENT = 0x10, 0x20, 0x40, 0x80
USABLE = NUD_REACHABLE | NUD_STALE | NUD_DELAY | NUD_PROBE | NUD_PERMANENT | NUD_NOARP
STATE_NAMES = ((NUD_INCOMPLETE, "INCOMPLETE"), (NUD_REACHABLE, "REACHABLE"), (NUD_STALE, "STALE"),
               (NUD_DELAY, "DELAY"), (NUD_PROBE, "PROBE"), (NUD_FAILED, "FAILED"),
               (NUD_NOARP, "NOARP"), (NUD_PERMANENT, "PERMANENT"))
NTF_USE = 0x01
RTM_NEWNEIGH, RTM_GETNEIGH = 28, 30
NDA_DST, NDA_LLADDR, NDA_MASTER = 1, 2, 9
AF_BRIDGE = 7


class Evidence:
    """The neighbour table and the FDBs of this host, each read once when first
    needed (or given: tests, and callers that read them already)."""

    def __init__(self, neighbours: Optional[Iterable[Neighbour]] = None,
                 fdb: Optional[Iterable[FdbEntry]] = None) -> None:
        self._neighbours = None if neighbours is None else _by_address(neighbours)
        self._fdb = None if fdb is None else _by_mac(fdb)

    def neighbour(self, interface: str, address: str) -> Optional[Tuple[str, int]]:
        """(MAC, state) of the host's neighbour entry for ``address`` on ``interface``."""
        if self._neighbours is None:
            self._neighbours = _by_address(read_neighbours())
        return self._neighbours.get((interface, address))

    def fdb(self, bridge: str, mac: str) -> Optional[List[Tuple[str, int]]]:
        """(port, state) of each entry for ``mac`` in ``bridge``'s FDB; None when
        ``bridge`` keeps none (not a Linux bridge, or no such interface)."""
        if self._fdb is None:
            self._fdb = _by_mac(read_fdb())
        ports, bridges = self._fdb
        if bridge not in bridges and not os.path.isdir(f"/sys/class/net/{bridge}/bridge"):
            return None  # (a bridge without ports or addresses has no entry at all)
        return ports.get((bridge, mac), [])

    def verdict(self, address: str, mac: str, bridge: str, tap: Optional[str]) -> Optional[Reason]:
        """None when the address is proven to be the NIC's; else why not: REFUSED
        for contrary evidence, WAITING for evidence not there (yet)."""
        entries = self.fdb(bridge, mac)
        if entries is None:
            return Reason(Reason.WAITING, f"{bridge} is not a Linux bridge (no forwarding"
                                          f" database shows where MAC {mac} is): set ipv4/ipv6"
                                          " in forward.toml")
        contrary = _contrary_fdb(entries, mac, bridge, tap)
        if contrary:
            return Reason(Reason.REFUSED, contrary)
        seen = self.neighbour(bridge, address)
        if seen is not None and seen[1] & USABLE and seen[0] != mac:
            return Reason(Reason.REFUSED, f"the host's neighbour entry for {address} on {bridge}"
                                          f" has MAC {seen[0]}, not this NIC's {mac}")
        if tap is None:
            return Reason(Reason.WAITING, f"the domain XML names no tap (<target dev>) for NIC"
                                          f" {mac}")
        if seen is None or not seen[1] & USABLE:
            return Reason(Reason.WAITING, f"no neighbour entry for {address} with MAC {mac} on"
                                          f" {bridge} yet")
        if not entries:
            return Reason(Reason.WAITING, f"MAC {mac} not seen on its tap {tap} yet (forwarding"
                                          f" database of bridge {bridge})")
        return None


def _contrary_fdb(entries: List[Tuple[str, int]], mac: str, bridge: str,
                  tap: Optional[str]) -> Optional[str]:
    """Why ``bridge``'s FDB entries for ``mac`` say frames to it leave elsewhere."""
    for port, state in entries:
        if state & NUD_PERMANENT:
            return f"MAC {mac} is the host's own address on {port} (bridge {bridge})"
        if tap is not None and port != tap:
            return (f"bridge {bridge}'s forwarding database has MAC {mac} on {port}, not"
                    f" only on this NIC's tap {tap}")
    return None


def _by_address(neighbours: Iterable[Neighbour]) -> Dict[Tuple[str, str], Tuple[str, int]]:
    return {(iface, address): (mac, state) for iface, address, mac, state in neighbours}


def _by_mac(fdb: Iterable[FdbEntry]) -> Tuple[Dict[Tuple[str, str], List[Tuple[str, int]]],
                                               Set[str]]:
    ports: Dict[Tuple[str, str], List[Tuple[str, int]]] = {}
    bridges: Set[str] = set()
    for bridge, port, mac, state in fdb:
        bridges.add(bridge)
        ports.setdefault((bridge, mac), []).append((port, state))
    return ports, bridges


def _mac(raw: bytes) -> str:
    return ":".join(f"{o:02x}" for o in raw)


def _names() -> Dict[int, str]:
    from _socket import if_nameindex

    return {index: name for index, name in if_nameindex()}


def _entries(family: int) -> List[Tuple[int, int, Dict[int, bytes]]]:
    """(ifindex, state, attributes) of each RTM_NEWNEIGH answer to a dump of ``family``."""
    import struct

    from portfwd.host.hostnet import NLM_F_DUMP, netlink, netlink_attributes

    out = []
    # ndmsg: family, pad, pad, ifindex, state, flags, type
    request = struct.pack("=BBHiHBB", family, 0, 0, 0, 0, 0, 0)
    for kind, body in netlink(RTM_GETNEIGH, NLM_F_DUMP, request)[0]:
        if kind == RTM_NEWNEIGH and len(body) >= 12:
            _, _, _, ifindex, state, _, _ = struct.unpack_from("=BBHiHBB", body, 0)
            out.append((ifindex, state, netlink_attributes(body, 12)))
    return out


def read_neighbours() -> List[Neighbour]:
    """(interface, address, MAC, state) of every IPv4 and IPv6 neighbour entry."""
    from _socket import AF_INET, AF_INET6, inet_ntop

    names = _names()
    out = []
    for ifindex, state, attrs in _entries(0):  # AF_UNSPEC: the ARP and the NDISC tables
        dst, lladdr = attrs.get(NDA_DST, b""), attrs.get(NDA_LLADDR, b"")
        if len(dst) not in (4, 16) or ifindex not in names:
            continue
        out.append((names[ifindex], inet_ntop(AF_INET if len(dst) == 4 else AF_INET6, dst),
                    _mac(lladdr), state))
    return out


def state_name(state: int) -> str:
    """``REACHABLE``, ``FAILED``, ... as ``ip neigh`` names a NUD state ("NONE": 0)."""
    names = [name for bit, name in STATE_NAMES if state & bit]
    return ",".join(names) or "NONE"


def read_fdb() -> List[FdbEntry]:
    """(bridge, port, MAC, state) of every entry of every Linux bridge's FDB (entries
    a port device keeps of its own, without a bridge, are left out)."""
    import struct

    names = _names()
    out = []
    for ifindex, state, attrs in _entries(AF_BRIDGE):
        master = attrs.get(NDA_MASTER, b"")
        lladdr = attrs.get(NDA_LLADDR, b"")
        if len(master) != 4 or len(lladdr) != 6:
            continue
        bridge = names.get(struct.unpack("=I", master)[0])
        if bridge is not None and ifindex in names:
            out.append((bridge, names[ifindex], _mac(lladdr), state))
    return out


def solicit(address: str, interface: str, recheck: bool = False) -> bool:
    """Ask the kernel to resolve ``address`` on ``interface`` now, as a packet to it
    would (an ARP request or neighbour solicitation; from a stale entry, a unicast
    probe after the kernel's delay): the answer makes both pieces of evidence if the
    NIC is there. ``recheck``: put an existing entry into PROBE, so that even one
    that says REACHABLE is asked again at once (no entry: False). Waits for nothing;
    False if the kernel refused."""
    import struct
    from _socket import AF_INET, AF_INET6, if_nametoindex, inet_pton

    from portfwd.host.hostnet import NLM_F_ACK, NLM_F_CREATE, NLM_F_REPLACE, netlink

    family = AF_INET6 if ":" in address else AF_INET
    try:
        dst = inet_pton(family, address)
        ifindex = if_nametoindex(interface)
        state, flags = (NUD_PROBE, 0) if recheck else (0, NTF_USE)
        request = (struct.pack("=BBHiHBB", family, 0, 0, ifindex, state, flags, 0)
                   + struct.pack("=HH", 4 + len(dst), NDA_DST) + dst)
        create = 0 if recheck else NLM_F_CREATE
        return netlink(RTM_NEWNEIGH, NLM_F_ACK | create | NLM_F_REPLACE, request)[1] == 0
    except OSError:
        return False


class Recheck:
    """For the daemon: while forwards wait for evidence (``arm``: what the last
    reconcile left waiting), look at the kernel every FAST seconds for a minute,
    then every SLOW seconds, and solicit what is missing; ``due`` says when the
    evidence of one of them is complete, so that a reconcile would apply it. Costs
    two netlink dumps per look, and nothing while no forward waits."""

    FAST, SLOW, FAST_FOR = 2.0, 15.0, 60.0

    def __init__(self) -> None:
        self.awaited: List[Awaited] = []
        self.armed = 0.0
        self.next = 0.0

    def arm(self, awaited: Sequence[Awaited], now: Optional[float] = None) -> None:
        self.awaited = list(awaited)
        self.armed = time.monotonic() if now is None else now
        self.next = self.armed + self.FAST

    def due(self, now: Optional[float] = None) -> Optional[Awaited]:
        """The first waiting address whose evidence is now complete, if a look is due."""
        now = time.monotonic() if now is None else now
        if not self.awaited or now < self.next:
            return None
        self.next = now + (self.FAST if now - self.armed < self.FAST_FOR else self.SLOW)
        evidence = Evidence()
        try:
            for awaited in self.awaited:
                _, address, mac, bridge, tap = awaited
                if evidence.verdict(address, mac, bridge, tap or None) is None:
                    return awaited
        except OSError:
            return None
        for _, address, _, bridge, _ in self.awaited:
            solicit(address, bridge)
        return None
