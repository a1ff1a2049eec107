"""Guest addresses from what libvirt already knows, without calling libvirt: the
address a forward leads to, for each NIC of the domain XML (``domainxml``).

Sources, in order: the address in forward.toml (never reaches here), the
network's static DHCP reservations (libvirt's network XML files), libvirt's
dnsmasq lease files, and, outside hooks only, a lookup through libvirt's API
(``interfaceAddresses``: lease, then agent, then ARP, as far as ``[options]
discover`` allows) passed in by the caller.

What is found is untrusted input (a guest chooses its DHCP client-id and the
chaddr dnsmasq records as the lease's MAC, answers for its agent and its ARP
entries). Every address found is first written in canonical form (``canonical``:
``FD00::0001`` is ``fd00::1``, an IPv4 address with leading zeros is no
address), then becomes a DNAT target only if it is a unicast address inside the
NIC's libvirt network, routed out of that network's bridge, not the host's own,
not another running guest's (by reservation, live lease or forward:
:meth:`Resolver.vet`), and shown to be this NIC's by the host's neighbour table
and the bridge's forwarding database (``evidence``) unless the admin wrote it (a
reservation in the network XML, a suffix in forward.toml: ``Found.admins``). IPv4
leases are matched on the lease's MAC;
IPv6 leases on the MAC dnsmasq saw, or on a DUID the network XML reserves for
this guest; a MAC holding live leases under several client-ids is refused.

Longer than ~450 lines on purpose: the sources and the vetting of what they say
are one job (every vetting rule names the sources it applies to), so they stay
together.
"""

from __future__ import annotations

import json
import os
import time

from portfwd.constants import DEFAULT_DISCOVER
from portfwd.libvirt.domainxml import Domain, mac_addresses, parse, status_files
from portfwd.values import Reason

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Callable, Dict, List, Optional, Sequence, Set, Tuple, Union
    from xml.etree.ElementTree import Element

    from portfwd.libvirt.domainxml import Nic
    from portfwd.host.evidence import Evidence
    from portfwd.host.hostnet import RouteTable as Routes
    from portfwd.values import Selector

    # (mac, family) → (address, source) or None
    Lookup = Callable[[str, int], Optional[Tuple[str, str]]]

LEASE_DIR = "/var/lib/libvirt/dnsmasq"
NETWORK_DIRS = ("/run/libvirt/network", "/etc/libvirt/qemu/networks")


class Found:
    """An address a source gave for a NIC (``Resolver._find``), where it came from
    (``"lease on virbr0"``), and whether the admin wrote it (a reservation in the
    network XML, a suffix in forward.toml): then it is taken as an address in
    forward.toml is, without evidence from the kernel."""

    __slots__ = ("address", "where", "admins")

    def __init__(self, address: str, where: str, admins: bool = False) -> None:
        self.address = address
        self.where = where
        self.admins = admins


class Network:
    """What a libvirt network's XML says about addresses."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.bridge: Optional[str] = None
        self.hosts4: Dict[str, str] = {}  # mac → reserved IPv4
        self.hosts6: List[Tuple[str, str, str]] = []  # (id, name, reserved IPv6)
        self.prefix6: Optional[Tuple[int, int]] = None  # (network as int, length)
        self.families: Set[int] = set()  # address families the network has a range of
        self.subnets: List[Tuple[int, int, int]] = []  # (family, network as int, length)


def _network_element(root: Element) -> Optional[Element]:
    return root if root.tag == "network" else root.find(".//network")


def read_network(name: str, dirs: Tuple[str, ...] = NETWORK_DIRS) -> Optional[Network]:
    """The network's live status file, else its persistent definition."""
    from xml.etree import ElementTree

    for folder in dirs:
        try:
            root = ElementTree.parse(os.path.join(folder, f"{name}.xml")).getroot()
        except (OSError, ElementTree.ParseError):
            continue
        element = _network_element(root)
        if element is None:
            continue
        net = Network(name)
        bridge = element.find("bridge")
        net.bridge = bridge.get("name") if bridge is not None else None
        for ip in element.findall("ip"):
            family = ip.get("family", "ipv4")
            net.families.add(6 if family == "ipv6" else 4)
            subnet = _subnet(ip, 6 if family == "ipv6" else 4)
            if subnet is not None:
                net.subnets.append(subnet)
            for host in ip.findall("dhcp/host"):
                address = host.get("ip")
                if not address:
                    continue
                address = canonical(address, 6 if family == "ipv6" else 4) or address
                if family == "ipv6":
                    net.hosts6.append((host.get("id", "").lower(), host.get("name", ""), address))
                elif host.get("mac"):
                    net.hosts4[str(host.get("mac")).lower()] = address
            if family == "ipv6" and ip.get("address") and net.prefix6 is None:
                length = int(ip.get("prefix", "64"))
                value = _v6int(str(ip.get("address")))
                if value is not None:
                    net.prefix6 = (value >> (128 - length) << (128 - length), length)
        return net
    return None


def _subnet(ip: Element, family: int) -> Optional[Tuple[int, int, int]]:
    """``<ip address=… prefix=…|netmask=…>`` → (family, network as int, length)."""
    value = _addr_int(str(ip.get("address", "")), family)
    if value is None:
        return None
    bits = 32 if family == 4 else 128
    length: Optional[int] = None
    if ip.get("prefix", "").isdigit():
        length = int(str(ip.get("prefix")))
    elif family == 4 and ip.get("netmask"):
        mask = _addr_int(str(ip.get("netmask")), 4)
        length = bin(mask).count("1") if mask is not None else None
    elif family == 6:
        length = 64
    if length is None or not 0 < length <= bits:
        return None
    return family, value >> (bits - length) << (bits - length), length


def _addr_int(address: str, family: int) -> Optional[int]:
    """An address of ``family`` as an integer, None when it is not one."""
    from _socket import AF_INET, AF_INET6, inet_pton

    try:
        return int.from_bytes(inet_pton(AF_INET6 if family == 6 else AF_INET, address), "big")
    except (OSError, ValueError):
        return None


def canonical(address: str, family: int) -> Optional[str]:
    """``address`` as the kernel and ``ipaddress`` write it (``FD00:0:0::0001`` →
    ``fd00::1``), or None when it is not an address of ``family``: an IPv4 address
    with leading zeros is refused, never read as octal or decimal (inet_pton)."""
    from _socket import AF_INET, AF_INET6, inet_ntop, inet_pton

    kind = AF_INET6 if family == 6 else AF_INET
    try:
        return inet_ntop(kind, inet_pton(kind, address))
    except (OSError, ValueError, TypeError):
        return None


def canonical_keys(by_address: Dict[str, str]) -> Dict[str, str]:
    """The same mapping, its address keys in canonical form."""
    out = {}
    for address, value in by_address.items():
        out[canonical(address, 6 if ":" in address else 4) or address] = value
    return out


def running_macs(folder: Optional[str] = None) -> Dict[str, str]:
    """MAC (lower case) → name of each running domain, from libvirt's status files:
    no libvirt call, no XML parser (a hook reads them only when an address it checks
    is held by a MAC that is not the guest's)."""
    return {mac: name for name, xml in (status_files(folder) or {}).items()
            for mac in mac_addresses(xml)}


def _v6int(address: str) -> Optional[int]:
    return _addr_int(address, 6)


def _v6str(value: int) -> str:
    from _socket import AF_INET6, inet_ntop

    return inet_ntop(AF_INET6, value.to_bytes(16, "big"))


def leases(bridge: str, lease_dir: str = LEASE_DIR) -> List[Dict[str, object]]:
    """libvirt's record of dnsmasq's leases on ``bridge`` (``BRIDGE.status``)."""
    try:
        with open(os.path.join(lease_dir, f"{bridge}.status"), encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return []
    return [d for d in data if isinstance(d, dict)] if isinstance(data, list) else []


def duid_mac(duid: str) -> Optional[str]:
    """The Ethernet MAC a DUID-LLT (type 1) or DUID-LL (type 3) is made of, else None.

    libvirt and dnsmasq print DUIDs as hex octets ("0:3:0:1:52:54:…"); the MAC must
    be the whole link-layer part, not merely a suffix of the DUID.
    """
    try:
        octets = [int(x, 16) for x in duid.replace("-", ":").split(":") if x]
    except ValueError:
        return None
    if any(not 0 <= o <= 255 for o in octets) or len(octets) < 4:
        return None
    kind, hwtype = octets[0] << 8 | octets[1], octets[2] << 8 | octets[3]
    lladdr = octets[8:] if kind == 1 else octets[4:] if kind == 3 else []
    if hwtype != 1 or len(lladdr) != 6:
        return None
    return ":".join(f"{o:02x}" for o in lladdr)


def _unicast_problem(value: int, family: int) -> Optional[str]:
    """Why an address (as an integer) cannot be a guest's unicast address, else None."""
    if family == 4:
        first = value >> 24
        if first in (0, 127) or value >> 16 == 0xA9FE or first >= 224:
            return "not a unicast address (zero, loopback, link-local, multicast or reserved)"
        return None
    if value >> 118 == 0x3FA or value >> 120 == 0xFF or value <= 1 or value >> 32 == 0xFFFF:
        return "not a unicast address (unspecified, loopback, link-local, multicast or mapped)"
    return None


class Resolver:
    """Finds the address a selector (``?mac=…[&suffix=…]``) stands for, for one guest.

    The host facts it vets discovered addresses against are constructor arguments
    (``for_host`` gives the same guest's resolver with others), never set on it
    afterwards: ``routes`` (interface_for), ``local`` (the host's own addresses)
    and ``evidence`` (neighbour table and bridge FDBs) are read from the kernel
    when not given; ``taken`` maps addresses that other guests' forwards use (in
    canonical form) to their names; ``running`` maps the MACs of running guests to
    their names (read from libvirt's status files when needed and not given);
    ``kept`` holds the addresses this guest's forwards were applied to before,
    which stay without fresh evidence while nothing contradicts them; ``discover``
    is ``[options] discover``. ``awaiting`` collects (address, MAC, bridge, tap)
    of each address refused or waiting for want of evidence.
    """

    def __init__(self, guest: str, xml: Union[None, bytes, Domain],
                 lookup: Optional[Lookup] = None, lease_dir: str = LEASE_DIR,
                 network_dirs: Tuple[str, ...] = NETWORK_DIRS, now: Optional[float] = None,
                 routes: Optional[Routes] = None, local: Optional[Set[str]] = None,
                 discover: Sequence[str] = DEFAULT_DISCOVER,
                 evidence: Optional[Evidence] = None, taken: Optional[Dict[str, str]] = None,
                 kept: Optional[Set[str]] = None,
                 running: Optional[Dict[str, str]] = None) -> None:
        self.guest = guest
        domain = xml if isinstance(xml, Domain) else parse(xml) if xml else Domain()
        self._domain = domain
        self.nics = list(domain.nics)
        self.taps = domain.taps  # for hairpin mode (bridgeport)
        self.forwards = domain.forwards  # its <metadata> forwards (domainforwards)
        self.lookup = lookup
        self.lease_dir = lease_dir
        self.network_dirs = network_dirs
        self.now = time.time() if now is None else now
        self.discover = tuple(discover)
        self.taken: Dict[str, str] = dict(taken or {})
        self.kept: Set[str] = set(kept or ())
        # read from the host when first needed and not given
        self._routes = routes
        self._local = local
        self._evidence = evidence
        self._running = running
        self.awaiting: List[Tuple[str, str, str, str]] = []
        self._networks: Dict[str, Optional[Network]] = {}
        self._local_canonical: Optional[Set[str]] = None
        self._leases: Dict[str, List[Dict[str, object]]] = {}
        self._holders: Dict[Tuple[str, int], Dict[str, List[Tuple[str, str, str]]]] = {}

    def for_host(self, discover: Sequence[str], routes: Optional[Routes],
                 taken: Dict[str, str], kept: Set[str],
                 running: Optional[Dict[str, str]] = None,
                 evidence: Optional[Evidence] = None) -> Resolver:
        """This guest's resolver (same domain, lookup, lease and network files, time)
        vetting against these host facts; this one is left as it is."""
        return Resolver(self.guest, self._domain, self.lookup, self.lease_dir,
                        self.network_dirs, self.now, routes, self._local, discover,
                        evidence if evidence is not None else self._evidence, taken, kept,
                        running if running is not None else self._running)

    def _network(self, name: Optional[str]) -> Optional[Network]:
        if not name:
            return None
        if name not in self._networks:
            self._networks[name] = read_network(name, self.network_dirs)
        return self._networks[name]

    def _lease_list(self, bridge: str) -> List[Dict[str, object]]:
        if bridge not in self._leases:
            self._leases[bridge] = leases(bridge, self.lease_dir)
        return self._leases[bridge]

    def nic(self, mac: str) -> Optional[Nic]:
        """The NIC with ``mac``, or by default the first one on a libvirt network."""
        if mac:
            return next((n for n in self.nics if n.mac == mac), None)
        return next((n for n in self.nics if n.network), self.nics[0] if self.nics else None)

    def applies(self, selector: Selector, family: int) -> bool:
        """False when the NIC's network is known to have no range of ``family`` (an
        IPv4-only network): a discovered forward then has nothing to wait for."""
        nic = self.nic(selector.mac)
        network = self._network(nic.network) if nic else None
        return network is None or family in network.families

    def resolve(self, selector: Selector, family: int) -> Union[Tuple[str, str], Reason]:
        """(address in canonical form, where it came from), or the reason there is
        none yet (``Reason.WAITING``: also while the evidence that it is this NIC's
        is missing) or why what was found is refused (``Reason.REFUSED``)."""
        mac, suffix = selector.mac, selector.suffix
        nic = self.nic(mac)
        if nic is None:
            return Reason(Reason.WAITING, f"the domain has no NIC with MAC {mac}" if mac
                          else "the domain has no NIC")
        network = self._network(nic.network)
        if network is None:
            return Reason(Reason.WAITING,
                          f"NIC {nic.mac} is not on a libvirt network whose definition portfwd"
                          " can read (bridge " + (nic.bridge or "unknown") + "): set ipv4/ipv6"
                          " in forward.toml")
        found = self._find(nic, network, family, suffix)
        if found is None or isinstance(found, Reason):
            return found or Reason(Reason.WAITING, f"no IPv{family} address yet for NIC"
                                                   f" {nic.mac} on network {network.name}")
        address = canonical(found.address, family)
        if address is None:
            return Reason(Reason.REFUSED, f"refused {found.address} from {found.where}: not an"
                                          f" IPv{family} address (inet_pton refuses it)")
        problem = self.vet(address, family, nic, network)
        if problem:
            return Reason(Reason.REFUSED, f"refused {address} from {found.where}: {problem}")
        # what the admin wrote is the admin's word, as an address in forward.toml is; what
        # the guest chooses (a lease, its agent, its ARP answers) needs the kernel's evidence
        unproven = None if found.admins else self._unproven(address, nic, network)
        if unproven is not None:
            what = "refused" if unproven.cause == Reason.REFUSED else "unconfirmed"
            return Reason(unproven.cause, f"{what} {address} from {found.where}: {unproven.text}")
        return address, found.where

    def _find(self, nic: Nic, network: Network, family: int, suffix: str
              ) -> Union[None, Found, Reason]:
        """The address as found, in the order of ``discover``; a Reason when a
        source's answer is refused as a whole."""
        if family == 6 and suffix:
            if network.prefix6 is None:
                return Reason(Reason.WAITING, f"network {network.name} of NIC {nic.mac} has no"
                                              f" IPv6 range to join suffix {suffix} to")
            value = _v6int(suffix)
            if value is None:
                return Reason(Reason.WAITING, f"{suffix} is not an IPv6 suffix")
            return Found(_v6str(network.prefix6[0] | value), f"suffix on network {network.name}",
                         admins=True)
        found: Union[None, Found, Reason] = None
        if "reservation" in self.discover:
            found = self._reserved(nic, network, family)
        if found is None and "lease" in self.discover:
            found = self._leased(nic, network, family)
        if found is None and self.lookup is not None:
            answer = self.lookup(nic.mac, family)
            found = None if answer is None else Found(*answer)
        return found

    def vet(self, address: str, family: int, nic: Nic, network: Network) -> Optional[str]:
        """Why a discovered address (in canonical form) must not be a DNAT target of
        this NIC, else None."""
        value = _addr_int(address, family)
        if value is None:
            return f"not an IPv{family} address"
        problem = _unicast_problem(value, family)
        if problem:
            return problem
        bits = 32 if family == 4 else 128
        inside = [(net, length) for fam, net, length in network.subnets if fam == family
                  and value >> (bits - length) << (bits - length) == net]
        if not inside:
            return f"outside the IPv{family} prefix of network {network.name}"
        net, length = inside[0]
        host_bits = value & ((1 << (bits - length)) - 1)
        if length < bits - 1 and (host_bits == 0 or (family == 4
                                                     and host_bits == (1 << (bits - length)) - 1)):
            return f"the network or broadcast address of network {network.name}"
        bridge = nic.bridge or network.bridge
        if self._routes is None:
            from portfwd.host.hostnet import RouteTable

            self._routes = RouteTable()
        routed = self._routes.interface_for(address)
        if bridge and routed != bridge:
            return f"routed out of {routed or 'no interface'}, not bridge {bridge}"
        if address in self._local_addresses():
            return "an address of the host itself"
        other = self.taken.get(address)
        if other is not None and other != self.guest:
            return f"the address of guest {other}"
        held = self._held_by_other(address, family, nic, network)
        if held:
            return held
        owner = next((m for m, a in network.hosts4.items() if a == address), nic.mac)
        if family == 4 and owner != nic.mac:
            return f"reserved on network {network.name} for MAC {owner}"
        return None

    def _local_addresses(self) -> Set[str]:
        """The host's own addresses, in canonical form (as given, or read once)."""
        if self._local_canonical is None:
            if self._local is None:
                from portfwd.host.hostnet import local_addresses

                self._local = local_addresses()
            self._local_canonical = {canonical(a, 6 if ":" in a else 4) or a for a in self._local}
        return self._local_canonical

    def _held_by_other(self, address: str, family: int, nic: Nic,
                       network: Network) -> Optional[str]:
        """Which other running guest a reservation or live lease of this network gives
        ``address`` to (by that guest's MAC, or the name of an IPv6 reservation)."""
        for mac, name, what in self._address_holders(network, family, nic).get(address, []):
            if mac == nic.mac:
                continue
            if self._running is None:
                self._running = running_macs()
            guest = self._running.get(mac) if mac else None
            if guest is None and name and name in self._running.values():
                guest = name
            if guest is not None and guest != self.guest:
                return f"the address of guest {guest} ({what})"
        return None

    def _address_holders(self, network: Network, family: int, nic: Nic
                         ) -> Dict[str, List[Tuple[str, str, str]]]:
        """Address → (MAC or "", reserved name or "", what) of each reservation and
        live lease on ``network``, in canonical form."""
        key = (network.name, family)
        if key in self._holders:
            return self._holders[key]
        out: Dict[str, List[Tuple[str, str, str]]] = {}
        reserved = f"reserved on network {network.name}"
        if family == 4:
            for mac, address in network.hosts4.items():
                out.setdefault(address, []).append((mac, "", reserved))
        else:
            for duid, name, address in network.hosts6:
                out.setdefault(address, []).append((duid_mac(duid) or "", name, reserved))
        bridge = nic.bridge or network.bridge
        for lease in self._lease_list(bridge) if bridge else []:
            raw = str(lease.get("ip-address", ""))
            if (":" in raw) != (family == 6) or not _live(lease, self.now):
                continue
            mac = str(lease.get("mac-address", "")).lower() or duid_mac(
                str(lease.get("client-id", ""))) or ""
            out.setdefault(canonical(raw, family) or raw, []).append((mac, "", f"lease on {bridge}"))
        self._holders[key] = out
        return out

    def _unproven(self, address: str, nic: Nic, network: Network) -> Optional[Reason]:
        """Why ``address`` is not (yet) proven to be this NIC's (``evidence``); an
        address applied before (``kept``) needs only that nothing contradicts it."""
        bridge = nic.bridge or network.bridge
        if not bridge:
            return Reason(Reason.WAITING, f"no bridge is known for NIC {nic.mac}")
        if self._evidence is None:
            from portfwd.host.evidence import Evidence

            self._evidence = Evidence()
        try:
            why = self._evidence.verdict(address, nic.mac, bridge, nic.tap)
        except OSError as e:
            why = Reason(Reason.WAITING, f"the host's neighbour table could not be read: {e}")
        if why is None or (why.cause == Reason.WAITING and address in self.kept):
            return None
        self.awaiting.append((address, nic.mac, bridge, nic.tap or ""))
        return why

    def _reserved(self, nic: Nic, network: Network, family: int) -> Optional[Found]:
        where = f"reservation on network {network.name}"
        if family == 4 and nic.mac in network.hosts4:
            return Found(network.hosts4[nic.mac], where, admins=True)
        if family == 6:
            for duid, name, address in network.hosts6:
                if name == self.guest or (duid and duid_mac(duid) == nic.mac):
                    return Found(address, where, admins=True)
        return None

    def _reserved_duids(self, nic: Nic, network: Network) -> Set[str]:
        """DUIDs the network XML reserves for this guest or this NIC (normalised)."""
        return {_norm_duid(duid) for duid, name, _ in network.hosts6
                if duid and (name == self.guest or duid_mac(duid) == nic.mac)}

    def _leased(self, nic: Nic, network: Network, family: int
                ) -> Union[None, Found, Reason]:
        bridge = nic.bridge or network.bridge
        if not bridge:
            return None
        duids = self._reserved_duids(nic, network) if family == 6 else set()
        best: Optional[Tuple[float, str]] = None
        others: Dict[str, float] = {}  # address → newest expiry of another client's lease
        clients: Set[str] = set()  # client-ids of this NIC's live leases
        for lease in self._lease_list(bridge):
            raw = str(lease.get("ip-address", ""))
            if (":" in raw) != (family == 6) or not _live(lease, self.now):
                continue
            address = canonical(raw, family) or raw  # else refused as no address, by resolve
            key = _expiry(lease) or float("inf")
            mac = str(lease.get("mac-address", "")).lower()
            duid = _norm_duid(str(lease.get("client-id", "")))
            # the MAC dnsmasq saw decides; a client-id (chosen by the guest) only when it
            # is a DUID the network XML reserves for this guest
            mine = mac == nic.mac or (family == 6 and not mac and duid in duids)
            if not mine:
                others[address] = max(others.get(address, 0.0), key)
                continue
            clients.add(duid)
            if best is None or key >= best[0]:  # the newest lease; on a tie the later entry
                best = (key, address)
        if len(clients) > 1:  # another client uses this NIC's MAC as its DHCP chaddr
            return Reason(Reason.REFUSED, f"refused the IPv{family} leases of MAC {nic.mac} on"
                                          f" {bridge}: they are held under {len(clients)}"
                                          " different client-ids (one NIC is one DHCP client);"
                                          " waiting until only one is left (expired or"
                                          " released)")
        if best is None or others.get(best[1], -1.0) > best[0]:
            return None  # none, or another client holds that address more recently
        return Found(best[1], f"lease on {bridge}")


def _expiry(lease: Dict[str, object]) -> float:
    """A lease's expiry time (0: never, or unreadable)."""
    try:
        return float(str(lease.get("expiry-time", 0)) or 0)
    except ValueError:
        return -1.0


def _live(lease: Dict[str, object], now: float) -> bool:
    expiry = _expiry(lease)
    return expiry == 0 or expiry >= now


def _norm_duid(duid: str) -> str:
    try:
        return ":".join(f"{int(x, 16):02x}" for x in duid.replace("-", ":").split(":") if x)
    except ValueError:
        return duid.lower()
