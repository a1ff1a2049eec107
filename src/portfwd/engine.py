"""The engine shared by the hook, the CLI and the daemon.

It turns a configuration and guests into nftables transactions and keeps
/run/portfwd in step with what it applied. Callers hold ``state.locked()``.
"""

from __future__ import annotations

import glob
import json
import os
import pickle
import shutil
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Optional, Sequence, Set, Tuple

from . import compat, hostnet, log, plan, state
from .config import load
from .errors import HostError
from .model import DEFAULT_TABLE, Config, Forward, Guest, Options
from .nft import Nft
from .plan import Binding


@dataclass
class GuestState:
    """What portfwd applied for one guest, as recorded under /run/portfwd."""

    guest: str
    uuid: Optional[str]
    table: str
    bindings: List[Binding]

    def to_json(self) -> Dict[str, Any]:
        return {"guest": self.guest, "uuid": self.uuid, "table": self.table,
                "bindings": [b.to_json() for b in self.bindings]}

    @classmethod
    def from_json(cls, raw: Dict[str, Any]) -> "GuestState":
        return cls(str(raw["guest"]), raw.get("uuid"), str(raw["table"]),
                   [Binding.from_json(b) for b in raw["bindings"]])


@dataclass(frozen=True)
class StatusRow:
    guest: str
    proto: str
    listen: str
    target: str
    sources: str
    state: str
    comment: str


class Engine:
    def __init__(self, config_path: str, root: Optional[str] = None) -> None:
        self.config_path = config_path
        self.root = root or state.run_dir()
        self._nft: Optional[Nft] = None

    @property
    def nft(self) -> Nft:
        if self._nft is None:
            self._nft = Nft()
        return self._nft

    # -- compiled configuration (what the hook reads) -----------------------
    def compile(self) -> Config:
        """Parse the configuration (ConfigError if invalid) and cache it per guest."""
        signature = state.config_signature(self.config_path)
        config = (load(self.config_path) if os.path.exists(self.config_path)
                  else Config(self.config_path, Options(), ()))
        self._write_cache(config, signature)
        return config

    def _write_cache(self, config: Config, signature: str) -> None:
        state.ensure_dir(self.root)
        target = os.path.join(self.root, f"compiled.{os.getpid()}.{id(config)}")
        shutil.rmtree(target, ignore_errors=True)
        for sub in ("name", "uuid"):
            os.makedirs(os.path.join(target, sub))
        groups: Dict[Tuple[str, str], List[Forward]] = {}
        for fwd in config.forwards:
            key = ("name", fwd.guest) if fwd.guest is not None else ("uuid", str(fwd.uuid))
            groups.setdefault(key, []).append(fwd)
        for (sub, ident), forwards in groups.items():
            with open(os.path.join(target, sub, state.file_name(ident)), "wb") as f:
                pickle.dump(forwards, f, protocol=pickle.HIGHEST_PROTOCOL)
        with open(os.path.join(target, "options"), "wb") as f:
            pickle.dump(config.options, f, protocol=pickle.HIGHEST_PROTOCOL)
        with open(os.path.join(target, "signature"), "w", encoding="utf-8") as f:
            f.write(signature)
        link = state.compiled_dir(self.root)
        tmp_link = f"{link}.new.{os.getpid()}"
        os.symlink(os.path.basename(target), tmp_link)
        os.replace(tmp_link, link)
        for old in glob.glob(os.path.join(self.root, "compiled.*")):
            if old != target and os.path.isdir(old) and not os.path.islink(old):
                shutil.rmtree(old, ignore_errors=True)

    def cached(self, guest: Guest) -> Optional[Tuple[Options, List[Forward]]]:
        """The guest's forwards from the cache, or None when the cache is stale."""
        if state.cached_signature(self.root) != state.config_signature(self.config_path):
            return None
        try:
            with open(os.path.join(state.compiled_dir(self.root), "options"), "rb") as f:
                options: Options = pickle.load(f)
            forwards: List[Forward] = []
            for path in state.cached_guest_files(guest.name, guest.uuid, self.root):
                with open(path, "rb") as f:
                    forwards.extend(pickle.load(f))
        except (OSError, pickle.UnpicklingError, AttributeError, EOFError, ImportError):
            return None
        return options, sorted(forwards, key=lambda fwd: fwd.index)

    def guest_config(self, guest: Guest) -> Tuple[Options, List[Forward]]:
        """Options and forwards for one guest: from the cache, else by parsing."""
        hit = self.cached(guest)
        if hit is not None:
            return hit
        config = self.compile()
        return config.options, config.forwards_for(guest.name, guest.uuid)

    # -- per-guest state ----------------------------------------------------
    def read_state(self, name: str) -> Optional[GuestState]:
        try:
            with open(state.guest_state_path(name, self.root), encoding="utf-8") as f:
                return GuestState.from_json(json.load(f))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as e:
            log.warning(f"ignoring unreadable state of guest {name}: {e}")
            return None

    def all_states(self) -> List[GuestState]:
        out = []
        for path in sorted(glob.glob(os.path.join(self.root, "guests", "*.json"))):
            try:
                with open(path, encoding="utf-8") as f:
                    out.append(GuestState.from_json(json.load(f)))
            except (OSError, ValueError, KeyError, TypeError) as e:
                log.warning(f"ignoring unreadable state file {path}: {e}")
        return out

    def write_state(self, st: GuestState) -> None:
        self.write_states([st])

    def write_states(self, states: Iterable[GuestState]) -> None:
        """Record (or, for no bindings, forget) guests, and their target addresses."""
        targets = self.read_targets()
        for st in states:
            path = state.guest_state_path(st.guest, self.root)
            if not st.bindings:
                targets.pop(st.guest, None)
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    pass
                continue
            targets[st.guest] = sorted({b.target for b in st.bindings})
            state.ensure_dir(os.path.dirname(path))
            state.write_atomic(path, json.dumps(st.to_json(), separators=(",", ":")).encode())
        state.write_atomic(self._targets_path(), json.dumps(targets, sort_keys=True).encode())

    def _targets_path(self) -> str:
        return os.path.join(self.root, "targets.json")

    def read_targets(self) -> Dict[str, List[str]]:
        """Guest → the guest addresses its forwards lead to (kept beside the states, so
        that finding the bridges with forwards does not read every guest's state)."""
        try:
            with open(self._targets_path(), encoding="utf-8") as f:
                data = json.load(f)
            return {str(k): [str(a) for a in v] for k, v in data.items()}
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, AttributeError) as e:
            log.warning(f"rebuilding unreadable {self._targets_path()}: {e}")
            return {st.guest: sorted({b.target for b in st.bindings}) for st in self.all_states()}

    # -- libvirt's chains and other firewalls ----------------------------------
    def wanted_bridges(self) -> Dict[int, Set[str]]:
        addresses = {a for targets in self.read_targets().values() for a in targets}
        return hostnet.bridges_for(addresses)

    def ensure_compat(self, wanted: Optional[Dict[int, Set[str]]] = None) -> List[str]:
        """Put portfwd's narrow accepts where libvirt would reject forwarded traffic
        (and remove them where no forward needs them); returns what still blocks."""
        wanted = self.wanted_bridges() if wanted is None else wanted
        fw = compat.read(self.nft)
        commands, argvs = compat.changes(fw, wanted)
        if commands:
            self.nft.apply(commands)
        compat.run_iptables(argvs)
        if commands or argvs:
            fw = compat.read(self.nft)
        return compat.blockers(fw, wanted)

    # -- changes ------------------------------------------------------------
    def apply_guest(self, guest: Guest, options: Options, forwards: Sequence[Forward]) -> List[Binding]:
        """Make the table hold exactly this guest's forwards; returns them."""
        new = plan.forwards_bindings(forwards, guest.name)
        old_state = self.read_state(guest.name)
        if old_state is None and not new:
            return []
        cmds: List[plan.Command] = []
        old = old_state.bindings if old_state else []
        if old_state and old_state.table != options.table:
            cmds += plan.guest_update(old_state.table, old, [])
            old = []
        cmds += plan.guest_update(options.table, old, new)
        try:
            self.nft.apply(cmds)
        except HostError as first:
            log.warning(f"guest {guest.name}: incremental update refused ({first});"
                        " rebuilding the table from recorded state")
            self._rebuild_with(guest, options.table, new)
        self.write_state(GuestState(guest.name, guest.uuid, options.table, new))
        self._report(self.ensure_compat())
        return new

    def firewall(self, addresses: Optional[Iterable[str]] = None) -> Tuple[List[str], List[str]]:
        """(how the host filters forwarded traffic, what blocks portfwd's forwards),
        for the bridges behind ``addresses`` (default: the applied forwards)."""
        wanted = self.wanted_bridges() if addresses is None else hostnet.bridges_for(addresses)
        fw = compat.read(self.nft)
        return fw.backends(), compat.blockers(fw, wanted)

    def _report(self, blockers: List[str]) -> None:
        for line in blockers:
            log.warning(f"forwarded traffic blocked: {line}")

    def _rebuild_with(self, guest: Guest, table: str, new: List[Binding]) -> None:
        """Rebuild ``table`` from every guest's state, this guest's replaced by ``new``.

        A binding of another guest whose key ``new`` now claims (left from an
        earlier configuration) gives way to the current configuration.
        """
        claimed = {(b.kind, b.family, b.key) for b in new}
        everything = list(new)
        changed: List[GuestState] = []
        for st in self.all_states():
            if st.guest == guest.name or st.table != table:
                continue
            kept = [b for b in st.bindings if (b.kind, b.family, b.key) not in claimed]
            if len(kept) != len(st.bindings):
                log.warning(f"guest {st.guest}: {len(st.bindings) - len(kept)} forward(s) from an"
                            f" earlier configuration now belong to guest {guest.name}")
                changed.append(GuestState(st.guest, st.uuid, st.table, kept))
            everything += kept
        self.nft.apply(plan.full_rebuild(table, everything))
        self.write_states(changed)

    def remove_guest(self, name: str) -> int:
        """Remove what was applied for this guest; returns how many bindings."""
        old_state = self.read_state(name)
        if old_state is None:
            return 0
        if old_state.bindings:
            self.nft.apply(plan.guest_update(old_state.table, old_state.bindings, []))
        self.write_state(GuestState(name, old_state.uuid, old_state.table, []))
        self._report(self.ensure_compat())
        return len(old_state.bindings)

    def reapply(self) -> List[Binding]:
        """Rebuild every table and libvirt accept from /run/portfwd alone (no libvirt,
        no configuration): after `nft flush ruleset`, an nftables or firewalld reload."""
        states = self.all_states()
        cmds: List[plan.Command] = []
        everything: List[Binding] = []
        for table in sorted({st.table for st in states}):
            bindings = [b for st in states if st.table == table for b in st.bindings]
            cmds += plan.full_rebuild(table, bindings)
            everything += bindings
        self.nft.apply(cmds)
        self._report(self.ensure_compat())
        return everything

    def sync(self, config: Config, guests: Iterable[Guest], dry_run: bool = False) -> List[Binding]:
        """Make the table hold exactly the forwards of ``guests``, in one transaction."""
        table = config.options.table
        wanted: Dict[str, GuestState] = {}
        for guest in guests:
            bindings = plan.guest_bindings(config, guest)
            if bindings:
                wanted[guest.name] = GuestState(guest.name, guest.uuid, table, bindings)
        everything = [b for st in wanted.values() for b in st.bindings]
        old_states = self.all_states()
        cmds: List[plan.Command] = []
        for old_table in sorted({st.table for st in old_states} - {table}):
            cmds += plan.drop_table(old_table)
        cmds += plan.full_rebuild(table, everything)
        self.nft.apply(cmds, dry_run=dry_run)
        if dry_run:
            return everything
        self.write_states([GuestState(st.guest, st.uuid, st.table, []) for st in old_states
                           if st.guest not in wanted] + list(wanted.values()))
        self._report(self.ensure_compat())
        return everything

    def flush(self, config_table: Optional[str]) -> List[str]:
        """Remove every table portfwd made and forget all state; returns the tables."""
        tables: Set[str] = {st.table for st in self.all_states()} | {DEFAULT_TABLE}
        if config_table:
            tables.add(config_table)
        present = sorted(t for t in tables if self.nft.list_table(t) is not None)
        cmds: List[plan.Command] = []
        for table in present:
            cmds += plan.drop_table(table)
        self.nft.apply(cmds)
        self.ensure_compat({4: set(), 6: set()})
        shutil.rmtree(os.path.join(self.root, "guests"), ignore_errors=True)
        try:
            os.unlink(self._targets_path())
        except FileNotFoundError:
            pass
        return present

    # -- status -------------------------------------------------------------
    def status(self, config: Optional[Config]) -> List[StatusRow]:
        """Every recorded binding with whether the kernel holds it, plus
        configured forwards of guests that are not running."""
        rows: List[StatusRow] = []
        states = self.all_states()
        live: Dict[str, Dict[str, Dict[Tuple[Any, ...], Any]]] = {}
        for table in sorted({st.table for st in states}):
            live[table] = live_elements(self.nft.list_table(table) or [])
        running = set()
        for st in states:
            running.add(st.guest)
            if st.uuid:
                running.add(st.uuid)
            maps = live.get(st.table, {})
            for b in st.bindings:
                rows.append(_row(b, _live_state(b, maps)))
        if config is not None:
            for fwd in config.forwards:
                if fwd.guest in running or fwd.uuid in running:
                    continue
                for b in plan.forwards_bindings([fwd], fwd.label):
                    rows.append(_row(b, "guest not running"))
        return rows


def _row(b: Binding, status: str) -> StatusRow:
    target = f"[{b.target}]:{b.port}" if b.family == 6 else f"{b.target}:{b.port}"
    listen = plan._listen_text(b)
    return StatusRow(b.guest, b.proto, listen, target, b.sources, status, b.comment)


def _live_state(b: Binding, maps: Dict[str, Dict[Tuple[Any, ...], Any]]) -> str:
    ip = maps.get(plan.map_name(b.kind, b.family, "ip"), {}).get(_norm_key(b))
    port = maps.get(plan.map_name(b.kind, b.family, "port"), {}).get(_norm_key(b))
    if ip is None or port is None:
        return "missing"
    if str(ip) != b.target or int(port) != b.port:
        return f"differs (table: {ip}:{port})"
    return "active"


def _norm_key(b: Binding) -> Tuple[Any, ...]:
    return tuple(str(p) for p in b.key)


def live_elements(objects: Sequence[Dict[str, Any]]) -> Dict[str, Dict[Tuple[Any, ...], Any]]:
    """Map name → {normalised key: value} from a JSON table listing."""
    out: Dict[str, Dict[Tuple[Any, ...], Any]] = {}
    for obj in objects:
        m = obj.get("map")
        if not m:
            continue
        interval = "interval" in m.get("flags", [])
        full = 32 if m["name"][3] == "4" else 128
        elems: Dict[Tuple[Any, ...], Any] = {}
        for key, value in m.get("elem", []):
            if isinstance(key, dict) and "elem" in key:
                key = key["elem"]["val"]
            parts = key["concat"] if isinstance(key, dict) and "concat" in key else [key]
            norm = []
            for i, part in enumerate(parts):
                if isinstance(part, dict) and "prefix" in part:
                    norm.append(f"{part['prefix']['addr']}/{part['prefix']['len']}")
                elif interval and i < 2:
                    norm.append(f"{part}/{full}")
                else:
                    norm.append(str(part))
            elems[tuple(norm)] = value
        out[m["name"]] = elems
    return out
