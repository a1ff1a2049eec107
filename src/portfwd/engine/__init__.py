"""The handles one portfwd run works with, and the configuration as the engine
reads it.

``Engine`` holds the nftables handle, the routing table, the run directory's
store and the configuration's path (and which tables were seen to be portfwd's
in this run: a memo, never a result). The jobs live in their own modules, each
taking an ``Engine`` and its inputs as arguments and returning values:

    tables        a table's layout, variant, owner check, migration and rebuild
    guestpass     one guest's event: its forwards in one pass (and its removal)
    wholehost     sync, reapply and flush: every guest at once
    bridgeupkeep  what follows the bridges with forwards: libvirt's accepts, the
                  hairpin set and ports, route_localnet

Callers hold ``state.locked()``.

The hook imports this module for every guest that has forwards, so it imports
only what a guest start needs; parsing TOML, ``dataclasses`` and the like load
only when the configuration changed.
"""

from __future__ import annotations

from portfwd.host import hostnet
from portfwd import plan
from portfwd.rundir import run_compiled, state
from portfwd.host.nft import Nft
from portfwd.values import Bridges

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Dict, Iterable, List, Optional, Set, Tuple

    from portfwd.config.model import Config, Forward
    from portfwd.host.nft import NftLike
    from portfwd.rundir.record import GuestState


class GuestConfig:
    """What the configuration says about one guest: its table, ``strict``, the
    discovery sources of [options] and its binding templates."""

    __slots__ = ("table", "strict", "discover", "templates")

    def __init__(self, table: str, strict: bool, discover: Tuple[str, ...],
                 templates: List[plan.Template]) -> None:
        self.table = table
        self.strict = strict
        self.discover = discover
        self.templates = templates


class Engine:
    """The handles of one run: nftables, the routes, the store, the configuration's
    path; ``owned``: the tables seen to carry portfwd's marker in this run."""

    def __init__(self, config_path: str, root: Optional[str] = None,
                 nft: Optional[NftLike] = None) -> None:
        self.config_path = config_path
        self.root = root or state.run_dir()
        self.store = state.Store(self.root)
        self._nft = nft  # None: an Nft on first use
        self._routes: Optional[hostnet.RouteTable] = None
        self.owned: Set[str] = set()

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

    def forget_owned_tables(self) -> None:
        """Judge every table afresh (a long-running caller: tables may have gone)."""
        self.owned.clear()

    # -- compiled configuration (what the hook reads) -----------------------
    def compile(self) -> Config:
        """Parse the configuration (ConfigError if invalid or missing: an editor's
        save-by-rename must not read as "no forwards") and cache it per guest: one
        file per guest name (and per UUID) holding its binding templates, so that
        the hook reads a few bytes instead of the whole configuration."""
        from portfwd import hookindex
        from portfwd.config import load

        signature = state.config_signature(self.config_path)
        seen = hookindex.snapshot(self.config_path)
        config = load(self.config_path)
        by_guest: Dict[Tuple[str, str], List[Forward]] = {}
        for fwd in config.forwards:
            key = ("name", fwd.guest) if fwd.guest is not None else ("uuid", str(fwd.uuid))
            by_guest.setdefault(key, []).append(fwd)
        run_compiled.write(self.root, {key: plan.templates(forwards)
                                       for key, forwards in by_guest.items()},
                           (config.options.table, config.options.strict,
                            list(config.options.discover)), signature,
                           config.options.domain_forwards)
        hookindex.after_compile(self.root, self.config_path, config, seen)
        return config

    def cached(self, name: str, uuid: Optional[str]) -> Optional[GuestConfig]:
        """One guest's configuration from the cache; None if stale."""
        hit = run_compiled.read(self.root, name, uuid, self.config_path)
        if hit is None:
            return None
        table, strict, discover, templates = hit
        return GuestConfig(table, strict, discover, templates)

    def guest_config(self, name: str, uuid: Optional[str]) -> GuestConfig:
        """One guest's configuration: from the cache, else by parsing."""
        hit = self.cached(name, uuid)
        if hit is not None:
            return hit
        config = self.compile()
        return GuestConfig(config.options.table, config.options.strict,
                           tuple(config.options.discover),
                           plan.templates(config.forwards_for(name, uuid)))

    # -- recorded state (state.Store owns the files) ---------------------------
    def read_state(self, name: str) -> Optional[GuestState]:
        return self.store.read_guest(name)

    def all_states(self) -> List[GuestState]:
        return self.store.all_guests()

    def write_states(self, states: Iterable[GuestState]) -> None:
        """Record (or, for no bindings, forget) guests, and where their forwards lead."""
        self.store.write_guests(states, self.bridges_of)

    def bridges_of(self, st: GuestState) -> Bridges:
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
        return self.store.read_summary(self.bridges_of)
