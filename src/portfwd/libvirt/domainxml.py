"""libvirt's domain XML: the one reader of it, and of the copies libvirt keeps.

``parse`` reads a domain once with ElementTree into a ``Domain`` (name, UUID,
NICs with MAC, network, bridge and tap). ``domain_uuid`` and ``mac_addresses``
find those values by a byte search instead, for paths that must stay light (the
hook of a guest without forwards imports no XML parser; a check of every running
guest's MACs reads many status files). ``status_files`` reads the live domain XML
of every running domain from the status files libvirt's QEMU driver keeps;
``running_domain`` tells from them whether one domain runs, and
``status_files_tell`` whether they describe the guests of a connection.
``mac_problem`` judges a NIC's MAC, read here or given in forward.toml.

Cheap to import (os only); ElementTree is imported by ``parse`` alone.
"""

from __future__ import annotations

import os

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Dict, List, Optional, Sequence, Tuple
    from xml.etree.ElementTree import Element

STATUS_DIR = "/run/libvirt/qemu"  # libvirt's NAME.xml of each running domain
ENV_STATUS_DIR = "PORTFWD_QEMU_STATUS_DIR"  # for tests: another folder
IFNAMSIZ = 16  # the kernel's buffer for an interface name, its NUL included
# the namespace of portfwd's element in a domain's <metadata> (domainforwards)
FORWARDS_NS = "urn:portfwd:forwards:1"
FORWARDS_MARK = b"urn:portfwd"  # a domain XML without it holds no forwards: one byte search


class Nic:
    """One ``<interface>`` of a domain that has a MAC: MAC (lower case), libvirt
    network, bridge, and ``<target dev>`` (the tap, the host's end, in a live XML;
    None where absent or no plain interface name)."""

    __slots__ = ("mac", "network", "bridge", "tap")

    def __init__(self, mac: str, network: Optional[str], bridge: Optional[str],
                 tap: Optional[str] = None) -> None:
        self.mac = mac
        self.network = network
        self.bridge = bridge
        self.tap = tap


class Domain:
    """What portfwd reads of one domain XML; empty when the XML is not well formed."""

    __slots__ = ("name", "uuid", "nics", "forwards")

    def __init__(self, name: Optional[str] = None, uuid: Optional[str] = None,
                 nics: Sequence[Nic] = (), forwards: Sequence[Dict[str, str]] = ()) -> None:
        self.name = name
        self.uuid = uuid  # lower case
        self.nics = tuple(nics)
        # the attributes of each <pf:forward> in <metadata><pf:forwards xmlns:pf=FORWARDS_NS>
        self.forwards = tuple(forwards)

    @property
    def taps(self) -> List[str]:
        """Each NIC's tap, in order, once."""
        return list(dict.fromkeys(n.tap for n in self.nics if n.tap))


_last: Optional[Tuple[bytes, Domain]] = None  # the hook hands one XML to several readers


def parse(xml: bytes) -> Domain:
    """The domain of a domain XML, or of a status file (``<domstatus>`` holding one)."""
    global _last
    if _last is not None and _last[0] is xml:
        return _last[1]
    from xml.etree import ElementTree

    try:
        root = ElementTree.fromstring(xml)
    except ElementTree.ParseError:
        return Domain()
    element = root if root.tag == "domain" else root.find("domain")
    if element is None:
        return Domain()
    nics = []
    for iface in element.iter("interface"):
        mac = iface.find("mac")
        if mac is None or not mac.get("address"):
            continue
        source = iface.find("source")
        target = iface.find("target")
        nics.append(Nic(str(mac.get("address")).lower(),
                        source.get("network") if source is not None else None,
                        source.get("bridge") if source is not None else None,
                        _interface_name(target.get("dev") if target is not None else None)))
    forwards: List[Dict[str, str]] = []
    if FORWARDS_MARK in xml:
        ns = "{" + FORWARDS_NS + "}"
        for found in element.findall(f"metadata/{ns}forwards/{ns}forward"):
            forwards.append({str(k): str(v) for k, v in found.attrib.items()})
    domain = Domain(_text(element, "name"), (_text(element, "uuid") or "").lower() or None, nics,
                    forwards)
    _last = (xml, domain)
    return domain


def taps(xml: bytes) -> List[str]:
    """The taps of the domain's NICs (``Domain.taps``), for their hairpin mode."""
    return parse(xml).taps


def _text(element: Element, tag: str) -> Optional[str]:
    found = element.find(tag)
    return found.text.strip() if found is not None and found.text else None


def _interface_name(name: Optional[str]) -> Optional[str]:
    """``name`` if the kernel could call an interface so (``dev_valid_name``: 1 to 15
    bytes, not ``.`` or ``..``, no ``/``, ``:``, NUL or ASCII space), else None: it
    names a sysfs entry."""
    if (not name or name in (".", "..") or any(c in name for c in "/: \t\n\v\f\r\0")
            or len(name.encode("utf-8", "surrogateescape")) > IFNAMSIZ - 1):
        return None
    return name


def mac_problem(mac: str) -> Optional[str]:
    """Why ``mac`` cannot be a guest NIC's MAC (six octets, unicast, not all zero):
    a sentence naming it, or None when it can."""
    octets = mac.split(":")
    if len(octets) != 6 or not all(len(o) == 2 and all(c in "0123456789abcdefABCDEF" for c in o)
                                   for o in octets):
        return (f"{mac!r} is not a MAC address (six octets such as 52:54:00:12:34:56, as"
                " `virsh domiflist` prints them)")
    if int(octets[0], 16) & 1:
        return (f"{mac} is a multicast MAC address; a guest NIC's MAC is unicast (the first"
                " octet is even)")
    if mac.strip("0:") == "":
        return f"{mac} is the all-zero MAC address; no NIC has it"
    return None


def domain_uuid(xml: bytes) -> Optional[str]:
    """The first ``<uuid>`` of the domain XML, without parsing all of it."""
    start = xml.find(b"<uuid>")
    if start < 0:
        return None
    end = xml.find(b"</uuid>", start)
    if end < 0:
        return None
    return xml[start + 6:end].strip().decode("ascii", "replace").lower() or None


def mac_addresses(xml: bytes) -> List[str]:
    """Every ``<mac address=…>`` of the XML (lower case), by a byte search."""
    out = []
    pos = xml.find(b"<mac address=")
    while pos >= 0:
        value = xml[pos + 14:pos + 31]
        if xml[pos + 13:pos + 14] in (b"'", b'"') and len(value) == 17:
            out.append(value.decode("ascii", "replace").lower())
        pos = xml.find(b"<mac address=", pos + 1)
    return out


def status_dir() -> str:
    """Where libvirt's QEMU driver keeps the status files of running domains."""
    return os.environ.get(ENV_STATUS_DIR) or STATUS_DIR


def status_files(folder: Optional[str] = None) -> Optional[Dict[str, bytes]]:
    """Name → live domain XML of each running domain, from the status files in
    ``folder`` (default ``status_dir()``); None when the folder cannot be read."""
    folder = folder or status_dir()
    try:
        names = sorted(os.listdir(folder))
    except OSError:
        return None
    out: Dict[str, bytes] = {}
    for name in names:
        if name.endswith(".xml"):
            try:
                with open(os.path.join(folder, name), "rb") as f:
                    out[name[:-4]] = f.read()
            except OSError:
                continue
    return out


def status_files_tell(uri: str) -> bool:
    """Whether libvirt's QEMU status files describe the guests of connection ``uri``
    (the system driver, which runs the hooks; or the folder tests point to)."""
    return bool(os.environ.get(ENV_STATUS_DIR)) or uri.split("?")[0] in (
        "qemu:///system", "qemu+unix:///system")


def running_domain(name: str) -> Optional[bool]:
    """Whether libvirt's QEMU driver runs domain ``name``, from the status file it keeps
    (no libvirt call); None when that cannot be told (no such folder on this host)."""
    folder = status_dir()
    if not os.path.isdir(folder):
        return None
    return os.path.exists(os.path.join(folder, f"{name}.xml"))
