"""Guest addresses from what libvirt already knows, without calling libvirt.

Sources, in order: the address in forward.toml (never reaches here), the
network's static DHCP reservations (libvirt's network XML files), libvirt's
dnsmasq lease files, and, outside hooks only, a lookup through libvirt's API
(``interfaceAddresses``: lease, then agent, then ARP) passed in by the caller.
"""

from __future__ import annotations

import json
import os
import time

from .plan import parse_selector

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Callable, Dict, List, Optional, Set, Tuple
    from xml.etree.ElementTree import Element

    # (mac, family) → (address, source) or None
    Lookup = Callable[[str, int], Optional[Tuple[str, str]]]

LEASE_DIR = "/var/lib/libvirt/dnsmasq"
NETWORK_DIRS = ("/run/libvirt/network", "/etc/libvirt/qemu/networks")


class Nic:
    __slots__ = ("mac", "network", "bridge")

    def __init__(self, mac: str, network: Optional[str], bridge: Optional[str]) -> None:
        self.mac = mac
        self.network = network
        self.bridge = bridge


class Network:
    """What a libvirt network's XML says about addresses."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.bridge: Optional[str] = None
        self.hosts4: Dict[str, str] = {}  # mac → reserved IPv4
        self.hosts6: List[Tuple[str, str, str]] = []  # (id, name, reserved IPv6)
        self.prefix6: Optional[Tuple[int, int]] = None  # (network as int, length)
        self.families: Set[int] = set()  # address families the network has a range of


def domain_nics(xml: bytes) -> List[Nic]:
    """Each NIC of a domain XML: MAC (lower case), libvirt network, bridge."""
    from xml.etree import ElementTree

    try:
        root = ElementTree.fromstring(xml)
    except ElementTree.ParseError:
        return []
    out = []
    for iface in root.iter("interface"):
        mac = iface.find("mac")
        source = iface.find("source")
        if mac is None or not mac.get("address"):
            continue
        network = source.get("network") if source is not None else None
        bridge = source.get("bridge") if source is not None else None
        out.append(Nic(str(mac.get("address")).lower(), network, bridge))
    return out


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
            for host in ip.findall("dhcp/host"):
                address = host.get("ip")
                if not address:
                    continue
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


def _v6int(address: str) -> Optional[int]:
    from _socket import AF_INET6, inet_pton

    try:
        return int.from_bytes(inet_pton(AF_INET6, address), "big")
    except OSError:
        return None


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


def _duid_has_mac(duid: str, mac: str) -> bool:
    """DUID-LL and DUID-LLT end with the MAC (libvirt and dnsmasq print them in hex)."""
    tail = "".join(f"{int(x, 16):02x}" for x in duid.replace("-", ":").split(":") if x)
    return tail.endswith(mac.replace(":", ""))


class Resolver:
    """Finds the address a selector (``?mac=…[&suffix=…]``) stands for, for one guest."""

    def __init__(self, guest: str, xml: Optional[bytes], lookup: Optional[Lookup] = None,
                 lease_dir: str = LEASE_DIR, network_dirs: Tuple[str, ...] = NETWORK_DIRS,
                 now: Optional[float] = None) -> None:
        self.guest = guest
        self.nics = domain_nics(xml) if xml else []
        self.lookup = lookup
        self.lease_dir = lease_dir
        self.network_dirs = network_dirs
        self.now = time.time() if now is None else now
        self._networks: Dict[str, Optional[Network]] = {}

    def _network(self, name: Optional[str]) -> Optional[Network]:
        if not name:
            return None
        if name not in self._networks:
            self._networks[name] = read_network(name, self.network_dirs)
        return self._networks[name]

    def nic(self, mac: str) -> Optional[Nic]:
        """The NIC with ``mac``, or by default the first one on a libvirt network."""
        if mac:
            return next((n for n in self.nics if n.mac == mac), None)
        return next((n for n in self.nics if n.network), self.nics[0] if self.nics else None)

    def applies(self, selector: str, family: int) -> bool:
        """False when the NIC's network is known to have no range of ``family`` (an
        IPv4-only network): a discovered forward then has nothing to wait for."""
        nic = self.nic(parse_selector(selector)[0])
        network = self._network(nic.network) if nic else None
        return network is None or family in network.families

    def resolve(self, selector: str, family: int) -> Tuple[Optional[str], str]:
        """(address, where it came from), or (None, why there is none yet)."""
        mac, suffix = parse_selector(selector)
        nic = self.nic(mac)
        if nic is None:
            return None, (f"the domain has no NIC with MAC {mac}" if mac
                          else "the domain has no NIC")
        network = self._network(nic.network)
        if family == 6 and suffix:
            if network is None or network.prefix6 is None:
                return None, (f"network {nic.network or '(none)'} of NIC {nic.mac} has no IPv6"
                              f" range to join suffix {suffix} to")
            value = _v6int(suffix)
            if value is None:
                return None, f"{suffix} is not an IPv6 suffix"
            return _v6str(network.prefix6[0] | value), f"suffix on network {network.name}"
        found = self._reserved(nic, network, family) or self._leased(nic, network, family)
        if found is None and self.lookup is not None:
            found = self.lookup(nic.mac, family)
        if found is not None:
            return found
        where = f"network {nic.network}" if nic.network else f"bridge {nic.bridge}"
        return None, f"no IPv{family} address yet for NIC {nic.mac} on {where}"

    def _reserved(self, nic: Nic, network: Optional[Network],
                  family: int) -> Optional[Tuple[str, str]]:
        if network is None:
            return None
        if family == 4 and nic.mac in network.hosts4:
            return network.hosts4[nic.mac], f"reservation on network {network.name}"
        if family == 6:
            for duid, name, address in network.hosts6:
                if name == self.guest or (duid and _duid_has_mac(duid, nic.mac)):
                    return address, f"reservation on network {network.name}"
        return None

    def _leased(self, nic: Nic, network: Optional[Network],
                family: int) -> Optional[Tuple[str, str]]:
        bridge = nic.bridge or (network.bridge if network else None)
        if not bridge:
            return None
        best: Optional[Tuple[float, str]] = None
        for lease in leases(bridge, self.lease_dir):
            address = str(lease.get("ip-address", ""))
            if (":" in address) != (family == 6):
                continue
            mac = str(lease.get("mac-address", "")).lower()
            duid = str(lease.get("client-id", ""))
            if mac != nic.mac and not (family == 6 and duid and _duid_has_mac(duid, nic.mac)):
                continue
            expiry = float(str(lease.get("expiry-time", 0)) or 0)
            if expiry and expiry < self.now:
                continue
            key = expiry or float("inf")
            if best is None or key >= best[0]:  # the newest lease; on a tie the later entry
                best = (key, address)
        return (best[1], f"lease on {bridge}") if best else None
