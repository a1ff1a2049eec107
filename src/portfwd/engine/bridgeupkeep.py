"""What follows the bridges with forwards: portfwd's accepts in libvirt's chains
(``compat``), each table's hairpin set, the hairpin mode of guests' taps
(``bridgeport``) and route_localnet on the bridges of forwards from 127.0.0.1.

The bridges come from the host record's summary (``state.Store``); each function
takes the run's handles (``engine.Engine``) and its inputs and returns what it
found: what still blocks forwarded traffic, the bridges it turned off.
"""

from __future__ import annotations

from portfwd.host import bridgeport, compat, guard, hostnet
from portfwd import log
from portfwd.plan import rules
from portfwd.engine import tables
from portfwd.constants import GUARD_CHAIN

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Dict, Iterable, List, Optional, Set, Tuple

    from portfwd.engine import Engine
    from portfwd.values import Blocker, Bridges

    Wanted = Dict[int, Set[str]]
    Taps = Dict[str, List[str]]  # guest → the taps of its live domain XML


def wanted_of(summary: Dict[str, Bridges]) -> Wanted:
    """Family → the bridges forwards lead to, by the host record's summary."""
    wanted: Wanted = {4: set(), 6: set()}
    for bridges in summary.values():
        for family, bridge in bridges.routed:
            wanted[family].add(bridge)
    return wanted


def as_sets(accepts: Dict[int, List[str]]) -> Wanted:
    return {4: set(accepts.get(4, [])), 6: set(accepts.get(6, []))}


def wanted_bridges(engine: Engine, recompute: bool = False) -> Wanted:
    """Family → bridges with forwards; ``recompute`` asks the routing table again
    for every recorded guest (after a network came back, possibly renamed)."""
    if recompute:
        summary = {st.guest: engine.bridges_of(st) for st in engine.all_states()}
        engine.store.write_summary(summary)
    else:
        summary = engine.read_summary()
    return wanted_of(summary)


def ensure_compat(engine: Engine, wanted: Optional[Wanted] = None,
                  taps: Optional[Taps] = None) -> List[Blocker]:
    """Put portfwd's narrow accepts where libvirt would reject forwarded traffic
    (and remove them where no forward needs them), the hairpin sets, route_localnet
    and the taps' hairpin mode (``taps``: of the guests whose live XML this run
    has); returns what still blocks."""
    wanted = wanted_bridges(engine) if wanted is None else wanted
    _ensure_hairpin_and_localnet(engine)
    ensure_hairpin_ports(engine, taps or {})
    deadline = compat.new_deadline()  # one bound for this run's iptables calls
    fw = compat.read(engine.nft, deadline)
    commands, argvs = compat.changes(fw, wanted)
    if commands:
        engine.nft.apply(commands)
    compat.run_iptables(argvs, deadline)
    if commands or argvs:
        fw = compat.read(engine.nft, deadline)
    engine.store.write_accepts({f: sorted(b) for f, b in wanted.items()})
    engine.store.commit()
    return compat.blockers(fw, wanted)


def _ensure_hairpin_and_localnet(engine: Engine) -> None:
    """Per table, the hairpin set names exactly the bridges with forwards; and
    route_localnet is on exactly on the bridges of forwards from 127.0.0.1 (and
    turned off again only where portfwd turned it on). The hairpin set is changed
    only when it differs from what portfwd last wrote (the host record); the sysctl
    is compared with its live value (the host record: where portfwd turned it on)."""
    per_table: Dict[str, Set[str]] = {}
    localnet: Dict[str, Set[str]] = {}
    for bridges in engine.read_summary().values():
        per_table.setdefault(bridges.table, set()).update(name for _, name in bridges.routed)
        if bridges.localnet:
            localnet.setdefault(bridges.table, set()).update(bridges.localnet)
    written = engine.store.hairpin()
    for table in sorted(set(per_table) | set(written)):
        want = sorted(per_table.get(table, set()))
        if not want and not tables.layout_known(engine, table):
            written.pop(table, None)  # a table portfwd no longer keeps: nothing to do
        elif written.get(table) != want:
            tables.apply_with_layout(engine, table, lambda _: rules.hairpin(table, want))
            written[table] = want
    engine.store.write_hairpin(written)
    ensure_localnet(engine, localnet)


def ensure_localnet(engine: Engine, wanted: Dict[str, Set[str]]) -> None:
    """route_localnet on exactly on the bridges of forwards from 127.0.0.1 (``wanted``:
    table → those bridges), compared with the live sysctl (a network restart
    recreates the bridge with it off). Turned on only while the table's drop
    rule for outside packets to 127.0.0.0/8 is in the kernel; turned off again
    only where portfwd turned it on (the host record)."""
    enabled = set(engine.store.localnet())
    keep: Set[str] = set()
    for table, bridges in sorted(wanted.items()):
        off = [b for b in sorted(bridges) if hostnet.route_localnet(b) is False]
        if off and not guarded(table):
            log.warning(f"route_localnet left off on {', '.join(off)}: table inet {table}"
                        " lacks its drop rule for outside packets to 127.0.0.0/8;"
                        " run `portfwd reapply`")
            bridges = bridges - set(off)
        keep |= bridges
        for bridge in sorted(bridges):
            if hostnet.set_route_localnet(bridge, True):
                enabled.add(bridge)
    for bridge in sorted(enabled - keep):
        hostnet.set_route_localnet(bridge, False)
        enabled.discard(bridge)
    engine.store.write_localnet(sorted(enabled))


def ensure_localnet_of(engine: Engine, summary: Dict[str, Bridges]) -> None:
    """route_localnet for one guest's event: looked at only where a forward from
    127.0.0.1 wants it or portfwd turned it on (else nothing to read or write)."""
    wanted: Dict[str, Set[str]] = {}
    for bridges in summary.values():
        if bridges.localnet:
            wanted.setdefault(bridges.table, set()).update(bridges.localnet)
    if wanted or engine.store.localnet():
        ensure_localnet(engine, wanted)


def localnet_off(engine: Engine) -> List[str]:
    """Turn route_localnet off wherever portfwd turned it on, and record that: the
    127.0.0.0/8 guard that makes it safe is going, or gone. Returns those bridges
    (the next run that finds the guard back turns them on again)."""
    bridges = engine.store.localnet()
    for bridge in bridges:
        try:
            hostnet.set_route_localnet(bridge, False)
        except OSError as e:  # the bridge went meanwhile: nothing left to turn off
            log.warning(f"route_localnet of {bridge}: {e}")
    engine.store.write_localnet([])
    engine.store.commit()
    return bridges


def guarded(table: str) -> bool:
    """Whether ``table``'s drop rule for outside packets to 127.0.0.0/8 is in the
    kernel (``guard``; a netlink failure counts as no, and is logged)."""
    try:
        return guard.present(table)
    except OSError as e:
        log.warning(f"cannot read chain {GUARD_CHAIN} of table inet {table}: {e}")
        return False


def unguarded(engine: Engine) -> List[str]:
    """The recorded tables (of guests with forwards) that are gone from the kernel or
    lack their 127.0.0.0/8 guard; cheap (the host record, one netlink dump per table)."""
    names = sorted({bridges.table for bridges in engine.read_summary().values()})
    return [table for table in names if not guarded(table)]


def ensure_hairpin_ports(engine: Engine, taps: Taps, only: Optional[str] = None) -> None:
    """Hairpin mode on the taps of guests with forwards, on the bridges those lead
    to (a guest reaching its own forward where br_netfilter bridges it back); put
    back as found where the forwards went (``bridgeport``; the host record's
    ports). ``taps``: guest → the taps of its live XML, where this run has it;
    ``only``: that guest's taps alone (one guest's event)."""
    summary = engine.read_summary()
    wanted = {guest: {name for _, name in b.routed} for guest, b in summary.items()
              if only is None or guest == only}
    everyone = engine.store.hairpin_ports()
    recorded = everyone if only is None else {g: t for g, t in everyone.items() if g == only}
    if not recorded and not any(wanted.get(g) for g in taps):
        return  # nothing recorded, no live XML of a guest with forwards: sysfs untouched
    updated, problems = bridgeport.reconcile(wanted, taps, recorded)
    for line in problems:
        log.warning(line)
    if only is not None:
        updated = dict({g: t for g, t in everyone.items() if g != only}, **updated)
    if updated != everyone:
        engine.store.write_hairpin_ports(updated)


def firewall(engine: Engine, addresses: Optional[Iterable[str]] = None
             ) -> Tuple[List[str], List[Blocker]]:
    """(how the host filters forwarded traffic, what blocks portfwd's forwards),
    for the bridges behind ``addresses`` (default: the applied forwards)."""
    if addresses is None:
        wanted = wanted_bridges(engine)
    else:
        wanted = {4: set(), 6: set()}
        for address in addresses:
            iface = engine.routes.interface_for(address)
            if iface:
                wanted[6 if ":" in address else 4].add(iface)
    fw = compat.read(engine.nft)
    return compat.seen(fw, wanted), compat.blockers(fw, wanted)


def report(blockers: List[Blocker]) -> None:
    for line in blockers:
        log.warning(f"forwarded traffic blocked: {line}")
