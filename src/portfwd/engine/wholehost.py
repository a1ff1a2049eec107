"""Whole-host operations: ``sync`` (every running guest's forwards from the
configuration, in one transaction), ``reapply`` (every table rebuilt from the
records alone) and ``flush`` (every table and record gone).

Each takes the run's handles (``engine.Engine``) and its inputs and returns
what it did (``Synced`` for a sync).
"""

from __future__ import annotations

from portfwd.engine import bridgeupkeep, tables
from portfwd import log, plan
from portfwd.plan import rules
from portfwd.plan.claims import refuse_shared_discoveries, refuse_shared_keys
from portfwd.constants import DEFAULT_TABLE
from portfwd.libvirt.discover import canonical_keys
from portfwd.libvirt.domainxml import running_domain
from portfwd.errors import HostError
from portfwd.host.evidence import Evidence, solicit
from portfwd.rundir.record import GuestState
from portfwd.plan.resolve import resolve
from portfwd.engine.guestpass import log_refusals
from portfwd.values import Reason

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Dict, Iterable, List, Optional, Set, Tuple

    from portfwd.libvirt.discover import Resolver
    from portfwd.engine import Engine
    from portfwd.host.evidence import Awaited
    from portfwd.config.model import Config, Forward, Guest
    from portfwd.plan import Binding
    from portfwd.rundir.record import Recorded


class Synced:
    """What a sync did: the bindings applied (a dry run: that would be), those
    waiting for an address with the reason, and whether nftables was sent a
    transaction (``rebuilt``; False when the records said the kernel already held
    exactly these forwards)."""

    __slots__ = ("applied", "pending", "rebuilt")

    def __init__(self, applied: List[Binding], pending: List[Tuple[Binding, Reason]],
                 rebuilt: bool) -> None:
        self.applied = applied
        self.pending = pending
        self.rebuilt = rebuilt


def sync(engine: Engine, config: Config, guests: Iterable[Guest], dry_run: bool = False,
         resolvers: Optional[Dict[str, Resolver]] = None,
         settle: bool = False, rebuild: bool = True) -> Synced:
    """Make the table hold exactly the forwards of ``guests``, in one transaction
    (``resolvers``: per guest name, for addresses found when the guest runs;
    ``settle``: libvirt's status files tell which guests started or stopped
    since ``guests`` was asked, see ``_settled``). ``rebuild = False``: when the
    records say the kernel already holds exactly these forwards, send nftables
    nothing at all (and leave libvirt's chains and the sysctls as they are)."""
    table = config.options.table
    resolvers = resolvers or {}
    old_states = engine.store.all_records()  # parsed only as far as needed: 10,000 bindings
    guests, started_since = (_settled(list(guests), old_states) if settle
                             else (list(guests), []))
    by_name: Dict[str, List[Forward]] = {}
    by_uuid: Dict[str, List[Forward]] = {}
    for fwd in config.forwards:
        if fwd.guest is not None:
            by_name.setdefault(fwd.guest, []).append(fwd)
        else:
            by_uuid.setdefault(str(fwd.uuid), []).append(fwd)
    planned: Dict[str, List[Binding]] = {}
    for guest in guests:
        forwards = by_name.get(guest.name, []) + by_uuid.get((guest.uuid or "").lower(), [])
        declaring = resolvers.get(guest.name)
        if config.options.domain_forwards and declaring is not None:
            from portfwd.libvirt.domainforwards import forwards as declared

            forwards += declared(declaring.forwards, guest.name, guest.uuid, config)[0]
        planned[guest.name] = plan.forwards_bindings(sorted(forwards, key=lambda f: f.index),
                                                     guest.name)
    # addresses the configuration gives are the admin's word: no guest may discover them
    explicit = canonical_keys({b.target: b.guest for bindings in planned.values()
                               for b in bindings if isinstance(b.target, str)})
    before = {st.guest: st for st in old_states}
    # a guest started since libvirt was asked: the record its hook just wrote stands
    wanted: Dict[str, GuestState] = {st.guest: st for st in started_since
                                     if st.table == table}
    running = {nic.mac: name for name, r in resolvers.items() for nic in r.nics}
    evidence = Evidence()  # read once, when a resolver first needs it
    awaited: List[Awaited] = []
    taps: Dict[str, List[str]] = {}
    for guest in guests:
        resolver = resolvers.get(guest.name)
        if resolver is not None:
            taps[guest.name] = resolver.taps
            old = before.get(guest.name)
            resolver = resolver.for_host(config.options.discover, engine.routes, explicit,
                                         old.discovered() if old else set(), running, evidence)
        found = resolve(planned[guest.name], resolver, engine.routes)
        if not found.empty:
            wanted[guest.name] = GuestState(guest.name, guest.uuid, table, found.bindings,
                                            found.pending, found.address_from, found.warnings)
            awaited += [(guest.name,) + a for a in resolver.awaiting] if resolver else []
    refuse_shared_discoveries(wanted)
    refuse_shared_keys(wanted)
    for st in wanted.values():
        old = before.get(st.guest)
        log_refusals(st.guest, old.reasons() if old else set(), st)
    everything = [b for st in wanted.values() for b in st.bindings]
    if not rebuild and not dry_run and tables.layout_known(engine, table) and _in_kernel(
            table, old_states, wanted):
        changed = _changed(old_states, wanted)  # pending reasons, warnings: records only
        if changed:
            engine.write_states(changed)
            engine.store.commit()
        _await_evidence(engine, awaited)  # the daemon's recheck follows what still waits
        return Synced(everything, _pending(wanted), False)
    cmds: List[rules.Command] = []
    dropped = [t for t in sorted({st.table for st in old_states} - {table})
               if tables.table_owner(engine, t)]
    for old_table in dropped:
        cmds += rules.drop_table(old_table)
    tables.own_table(engine, table, create=not dry_run)
    variant = tables.variant(engine)
    cmds += tables.migration(engine, table, variant)
    try:
        engine.nft.apply(cmds + rules.full_rebuild(table, everything, variant), dry_run=dry_run)
    except HostError as e:
        if dry_run:
            raise
        # one guest's bad forward must not cost every other guest theirs
        log.warning(f"nftables refused the whole table ({e}); applying guest by guest")
        engine.nft.apply(cmds + rules.full_rebuild(table, [], variant))
        everything = _apply_each(engine, table, wanted, variant)
    if dry_run:
        return Synced(everything, _pending(wanted), False)
    _await_evidence(engine, awaited)
    engine.store.remember_layout(table, tables.layout_id(variant))
    for gone in dropped + [table]:
        engine.store.forget_hairpin(gone)
    for gone in dropped:
        engine.store.forget_layout(gone)
        engine.owned.discard(gone)
    engine.write_states(_changed(old_states, wanted))
    bridgeupkeep.report(bridgeupkeep.ensure_compat(engine, taps=taps))
    return Synced(everything, _pending(wanted), True)


def _pending(wanted: Dict[str, GuestState]) -> List[Tuple[Binding, Reason]]:
    return [(b, why) for st in wanted.values() for b, why in st.pending]


def _await_evidence(engine: Engine, awaited: List[Awaited]) -> None:
    """Record what waits for evidence (the daemon looks for it, ``evidence.Recheck``)
    and ask the kernel to resolve those addresses now: the answers, if the NICs
    are there, are the evidence a later run finds."""
    engine.store.write_awaiting(awaited)
    for address, bridge in sorted({(a[1], a[3]) for a in awaited}):
        solicit(address, bridge)


def _apply_each(engine: Engine, table: str, wanted: Dict[str, GuestState],
                variant: rules.Variant) -> List[Binding]:
    """Add each guest's bindings in a transaction of its own; a guest that nftables
    refuses keeps its forwards pending with what nftables said (in ``wanted``)."""
    applied: List[Binding] = []
    for st in wanted.values():
        try:
            engine.nft.apply(rules.guest_update(table, [], st.bindings, variant))
        except HostError as e:
            log.error(f"guest {st.guest}: {e}")
            st.pending += [(b, Reason(Reason.WAITING, str(e))) for b in st.bindings]
            st.bindings = []
        applied += st.bindings
    return applied


def reapply(engine: Engine) -> List[Binding]:
    """Rebuild every table and libvirt accept from /run/portfwd alone (no libvirt,
    no configuration): after `nft flush ruleset`, an nftables or firewalld reload.
    Returns the bindings rebuilt.

    A guest whose ``stopped`` hook never ran to its end (killed, or it found the
    lock held) is not brought back: libvirt keeps a running domain's status file,
    and a recorded guest without one is forgotten instead."""
    states = []
    for st in engine.all_states():
        if running_domain(st.guest) is False:
            log.info(f"guest {st.guest} is not running: forgetting its forwards")
            engine.write_states([GuestState(st.guest, st.uuid, st.table, [])])
        else:
            states.append(st)
    cmds: List[rules.Command] = []
    everything: List[Binding] = []
    names = sorted({st.table for st in states})
    variant = tables.variant(engine)
    for table in names:
        tables.own_table(engine, table)
        bindings = [b for st in states if st.table == table for b in st.bindings]
        cmds += (tables.migration(engine, table, variant)
                 + rules.full_rebuild(table, bindings, variant))
        everything += bindings
    engine.nft.apply(cmds)
    for table in names:
        tables.built(engine, table, variant)
    engine.write_states([GuestState(st.guest, st.uuid, st.table, st.bindings, st.pending,
                                    st.address_from, st.warnings)
                         for st in states if st.removing])  # rebuilt without them: done
    wanted = bridgeupkeep.wanted_bridges(engine, recompute=True)
    bridgeupkeep.report(bridgeupkeep.ensure_compat(engine, wanted))
    return everything


def flush(engine: Engine, config_table: Optional[str]) -> Tuple[List[str], List[str]]:
    """Remove every table portfwd made and forget all state; returns the tables
    removed and those left alone because someone else made them."""
    names: Set[str] = {st.table for st in engine.all_states()} | {DEFAULT_TABLE}
    if config_table:
        names.add(config_table)
    owners = {t: tables.table_owner(engine, t) for t in sorted(names)}
    present = [t for t, owner in owners.items() if owner]
    foreign = [t for t, owner in owners.items() if owner is False]
    cmds: List[rules.Command] = []
    for table in present:
        cmds += rules.drop_table(table)
    bridgeupkeep.localnet_off(engine)  # before the 127.0.0.0/8 guard goes with the tables
    engine.nft.apply(cmds)
    engine.forget_owned_tables()
    engine.store.clear()
    bridgeupkeep.ensure_compat(engine, {4: set(), 6: set()})  # also turns route_localnet off
    return present, foreign


def _changed(recorded: List[Recorded], wanted: Dict[str, GuestState]) -> List[GuestState]:
    """What to write for ``wanted`` to replace ``recorded``: the states that differ
    from their record, and an empty state (forget) for each guest no longer wanted."""
    before = {rec.guest: rec for rec in recorded}
    return ([GuestState(rec.guest, rec.uuid, rec.table, []) for rec in recorded
             if rec.guest not in wanted]
            + [st for st in wanted.values()
               if st.guest not in before or not before[st.guest].same(st)])


def _in_kernel(table: str, recorded: List[Recorded], wanted: Dict[str, GuestState]) -> bool:
    """Whether the records say that ``table`` holds exactly the bindings of ``wanted``:
    every guest's bindings as recorded, all in ``table``, none being removed."""
    bound = {name for name, st in wanted.items() if st.bindings}
    for rec in recorded:
        if rec.table != table or rec.raw.get("removing"):
            return False
        st = wanted.get(rec.guest)
        if rec.raw.get("bindings", []) != ([b.to_json() for b in st.bindings] if st else []):
            return False
        bound.discard(rec.guest)
    return not bound


def _settled(listed: List[Guest], recorded: List[Recorded]
             ) -> Tuple[List[Guest], List[GuestState]]:
    """Libvirt was asked before portfwd's lock was taken, and a hook may have run
    since. Where libvirt's status files tell (``running_domain``): a listed guest
    whose file is gone has stopped since (left out); a recorded guest that was not
    listed but has a file has started since (returned: its record stands)."""
    names = {g.name for g in listed}
    still = [g for g in listed if running_domain(g.name) is not False]
    started = [st.state() for st in recorded
               if st.guest not in names and running_domain(st.guest)]
    return still, [st for st in started if st is not None]
