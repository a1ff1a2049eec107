"""One guest's event in one pass: its forwards whose address is known go into its
table in ONE nftables transaction (with the table's hairpin set and libvirt's
nftables-backend accepts when those change), then iptables, the taps' hairpin
mode and route_localnet only where something changed, then the records once.
Also the removal of a guest's forwards (``stopped``).

Each function takes the run's handles (``engine.Engine``) and its inputs and
returns what it applied.
"""

from __future__ import annotations

from portfwd.engine import bridgeupkeep, tables
from portfwd.host import compat
from portfwd.plan import display, rules
from portfwd import log
from portfwd.libvirt.discover import canonical_keys
from portfwd.errors import HostError
from portfwd.rundir.record import GuestState
from portfwd.plan.resolve import resolve
from portfwd.values import Reason

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Dict, List, Optional, Sequence, Set

    from portfwd.libvirt.discover import Resolver
    from portfwd.engine import Engine, GuestConfig
    from portfwd.plan import Binding


def apply_guest(engine: Engine, name: str, uuid: Optional[str], config: GuestConfig,
                planned: Sequence[Binding], resolver: Optional[Resolver] = None,
                taps: Optional[List[str]] = None, look: bool = False) -> GuestState:
    """Make ``config.table`` hold exactly this guest's forwards whose address is known
    (``planned``: ``plan.bind`` of its templates); returns what was applied and
    what waits for an address. ``taps``: those of its live domain XML (their hairpin
    mode); ``look``: also look at libvirt's chains whatever the host record says."""
    table = config.table
    old_state = engine.read_state(name)
    if resolver is not None:
        resolver = resolver.for_host(config.discover, engine.routes,
                                     taken_by_others(engine, name),
                                     old_state.discovered() if old_state else set())
    wanted = resolve(list(planned), resolver, engine.routes)
    new = wanted.bindings
    log_refusals(name, {why for _, why in old_state.pending} if old_state else set(), wanted)
    if old_state is None and wanted.empty:
        return wanted
    old = old_state.bindings + old_state.removing if old_state else []
    if old_state and old_state.table != table:  # the configuration renamed the table
        if old and tables.table_owner(engine, old_state.table):
            gone, old_table = old, old_state.table
            tables.apply_with_layout(engine, old_table,
                                     lambda v: rules.guest_update(old_table, gone, [], v))
        old = []
    fresh = {name: taps} if taps is not None else {}
    applied = GuestState(name, uuid, table, new, wanted.pending, wanted.address_from,
                         wanted.warnings)
    try:
        one_pass(engine, applied, old, new, look, fresh)
    except HostError as first:
        if not (new or old):
            raise
        log.warning(f"guest {name}: incremental update refused ({first});"
                    " rebuilding the table from recorded state")
        for b, holder in tables.rebuild_with(engine, name, table, new):
            new.remove(b)
            why = f"host port {display.listen_text(b)}/{b.proto} is held by guest {holder}"
            log.warning(f"guest {name}: {why}; fix the configuration (`portfwd check`)")
            wanted.pending.append((b, Reason(Reason.HELD, why)))
        applied = GuestState(name, uuid, table, new, wanted.pending, wanted.address_from,
                             wanted.warnings)
        engine.write_states([applied])
        bridgeupkeep.report(bridgeupkeep.ensure_compat(engine, taps=fresh))
        return applied
    engine.write_states([applied])
    engine.store.commit()
    return applied


def remove_guest(engine: Engine, name: str) -> int:
    """Remove what was applied for this guest; returns how many bindings."""
    old_state = engine.read_state(name)
    if old_state is None:
        return 0
    table, doomed = old_state.table, old_state.bindings + old_state.removing
    # recorded as being removed first: killed halfway, the next stop or rebuild
    # (reapply, sync) takes out what is left, and nothing brings it back
    engine.write_states([GuestState(name, old_state.uuid, table, [], removing=doomed)])
    gone = GuestState(name, old_state.uuid, table, [])
    if doomed and not (tables.layout_known(engine, table) or tables.table_owner(engine, table)):
        doomed = []  # the table is gone, or another's: nothing of ours to take out
    one_pass(engine, gone, doomed, [], False, {})
    engine.write_states([gone])
    engine.store.commit()
    return len(old_state.bindings)


def one_pass(engine: Engine, after: GuestState, old: List[Binding], new: List[Binding],
             look: bool, taps: Dict[str, List[str]]) -> None:
    """The kernel side of one guest event, once its bindings are decided: the host
    record updated (in memory: the caller writes the guest record, then
    ``commit``), then ONE nftables transaction holding the guest's elements, the
    table's hairpin set when the bridges with forwards changed and, on libvirt's
    nftables backend, the accepts in libvirt's table; iptables, the taps' hairpin
    mode (``taps``: guest → those of its live XML) and route_localnet are touched
    only where something changed.

    libvirt's chains are looked at (``compat.read``) only when the bridges that
    need an accept differ from those the last look left in place, or when
    ``look`` asks (a reconnect: libvirtd has just rebuilt its rules); the network
    hook, ``reapply`` and the daemon keep them in place otherwise."""
    name, table = after.guest, after.table
    summary = engine.read_summary()
    if after.bindings:
        summary[name] = engine.bridges_of(after)
    else:
        summary.pop(name, None)
    engine.store.write_summary(summary)
    extra: List[rules.Command] = []
    written = engine.store.hairpin()
    wants = {t: sorted({bridge for b in summary.values() if b.table == t
                        for _, bridge in b.routed}) for t in set(written) | {table}}
    want = wants[table]
    known = tables.layout_known(engine, table)  # layout.TABLE read once for this pass
    hairpin_changed = written.get(table) != want and (want or known)
    for other, bridges in sorted(wants.items()):  # a table the configuration renamed
        if other != table and written.get(other) != bridges:
            if tables.layout_known(engine, other):
                extra += rules.hairpin(other, bridges)
                written[other] = bridges
            else:
                written.pop(other, None)  # a table portfwd no longer keeps
    wanted = bridgeupkeep.wanted_of(summary)
    argvs: List[List[str]] = []
    deadline = compat.new_deadline()
    fw: Optional[compat.Firewall] = None
    accepts_changed = False
    if look or wanted != bridgeupkeep.as_sets(engine.store.accepts()):
        try:
            fw = compat.read(engine.nft, deadline)
        except HostError as e:  # an iptables tool refused or timed out: the next run looks
            log.warning(f"guest {name}: libvirt's chains not looked at: {e}")
        else:
            commands, argvs = compat.changes(fw, wanted)
            extra += commands
            accepts_changed = bool(commands or argvs)
    built = [known]  # False once the table is (re)built below

    def batch(variant: rules.Variant) -> List[rules.Command]:
        cmds = rules.guest_update(table, old, new, variant) + extra
        if hairpin_changed or not built[-1]:  # a rebuilt table's hairpin set is empty
            cmds += rules.hairpin(table, want)
        built.append(False)
        return cmds

    if new or old or extra or hairpin_changed:
        tables.apply_with_layout(engine, table, batch)
    if want or known or len(built) > 1:  # the table is there (a batch went in)
        written[table] = want
    else:
        written.pop(table, None)  # no table, nothing in it: nothing to remember
    if written != engine.store.hairpin():
        engine.store.write_hairpin(written)
    if fw is not None:  # looked: put the iptables accepts in place, say what still blocks
        try:
            compat.run_iptables(argvs, deadline)
            if accepts_changed:
                fw = compat.read(engine.nft, deadline)
        except HostError as e:  # the records stay true to the table; the next run retries
            log.warning(f"guest {name}: {e}")
        else:
            engine.store.write_accepts({f: sorted(b) for f, b in wanted.items()})
            bridgeupkeep.report(compat.blockers(fw, wanted))
    bridgeupkeep.ensure_localnet_of(engine, summary)
    bridgeupkeep.ensure_hairpin_ports(engine, taps, only=name)


def taken_by_others(engine: Engine, name: str) -> Dict[str, str]:
    """Guest addresses other guests' forwards lead to, from their recorded state."""
    return canonical_keys({b.address: st.guest for st in engine.all_states()
                           if st.guest != name for b in st.bindings})


def log_refusals(name: str, seen: Set[Reason], now: GuestState) -> None:
    """Log each refused discovered address and each port held by another guest once:
    when its reason first appears (``seen``: the reasons recorded before)."""
    for why in dict.fromkeys(why for _, why in now.pending
                             if why.cause in (Reason.REFUSED, Reason.HELD)):
        if why not in seen:
            log.warning(f"guest {name}: {why}")
