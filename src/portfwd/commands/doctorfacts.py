"""What ``portfwd doctor`` looks at, gathered read-only from the host (the edge of
``doctor``): libvirt's AppArmor profiles and what portfwd's hooks execute, sysctls,
interfaces (``hostnet.link``), neighbour entries, the running guests' domain XML
(``domainxml``), portfwd's records against the live table, the live rule set and
the listening sockets (``listening``).

The running guests come from libvirt, asked in a thread that doctor stops
waiting for after ``LIBVIRT_TIMEOUT`` seconds (a hung libvirtd must not hang the
command that diagnoses it), else from libvirt's status files (``status_dir``:
``/run/libvirt/qemu/NAME.xml``, which holds the live domain XML). The only packet
doctor sends are neighbour probes (an ARP request or neighbour solicitation: a
cached entry may be stale) and one TCP connection to the guest's address and
port of each TCP forward, bounded by ``CONNECT_WAIT`` seconds.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from typing import Any, Dict, Iterable, List, Optional, Sequence, Set, Tuple

from portfwd.host import apparmor, compat, evidence, hookchain, hostnet, listening, proc
from portfwd.libvirt import domainxml, libvirtapi
from portfwd.commands import installpaths
from portfwd import plan
from portfwd.constants import MARK
from portfwd.commands.doctor import (Check, Confinement, ForwardFacts, GuestFacts, HostFacts, Packet,
                     chain_verdict)
from portfwd.engine import Engine
from portfwd.errors import HostError
from portfwd.host.hostnet import Link
from portfwd.config.model import Config
from portfwd.host.pathwalk import at
from portfwd.commands.status import RowState, live_elements, live_state
from portfwd.values import Blocker, BlockerKind, Reason

LIBVIRT_TIMEOUT = 10.0
NEIGHBOUR_WAIT = 2.0
CONNECT_WAIT = 1.5


APPARMOR_ENABLED = "/sys/module/apparmor/parameters/enabled"


def host_facts() -> HostFacts:
    return HostFacts(hostnet.read_sysctl("/proc/sys/net/ipv4/ip_forward"),
                     hostnet.read_sysctl("/proc/sys/net/ipv6/conf/all/forwarding"),
                     hostnet.ipv6_off(),
                     hostnet.read_sysctl("/proc/sys/net/bridge/bridge-nf-call-iptables"),
                     confinement())


def confinement(root: str = "/", enforcing: Optional[bool] = None,
                extra_dirs: Sequence[str] = ()) -> Optional[Confinement]:
    """The profiles of libvirt's daemons below ``root`` and what portfwd's hooks there
    execute; None when libvirt is not confined: AppArmor off in this kernel (unless
    ``enforcing`` says otherwise), no profile of libvirt's, or no portfwd hook.
    ``extra_dirs``: where includes missing from ``root``'s /etc/apparmor.d are found."""
    if enforcing is None:
        enforcing = hostnet.read_sysctl(APPARMOR_ENABLED) == "Y"
    if not enforcing:
        return None
    profiles = []
    problems: List[str] = []
    for name, kinds in apparmor.LIBVIRT_PROFILES:
        read = apparmor.read_profiles(root, name, extra_dirs)
        if read is not None:
            profiles += [(read.path, p, kinds) for p in read.profiles]
            problems += read.problems
    hooks = [(kind, path, hookchain.hook_chain(root, path)) for kind in installpaths.HOOK_KINDS
             for path in [installpaths.hook(kind)] if os.path.lexists(at(root, path))]
    if not profiles or not hooks:
        return None
    return Confinement(profiles, hooks, problems)


# -- running guests -------------------------------------------------------------

def domains_from_libvirt(uri: str, timeout: float = LIBVIRT_TIMEOUT
                         ) -> Tuple[Optional[Dict[str, bytes]], str]:
    """Name → live domain XML of every running domain, and where it came from; None
    (with the reason) when libvirt did not answer within ``timeout`` seconds."""
    result: List[Dict[str, bytes]] = []
    failure: List[str] = []

    def ask() -> None:
        try:
            conn = libvirtapi.connect(uri)
            try:
                result.append(libvirtapi.running_domain_xmls(conn))
            finally:
                conn.close()
        except Exception as e:  # HostError or a libvirt error: reported, never raised
            failure.append(str(e))

    worker = threading.Thread(target=ask, daemon=True)  # left behind if libvirt hangs
    worker.start()
    worker.join(timeout)
    if result:
        return result[0], f"libvirt {uri}"
    if failure:
        return None, failure[0]
    return None, f"libvirt at {uri} did not answer within {timeout:g} s"


def running_domains(uri: str, status_dir: Optional[str] = None
                    ) -> Tuple[Optional[Dict[str, bytes]], str]:
    """Name → live domain XML of every running domain and where that came from: the
    status files in ``status_dir`` when given, else libvirt (bounded wait), else
    libvirt's status files; None when none of them could tell."""
    if status_dir is not None:
        return domainxml.status_files(status_dir), f"status files in {status_dir}"
    domains, source = domains_from_libvirt(uri)
    if domains is None:
        fallback = domainxml.status_dir()
        domains = domainxml.status_files(fallback)
        source = f"{source}; {'from' if domains is not None else 'no'} status files in" \
                 f" {fallback}"
    return domains, source


def running_names(domains: Dict[str, bytes]) -> Set[str]:
    """The names and (lower-case) UUIDs of ``domains``."""
    out = set(domains)
    for xml in domains.values():
        uuid = domainxml.parse(xml).uuid
        if uuid:
            out.add(uuid.lower())
    return out


# -- neighbours, sockets ------------------------------------------------------------

def neighbour_state(address: str, dev: Optional[str]) -> str:
    """The neighbour entry's state of ``address`` ("" when there is none)."""
    for interface, dst, _, state in evidence.read_neighbours():
        if dst == address and (dev is None or interface == dev):
            return evidence.state_name(state)
    return ""


def neighbour(address: str, dev: Optional[str], wait: float = NEIGHBOUR_WAIT) -> str:
    """The neighbour state of ``address`` after asking it again: an entry is put into
    PROBE (a REACHABLE one may be a second old news), none is solicited; the answer
    is awaited up to ``wait`` seconds. What the cache says without ``dev``."""
    state = neighbour_state(address, dev)
    if dev is None or state in ("PERMANENT", "NOARP"):
        return state
    if not (state and evidence.solicit(address, dev, recheck=True)):
        evidence.solicit(address, dev)
    deadline = time.monotonic() + wait
    while True:
        state = neighbour_state(address, dev)
        if state in ("REACHABLE", "FAILED") or time.monotonic() >= deadline:
            return state
        time.sleep(0.05)


def connect(address: str, port: int, wait: float = CONNECT_WAIT) -> str:
    """One TCP connection from the host to the guest's ``address:port``, at most
    ``wait`` seconds: "open", "refused", "timeout", or what the kernel said."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.settimeout(wait)
        try:
            s.connect((address, port))
        except ConnectionRefusedError:
            return "refused"
        except socket.timeout:
            return "timeout"
        except OSError as e:
            return e.strerror or str(e)
    return "open"


def services(forwards: Sequence[ForwardFacts]) -> Dict[Tuple[str, int], str]:
    """(guest address, first guest port) → what a connection to it got, per TCP forward."""
    out: Dict[Tuple[str, int], str] = {}
    for f in forwards:
        if f.proto == "tcp" and f.address is not None:
            key = (f.address, f.guest_ports.first)
            if key not in out:
                out[key] = connect(*key)
    return out


def listeners(forwards: Sequence[ForwardFacts]) -> List[str]:
    """Host sockets listening on a forwarded host port and listen address."""
    out = []
    for s in listening.sockets():
        for f in forwards:
            if (f.proto == s.proto and s.port in f.host_ports
                    and (s.wildcard or f.listen in ("*", s.address))):
                out.append(f"{s.process or 'a process'} listens on {s.endpoint}/{s.proto}")
                break
    return out


# -- the rule set -------------------------------------------------------------------

SKIPPED_TABLES = {("ip", "filter"), ("ip6", "filter"), ("ip", "libvirt_network"),
                  ("ip6", "libvirt_network"), ("inet", "firewalld")}  # compat.py reads those


def own_drops(engine: Engine, forwards: Sequence[ForwardFacts], bridge_of: Dict[str, str],
              table: str) -> List[Blocker]:
    """Drops and rejects in forward base chains of the host's own tables (not
    libvirt's, firewalld's or portfwd's, which compat.py judges) that surely hit a
    forwarded connection to one of ``forwards``; each names table, chain and rule."""
    chains = [c["chain"] for c in engine.nft.list({"chains": {}}) or [] if "chain" in c]
    out: List[Blocker] = []
    for c in chains:
        where = (c["family"], c["table"])
        if c.get("hook") != "forward" or where in SKIPPED_TABLES or where == ("inet", table):
            continue
        listed = engine.nft.list({"chain": {"family": c["family"], "table": c["table"],
                                            "name": c["name"]}}) or []
        rules = [o["rule"] for o in listed if "rule" in o]
        for t in forwards:
            if t.address is None or t.family not in _families(c["family"]):
                continue
            first = t.guest_ports.first
            packet = Packet(t.family, bridge_of.get(t.address, ""), t.address, t.proto, first)
            hit = chain_verdict(rules, packet, MARK)
            if hit and hit[0] in ("drop", "reject"):
                handle = hit[1].get("handle")
                out.append(Blocker(
                    BlockerKind.RULE, c["family"], c["table"], c["name"],
                    f"table {c['family']} {c['table']} chain {c['name']}: rule handle"
                    f" {'?' if handle is None else handle} {hit[0]}s"
                    f" {t.address}:{first}/{t.proto}",
                    handle=handle if isinstance(handle, int) else None))
                break
    return out


def _families(family: str) -> Tuple[int, ...]:
    return (4,) if family == "ip" else (6,) if family == "ip6" else (4, 6) if family == "inet" else ()


# -- per guest ---------------------------------------------------------------------

def forwards_of(engine: Engine, config: Optional[Config], name: str, uuid: Optional[str],
               live: Dict[str, Dict[str, Dict[Tuple[Any, ...], Any]]]) -> List[ForwardFacts]:
    """The guest's forwards: recorded (with the kernel's verdict, as ``portfwd status``
    gives it), else configured and not applied."""
    st = engine.read_state(name)
    out: List[ForwardFacts] = []
    if st is not None and not st.empty:
        if st.table not in live:
            live[st.table] = live_elements(engine.nft.list_table(st.table) or [])
        for b in st.bindings:
            state, reason, _, _ = live_state(b, live[st.table])
            out.append(ForwardFacts(b.family, b.proto, b.listen, b.host_ports, b.address,
                                    b.guest_ports, state,
                                    reason if state == RowState.DIFFERS else ""))
        for b, why in st.pending:
            pending = RowState.INACTIVE if why.cause == Reason.INACTIVE else RowState.PENDING
            out.append(ForwardFacts(b.family, b.proto, b.listen, b.host_ports, None, b.guest_ports,
                                    pending, why.text))
        return out
    if config is not None:
        for b in plan.forwards_bindings(config.forwards_for(name, uuid), name):
            address = b.target if isinstance(b.target, str) else None
            out.append(ForwardFacts(b.family, b.proto, b.listen, b.host_ports, address,
                              b.guest_ports, RowState.NOT_APPLIED))
    return out


def guest_names(config: Optional[Config], engine: Engine) -> List[str]:
    """Every guest with forwards: configured or recorded."""
    names = {f.label for f in config.forwards} if config is not None else set()
    names |= {st.guest for st in engine.all_states() if not st.empty}
    return sorted(names)


def gather(engine: Engine, config: Optional[Config], names: Iterable[str],
           domains: Optional[Dict[str, bytes]], domains_from: str) -> List[GuestFacts]:
    """The facts of each guest in ``names``; ``domains`` are the running domains'
    XMLs (None: unknown, from ``domains_from``)."""
    table = config.options.table if config is not None else "portfwd"
    macs: Dict[Tuple[str, str], List[str]] = {}
    parsed = {name: domainxml.parse(xml) for name, xml in (domains or {}).items()}
    for other, domain in parsed.items():
        for nic in domain.nics:
            if nic.bridge:
                macs.setdefault((nic.bridge, nic.mac), []).append(other)
    fw = compat.read(engine.nft)
    routes = hostnet.RouteTable()
    live: Dict[str, Dict[str, Dict[Tuple[Any, ...], Any]]] = {}
    out = []
    for name in names:
        domain = parsed.get(name, domainxml.Domain())
        running = None if domains is None else name in parsed
        nics = domain.nics
        uuid = domain.uuid
        links: Dict[str, Optional[Link]] = {}
        for nic in nics:
            for iface in (nic.bridge, nic.tap):
                if iface:
                    links[iface] = hostnet.link(iface)
        ipv6_off = {str(n.bridge): why for n in nics if n.bridge
                    for why in [hostnet.ipv6_off(n.bridge)] if why}
        forwards = forwards_of(engine, config, name, uuid, live)
        bridge_of = {str(t.address): routes.interface_for(str(t.address)) or ""
                     for t in forwards if t.address}
        wanted: Dict[int, Set[str]] = {4: set(), 6: set()}
        for t in forwards:
            if t.address and bridge_of.get(t.address):
                wanted[t.family].add(bridge_of[t.address])
        blocked = compat.blockers(fw, wanted) + own_drops(engine, forwards, bridge_of, table)
        neighbours = {}
        answers: Dict[Tuple[str, int], str] = {}
        if running:
            for address in sorted(bridge_of):
                neighbours[address] = neighbour(address, bridge_of[address] or None)
            answers = services(forwards)
        out.append(GuestFacts(name, running, domains_from, nics, links, ipv6_off, forwards,
                              neighbours, blocked, listeners(forwards), macs, answers))
    return out


def diagnose(config_path: str, guest: Optional[str], uri: str,
             status_dir: Optional[str]) -> List[Check]:
    """Every layer's check, in the packet's order (see doctor.walk). The running
    domains come from ``status_dir`` when given, else from libvirt (bounded wait),
    else from libvirt's status files."""
    from portfwd.commands import doctor
    from portfwd import log
    from portfwd.config import load
    from portfwd.errors import ConfigError

    config: Optional[Config] = None
    try:
        config = load(config_path)
    except ConfigError as e:
        for line in e.lines:
            log.warning(line)
        log.warning("configuration invalid: looking at the applied forwards only")
    domains, source = running_domains(uri, status_dir)
    engine = Engine(config_path)
    names = [guest] if guest else guest_names(config, engine)
    if not names:
        return [doctor.Check("forwards", True, f"no forwards configured in {config_path} and"
                             " none applied: nothing to check", skipped=True)]
    return doctor.walk(host_facts(), gather(engine, config, names, domains, source))
