"""Table upkeep: which layout and variant a portfwd table has, whose it is, and
building, migrating or rebuilding it from the records.

Each function takes the run's handles (``engine.Engine``) and its inputs, and
returns what it found or did; the records of what was built (layout.TABLE, the
hairpin set) go through the store.
"""

from __future__ import annotations

from portfwd import log, plan
from portfwd.plan import rules
from portfwd.plan.claims import Claims
from portfwd.constants import LAYOUT, MARKER_SET, TABLE_COMMENT, TABLE_MARK, UNMARKED_LAYOUT
from portfwd.errors import HostError
from portfwd.rundir.record import GuestState

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Callable, List, Optional, Tuple

    from portfwd.engine import Engine
    from portfwd.plan import Binding


def layout_id(variant: rules.Variant) -> str:
    """What layout.TABLE records for a table of this layout and ``variant``:
    ``constants.LAYOUT`` alone for ``rules.SPLIT`` (as before the variants), with
    the variant's name after a "+" for the others."""
    return LAYOUT if variant is rules.SPLIT else f"{LAYOUT}+{variant.value}"


def recorded_variant(engine: Engine, table: str) -> Optional[rules.Variant]:
    """The variant (``rules.VARIANTS``) ``table`` was built with in this layout."""
    recorded = engine.store.layout(table)
    for variant in rules.VARIANTS:
        if recorded == layout_id(variant):
            return variant
    return None


def layout_known(engine: Engine, table: str) -> bool:
    """Whether we created ``table`` with this version's layout (then a guest
    change need not resend it: re-adding the base chain costs every start)."""
    return recorded_variant(engine, table) is not None


def variant(engine: Engine) -> rules.Variant:
    """The variant a table (re)built now gets: ``rules.CONCAT`` where nftables
    can declare its maps (probed once per process, on this path alone: a
    guest change uses the variant its table was built with)."""
    return rules.CONCAT if engine.nft.concat_values() else rules.SPLIT


def table_owner(engine: Engine, table: str) -> Optional[bool]:
    """True: ``table`` is portfwd's (it carries the marker, or a portfwd from before
    the marker made it in this boot); False: someone else's; None: absent."""
    return _owner(engine, table)[0]


def _owner(engine: Engine, table: str) -> Tuple[Optional[bool], bool]:
    """(``table_owner``, whether the table holds the marker set). The marker set
    is read first: cheap, where the table's own comment costs a listing of every
    map element. Only a table without it (absent, someone else's, or made before
    layout 5) is judged by the table's comment."""
    if table in engine.owned:
        return True, True
    if (engine.nft.set_comment(table, MARKER_SET) or "").startswith(TABLE_MARK):
        return True, True
    comment = engine.nft.table_comment(table)
    if comment is None:
        return None, False
    if comment.startswith(TABLE_MARK):
        return True, False
    # made in this boot by a portfwd from before the marker (its layout record says so)
    return comment == "" and engine.store.layout(table) == UNMARKED_LAYOUT, False


def own_table(engine: Engine, table: str, create: bool = True) -> None:
    """Before building ``table``: create it with portfwd's marker when absent, and
    refuse (HostError) a table that someone else made: portfwd never changes or
    deletes that. A table of portfwd's made before the marker set gets it."""
    if table in engine.owned:
        return
    owner, marked = _owner(engine, table)
    if owner is False:
        raise HostError(f"table inet {table} exists and was not made by portfwd (it lacks"
                        f" the comment \"{TABLE_MARK} …\"); portfwd leaves it alone:"
                        " set another name with `table` in [options] of the configuration")
    if owner is None and create:
        engine.nft.create_table(table, TABLE_COMMENT, MARKER_SET)
        engine.store.forget_layout(table)
    elif owner and not marked and create:
        engine.nft.mark_table(table, TABLE_COMMENT, MARKER_SET)
    if owner or create:
        engine.owned.add(table)


def built(engine: Engine, table: str, variant: rules.Variant) -> None:
    """Record that ``table`` was (re)built with this layout: its hairpin set is empty."""
    engine.store.remember_layout(table, layout_id(variant))
    engine.store.forget_hairpin(table)


def migration(engine: Engine, table: str, variant: rules.Variant) -> List[rules.Command]:
    """What must go before ``table`` is rebuilt as ``variant``, if an earlier
    portfwd built it (its record names another layout or variant) with maps
    that this one declares otherwise or not at all (``rules.migration``); asks
    the kernel only then."""
    was = engine.store.layout(table)
    if was is None or was == layout_id(variant) or not table_owner(engine, table):
        return []
    return rules.migration(table, engine.nft.list_table(table) or [], variant)


def apply_with_layout(engine: Engine, table: str,
                      build: Callable[[rules.Variant], List[rules.Command]]) -> None:
    """Apply ``build(variant)`` to ``table``; (re)create the table's layout first if
    it is not known to be there, or if the change fails without it (a flushed
    rule set). A table of another layout or variant (nftables upgraded since it
    was built) is rebuilt whole from the records: no forward stays behind."""
    known = recorded_variant(engine, table)
    if known is not None:
        try:
            engine.nft.apply(build(known))
            return
        except HostError as e:
            log.info(f"table inet {table}: rebuilding its layout ({e})")
    now = variant(engine)
    own_table(engine, table)
    before = migration(engine, table, now)
    if before:  # rebuilt from the record first; the change is relative to it
        recorded = [b for st in engine.all_states() if st.table == table for b in st.bindings]
        engine.nft.apply(before + rules.full_rebuild(table, recorded, now))
        engine.nft.apply(build(now))
    else:
        engine.nft.apply(rules.skeleton(table, variant=now) + build(now))
    built(engine, table, now)


def rebuild_with(engine: Engine, name: str, table: str,
                 new: List[Binding]) -> List[Tuple[Binding, str]]:
    """Rebuild ``table`` from every guest's state, guest ``name``'s replaced by
    ``new``; returns the bindings of ``new`` that another guest holds (left out),
    with that guest.

    A key both claim stays with the guest that holds it while its current
    configuration still forwards that port (two guests' listen interfaces that
    expand to one address): the newcomer's binding waits. A binding left from an
    earlier configuration gives way to the current one.
    """
    held = Claims()
    others = [st for st in engine.all_states() if st.guest != name and st.table == table]
    for st in others:
        for b in st.bindings:
            held.add(b, st.guest)
    elsewhere: List[Tuple[Binding, str]] = []
    for b in new:
        holder = held.holder(b)
        if holder is not None and _still_claims(engine, holder, b):
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
            changed.append(GuestState(st.guest, st.uuid, st.table, kept, st.pending,
                                      st.address_from, st.warnings))
        everything += kept
    own_table(engine, table)
    now = variant(engine)
    engine.nft.apply(migration(engine, table, now) + rules.full_rebuild(table, everything, now))
    built(engine, table, now)
    engine.write_states(changed)
    return elsewhere


def _still_claims(engine: Engine, guest: str, b: Binding) -> bool:
    """Whether ``guest``'s current configuration forwards ``b``'s host port (same
    kind, family, protocol and port: a listen interface may expand either way)."""
    st = engine.read_state(guest)
    hit = engine.cached(guest, st.uuid if st else None)
    if hit is None:
        return True  # cannot tell: the holder keeps what it has
    for c in plan.bind(hit.templates, guest):
        if (c.kind == b.kind and c.family == b.family and c.proto == b.proto
                and c.host_ports.overlaps(b.host_ports)):
            return True
    return False
