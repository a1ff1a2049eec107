"""``portfwd status``: recorded bindings against what the kernel holds, one row
per forward, with the connections its DNAT counted and whatever blocks it.

``report`` reads (the records, the table, the firewall); everything below it
is pure. A row is plain JSON data (its state a ``RowState``, a ``str``
whose value is the text); the CLI prints it as a table or as JSON.
"""

from __future__ import annotations

from enum import Enum

from portfwd.engine import bridgeupkeep
from portfwd.host import compat
from portfwd.plan import display, rules
from portfwd import plan
from portfwd.plan import Binding
from portfwd.values import Reason, Selector

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Set, Tuple

    from portfwd.engine import Engine
    from portfwd.config.model import Config
    from portfwd.rundir.record import GuestState

    Row = Dict[str, Any]
    # map name → {normalised key: (value, packets, bytes)}; counts are None without a counter
    Live = Dict[str, Dict[Tuple[Any, ...], Tuple[Any, Optional[int], Optional[int]]]]


class RowState(str, Enum):
    """The state of a forward in ``portfwd status`` (and of a ``<pf:forward>`` it
    refuses); the value is the text shown and written by ``--json``. Here, not in
    ``values``: the hook never needs it."""

    ACTIVE = "active"
    PENDING = "pending"
    INACTIVE = "inactive"
    MISSING = "missing"
    DIFFERS = "differs"
    BLOCKED = "blocked"
    STOPPED = "guest not running"
    NOT_APPLIED = "not applied"
    UNKNOWN = "unknown"
    REFUSED = "refused"

    def __str__(self) -> str:
        return str(self.value)

    def __format__(self, spec: str) -> str:
        return format(str(self.value), spec)


# the states of a forward that make `portfwd status` exit non-zero
BAD = frozenset({RowState.MISSING, RowState.DIFFERS, RowState.BLOCKED, RowState.NOT_APPLIED})
HOOK_NOT_RUN = "its hook has not run: restart libvirtd (once after installing), or run" \
               " `portfwd sync`"


class Report:
    """What `portfwd status` shows: the rows, what the last changes skipped, how the
    host filters forwarded traffic and what blocks it."""

    __slots__ = ("rows", "warnings", "firewall", "blocked")

    def __init__(self, rows: List[Row], warnings: List[str], firewall: List[str],
                 blocked: List[str]) -> None:
        self.rows = rows
        self.warnings = warnings
        self.firewall = firewall
        self.blocked = blocked

    @property
    def healthy(self) -> bool:
        """No forward missing, differing or blocked."""
        return not any(r["state"] in BAD for r in self.rows)


def report(engine: Engine, config: Optional[Config], running: Optional[Set[str]] = None,
           running_from: str = "", guests: Sequence[str] = ()) -> Report:
    """Read the records, the tables they name and the firewall (the caller holds the
    lock) and compare them; ``running``: the names and UUIDs of the running guests
    (None: unknown, because of ``running_from``); ``guests``: only these."""
    states = [st for st in engine.all_states() if not guests or st.guest in guests]
    live = {table: live_elements(engine.nft.list_table(table) or [])
            for table in sorted({st.table for st in states})}
    fw = compat.read(engine.nft)
    wanted = bridgeupkeep.wanted_bridges(engine)
    blockers = compat.blocked_bridges(fw, wanted)

    def blocked_by(b: Binding) -> List[str]:
        bridge = engine.routes.interface_for(b.address)
        return blockers.get((b.family, bridge), []) if bridge else []

    rows = rows_of(states, live, config, blocked_by, running, running_from)
    if config is not None and config.options.domain_forwards:
        from portfwd.libvirt.domainforwards import refusals

        rows += [refused_row(*refused) for refused in refusals(config, states)]
    if guests:
        rows = [r for r in rows if r["guest"] in guests]
    warnings = [f"guest {st.guest}: {w}" for st in states for w in st.warnings]
    return Report(rows, warnings, compat.seen(fw, wanted),
                  [str(b) for b in compat.blockers(fw, wanted)])


def rows_of(states: Sequence[GuestState], live: Dict[str, Live], config: Optional[Config],
            blocked_by: Callable[[Binding], List[str]] = lambda b: [],
            running: Optional[Set[str]] = None, running_from: str = "") -> List[Row]:
    """Every recorded binding with its state in the kernel, the bindings waiting for
    an address, and the configured forwards nothing recorded: of a guest that is not
    running, that runs (its hook has not run), or of which that is unknown (``running``
    is None, because of ``running_from``); the bindings of one forward that differ
    only in their source network share a row. ``blocked_by(binding)``: the firewall
    lines that drop its traffic."""
    rows: List[Row] = []
    recorded: Set[str] = set()
    for st in states:
        recorded.add(st.guest)
        if st.uuid:
            recorded.add(st.uuid)
        maps = live.get(st.table, {})
        for b in st.bindings:
            state, reason, packets, octets = live_state(b, maps)
            if state == RowState.ACTIVE:
                blocked = blocked_by(b)
                if blocked:
                    state, reason = RowState.BLOCKED, "; ".join(blocked)
            rows.append(row(b, state, reason, st.address_from.get(b.address, "config"),
                            packets, octets))
        for b, why in st.pending:
            pending = RowState.INACTIVE if why.cause == Reason.INACTIVE else RowState.PENDING
            rows.append(row(b, pending, why.text))
    if config is not None:
        for fwd in config.forwards:
            if fwd.guest in recorded or fwd.uuid in recorded:
                continue
            runs = running is not None and (fwd.guest in running
                                            or (fwd.uuid or "").lower() in running)
            state, reason = _unrecorded(runs, running is None, running_from)
            for b in plan.forwards_bindings([fwd], fwd.label):
                rows.append(row(b, state, reason))
    return merge_sources(rows)


def _unrecorded(runs: bool, unknown: bool, running_from: str) -> Tuple[RowState, str]:
    """The state and reason of a configured forward that nothing records."""
    if unknown:
        return RowState.UNKNOWN, (f"not applied: guest stopped, or {HOOK_NOT_RUN} (cannot tell"
                         f" whether it runs: {running_from})")
    if runs:
        return RowState.NOT_APPLIED, f"the guest runs, but {HOOK_NOT_RUN}"
    return RowState.STOPPED, ""


def row(b: Binding, state: Optional[RowState] = None, reason: str = "", address_from: str = "",
        packets: Optional[int] = None, octets: Optional[int] = None) -> Row:
    """One binding: a range kept as one element is one row (``state`` None: as the
    configuration says it, for ``portfwd show``)."""
    address = b.target.describe(b.family) if isinstance(b.target, Selector) else b.target
    return {"guest": b.guest, "family": b.family, "proto": b.proto,
            "listen": display.listen_text(b), "listen_address": b.listen,
            "host_ports": str(b.host_ports),
            "target": display.target_text(b.target, b.family, b.guest_ports),
            "guest_address": address, "guest_ports": str(b.guest_ports),
            "sources": [] if b.sources == "*" else [b.sources], "state": state,
            "reason": reason, "address_from": address_from, "entry": b.entry,
            "comment": b.comment, "connections": packets, "bytes": octets}


def refused_row(guest: str, where: str, why: str) -> Row:
    """A ``<pf:forward>`` portfwd does not apply (``where``: the domain's metadata)."""
    return {"guest": guest, "family": None, "proto": "-", "listen": "-",
            "listen_address": None, "host_ports": None, "target": where,
            "guest_address": None, "guest_ports": None, "sources": [],
            "state": RowState.REFUSED, "reason": why, "address_from": "", "entry": where,
            "comment": "", "connections": None, "bytes": None}


def merge_sources(rows: Iterable[Row]) -> List[Row]:
    """Rows equal but for their source network become one row listing them all;
    their counters add up."""
    merged: Dict[Tuple[Any, ...], Row] = {}
    for r in rows:
        key = tuple((k, str(v)) for k, v in r.items()
                    if k not in ("sources", "connections", "bytes"))
        seen = merged.get(key)
        if seen is None:
            merged[key] = dict(r, sources=list(r["sources"]))
            continue
        seen["sources"] += [s for s in r["sources"] if s not in seen["sources"]]
        for counter in ("connections", "bytes"):
            if r[counter] is not None:
                seen[counter] = (seen[counter] or 0) + r[counter]
    return list(merged.values())


def live_state(b: Binding, maps: Live) -> Tuple[RowState, str, Optional[int], Optional[int]]:
    """(state, reason, connections, bytes) of one binding in the listed table: the
    counters of its ``ip`` or ``range`` element (rules.COUNTED), which the nat chain
    advances on the first packet of each connection it DNATs."""
    key = _norm_key(b)
    if b.is_range:
        hit = maps.get(rules.map_name(b.kind, b.family, "range"), {}).get(key)
        if hit is None or key not in maps.get(rules.map_name(b.kind, b.family, "rkeys"), {}):
            return RowState.MISSING, "not in the table: run `portfwd reapply`", None, None
        ip, packets, octets = hit
        if str(ip) != b.address:
            return RowState.DIFFERS, f"the table leads to {ip}", packets, octets
        return RowState.ACTIVE, "", packets, octets
    to = maps.get(rules.map_name(b.kind, b.family, "to"), {}).get(key)
    if to is not None:  # the concat variant: address . port, and the key in the key set
        if key not in maps.get(rules.map_name(b.kind, b.family, "keys"), {}):
            return RowState.MISSING, "not in the table: run `portfwd reapply`", None, None
        value, packets, octets = to
        ip, port = value["concat"] if isinstance(value, dict) else (value, None)
    else:  # the split variant: address and port maps side by side
        hit = maps.get(rules.map_name(b.kind, b.family, "ip"), {}).get(key)
        port_hit = maps.get(rules.map_name(b.kind, b.family, "port"), {}).get(key)
        if hit is None or port_hit is None:
            return RowState.MISSING, "not in the table: run `portfwd reapply`", None, None
        ip, packets, octets = hit
        port = port_hit[0]
    if str(ip) != b.address or port is None or int(port) != b.guest_port:
        return RowState.DIFFERS, f"the table leads to {ip}:{port}", packets, octets
    return RowState.ACTIVE, "", packets, octets


def _norm_key(b: Binding) -> Tuple[Any, ...]:
    return tuple(str(p) for p in b.key)


def live_elements(objects: Sequence[Dict[str, Any]]) -> Live:
    """Map or set name → {normalised key: (value, packets, bytes)} from a JSON table
    listing: the keys as bindings write them (``src`` addresses as prefixes, a port
    interval as ``"FIRST-LAST"``); a set's value is None."""
    out: Live = {}
    for obj in objects:
        m = obj.get("map") or obj.get("set")
        if not m:
            continue
        if m["name"] in rules.MAPS:
            kind, family, _ = rules.MAPS[m["name"]]
        elif m["name"] in rules.KEY_SETS:
            kind, family, _ = rules.KEY_SETS[m["name"]]
        else:
            continue
        elems: Dict[Tuple[Any, ...], Tuple[Any, Optional[int], Optional[int]]] = {}
        for item in m.get("elem", []):
            key, value = item if "map" in obj else (item, None)
            counter: Dict[str, int] = {}
            if isinstance(key, dict) and "elem" in key:
                counter = key["elem"].get("counter") or {}
                key = key["elem"]["val"]
            elems[_normalise(key, kind, family)] = (value, counter.get("packets"),
                                                     counter.get("bytes"))
        out[m["name"]] = elems
    return out


def _normalise(key: Any, kind: str, family: int) -> Tuple[Any, ...]:
    prefixes = kind == "src"
    full = 32 if family == 4 else 128
    parts = key["concat"] if isinstance(key, dict) and "concat" in key else [key]
    norm = []
    for i, part in enumerate(parts):
        if isinstance(part, dict) and "prefix" in part:
            norm.append(f"{part['prefix']['addr']}/{part['prefix']['len']}")
        elif isinstance(part, dict) and "range" in part:
            first, last = part["range"]
            if prefixes and i < 2:  # an address range: not what portfwd writes
                norm.append(f"{first}-{last}")
            else:
                norm.append(str(first) if first == last else f"{first}-{last}")
        elif prefixes and i < 2:
            norm.append(f"{part}/{full}")
        else:
            norm.append(str(part))
    return tuple(norm)


SHOWN = 5  # the columns of `portfwd show`: GUEST to FROM


def table_lines(rows: Sequence[Row], columns: int = 7) -> List[str]:
    """The rows as an aligned text table, its first ``columns`` columns."""
    header = ("GUEST", "PROTO", "LISTEN", "TARGET", "FROM", "CONNS", "STATE")[:columns]
    table = [header]
    for r in rows:
        state = "" if r["state"] is None else str(r["state"])
        if r["state"] == RowState.BLOCKED:  # the lines after the table name what blocks it
            state += " (see below)"
        elif r["reason"]:
            state += f": {r['reason']}"
        elif r["address_from"] not in ("", "config"):
            state += f" ({r['address_from']})"
        table.append((r["guest"], r["proto"], r["listen"], "-> " + r["target"],
                      ",".join(r["sources"]) or "*",
                      "-" if r["connections"] is None else str(r["connections"]), state)[:columns])
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    return ["  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in table]

