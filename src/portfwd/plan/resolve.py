"""From planned bindings to what the kernel can hold now: listen interfaces become
their addresses, selectors the guest's discovered address, IPv6 where it is off
waits as inactive."""

from __future__ import annotations

from portfwd.host import hostnet
from portfwd.plan import Binding
from portfwd.rundir.record import GuestState
from portfwd.values import ListenIface, Reason, Selector

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Dict, List, Optional, Tuple, Union

    from portfwd.libvirt.discover import Resolver


def resolve(bindings: List[Binding], resolver: Optional[Resolver],
            routes: Optional[hostnet.RouteTable] = None) -> GuestState:
    """Turn planned bindings into what the kernel can hold now: listen interface
    names become their current usable addresses, selectors the guest address they
    stand for; what cannot be applied waits in ``pending`` with the reason
    (IPv6 on a host or bridge where it is disabled: ``Reason.INACTIVE``)."""
    out = GuestState("", None, "", [])
    found: Dict[Tuple[Selector, int], Union[Tuple[str, str], Reason]] = {}
    listens: Dict[Tuple[str, int], List[str]] = {}
    ipv6_off: Dict[str, Optional[str]] = {}  # target → why IPv6 cannot reach it
    for planned in bindings:
        for b in _expand_listen(planned, listens, out):
            if isinstance(b.target, Selector):
                if resolver is not None and not resolver.applies(b.target, b.family):
                    continue
                key = (b.target, b.family)
                if key not in found:
                    found[key] = (resolver.resolve(b.target, b.family) if resolver is not None
                                  else Reason(Reason.WAITING,
                                              "no domain XML to find the guest's NIC in"))
                hit = found[key]
                if isinstance(hit, Reason):
                    out.pending.append((b, hit))
                    continue
                address, source = hit
                out.address_from[address] = source
                b = b.with_target(address)
            if b.family == 6:
                if b.address not in ipv6_off:
                    ipv6_off[b.address] = _ipv6_off_for(b, bindings, routes)
                off = ipv6_off[b.address]
                if off:
                    out.pending.append((b, Reason(Reason.INACTIVE, off)))
                    continue
            out.bindings.append(b)
    return out


def _ipv6_off_for(b: Binding, bindings: List[Binding],
                  routes: Optional[hostnet.RouteTable]) -> Optional[str]:
    """Why IPv6 cannot reach this binding's guest: IPv6 off on the host or on the
    bridge. A bridge with IPv6 off has no IPv6 route, so it is found through the
    IPv4 address of the same guest and configuration entry."""
    if routes is None:
        return hostnet.ipv6_off()
    bridge = routes.interface_for(b.address)
    if bridge is None:
        siblings = {routes.interface_for(o.target) for o in bindings
                    if o.family == 4 and o.guest == b.guest and o.entry == b.entry
                    and isinstance(o.target, str)}
        for sibling in sorted(s for s in siblings if s):
            off = hostnet.ipv6_off(sibling)
            if off:
                return off
    return hostnet.ipv6_off(bridge)


def _expand_listen(b: Binding, cache: Dict[Tuple[str, int], List[str]],
                   out: GuestState) -> List[Binding]:
    """A listen interface in a binding's key → one binding per usable address of it now."""
    first = b.key[0] if b.kind in ("fwd", "src") else None
    if not isinstance(first, ListenIface):
        return [b]
    name = first.name
    if (name, b.family) not in cache:
        good, skipped = hostnet.usable_addresses(name, b.family)
        cache[(name, b.family)] = good
        out.warnings += [w for w in skipped if w not in out.warnings]
    addresses = cache[(name, b.family)]
    if not addresses:
        out.pending.append((b, Reason(Reason.WAITING,
                                      f"no usable IPv{b.family} address on listen interface {name}")))
    return [b.with_key((first.with_address(a),) + tuple(b.key[1:])) for a in addresses]
