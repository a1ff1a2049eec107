"""The engine's paths without root: guest events driven through the engine with a
temporary run directory and nftables in memory (tests/fakenft.py), each event's
nftables calls and run-directory writes compared with a golden file under
tests/data/golden/engine/. tests/test_fakenft.py replays the same scenarios through
the kernel's nftables, so the fake cannot drift from what the kernel does.

Guest events go through ``guest_event`` alone (and whole-host runs through
``reapply``): when the engine's entry points change, only those change.

The engine reaches the host itself at these seams, replaced here (``EngineHost``):
the configuration's trust check (``configtrust.read``: file owners), the routing table
(``hostnet.RouteTable``), listen interfaces' addresses (``hostnet.usable_addresses``),
IPv6 being off (``hostnet.ipv6_off``), route_localnet (``hostnet.route_localnet``,
``hostnet.set_route_localnet``), bridge ports' hairpin mode (``bridgeport.port``,
``bridgeport.set_hairpin``), the 127.0.0.0/8 guard's netlink dump (``guard.present``),
iptables-legacy (``compat._legacy_rules``) and every subprocess (``proc.run``: none
may run). libvirt's status files are a folder (``$PORTFWD_QEMU_STATUS_DIR``).

To rewrite the golden files after a deliberate change (a new ``constants.LAYOUT``
changes every batch that builds the table):
``PORTFWD_GOLDEN=write .venv/bin/python -m pytest tests/test_engine_paths.py``.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable, Dict, List, Optional, Tuple

import pytest

from fakenft import FakeNft, Ruleset, counts, libvirt_network
from pfhost import domain_xml
from portfwd.host import bridgeport, compat, guard, hostnet, proc
from portfwd.config import configtrust
from portfwd import constants
from portfwd.libvirt import domainxml
from portfwd.plan import rules
from portfwd.rundir import state
from portfwd.libvirt.discover import Resolver
from portfwd.rundir import atomicfile, run_compiled
from portfwd.engine import guestpass, wholehost
from portfwd import hookcall, hookindex
from portfwd.engine import Engine
from portfwd.plan import bind
from portfwd.values import Selector

GOLDEN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "golden", "engine")
LAYOUT4 = os.path.join(os.path.dirname(GOLDEN), "skeleton-layout4.json")
Json = Dict[str, Any]

WEB1, DB1 = "192.168.122.10", "192.168.122.11"
CONFIG = f"""
[[forward]]
guest = "web1"
ipv4  = "{WEB1}"
ipv6  = "fd00:122::10"
ports = ["8080:80", "5000-5002/udp"]

[[forward]]
guest = "db1"
ipv4  = "{DB1}"
localhost = true
ports = ["5432"]
"""
# eth0 carries 203.0.113.5: web1's forward listens on the interface, db1's on the address
HELD = f"""
[[forward]]
guest  = "web1"
ipv4   = "{WEB1}"
listen = ["eth0"]
ports  = ["8080:80"]

[[forward]]
guest  = "db1"
ipv4   = "{DB1}"
listen = ["203.0.113.5"]
ports  = ["8080:90"]
"""
XML = {"web1": domain_xml("web1", "1b4e28ba-2fa1-11d2-883f-0016d3cca401", "52:54:00:00:00:01",
                          ("vnet0",)),
       "db1": domain_xml("db1", "1b4e28ba-2fa1-11d2-883f-0016d3cca402", "52:54:00:00:00:02",
                         ("vnet1",))}
# the bridge ports of the guests' taps: tap → (bridge, ifindex)
PORTS = {"vnet0": ("virbr0", 11), "vnet1": ("virbr0", 12)}
ADDRESSES = {("eth0", 4): ["203.0.113.5"]}


def _route4(iface: str, network: str, length: int) -> str:
    """A line of /proc/net/route: the network-order words printed as little-endian."""
    import ipaddress

    net = ipaddress.IPv4Network(f"{network}/{length}")
    dest, mask = net.network_address.packed[::-1].hex(), net.netmask.packed[::-1].hex()
    return f"{iface}\t{dest.upper()}\t00000000\t0001\t0\t0\t0\t{mask.upper()}\t0\t0\t0"


ROUTES4 = "\n".join(["Iface\tDestination\tGateway\tFlags\tRefCnt\tUse\tMetric\tMask\tMTU\tWindow\tIRTT",
                     _route4("eth0", "0.0.0.0", 0), _route4("eth0", "203.0.113.0", 24),
                     _route4("virbr0", "192.168.122.0", 24)]) + "\n"
ROUTES6 = ("fd000122000000000000000000000000 40 00000000000000000000000000000000 00"
           " 00000000000000000000000000000000 00000100 00000001 00000000 00000001   virbr0\n")


class EngineHost:
    """A host as the engine sees it, without root: a run directory and forward.toml
    under ``tmp``, nftables in memory (``ruleset``; each run gets its own FakeNft,
    as each hook run is a process with its own Nft), and the host's sysctls and
    bridge ports in dicts. ``writes``: the run-directory files the current run wrote."""

    def __init__(self, tmp: str, monkeypatch: pytest.MonkeyPatch) -> None:
        self.run_dir = os.path.join(tmp, "run")
        self.config = os.path.join(tmp, "forward.toml")
        self.qemu = os.path.join(tmp, "qemu")  # libvirt's status files of running guests
        os.mkdir(self.qemu)
        self.ruleset = Ruleset()
        self.concat = False  # what the nftables of the next run can declare
        self.nft = FakeNft(self.ruleset)
        self.route_localnet = {"virbr0": "0"}
        self.hairpin = {tap: "0" for tap in PORTS}
        self.writes: List[str] = []
        self.sysfs: List[str] = []  # the sysctls and sysfs files the current run wrote
        self.before: Dict[str, Any] = {}  # the records when the current run began
        self._patch(monkeypatch)

    def _patch(self, mp: pytest.MonkeyPatch) -> None:
        mp.setenv("PORTFWD_QEMU_STATUS_DIR", self.qemu)
        mp.setattr(configtrust, "read", _read_untrusted)
        mp.setattr(hostnet, "RouteTable", _Routes)
        mp.setattr(hostnet, "usable_addresses",
                   lambda name, family: (ADDRESSES.get((name, family), []), []))
        mp.setattr(hostnet, "ipv6_off", lambda interface=None: None)
        mp.setattr(hostnet, "route_localnet", lambda bridge: (
            None if bridge not in self.route_localnet else self.route_localnet[bridge] != "0"))
        mp.setattr(hostnet, "set_route_localnet", self._set_route_localnet)
        mp.setattr(bridgeport, "link", self._link)
        mp.setattr(bridgeport, "set_hairpin", self._set_hairpin)
        mp.setattr(guard, "present", lambda table: self.nft.guarded(table))
        mp.setattr(compat, "_legacy_rules", lambda fam, deadline: None)
        mp.setattr(proc, "run", _no_subprocess)
        write_atomic, write_compiled = atomicfile.write_atomic, run_compiled.write

        def recorded_write(path: str, data: bytes, *args: Any, **kwargs: Any) -> None:
            self.writes.append(os.path.relpath(path, self.run_dir))
            write_atomic(path, data, *args, **kwargs)

        def recorded_compile(root: str, *args: Any) -> None:
            self.writes.append("compiled/")
            write_compiled(root, *args)

        mp.setattr(atomicfile, "write_atomic", recorded_write)
        mp.setattr(run_compiled, "write", recorded_compile)

    def _set_route_localnet(self, bridge: str, on: bool) -> bool:
        value = "1" if on else "0"
        if self.route_localnet.get(bridge, value) == value:
            return False
        self.route_localnet[bridge] = value
        self.sysfs.append(f"net.ipv4.conf.{bridge}.route_localnet = {value}")
        return True

    def _link(self, name: str) -> Optional[hostnet.Link]:
        if name not in PORTS:
            return None
        bridge, ifindex = PORTS[name]
        return hostnet.Link(name, ifindex, True, bridge, self.hairpin[name] == "1")

    def _set_hairpin(self, name: str, value: str) -> None:
        self.hairpin[name] = value
        self.sysfs.append(f"{name}/brport/hairpin_mode = {value}")

    def process(self) -> FakeNft:
        """A new run (a process): its own FakeNft over the same ruleset."""
        self.nft = FakeNft(self.ruleset, concat=self.concat)
        self.writes, self.sysfs = [], []
        self.before = self.records()
        return self.nft

    def write_config(self, text: str) -> None:
        with open(self.config, "w", encoding="utf-8") as f:
            f.write(text)

    def running(self, *guests: str) -> None:
        """libvirt's status files say exactly ``guests`` run."""
        for name in os.listdir(self.qemu):
            os.unlink(os.path.join(self.qemu, name))
        for guest in guests:
            with open(os.path.join(self.qemu, f"{guest}.xml"), "wb") as f:
                f.write(XML[guest])

    def records(self) -> Dict[str, Any]:
        """Every file under the run directory but the lock and the caches (the compiled
        configuration, the hook index)."""
        out: Dict[str, Any] = {}
        caches = (state.COMPILED, hookindex.INDEX)
        for folder, dirs, files in os.walk(self.run_dir):  # nothing when there is no folder
            dirs[:] = [d for d in dirs if not d.startswith(caches)]
            for name in files:
                rel = os.path.relpath(os.path.join(folder, name), self.run_dir)
                if rel == "lock" or rel.startswith(caches):
                    continue
                with open(os.path.join(folder, name), encoding="utf-8") as f:
                    text = f.read()
                out[rel] = json.loads(text) if name.endswith(".json") else text
        return dict(sorted(out.items()))


class _Routes(hostnet.RouteTable):
    def __init__(self, ipv4_text: Any = None, ipv6_text: Any = None) -> None:
        super().__init__(ROUTES4 if ipv4_text is None else ipv4_text,
                         ROUTES6 if ipv6_text is None else ipv6_text)


def _read_untrusted(path: str) -> str:
    """configtrust.read without its trust check (a test's files belong to whoever runs it)."""
    with open(path, encoding="utf-8") as f:
        return f.read()


def _no_subprocess(argv: List[str], *args: Any, **kwargs: Any) -> Any:
    raise AssertionError(f"an engine path ran {argv}")


# -- the engine's entry points: the only code that knows them --------------------------

def guest_event(host: EngineHost, name: str, op: str, xml: Optional[bytes] = None) -> FakeNft:
    """One qemu hook event of guest ``name`` (``xml``: its live XML, by default
    ``XML[name]``) as ``hook._run`` handles it, under the lock; returns the run's
    FakeNft. Errors are raised, not logged: a test must see them."""
    xml = XML[name] if xml is None else xml
    nft = host.process()
    with state.locked(host.run_dir):
        engine = Engine(host.config, root=host.run_dir, nft=nft)
        if op in hookcall.REMOVE:
            guestpass.remove_guest(engine, name)
            return nft
        uuid = domainxml.domain_uuid(xml)
        config = engine.guest_config(name, uuid)
        if op in hookcall.CHECK:
            return nft
        planned = bind(config.templates, name)
        resolver = (Resolver(name, xml) if any(isinstance(b.target, Selector) for b in planned)
                    else None)
        guestpass.apply_guest(engine, name, uuid, config, planned, resolver, domainxml.taps(xml))
    return nft


def reapply(host: EngineHost) -> FakeNft:
    """``portfwd reapply`` (cli.cmd_reapply); returns the run's FakeNft."""
    nft = host.process()
    with state.locked(host.run_dir):
        wholehost.reapply(Engine(host.config, root=host.run_dir, nft=nft))
    return nft


# -- the scenarios: each sets the host up, runs the event under test, checks its sense --

def _elements(host: EngineHost, table: str = "portfwd") -> Dict[str, List[Any]]:
    """Map or set name → its elements' keys, of ``inet TABLE`` in the ruleset."""
    t = host.ruleset.tables[("inet", table)]
    return {name: [e.val for e in s.elements.values()] for name, s in t.sets.items()
            if s.elements}


def first_start(host: EngineHost) -> FakeNft:
    """After boot: an empty run directory, no table, no compiled configuration."""
    host.write_config(CONFIG)
    nft = guest_event(host, "web1", "started")
    assert set(_elements(host)) == {"any4_ip", "any4_port", "any6_ip", "any6_port",
                                    "any4_range", "any4_rkeys", "any6_range", "any6_rkeys",
                                    "hairpin"}
    assert host.records()["layout.portfwd"] == constants.LAYOUT
    assert host.hairpin["vnet0"] == "1"
    return nft


def steady_start(host: EngineHost) -> FakeNft:
    """The table is built and holds web1's forwards; db1 (with a forward from
    127.0.0.1) starts."""
    host.write_config(CONFIG)
    guest_event(host, "web1", "started")
    nft = guest_event(host, "db1", "started")
    assert [v["concat"][0] for v in _elements(host)["fwd4_ip"]] == ["127.0.0.1"]
    assert host.route_localnet["virbr0"] == "1" and host.hairpin["vnet1"] == "1"
    return nft


def stop(host: EngineHost) -> FakeNft:
    """web1 stops; db1 keeps its forwards."""
    host.write_config(CONFIG)
    guest_event(host, "web1", "started")
    guest_event(host, "db1", "started")
    nft = guest_event(host, "web1", "stopped")
    assert "guests/web1.json" not in host.records()
    assert set(_elements(host)) == {"any4_ip", "any4_port", "fwd4_ip", "fwd4_port", "hairpin"}
    assert host.hairpin == {"vnet0": "0", "vnet1": "1"}
    return nft


def held_port(host: EngineHost) -> FakeNft:
    """web1's listen interface eth0 and db1's listen address are one address: web1,
    started first, keeps 203.0.113.5:8080; db1's forward waits. nftables refuses the
    element (twice: the engine first takes the refusal for a table flushed behind its
    back and resends it with the skeleton), then the engine rebuilds the table from
    the records and finds the holder."""
    host.write_config(HELD)
    guest_event(host, "web1", "started")
    nft = guest_event(host, "db1", "started")
    assert [c.refused for c in nft.calls if c.refused] == ["Could not process rule: File exists"] * 2
    assert [v for _, v in _map(host, "fwd4_ip")] == [WEB1]
    pending = host.records()["guests/db1.json"]["pending"]
    assert [p[-1][0] for p in pending] == ["held"]  # Cause.HELD as recorded
    return nft


def _map(host: EngineHost, name: str, table: str = "portfwd") -> List[Tuple[Any, Any]]:
    s = host.ruleset.tables[("inet", table)].sets[name]
    return [(e.val, e.value) for e in s.elements.values()]


def renamed_table(host: EngineHost) -> FakeNft:
    """The configuration's table became pf2 while web1 is recorded in portfwd; web1
    is reconnected (libvirtd restarted)."""
    host.write_config(CONFIG)
    guest_event(host, "web1", "started")
    host.write_config('[options]\ntable = "pf2"\n' + CONFIG)
    nft = guest_event(host, "web1", "reconnect")
    assert _elements(host, "portfwd") == {}  # its hairpin set emptied too
    assert "any4_ip" in _elements(host, "pf2")
    assert host.records()["guests/web1.json"]["table"] == "pf2"
    return nft


def layout_migration(host: EngineHost) -> FakeNft:
    """web1's table is as layout 4 built it (no counters, no marker set), and its
    record says so; db1 starts."""
    host.write_config(CONFIG)
    guest_event(host, "web1", "started")
    old_layout_table(host)
    nft = guest_event(host, "db1", "started")
    maps = host.ruleset.tables[("inet", "portfwd")].sets
    assert maps["any4_ip"].counted and constants.MARKER_SET in maps
    assert [v for _, v in _map(host, "any4_ip")] == [WEB1, DB1]
    assert host.records()["layout.portfwd"] == constants.LAYOUT
    return nft


def old_layout_table(host: EngineHost) -> None:
    """Replace table portfwd with what layout 4 built, holding the recorded forwards
    (as test_status.py does in the kernel), and record layout 4."""
    with open(LAYOUT4, encoding="utf-8") as f:
        old: List[Json] = json.load(f)
    bindings = [b for st in state.Store(host.run_dir).all_guests() for b in st.bindings]
    elements = [c for c in rules.guest_update("portfwd", [], bindings)
                if not c["add"]["element"]["name"].endswith("rkeys")]
    nft = host.process()
    nft.apply(rules.drop_table("portfwd"))
    nft.create_table("portfwd", constants.TABLE_COMMENT, constants.MARKER_SET)
    nft.apply([{"delete": {"set": {"family": "inet", "table": "portfwd",
                                   "name": constants.MARKER_SET}}}] + old + elements)
    state.Store(host.run_dir).remember_layout("portfwd", "4")


def nftables_upgrade(host: EngineHost) -> FakeNft:
    """The table was built as the split variant (nftables 1.0.6); nftables can now
    declare concatenated values: ``portfwd reapply`` rebuilds it whole as concat."""
    host.write_config(CONFIG)
    guest_event(host, "web1", "started")
    guest_event(host, "db1", "started")
    host.running("web1", "db1")
    host.concat = True
    nft = reapply(host)
    assert host.records()["layout.portfwd"] == f"{constants.LAYOUT}+concat"
    names = set(host.ruleset.tables[("inet", "portfwd")].sets)
    assert "any4_to" in names and "any4_ip" not in names
    return nft


def nftables_upgrade_guest(host: EngineHost) -> FakeNft:
    """After the upgrade, before any reapply: a guest event keeps the variant the
    table was built with (no rebuild on a guest's path)."""
    host.write_config(CONFIG)
    guest_event(host, "web1", "started")
    host.concat = True
    nft = guest_event(host, "db1", "started")
    assert host.records()["layout.portfwd"] == constants.LAYOUT
    return nft


def libvirt_accept(host: EngineHost) -> FakeNft:
    """libvirt's nftables backend rejects forwarded traffic to virbr0 in
    ``ip libvirt_network`` chain guest_input: the first start puts portfwd's accept
    at its head."""
    host.process().apply(libvirt_network("virbr0", "192.168.122.0/24"))
    host.write_config(CONFIG)
    nft = guest_event(host, "web1", "started")
    chain = host.ruleset.tables[("ip", "libvirt_network")].chains["guest_input"]
    assert [r.get("comment") for r in chain.rules] == [compat.COMMENT, None, None]
    return nft


def libvirt_accept_stop(host: EngineHost) -> FakeNft:
    """The last guest with forwards stops: portfwd's accept leaves guest_input."""
    libvirt_accept(host)
    nft = guest_event(host, "web1", "stopped")
    chain = host.ruleset.tables[("ip", "libvirt_network")].chains["guest_input"]
    assert [r.get("comment") for r in chain.rules] == [None, None]
    return nft


def iptables_backend(host: EngineHost) -> FakeNft:
    """libvirt's iptables backend (Debian 12's default), through iptables-nft, with
    portfwd's jump and chain PORTFWD_FWI in place: a steady start reads both
    families' chains and changes nothing there (no iptables run)."""
    host.process().apply(iptables_nft_libvirt("virbr0", ours=True))
    host.write_config(CONFIG)
    guest_event(host, "web1", "started")
    return guest_event(host, "db1", "started")


def iptables_nft_libvirt(bridge: str, ours: bool) -> List[Json]:
    """Tables ip and ip6 filter as iptables-nft holds libvirt's LIBVIRT_FWI (a reject
    for ``bridge``) and, ``ours``, portfwd's jump at its head and PORTFWD_FWI as
    ``compat`` writes them (xt matches: JSON cannot make them in the kernel, so this
    ruleset lives in the fake alone)."""
    oif = {"match": {"op": "==", "left": {"meta": {"key": "oifname"}}, "right": bridge}}
    counter = {"counter": None}
    out: List[Json] = []
    for family in ("ip", "ip6"):
        where = {"family": family, "table": "filter"}
        out += [{"add": {"table": {"family": family, "name": "filter"}}},
                {"add": {"chain": dict(where, name="FORWARD", type="filter", hook="forward",
                                       prio=0, policy="accept")}},
                {"add": {"chain": dict(where, name="LIBVIRT_FWI")}},
                {"add": {"rule": dict(where, chain="FORWARD", expr=[
                    counter, {"jump": {"target": "LIBVIRT_FWI"}}])}},
                {"add": {"rule": dict(where, chain="LIBVIRT_FWI", expr=[
                    oif, counter, {"xt": {"type": "target", "name": "REJECT"}}])}}]
        if ours:
            out += [{"add": {"chain": dict(where, name=compat.CHAIN)}},
                    {"add": {"rule": dict(where, chain=compat.CHAIN, expr=[
                        {"xt": {"type": "match", "name": name}}
                        for name in ("conntrack", "connmark", "comment")] + [
                        counter, {"accept": None}])}},
                    {"insert": {"rule": dict(where, chain="LIBVIRT_FWI", expr=[
                        oif, counter, {"jump": {"target": compat.CHAIN}}])}}]
    return out


SCENARIOS: Dict[str, Callable[[EngineHost], FakeNft]] = {
    f.__name__.replace("_", "-"): f for f in (
        first_start, steady_start, stop, held_port, renamed_table, layout_migration,
        nftables_upgrade, nftables_upgrade_guest, libvirt_accept, libvirt_accept_stop,
        iptables_backend)}
# what the kernel cannot replay (tests/test_fakenft.py): the concat variant needs
# nftables 1.1 (this host's 1.0.6 crashes on it), iptables-nft's xt matches need iptables
FAKE_ONLY = ("nftables-upgrade", "nftables-upgrade-guest", "iptables-backend")


@pytest.fixture
def host(tmp_path: "os.PathLike[str]", monkeypatch: pytest.MonkeyPatch) -> EngineHost:
    return EngineHost(str(tmp_path), monkeypatch)


def outcome(host: EngineHost, nft: FakeNft) -> Json:
    """What a golden file holds of the last run: its nftables calls (and their count),
    the files it wrote under the run directory, those it removed, the sysctls and
    sysfs files it wrote, and every record after it."""
    after = host.records()
    return {"layout": constants.LAYOUT, "nft": counts(nft.calls),
            "calls": [c.to_json() for c in nft.calls], "writes": host.writes,
            "sysfs": host.sysfs,
            "removed": sorted(set(host.before) - set(after)), "records": after}


def _golden(name: str, result: Json) -> None:
    path = os.path.join(GOLDEN, f"{name}.json")
    text = json.dumps(result, indent=1, sort_keys=True) + "\n"
    if os.environ.get("PORTFWD_GOLDEN") == "write":
        os.makedirs(GOLDEN, exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
    with open(path, encoding="utf-8") as f:
        golden = json.load(f)
    assert golden["layout"] == constants.LAYOUT, \
        "constants.LAYOUT changed: rewrite the golden files (see this module's docstring)"
    assert golden == json.loads(text), f"{name}: the engine's calls or records differ from {path}"


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_engine_path_is_golden(host: EngineHost, name: str) -> None:
    nft = SCENARIOS[name](host)
    _golden(name, outcome(host, nft))
