"""Questions to libvirt, for the CLI and the daemon only (never from a hook)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Tuple

from portfwd.libvirt.discover import Resolver
from portfwd.errors import HostError
from portfwd.config.model import Config, Guest

if TYPE_CHECKING:
    from portfwd.libvirt.discover import Lookup

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


def running_guests(conn: Any, discovering: Optional[Config] = None
                   ) -> Tuple[List[Guest], Dict[str, Resolver]]:
    """Every running domain, and for each a resolver of discovered addresses.

    Everything is asked of libvirt here, before the caller takes portfwd's lock:
    a hook that libvirt runs while it holds its own locks may be waiting for that
    lock, and a libvirt call made under it could then wait forever. For the guests
    of ``discovering`` whose addresses are found (no ipv4/ipv6 given), libvirt's
    ``interfaceAddresses`` is asked now for each source ``[options] discover``
    allows (lease; agent and ARP only when listed: the guest answers those).
    """
    libvirt = bindings()
    guests: List[Guest] = []
    resolvers: Dict[str, Resolver] = {}
    try:
        domains = conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE)
        for dom in domains:
            guest, resolver = _running(libvirt, dom, discovering)
            guests.append(guest)
            resolvers[guest.name] = resolver
    except libvirt.libvirtError as e:
        raise HostError(f"libvirt could not list domains: {e.get_error_message()}") from None
    return sorted(guests, key=lambda g: g.name), resolvers


def running_guest(conn: Any, name: str, uuid: Optional[str],
                  discovering: Optional[Config] = None) -> Optional[Tuple[Guest, Resolver]]:
    """One domain, by name (else by ``uuid``), as ``running_guests`` sees it; None
    when libvirt knows no such domain or it is not running."""
    libvirt = bindings()
    for find, key in ((conn.lookupByName, name), (conn.lookupByUUIDString, uuid)):
        if key is None:
            continue
        try:
            dom = find(key)
            return _running(libvirt, dom, discovering) if dom.isActive() else None
        except libvirt.libvirtError:
            continue  # no such domain (or it went away): try the UUID
    return None


def _running(libvirt: Any, dom: Any, discovering: Optional[Config]) -> Tuple[Guest, Resolver]:
    """A running domain and the resolver of its discovered addresses."""
    guest = Guest(dom.name(), dom.UUIDString().lower())
    try:
        xml = dom.XMLDesc(0).encode()
    except libvirt.libvirtError:
        xml = b""
    lookup = None
    if discovering is not None and any(
            f.discover for f in discovering.forwards_for(guest.name, guest.uuid)):
        lookup = _lookup(libvirt, dom, discovering.options.discover)
    return guest, Resolver(guest.name, xml, lookup)


def _lookup(libvirt: Any, dom: Any, allowed: Sequence[str]) -> Lookup:
    """A lookup over what libvirt says now (asked at once, never later)."""
    sources = [("libvirt lease", "lease", libvirt.VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_LEASE),
               ("guest agent", "agent", libvirt.VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_AGENT),
               ("ARP table", "arp", libvirt.VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_ARP)]
    wanted_type = {4: libvirt.VIR_IP_ADDR_TYPE_IPV4, 6: libvirt.VIR_IP_ADDR_TYPE_IPV6}
    answers: List[Tuple[str, Dict[str, Any]]] = []
    for name, option, source in sources:
        if option not in allowed:
            continue
        try:
            answers.append((name, dom.interfaceAddresses(source, 0) or {}))
        except libvirt.libvirtError:
            continue  # no agent, no lease support, …: try the next source

    def lookup(mac: str, family: int) -> Optional[Tuple[str, str]]:
        for name, found in answers:
            for iface in found.values():
                if str(iface.get("hwaddr", "")).lower() != mac:
                    continue
                for addr in iface.get("addrs") or []:
                    if addr.get("type") == wanted_type[family] and addr.get("addr"):
                        return str(addr["addr"]), name
        return None

    return lookup


def running_domain_xmls(conn: Any) -> Dict[str, bytes]:
    """Name → live domain XML of every running domain (read-only questions)."""
    libvirt = bindings()
    out: Dict[str, bytes] = {}
    try:
        for dom in conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE):
            try:
                out[dom.name()] = dom.XMLDesc(0).encode()
            except libvirt.libvirtError:
                continue  # stopped meanwhile
    except libvirt.libvirtError as e:
        raise HostError(f"libvirt could not list domains: {e.get_error_message()}") from None
    return out
