"""The engine shared by the hooks and the CLI.

It only sequences: configuration → bindings (``plan``) → what the kernel can
hold now (``resolve``) → nftables JSON (``rules``) applied by ``nft`` → recorded
state (``state.Store``, the owner of /run/portfwd) → libvirt's chains
(``compat``). Callers hold ``state.locked()``.

The hook imports this module for every guest that has forwards, so it
imports only what a guest start needs (``json`` comes with ``nftables``);
parsing TOML, ``dataclasses`` and the like load only when the configuration
changed.
"""

from __future__ import annotations


from . import bridgeport, compat, display, guard, hostnet, log, plan, rules, state
from .claims import Claims, refuse_shared_discoveries, refuse_shared_keys
from .errors import HostError
from .nft import Nft
from .constants import (DEFAULT_TABLE, GUARD_CHAIN, LAYOUT, MARKER_SET, TABLE_COMMENT, TABLE_MARK,
                        UNMARKED_LAYOUT)
from .plan import Binding
from .discover import DEFAULT_SOURCES, canonical_keys, running_domain
from .evidence import Evidence, solicit
from .record import GuestState, Recorded
from .resolve import resolve
from .values import Bridges, Reason

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Set, Tuple

    from .discover import Resolver
    from .evidence import Awaited
    from .model import Config, Forward, Guest
    from .nft import NftLike

    Wanted = Dict[int, Set[str]]


class Engine:
    def __init__(self, config_path: str, root: Optional[str] = None,
                 nft: Optional[NftLike] = None) -> None:
        self.config_path = config_path
        self.root = root or state.run_dir()
        self.store = state.Store(self.root)
        self._nft = nft  # None: an Nft on first use
        self._routes: Optional[hostnet.RouteTable] = None
        self._owned: Set[str] = set()  # tables seen to carry portfwd's marker in this run
        self.discover: Tuple[str, ...] = DEFAULT_SOURCES  # [options] discover, once read
        self.pending: List[Tuple[Binding, Reason]] = []  # what the last sync left waiting
        self.taps: Dict[str, List[str]] = {}  # guest → taps of its live XML, when given
        self.waiting = 0  # bindings the last sync left waiting (pending)
        self.rebuilt = False  # the last sync sent nftables a transaction

    @property
    def nft(self) -> NftLike:
        if self._nft is None:
            self._nft = Nft()
        return self._nft

    @property
    def routes(self) -> hostnet.RouteTable:
        if self._routes is None:
            self._routes = hostnet.RouteTable()
        return self._routes

    # -- compiled configuration (what the hook reads) -----------------------
    def compile(self) -> Config:
        """Parse the configuration (ConfigError if invalid or missing: an editor's
        save-by-rename must not read as "no forwards") and cache it per guest."""
        from . import hookindex
        from .config import load

        signature = state.config_signature(self.config_path)
        seen = hookindex.snapshot(self.config_path)
        config = load(self.config_path)
        self._write_cache(config, signature)
        hookindex.after_compile(self.root, self.config_path, config, seen)
        return config

    def _write_cache(self, config: Config, signature: str) -> None:
        """One file per guest name (and per UUID) holding its binding templates, so
        that the hook reads a few bytes instead of the whole configuration."""
        by_guest: Dict[Tuple[str, str], List[Forward]] = {}
        for fwd in config.forwards:
            key = ("name", fwd.guest) if fwd.guest is not None else ("uuid", str(fwd.uuid))
            by_guest.setdefault(key, []).append(fwd)
        self.store.write_compiled({key: plan.templates(forwards)
                                   for key, forwards in by_guest.items()},
                                  (config.options.table, config.options.strict,
                                   list(config.options.discover)), signature,
                                  config.options.domain_forwards)

    def cached(self, name: str, uuid: Optional[str]) -> Optional[Tuple[str, bool, List[plan.Template]]]:
        """(table, strict, binding templates) of a guest from the cache; None if stale."""
        hit = self.store.read_compiled(name, uuid, self.config_path)
        if hit is None:
            return None
        table, strict, self.discover, templates = hit
        return table, strict, templates

    def guest_config(self, name: str, uuid: Optional[str]) -> Tuple[str, bool, List[plan.Template]]:
        """(table, strict, binding templates) of one guest: from the cache, else by parsing."""
        hit = self.cached(name, uuid)
        if hit is not None:
            return hit
        config = self.compile()
        self.discover = config.options.discover
        return (config.options.table, config.options.strict,
                plan.templates(config.forwards_for(name, uuid)))

    # -- recorded state (state.Store owns the files) ---------------------------
    def read_state(self, name: str) -> Optional[GuestState]:
        return self.store.read_guest(name)

    def all_states(self) -> List[GuestState]:
        return self.store.all_guests()

    def write_states(self, states: Iterable[GuestState]) -> None:
        """Record (or, for no bindings, forget) guests, and where their forwards lead."""
        self.store.write_guests(states, self._bridges_of)

    def _bridges_of(self, st: GuestState) -> Bridges:
        """The table, the interfaces the kernel routes the targets to, and those of
        forwards from 127.0.0.1."""
        routed, localnet = set(), set()
        for b in st.bindings:
            iface = self.routes.interface_for(b.address)
            if iface:
                routed.add((b.family, iface))
                if b.via_loopback:
                    localnet.add(iface)
        return Bridges.of(st.table, routed, localnet)

    def read_summary(self) -> Dict[str, Bridges]:
        return self.store.read_summary(self._bridges_of)

    # -- libvirt's chains and other firewalls ----------------------------------
    def wanted_bridges(self, recompute: bool = False) -> Wanted:
        """Family → bridges with forwards; ``recompute`` asks the routing table again
        for every recorded guest (after a network came back, possibly renamed)."""
        if recompute:
            summary = {st.guest: self._bridges_of(st) for st in self.all_states()}
            self.store.write_summary(summary)
        else:
            summary = self.read_summary()
        return _wanted_of(summary)

    def ensure_compat(self, wanted: Optional[Wanted] = None) -> List[str]:
        """Put portfwd's narrow accepts where libvirt would reject forwarded traffic
        (and remove them where no forward needs them); returns what still blocks."""
        wanted = self.wanted_bridges() if wanted is None else wanted
        self._ensure_hairpin_and_localnet()
        self._ensure_hairpin_ports()
        deadline = compat.new_deadline()  # one bound for this run's iptables calls
        fw = compat.read(self.nft, deadline)
        commands, argvs = compat.changes(fw, wanted)
        if commands:
            self.nft.apply(commands)
        compat.run_iptables(argvs, deadline)
        if commands or argvs:
            fw = compat.read(self.nft, deadline)
        self.store.write_accepts({f: sorted(b) for f, b in wanted.items()})
        self.store.commit()
        return compat.blockers(fw, wanted)

    def _ensure_hairpin_and_localnet(self) -> None:
        """Per table, the hairpin set names exactly the bridges with forwards; and
        route_localnet is on exactly on the bridges of forwards from 127.0.0.1 (and
        turned off again only where portfwd turned it on). The hairpin set is changed
        only when it differs from what portfwd last wrote (the host record); the sysctl
        is compared with its live value (the host record: where portfwd turned it on)."""
        per_table: Dict[str, Set[str]] = {}
        localnet: Dict[str, Set[str]] = {}
        for bridges in self.read_summary().values():
            per_table.setdefault(bridges.table, set()).update(name for _, name in bridges.routed)
            if bridges.localnet:
                localnet.setdefault(bridges.table, set()).update(bridges.localnet)
        written = self.store.hairpin()
        for table in sorted(set(per_table) | set(written)):
            want = sorted(per_table.get(table, set()))
            if not want and not self._layout_known(table):
                written.pop(table, None)  # a table portfwd no longer keeps: nothing to do
            elif written.get(table) != want:
                self._apply_with_layout(table, lambda _: rules.hairpin(table, want))
                written[table] = want
        self.store.write_hairpin(written)
        self._ensure_localnet(localnet)

    def _ensure_localnet(self, wanted: Dict[str, Set[str]]) -> None:
        """route_localnet on exactly on the bridges of forwards from 127.0.0.1 (``wanted``:
        table → those bridges), compared with the live sysctl (a network restart
        recreates the bridge with it off). Turned on only while the table's drop
        rule for outside packets to 127.0.0.0/8 is in the kernel; turned off again
        only where portfwd turned it on (the host record)."""
        enabled = set(self.store.localnet())
        keep: Set[str] = set()
        for table, bridges in sorted(wanted.items()):
            off = [b for b in sorted(bridges) if hostnet.route_localnet(b) is False]
            if off and not self.guarded(table):
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
        self.store.write_localnet(sorted(enabled))

    def localnet_off(self) -> List[str]:
        """Turn route_localnet off wherever portfwd turned it on, and record that: the
        127.0.0.0/8 guard that makes it safe is going, or gone. Returns those bridges
        (the next run that finds the guard back turns them on again)."""
        bridges = self.store.localnet()
        for bridge in bridges:
            try:
                hostnet.set_route_localnet(bridge, False)
            except OSError as e:  # the bridge went meanwhile: nothing left to turn off
                log.warning(f"route_localnet of {bridge}: {e}")
        self.store.write_localnet([])
        self.store.commit()
        return bridges

    def guarded(self, table: str) -> bool:
        """Whether ``table``'s drop rule for outside packets to 127.0.0.0/8 is in the
        kernel (``guard``; a netlink failure counts as no, and is logged)."""
        try:
            return guard.present(table)
        except OSError as e:
            log.warning(f"cannot read chain {GUARD_CHAIN} of table inet {table}: {e}")
            return False

    def unguarded(self) -> List[str]:
        """The recorded tables (of guests with forwards) that are gone from the kernel or
        lack their 127.0.0.0/8 guard; cheap (the host record, one netlink dump per table)."""
        tables = sorted({bridges.table for bridges in self.read_summary().values()})
        return [table for table in tables if not self.guarded(table)]

    def _ensure_hairpin_ports(self, only: Optional[str] = None) -> None:
        """Hairpin mode on the taps of guests with forwards, on the bridges those lead
        to (a guest reaching its own forward where br_netfilter bridges it back); put
        back as found where the forwards went (``bridgeport``; the host record's
        ports). ``only``: that guest's taps alone (one guest's event)."""
        summary = self.read_summary()
        wanted = {guest: {name for _, name in b.routed} for guest, b in summary.items()
                  if only is None or guest == only}
        everyone = self.store.hairpin_ports()
        recorded = everyone if only is None else {g: t for g, t in everyone.items() if g == only}
        if not recorded and not any(wanted.get(g) for g in self.taps):
            return  # nothing recorded, no live XML of a guest with forwards: sysfs untouched
        updated, problems = bridgeport.reconcile(wanted, self.taps, recorded)
        for line in problems:
            log.warning(line)
        if only is not None:
            updated = dict({g: t for g, t in everyone.items() if g != only}, **updated)
        if updated != everyone:
            self.store.write_hairpin_ports(updated)

    def _ensure_localnet_of(self, summary: Dict[str, Bridges]) -> None:
        """route_localnet for one guest's event: looked at only where a forward from
        127.0.0.1 wants it or portfwd turned it on (else nothing to read or write)."""
        wanted: Dict[str, Set[str]] = {}
        for bridges in summary.values():
            if bridges.localnet:
                wanted.setdefault(bridges.table, set()).update(bridges.localnet)
        if wanted or self.store.localnet():
            self._ensure_localnet(wanted)

    def firewall(self, addresses: Optional[Iterable[str]] = None) -> Tuple[List[str], List[str]]:
        """(how the host filters forwarded traffic, what blocks portfwd's forwards),
        for the bridges behind ``addresses`` (default: the applied forwards)."""
        if addresses is None:
            wanted = self.wanted_bridges()
        else:
            wanted = {4: set(), 6: set()}
            for address in addresses:
                iface = self.routes.interface_for(address)
                if iface:
                    wanted[6 if ":" in address else 4].add(iface)
        fw = compat.read(self.nft)
        return compat.seen(fw, wanted), compat.blockers(fw, wanted)

    def _report(self, blockers: List[str]) -> None:
        for line in blockers:
            log.warning(f"forwarded traffic blocked: {line}")

    # -- changes ------------------------------------------------------------
    def _layout_known(self, table: str) -> bool:
        """Whether we created ``table`` with this version's layout (then a guest
        change need not resend it: re-adding the base chain costs every start)."""
        return self._recorded_variant(table) is not None

    def _recorded_variant(self, table: str) -> Optional[str]:
        """The variant (``rules.VARIANTS``) ``table`` was built with in this layout."""
        recorded = self.store.layout(table)
        for variant in rules.VARIANTS:
            if recorded == layout_id(variant):
                return variant
        return None

    def variant(self) -> str:
        """The variant a table (re)built now gets: ``rules.CONCAT`` where nftables
        can declare its maps (probed once per process, on this path alone: a
        guest change uses the variant its table was built with)."""
        return rules.CONCAT if self.nft.concat_values() else rules.SPLIT

    def _apply_with_layout(self, table: str,
                           build: Callable[[str], List[rules.Command]]) -> None:
        """Apply ``build(variant)`` to ``table``; (re)create the table's layout first if
        it is not known to be there, or if the change fails without it (a flushed
        rule set). A table of another layout or variant (nftables upgraded since it
        was built) is rebuilt whole from the records: no forward stays behind."""
        known = self._recorded_variant(table)
        if known is not None:
            try:
                self.nft.apply(build(known))
                return
            except HostError as e:
                log.info(f"table inet {table}: rebuilding its layout ({e})")
        variant = self.variant()
        self.own_table(table)
        migration = self._migration(table, variant)
        if migration:  # rebuilt from the record first; the change is relative to it
            recorded = [b for st in self.all_states() if st.table == table for b in st.bindings]
            self.nft.apply(migration + rules.full_rebuild(table, recorded, variant))
            self.nft.apply(build(variant))
        else:
            self.nft.apply(rules.skeleton(table, variant=variant) + build(variant))
        self._built(table, variant)

    def _migration(self, table: str, variant: str) -> List[rules.Command]:
        """What must go before ``table`` is rebuilt as ``variant``, if an earlier
        portfwd built it (its record names another layout or variant) with maps
        that this one declares otherwise or not at all (``rules.migration``); asks
        the kernel only then."""
        built = self.store.layout(table)
        if built is None or built == layout_id(variant) or not self.table_owner(table):
            return []
        return rules.migration(table, self.nft.list_table(table) or [], variant)

    def table_owner(self, table: str) -> Optional[bool]:
        """True: ``table`` is portfwd's (it carries the marker, or a portfwd from before
        the marker made it in this boot); False: someone else's; None: absent."""
        return self._owner(table)[0]

    def _owner(self, table: str) -> Tuple[Optional[bool], bool]:
        """(``table_owner``, whether the table holds the marker set). The marker set
        is read first: cheap, where the table's own comment costs a listing of every
        map element. Only a table without it (absent, someone else's, or made before
        layout 5) is judged by the table's comment."""
        if table in self._owned:
            return True, True
        if (self.nft.set_comment(table, MARKER_SET) or "").startswith(TABLE_MARK):
            return True, True
        comment = self.nft.table_comment(table)
        if comment is None:
            return None, False
        if comment.startswith(TABLE_MARK):
            return True, False
        # made in this boot by a portfwd from before the marker (its layout record says so)
        return comment == "" and self.store.layout(table) == UNMARKED_LAYOUT, False

    def own_table(self, table: str, create: bool = True) -> None:
        """Before building ``table``: create it with portfwd's marker when absent, and
        refuse (HostError) a table that someone else made: portfwd never changes or
        deletes that. A table of portfwd's made before the marker set gets it."""
        if table in self._owned:
            return
        owner, marked = self._owner(table)
        if owner is False:
            raise HostError(f"table inet {table} exists and was not made by portfwd (it lacks"
                            f" the comment \"{TABLE_MARK} …\"); portfwd leaves it alone:"
                            " set another name with `table` in [options] of the configuration")
        if owner is None and create:
            self.nft.create_table(table, TABLE_COMMENT, MARKER_SET)
            self.store.forget_layout(table)
        elif owner and not marked and create:
            self.nft.mark_table(table, TABLE_COMMENT, MARKER_SET)
        if owner or create:
            self._owned.add(table)

    def forget_owned_tables(self) -> None:
        """Judge every table afresh (a long-running caller: tables may have gone)."""
        self._owned.clear()

    def _built(self, table: str, variant: str) -> None:
        """``table`` was (re)built with this layout: its hairpin set is empty."""
        self.store.remember_layout(table, layout_id(variant))
        self.store.forget_hairpin(table)

    def apply_guest(self, name: str, uuid: Optional[str], table: str, planned: Sequence[Binding],
                    resolver: Optional[Resolver] = None, look: bool = False) -> GuestState:
        """Make the table hold exactly this guest's forwards whose address is known
        (``planned``: ``plan.bind`` of its templates); returns what was applied and
        what waits for an address. One pass (``_one_pass``); ``look``: also look at
        libvirt's chains whatever the host record says."""
        old_state = self.read_state(name)
        if resolver is not None:
            self._prepare(resolver, self.discover, self._taken_by_others(name),
                          old_state.discovered() if old_state else set())
        wanted = resolve(list(planned), resolver, self.routes)
        new = wanted.bindings
        _log_refusals(name, {why for _, why in old_state.pending} if old_state else set(), wanted)
        if old_state is None and wanted.empty:
            return wanted
        old = old_state.bindings + old_state.removing if old_state else []
        if old_state and old_state.table != table:  # the configuration renamed the table
            if old and self.table_owner(old_state.table):
                gone, old_table = old, old_state.table
                self._apply_with_layout(old_table,
                                        lambda v: rules.guest_update(old_table, gone, [], v))
            old = []
        applied = GuestState(name, uuid, table, new, wanted.pending, wanted.address_from,
                             wanted.warnings)
        try:
            self._one_pass(applied, old, new, look)
        except HostError as first:
            if not (new or old):
                raise
            log.warning(f"guest {name}: incremental update refused ({first});"
                        " rebuilding the table from recorded state")
            for b, holder in self._rebuild_with(name, table, new):
                new.remove(b)
                why = f"host port {display.listen_text(b)}/{b.proto} is held by guest {holder}"
                log.warning(f"guest {name}: {why}; fix the configuration (`portfwd check`)")
                wanted.pending.append((b, Reason(Reason.HELD, why)))
            applied = GuestState(name, uuid, table, new, wanted.pending, wanted.address_from,
                                 wanted.warnings)
            self.write_states([applied])
            self._report(self.ensure_compat())
            return applied
        self.write_states([applied])
        self.store.commit()
        return applied

    def _one_pass(self, after: GuestState, old: List[Binding], new: List[Binding],
                  look: bool) -> None:
        """The kernel side of one guest event, once its bindings are decided: the host
        record updated (in memory: the caller writes the guest record, then
        ``commit``), then ONE nftables transaction holding the guest's elements, the
        table's hairpin set when the bridges with forwards changed and, on libvirt's
        nftables backend, the accepts in libvirt's table; iptables, the taps' hairpin
        mode and route_localnet are touched only where something changed.

        libvirt's chains are looked at (``compat.read``) only when the bridges that
        need an accept differ from those the last look left in place, or when
        ``look`` asks (a reconnect: libvirtd has just rebuilt its rules); the network
        hook, ``reapply`` and the daemon keep them in place otherwise."""
        name, table = after.guest, after.table
        summary = self.read_summary()
        if after.bindings:
            summary[name] = self._bridges_of(after)
        else:
            summary.pop(name, None)
        self.store.write_summary(summary)
        extra: List[rules.Command] = []
        written = self.store.hairpin()
        wants = {t: sorted({bridge for b in summary.values() if b.table == t
                            for _, bridge in b.routed}) for t in set(written) | {table}}
        want = wants[table]
        known = self._layout_known(table)  # layout.TABLE read once for this pass
        hairpin_changed = written.get(table) != want and (want or known)
        for other, bridges in sorted(wants.items()):  # a table the configuration renamed
            if other != table and written.get(other) != bridges:
                if self._layout_known(other):
                    extra += rules.hairpin(other, bridges)
                    written[other] = bridges
                else:
                    written.pop(other, None)  # a table portfwd no longer keeps
        wanted = _wanted_of(summary)
        argvs: List[List[str]] = []
        deadline = compat.new_deadline()
        fw: Optional[compat.Firewall] = None
        accepts_changed = False
        if look or wanted != _as_sets(self.store.accepts()):
            try:
                fw = compat.read(self.nft, deadline)
            except HostError as e:  # an iptables tool refused or timed out: the next run looks
                log.warning(f"guest {name}: libvirt's chains not looked at: {e}")
            else:
                commands, argvs = compat.changes(fw, wanted)
                extra += commands
                accepts_changed = bool(commands or argvs)
        built = [known]  # False once the table is (re)built below

        def batch(variant: str) -> List[rules.Command]:
            cmds = rules.guest_update(table, old, new, variant) + extra
            if hairpin_changed or not built[-1]:  # a rebuilt table's hairpin set is empty
                cmds += rules.hairpin(table, want)
            built.append(False)
            return cmds

        if new or old or extra or hairpin_changed:
            self._apply_with_layout(table, batch)
        if want or known or len(built) > 1:  # the table is there (a batch went in)
            written[table] = want
        else:
            written.pop(table, None)  # no table, nothing in it: nothing to remember
        if written != self.store.hairpin():
            self.store.write_hairpin(written)
        if fw is not None:  # looked: put the iptables accepts in place, say what still blocks
            try:
                compat.run_iptables(argvs, deadline)
                if accepts_changed:
                    fw = compat.read(self.nft, deadline)
            except HostError as e:  # the records stay true to the table; the next run retries
                log.warning(f"guest {name}: {e}")
            else:
                self.store.write_accepts({f: sorted(b) for f, b in wanted.items()})
                self._report(compat.blockers(fw, wanted))
        self._ensure_localnet_of(summary)
        self._ensure_hairpin_ports(only=name)

    def _prepare(self, resolver: Resolver, discover: Sequence[str], taken: Dict[str, str],
                 kept: Set[str], running: Optional[Dict[str, str]] = None,
                 evidence: Optional[Evidence] = None) -> None:
        """What a resolver needs to vet discovered addresses against this host:
        ``taken`` (canonical addresses of others' forwards), ``kept`` (the guest's
        discovered addresses applied before), ``running`` (MAC → running guest; None:
        the resolver reads libvirt's status files if it needs to), ``evidence``
        (shared by the resolvers of one run: the kernel is read once)."""
        resolver.discover = tuple(discover)
        resolver.routes = self.routes
        resolver.taken = taken
        resolver.kept = kept
        if running is not None:
            resolver.running = running
        if evidence is not None:
            resolver.evidence = evidence

    def _taken_by_others(self, name: str) -> Dict[str, str]:
        """Guest addresses other guests' forwards lead to, from their recorded state."""
        return canonical_keys({b.address: st.guest for st in self.all_states()
                               if st.guest != name for b in st.bindings})

    def _rebuild_with(self, name: str, table: str,
                      new: List[Binding]) -> List[Tuple[Binding, str]]:
        """Rebuild ``table`` from every guest's state, this guest's replaced by ``new``;
        returns the bindings of ``new`` that another guest holds (left out), with it.

        A key both claim stays with the guest that holds it while its current
        configuration still forwards that port (two guests' listen interfaces that
        expand to one address): the newcomer's binding waits. A binding left from an
        earlier configuration gives way to the current one.
        """
        held = Claims()
        others = [st for st in self.all_states() if st.guest != name and st.table == table]
        for st in others:
            for b in st.bindings:
                held.add(b, st.guest)
        elsewhere: List[Tuple[Binding, str]] = []
        for b in new:
            holder = held.holder(b)
            if holder is not None and self._still_claims(holder, b):
                elsewhere.append((b, holder))
        lost = {b for b, _ in elsewhere}
        mine = Claims()
        for b in new:
            if b not in lost:
                mine.add(b, name)
        everything: List[Binding] = [b for b in new if b not in lost]
        changed: List[GuestState] = []
        for st in others:
            kept = [b for b in st.bindings if mine.holder(b) is None]
            if len(kept) != len(st.bindings):
                log.warning(f"guest {st.guest}: {len(st.bindings) - len(kept)} forward(s) from an"
                            f" earlier configuration now belong to guest {name}")
                changed.append(GuestState(st.guest, st.uuid, st.table, kept, st.pending, st.address_from,
                                          st.warnings))
            everything += kept
        self.own_table(table)
        variant = self.variant()
        self.nft.apply(self._migration(table, variant)
                       + rules.full_rebuild(table, everything, variant))
        self._built(table, variant)
        self.write_states(changed)
        return elsewhere

    def _still_claims(self, guest: str, b: Binding) -> bool:
        """Whether ``guest``'s current configuration forwards ``b``'s host port (same
        kind, family, protocol and port: a listen interface may expand either way)."""
        st = self.read_state(guest)
        hit = self.cached(guest, st.uuid if st else None)
        if hit is None:
            return True  # cannot tell: the holder keeps what it has
        first, last = b.span()
        for c in plan.bind(hit[2], guest):
            lo, hi = c.span()
            if (c.kind == b.kind and c.family == b.family and c.proto == b.proto
                    and lo <= last and first <= hi):
                return True
        return False

    def remove_guest(self, name: str) -> int:
        """Remove what was applied for this guest; returns how many bindings."""
        old_state = self.read_state(name)
        if old_state is None:
            return 0
        table, doomed = old_state.table, old_state.bindings + old_state.removing
        # recorded as being removed first: killed halfway, the next stop or rebuild
        # (reapply, sync) takes out what is left, and nothing brings it back
        self.write_states([GuestState(name, old_state.uuid, table, [], removing=doomed)])
        gone = GuestState(name, old_state.uuid, table, [])
        if doomed and not (self._layout_known(table) or self.table_owner(table)):
            doomed = []  # the table is gone, or another's: nothing of ours to take out
        self._one_pass(gone, doomed, [], look=False)
        self.write_states([gone])
        self.store.commit()
        return len(old_state.bindings)

    def reapply(self) -> List[Binding]:
        """Rebuild every table and libvirt accept from /run/portfwd alone (no libvirt,
        no configuration): after `nft flush ruleset`, an nftables or firewalld reload.

        A guest whose ``stopped`` hook never ran to its end (killed, or it found the
        lock held) is not brought back: libvirt keeps a running domain's status file,
        and a recorded guest without one is forgotten instead."""
        states = []
        for st in self.all_states():
            if running_domain(st.guest) is False:
                log.info(f"guest {st.guest} is not running: forgetting its forwards")
                self.write_states([GuestState(st.guest, st.uuid, st.table, [])])
            else:
                states.append(st)
        cmds: List[rules.Command] = []
        everything: List[Binding] = []
        tables = sorted({st.table for st in states})
        variant = self.variant()
        for table in tables:
            self.own_table(table)
            bindings = [b for st in states if st.table == table for b in st.bindings]
            cmds += self._migration(table, variant) + rules.full_rebuild(table, bindings, variant)
            everything += bindings
        self.nft.apply(cmds)
        for table in tables:
            self._built(table, variant)
        self.write_states([GuestState(st.guest, st.uuid, st.table, st.bindings, st.pending,
                                      st.address_from, st.warnings)
                           for st in states if st.removing])  # rebuilt without them: done
        self._report(self.ensure_compat(self.wanted_bridges(recompute=True)))
        return everything

    def sync(self, config: Config, guests: Iterable[Guest], dry_run: bool = False,
             resolvers: Optional[Dict[str, Resolver]] = None,
             settle: bool = False, rebuild: bool = True) -> List[Binding]:
        """Make the table hold exactly the forwards of ``guests``, in one transaction
        (``resolvers``: per guest name, for addresses found when the guest runs;
        ``settle``: libvirt's status files tell which guests started or stopped
        since ``guests`` was asked, see ``_settled``); returns the bindings applied
        (``dry_run``: that would be), and leaves those waiting for an address in
        ``self.pending``. ``rebuild = False``: when the records say the kernel
        already holds exactly these forwards, send nftables nothing at all (and
        leave libvirt's chains and the sysctls as they are); ``self.rebuilt`` tells."""
        self.rebuilt = False
        table = config.options.table
        old_states = self.store.all_records()  # parsed only as far as needed: 10,000 bindings
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
            declaring = (resolvers or {}).get(guest.name)
            if config.options.domain_forwards and declaring is not None:
                from .domainforwards import forwards as declared

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
        running = {nic.mac: name for name, r in (resolvers or {}).items() for nic in r.nics}
        evidence = Evidence()  # read once, when a resolver first needs it
        awaited: List[Awaited] = []
        for guest in guests:
            resolver = (resolvers or {}).get(guest.name)
            if resolver is not None:
                self.taps[guest.name] = resolver.taps
                old = before.get(guest.name)
                self._prepare(resolver, config.options.discover, explicit,
                              old.discovered() if old else set(), running, evidence)
            found = resolve(planned[guest.name], resolver, self.routes)
            if not found.empty:
                wanted[guest.name] = GuestState(guest.name, guest.uuid, table, found.bindings,
                                                found.pending, found.address_from, found.warnings)
                awaited += [(guest.name,) + a for a in resolver.awaiting] if resolver else []
        refuse_shared_discoveries(wanted)
        refuse_shared_keys(wanted)
        for st in wanted.values():
            old = before.get(st.guest)
            _log_refusals(st.guest, old.reasons() if old else set(), st)
        everything = [b for st in wanted.values() for b in st.bindings]
        self.pending = [(b, why) for st in wanted.values() for b, why in st.pending]
        self.waiting = len(self.pending)
        if not rebuild and not dry_run and self._layout_known(table) and _in_kernel(
                table, old_states, wanted):
            changed = _changed(old_states, wanted)  # pending reasons, warnings: records only
            if changed:
                self.write_states(changed)
                self.store.commit()
            self._await_evidence(awaited)  # the daemon's recheck follows what still waits
            return everything
        self.rebuilt = not dry_run
        cmds: List[rules.Command] = []
        dropped = [t for t in sorted({st.table for st in old_states} - {table})
                   if self.table_owner(t)]
        for old_table in dropped:
            cmds += rules.drop_table(old_table)
        self.own_table(table, create=not dry_run)
        variant = self.variant()
        cmds += self._migration(table, variant)
        try:
            self.nft.apply(cmds + rules.full_rebuild(table, everything, variant), dry_run=dry_run)
        except HostError as e:
            if dry_run:
                raise
            # one guest's bad forward must not cost every other guest theirs
            log.warning(f"nftables refused the whole table ({e}); applying guest by guest")
            self.nft.apply(cmds + rules.full_rebuild(table, [], variant))
            everything = self._apply_each(table, wanted, variant)
            self.pending = [(b, why) for st in wanted.values() for b, why in st.pending]
            self.waiting = len(self.pending)
        if dry_run:
            return everything
        self._await_evidence(awaited)
        self.store.remember_layout(table, layout_id(variant))
        for gone in dropped + [table]:
            self.store.forget_hairpin(gone)
        for gone in dropped:
            self.store.forget_layout(gone)
            self._owned.discard(gone)
        self.write_states(_changed(old_states, wanted))
        self._report(self.ensure_compat())
        return everything

    def _await_evidence(self, awaited: List[Awaited]) -> None:
        """Record what waits for evidence (the daemon looks for it, ``evidence.Recheck``)
        and ask the kernel to resolve those addresses now: the answers, if the NICs
        are there, are the evidence a later run finds."""
        self.store.write_awaiting(awaited)
        for address, bridge in sorted({(a[1], a[3]) for a in awaited}):
            solicit(address, bridge)

    def _apply_each(self, table: str, wanted: Dict[str, GuestState],
                    variant: str) -> List[Binding]:
        """Add each guest's bindings in a transaction of its own; a guest that nftables
        refuses keeps its forwards pending with what nftables said."""
        applied: List[Binding] = []
        for st in wanted.values():
            try:
                self.nft.apply(rules.guest_update(table, [], st.bindings, variant))
            except HostError as e:
                log.error(f"guest {st.guest}: {e}")
                st.pending += [(b, Reason(Reason.WAITING, str(e))) for b in st.bindings]
                st.bindings = []
            applied += st.bindings
        return applied

    def flush(self, config_table: Optional[str]) -> Tuple[List[str], List[str]]:
        """Remove every table portfwd made and forget all state; returns the tables
        removed and those left alone because someone else made them."""
        tables: Set[str] = {st.table for st in self.all_states()} | {DEFAULT_TABLE}
        if config_table:
            tables.add(config_table)
        owners = {t: self.table_owner(t) for t in sorted(tables)}
        present = [t for t, owner in owners.items() if owner]
        foreign = [t for t, owner in owners.items() if owner is False]
        cmds: List[rules.Command] = []
        for table in present:
            cmds += rules.drop_table(table)
        self.localnet_off()  # before the 127.0.0.0/8 guard goes with the tables
        self.nft.apply(cmds)
        self._owned.clear()
        self.store.clear()
        self.ensure_compat({4: set(), 6: set()})  # also turns route_localnet back off
        return present, foreign


def layout_id(variant: str) -> str:
    """What layout.TABLE records for a table of this layout and ``variant``:
    ``constants.LAYOUT`` alone for ``rules.SPLIT`` (as before the variants), with
    the variant's name after a "+" for the others."""
    return LAYOUT if variant == rules.SPLIT else f"{LAYOUT}+{variant}"


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


def _wanted_of(summary: Dict[str, Bridges]) -> Wanted:
    """Family → the bridges forwards lead to, by the host record's summary."""
    wanted: Wanted = {4: set(), 6: set()}
    for bridges in summary.values():
        for family, bridge in bridges.routed:
            wanted[family].add(bridge)
    return wanted


def _as_sets(accepts: Dict[int, List[str]]) -> Wanted:
    return {4: set(accepts.get(4, [])), 6: set(accepts.get(6, []))}


def _log_refusals(name: str, seen: Set[Reason], now: GuestState) -> None:
    """Log each refused discovered address and each port held by another guest once:
    when its reason first appears (``seen``: the reasons recorded before)."""
    for why in dict.fromkeys(why for _, why in now.pending
                             if why.cause in (Reason.REFUSED, Reason.HELD)):
        if why not in seen:
            log.warning(f"guest {name}: {why}")


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
