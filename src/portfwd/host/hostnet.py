"""Kernel facts about the host's network: which interface routes to an address
(/proc), an interface as sysfs shows it (``link``: the one reader of
/sys/class/net), sysctls, and the addresses of interfaces (netlink).

Kernel text is read as bytes and parsed as bytes: an interface name is whatever
bytes someone gave it (``ifname``), and no byte of it may stop a run.

Cheap to import (no ipaddress, no dataclasses): the hook uses it on every start.
"""

from __future__ import annotations

import os
from _socket import AF_INET, AF_INET6, if_nametoindex, inet_pton

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Dict, List, Optional, Set, Tuple, Union

    Route = Tuple[int, int, int, str]  # network, prefix length, metric, interface

RTF_UP = 0x0001
RTF_REJECT = 0x0200
SYS_NET = "/sys/class/net"
IFF_UP = 0x1


def ifname(raw: bytes) -> str:
    """An interface name as the kernel gives it (bytes: anything but ``/``, ``:``,
    NUL and ASCII spaces) → the str portfwd compares and passes on. UTF-8 as the
    domain XML is, so ``tap-é`` from /proc equals ``tap-é`` from libvirt; a byte
    that is not UTF-8 becomes a lone surrogate (``surrogateescape``) that os and
    socket functions turn back into the same byte (their encoding is UTF-8 with
    surrogateescape: the hook's C locale turns on Python's UTF-8 mode, and hosts
    run UTF-8 locales), so the name still opens its /sys/class/net entry and
    equals what ``socket.if_nameindex`` reports."""
    return raw.decode("utf-8", "surrogateescape")


def _ipv4_routes(data: bytes) -> List[Route]:
    """/proc/net/route, parsed as bytes: fields split at ASCII whitespace only (an
    interface name may hold \\x1c or U+2028, which str.split would cut at)."""
    routes = []
    for line in data.splitlines()[1:]:
        f = line.split()
        if len(f) < 8:
            continue
        try:
            flags = int(f[3], 16)
            # the kernel prints the network-order word as a little-endian number
            dest = int.from_bytes(bytes.fromhex(f[1].decode("ascii")), "little")
            mask = int.from_bytes(bytes.fromhex(f[7].decode("ascii")), "little")
            metric = int(f[6])
        except ValueError:
            continue
        if flags & RTF_UP and not flags & RTF_REJECT:
            routes.append((dest, bin(mask).count("1"), metric, ifname(f[0])))
    return routes


def _ipv6_routes(data: bytes) -> List[Route]:
    """/proc/net/ipv6_route, parsed as bytes (see _ipv4_routes)."""
    routes = []
    for line in data.splitlines():
        f = line.split()
        if len(f) < 10:
            continue
        try:
            flags, network, prefix, metric = (int(f[8], 16), int(f[0], 16), int(f[1], 16),
                                              int(f[5], 16))
        except ValueError:
            continue
        if flags & RTF_UP and not flags & RTF_REJECT and f[9] != b"lo":
            routes.append((network, prefix, metric, ifname(f[9])))
    return routes


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return b""


def _raw(text: Union[str, bytes]) -> bytes:
    return text if isinstance(text, bytes) else text.encode("utf-8", "surrogateescape")


class RouteTable:
    """The main routing table of both families, read once (or given: the text of
    /proc/net/route and /proc/net/ipv6_route, as bytes or str)."""

    def __init__(self, ipv4_text: Optional[Union[str, bytes]] = None,
                 ipv6_text: Optional[Union[str, bytes]] = None) -> None:
        self.routes: Dict[int, List[Route]] = {
            4: _ipv4_routes(_read("/proc/net/route") if ipv4_text is None else _raw(ipv4_text)),
            6: _ipv6_routes(_read("/proc/net/ipv6_route") if ipv6_text is None
                            else _raw(ipv6_text)),
        }

    def default_interface(self, family: int = 4) -> Optional[str]:
        """The interface of the default route with the lowest metric, or None."""
        defaults = [(metric, name) for _, prefix, metric, name in self.routes[family]
                    if prefix == 0]
        return min(defaults)[1] if defaults else None

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


def read_sysctl(path: str) -> Optional[str]:
    """A /proc or /sys value, stripped, or None when the file cannot be read. Read
    as bytes, bytes that are not UTF-8 kept as lone surrogates (``ifname``): a
    process name (``/proc/PID/comm``) is any bytes its process chose."""
    try:
        with open(path, "rb") as f:
            return f.read().strip().decode("utf-8", "surrogateescape")
    except OSError:
        return None


class Link:
    """A network interface as sysfs shows it."""

    __slots__ = ("name", "ifindex", "up", "master", "hairpin")

    def __init__(self, name: str, ifindex: int, up: bool, master: Optional[str] = None,
                 hairpin: Optional[bool] = None) -> None:
        self.name = name
        self.ifindex = ifindex
        self.up = up  # IFF_UP
        self.master = master  # the bridge (or bond) it is a port of
        self.hairpin = hairpin  # brport/hairpin_mode, None when not a bridge port


def link(name: str) -> Optional[Link]:
    """The interface ``name`` of this network namespace; None when there is no such
    interface, or the sysfs mounted here belongs to another namespace (its ifindex
    then differs from the kernel's answer to this process)."""
    if not name or "/" in name or name in (".", ".."):
        return None
    base = os.path.join(SYS_NET, name)
    try:
        with open(os.path.join(base, "ifindex"), "rb") as f:
            ifindex = int(f.read())
        if if_nametoindex(name) != ifindex:
            return None
        with open(os.path.join(base, "flags"), "rb") as f:
            flags = int(f.read(), 16)
    except (OSError, ValueError):
        return None
    try:
        master: Optional[str] = os.path.basename(os.readlink(os.path.join(base, "master")))
    except OSError:
        master = None
    hairpin = read_sysctl(os.path.join(base, "brport", "hairpin_mode"))
    return Link(name, ifindex, bool(flags & IFF_UP), master,
                None if hairpin is None else hairpin == "1")


def ipv6_off(interface: Optional[str] = None) -> Optional[str]:
    """Why IPv6 forwarding cannot work (host-wide, or on ``interface``), else None.

    Read from the kernel, never from ``socket.has_ipv6`` (a build-time flag).
    """
    if not os.path.isdir("/proc/sys/net/ipv6"):
        return "IPv6 is disabled on this host (no /proc/sys/net/ipv6: booted with ipv6.disable=1)"
    if read_sysctl("/proc/sys/net/ipv6/conf/all/disable_ipv6") == "1":
        return "IPv6 is disabled on this host (net.ipv6.conf.all.disable_ipv6 = 1)"
    if interface and read_sysctl(f"/proc/sys/net/ipv6/conf/{interface}/disable_ipv6") == "1":
        return f"IPv6 is disabled on {interface} (net.ipv6.conf.{interface}.disable_ipv6 = 1)"
    return None


def route_localnet(interface: str) -> Optional[bool]:
    """net.ipv4.conf.INTERFACE.route_localnet; None when there is no such interface."""
    value = read_sysctl(f"/proc/sys/net/ipv4/conf/{interface}/route_localnet")
    return None if value is None else value != "0"


def set_route_localnet(interface: str, on: bool) -> bool:
    """Turn net.ipv4.conf.INTERFACE.route_localnet on or off; True if portfwd changed
    it (a value someone else set is left alone)."""
    path = f"/proc/sys/net/ipv4/conf/{interface}/route_localnet"
    current = read_sysctl(path)
    if current is None or current == ("1" if on else "0"):
        return False
    with open(path, "w", encoding="ascii") as f:
        f.write("1" if on else "0")
    return True


# IPv6 address states an address must not be in to be listened on
IFA_F_OPTIMISTIC, IFA_F_DADFAILED, IFA_F_DEPRECATED, IFA_F_TENTATIVE = 0x04, 0x08, 0x20, 0x40
_UNUSABLE = ((IFA_F_TENTATIVE, "tentative"), (IFA_F_OPTIMISTIC, "optimistic"),
             (IFA_F_DADFAILED, "DAD failed"), (IFA_F_DEPRECATED, "deprecated"))


def interface_addresses(interface: str) -> Optional[List[Tuple[int, str, int]]]:
    """(family, address, IFA flags) of each address on ``interface`` (a netlink
    RTM_GETADDR dump), or None when there is no such interface."""
    import socket

    try:
        index = socket.if_nametoindex(interface)
    except OSError:
        return None
    return _dump_addresses(index)


def local_addresses() -> Set[str]:
    """Every address of this host, on any interface, both families."""
    return {address for _, address, _ in _dump_addresses(None)}


def _dump_addresses(index: Optional[int]) -> List[Tuple[int, str, int]]:
    """(family, address, IFA flags) of the addresses on interface ``index`` (None: all)."""
    import struct

    out: List[Tuple[int, str, int]] = []
    # RTM_GETADDR (22) dump, ifaddrmsg(AF_UNSPEC); answers are RTM_NEWADDR (20)
    for kind, body in netlink(22, NLM_F_DUMP, struct.pack("=BBBBI", 0, 0, 0, 0, 0))[0]:
        if kind == 20:
            out += _address(body, index)
    return out


NLM_F_REQUEST, NLM_F_ACK, NLM_F_REPLACE, NLM_F_CREATE, NLM_F_DUMP = 1, 4, 0x100, 0x400, 0x300


def netlink(kind: int, flags: int, payload: bytes
            ) -> Tuple[List[Tuple[int, bytes]], int]:
    """Send one rtnetlink request (message type ``kind``, ``flags`` besides
    NLM_F_REQUEST: NLM_F_DUMP or NLM_F_ACK, so that the kernel always answers;
    ``payload`` after the header) and read the answer: (type, body) of each message
    until NLMSG_DONE or NLMSG_ERROR, and that error (0: none, or the ack; else a
    negative errno)."""
    import socket
    import struct

    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
    out: List[Tuple[int, bytes]] = []
    error = 0
    try:
        sock.send(struct.pack("=LHHLL", 16 + len(payload), kind, NLM_F_REQUEST | flags, 1, 0)
                  + payload)
        done = False
        while not done:
            data = sock.recv(65536)
            offset = 0
            while offset + 16 <= len(data):
                length, answer = struct.unpack_from("=LH", data, offset)
                if answer in (2, 3) or length < 16:  # NLMSG_ERROR, NLMSG_DONE
                    if answer == 2 and length >= 20:
                        error = struct.unpack_from("=i", data, offset + 16)[0]
                    done = True
                    break
                out.append((answer, data[offset + 16:offset + length]))
                offset += (length + 3) & ~3
    finally:
        sock.close()
    return out, error


def netlink_attributes(body: bytes, pos: int) -> Dict[int, bytes]:
    """Type → value of the route attributes of a message body from offset ``pos``."""
    import struct

    attrs: Dict[int, bytes] = {}
    while pos + 4 <= len(body):
        length, kind = struct.unpack_from("=HH", body, pos)
        if length < 4:
            break
        attrs[kind & 0x3FFF] = body[pos + 4:pos + length]  # without NLA_F_NESTED/BYTEORDER
        pos += (length + 3) & ~3
    return attrs


def _address(body: bytes, index: Optional[int]) -> List[Tuple[int, str, int]]:
    import socket
    import struct

    family, _, flags, _, ifindex = struct.unpack_from("=BBBBI", body, 0)
    if (index is not None and ifindex != index) or family not in (socket.AF_INET, socket.AF_INET6):
        return []
    attrs = netlink_attributes(body, 8)
    raw = attrs.get(2) or attrs.get(1)  # IFA_LOCAL, else IFA_ADDRESS
    if raw is None:
        return []
    if 8 in attrs:  # IFA_FLAGS: the full 32-bit flags
        flags = struct.unpack("=I", attrs[8][:4])[0]
    return [(4 if family == socket.AF_INET else 6, socket.inet_ntop(family, raw), flags)]


def usable_addresses(interface: str, family: int) -> Tuple[List[str], List[str]]:
    """The addresses of ``family`` to listen on for ``interface``, and a warning for
    each address skipped (tentative, optimistic, DAD failed, deprecated)."""
    found = interface_addresses(interface)
    if found is None:
        return [], [f"listen interface {interface} does not exist"]
    good, skipped = [], []
    for fam, address, flags in found:
        if fam != family or address.startswith("fe80:"):
            continue
        bad = [name for bit, name in _UNUSABLE if flags & bit] if fam == 6 else []
        if bad:
            skipped.append(f"{address} on {interface} skipped: {', '.join(bad)}")
        else:
            good.append(address)
    return good, skipped
