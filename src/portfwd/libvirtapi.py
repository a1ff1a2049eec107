"""Questions to libvirt, for the CLI and the daemon only (never from a hook)."""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

from .discover import Resolver
from .errors import HostError
from .model import Guest

DEFAULT_URI = "qemu:///system"


def bindings() -> Any:
    try:
        import libvirt
    except ImportError:
        raise HostError("the libvirt Python bindings are missing:"
                        " apt-get install python3-libvirt") from None
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)  # we report errors ourselves
    return libvirt


def connect(uri: str, read_only: bool = True) -> Any:
    libvirt = bindings()
    try:
        return libvirt.openReadOnly(uri) if read_only else libvirt.open(uri)
    except libvirt.libvirtError as e:
        raise HostError(f"cannot connect to libvirt at {uri}: {e.get_error_message()}"
                        " (is libvirtd running? see --connect)") from None


def running_guests(conn: Any) -> Tuple[List[Guest], Dict[str, Resolver]]:
    """Every running domain, and for each a resolver of discovered addresses that
    may also ask libvirt (lease, then guest agent, then ARP)."""
    libvirt = bindings()
    guests: List[Guest] = []
    resolvers: Dict[str, Resolver] = {}
    try:
        domains = conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE)
        for dom in domains:
            guest = Guest(dom.name(), dom.UUIDString().lower())
            guests.append(guest)
            try:
                xml = dom.XMLDesc(0).encode()
            except libvirt.libvirtError:
                xml = b""
            resolvers[guest.name] = Resolver(guest.name, xml, _lookup(libvirt, dom))
    except libvirt.libvirtError as e:
        raise HostError(f"libvirt could not list domains: {e.get_error_message()}") from None
    return sorted(guests, key=lambda g: g.name), resolvers


def _lookup(libvirt: Any, dom: Any) -> Any:
    sources = [("libvirt lease", libvirt.VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_LEASE),
               ("guest agent", libvirt.VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_AGENT),
               ("ARP table", libvirt.VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_ARP)]
    wanted_type = {4: libvirt.VIR_IP_ADDR_TYPE_IPV4, 6: libvirt.VIR_IP_ADDR_TYPE_IPV6}

    def lookup(mac: str, family: int) -> Optional[Tuple[str, str]]:
        for name, source in sources:
            try:
                found = dom.interfaceAddresses(source, 0) or {}
            except libvirt.libvirtError:
                continue  # no agent, no lease support, …: try the next source
            for iface in found.values():
                if str(iface.get("hwaddr", "")).lower() != mac:
                    continue
                for addr in iface.get("addrs") or []:
                    if addr.get("type") == wanted_type[family] and addr.get("addr"):
                        return str(addr["addr"]), name
        return None

    return lookup
