"""What `portfwd check` warns about beyond the file itself: a forward that would
take a port a host service listens on, a listen interface or address the host
does not have, a forward that forwards nothing, two guests given one address.

Pure: the host's facts come in as a ``Host`` (``Host.read`` gathers them).
"""

from __future__ import annotations

from ipaddress import ip_address
from typing import Callable, Dict, List, Optional, Sequence, Set, Tuple

from portfwd.host.listening import Socket
from portfwd.config.model import Config, Forward, PortForward, Where

Locate = Callable[[Where], str]


class Host:
    """What the checks need to know about the host."""

    __slots__ = ("sockets", "addresses", "interfaces")

    def __init__(self, sockets: Sequence[Socket], addresses: Set[str],
                 interfaces: Set[str]) -> None:
        self.sockets = list(sockets)
        self.addresses = addresses  # every local address, both families
        self.interfaces = interfaces  # every interface name

    @classmethod
    def read(cls) -> "Host":
        import socket

        from portfwd.host import hostnet, listening

        return cls(listening.sockets(), hostnet.local_addresses(),
                   {name for _, name in socket.if_nameindex()})


def warnings(config: Config, host: Host, locate: Locate) -> List[str]:
    """Every warning, as ``FILE:LINE:COL: warning: KEY: message``."""
    out: List[str] = []
    named: Set[str] = set()  # listen items already warned about: once each
    for fwd in config.forwards:
        for pf in fwd.ports:
            out += _shadowed(fwd, pf, host.sockets, locate)
            out += _missing_listen(pf, host, locate, named)
        out += _forwards_nothing(fwd, locate)
    out += _shared_addresses(config.forwards, locate)
    return list(dict.fromkeys(out))


def _warning(locate: Locate, where: Where, message: str) -> str:
    return f"{locate(where)}: warning: {where.path}: {message}"


def _shadowed(fwd: Forward, pf: PortForward, sockets: Sequence[Socket],
              locate: Locate) -> List[str]:
    """A host service listening where this forward answers: the forward's DNAT
    runs first, so the service no longer sees connections there."""
    rng = pf.ports
    out = []
    for family in fwd.families(pf):
        listen = [a for a in pf.listen if not isinstance(a, str) and a.version == family]
        interfaces = [a for a in pf.listen if isinstance(a, str)]
        every = not pf.listen
        for s in sockets:
            dual = s.family == 6 and s.wildcard and family == 4  # [::] takes IPv4 too by default
            if (s.family != family and not dual) or s.proto != rng.proto \
                    or not rng.host_first <= s.port <= rng.host_last:
                continue
            if s.loopback and not (pf.localhost and family == 4):
                continue  # the forwards never catch the host's own 127.0.0.1 and ::1
            if every or s.wildcard:
                where = "every address" if every else ", ".join(str(a) for a in listen) \
                    or "the addresses of " + ", ".join(interfaces)
            elif any(str(a) == s.address for a in listen):
                where = s.address
            else:
                continue
            who = s.process or "a process"
            out.append(_warning(locate, pf.where,
                                f"host port {s.port}/{s.proto} on {where}: {who} listens there"
                                f" ({s.endpoint}); the forward would take its connections"
                                f" from other hosts and guests; use another host port or a"
                                " listen address the service does not use"))
    return out


def _missing_listen(pf: PortForward, host: Host, locate: Locate, named: Set[str]) -> List[str]:
    out = []
    for i, item in enumerate(pf.listen):
        if str(item) in named:
            continue
        named.add(str(item))
        where = Where(pf.where.file, f"{pf.listen_at}[{i}]") if pf.listen_at else pf.where
        if isinstance(item, str):
            if item not in host.interfaces:
                out.append(_warning(locate, where, f"listen interface {item} does not exist"
                                    " (yet): this forward answers on it only once it does"
                                    " (check the name with `ip link`)"))
        elif str(item) not in host.addresses:
            out.append(_warning(locate, where, f"listen address {item} is not an address of"
                                " this host: the forward answers there only once it is"
                                " (check with `ip address`)"))
    return out


def _forwards_nothing(fwd: Forward, locate: Locate) -> List[str]:
    """A port, or a whole [[forward]], that no address family is left for."""
    dead = [pf for pf in fwd.ports if not fwd.families(pf)]
    if not dead:
        return []
    if len(dead) == len(fwd.ports):
        return [_warning(locate, fwd.where, f"forwards nothing for {fwd.label}: every port's"
                         " listen or from names only address families this forward has no"
                         " guest address of")]
    return [_warning(locate, pf.where, "forwards nothing: its listen or from names only address"
                     " families this forward has no guest address of") for pf in dead]


def _shared_addresses(forwards: Sequence[Forward], locate: Locate) -> List[str]:
    """Two guests given the same address: traffic for one would reach the other."""
    first: Dict[Tuple[int, str], Forward] = {}
    out = []
    for fwd in forwards:
        for family, address in ((4, fwd.ipv4), (6, fwd.ipv6)):
            if address is None:
                continue
            key = (family, str(ip_address(address)))
            seen: Optional[Forward] = first.setdefault(key, fwd)
            if seen is None or seen is fwd or seen.label == fwd.label:
                continue
            here = Where(fwd.where.file, f"{fwd.where.path}.ipv{family}")
            there = Where(seen.where.file, f"{seen.where.path}.ipv{family}")
            out.append(_warning(locate, here, f"{address} is also the address of {seen.label}"
                                f" (at {locate(there)}): forwards of both guests would lead to"
                                " one of them; give each guest its own address"))
    return out
