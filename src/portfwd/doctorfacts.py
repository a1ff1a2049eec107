"""What ``portfwd doctor`` looks at, gathered read-only from the host (the edge of
``doctor``): libvirt's AppArmor profiles and what portfwd's hooks execute, sysctls,
sysfs links, neighbour entries, the domain XML of running guests, portfwd's records
against the live table, the live rule set and the sockets in /proc/net.

The running guests come from libvirt, asked in a thread that doctor stops
waiting for after ``LIBVIRT_TIMEOUT`` seconds (a hung libvirtd must not hang the
command that diagnoses it), else from libvirt's status files (``status_dir``:
``/run/libvirt/qemu/NAME.xml``, which holds the live domain XML). The only packet
doctor sends is one empty UDP datagram to port 9 of a guest address the host has
no neighbour entry for, so that the kernel asks who has it.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from typing import Any, Dict, Iterable, List, Optional, Sequence, Set, Tuple

from . import apparmor, compat, hostnet, libvirtapi, plan, proc
from .constants import MARK
from .discover import domain_nics
from .doctor import (Check, Confinement, GuestFacts, HostFacts, Link, Packet, Target,
                     chain_verdict)
from .engine import Engine
from .errors import HostError
from .model import Config
from .status import live_elements, live_state
from .values import Reason

LIBVIRT_TIMEOUT = 10.0
NEIGHBOUR_WAIT = 2.0
SYS_NET = "/sys/class/net"


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
    hooks = [(kind, path, apparmor.hook_chain(root, path)) for kind in ("qemu", "network")
             for path in [f"{apparmor.HOOK_DIR}/{kind}.d/portfwd"]
             if os.path.lexists(apparmor.at(root, path))]
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


def domains_from_status_files(folder: str) -> Optional[Dict[str, bytes]]:
    """Name → domain XML from libvirt's status files (``NAME.xml`` per running domain)."""
    try:
        names = sorted(os.listdir(folder))
    except OSError:
        return None
    out: Dict[str, bytes] = {}
    for name in names:
        if name.endswith(".xml"):
            try:
                with open(os.path.join(folder, name), "rb") as f:
                    out[name[:-4]] = f.read()
            except OSError:
                continue
    return out


# -- links, neighbours, sockets ---------------------------------------------------

def link(name: str) -> Optional[Link]:
    """``name`` as sysfs shows it, None when there is no such interface."""
    base = os.path.join(SYS_NET, name)
    if not name or "/" in name or not os.path.isdir(base):
        return None
    flags = hostnet.read_sysctl(os.path.join(base, "flags"))
    master = os.path.join(base, "master")
    hairpin = hostnet.read_sysctl(os.path.join(base, "brport", "hairpin_mode"))
    return Link(name, bool(int(flags or "0", 16) & 1),
                os.path.basename(os.readlink(master)) if os.path.islink(master) else None,
                None if hairpin is None else hairpin == "1")


def neighbour_state(address: str, dev: Optional[str]) -> str:
    """The neighbour entry's state of ``address`` ("" when there is none)."""
    argv = ["ip", "-j", "neigh", "show", "to", address] + (["dev", dev] if dev else [])
    # ip prints interface names as the kernel holds them: bytes, maybe not UTF-8 (proc.run
    # keeps them with surrogateescape)
    try:
        r = proc.run(argv, 10.0, package="iproute2")
    except HostError:
        return ""
    try:
        entries = json.loads(r.stdout or "[]")
    except ValueError:
        return ""
    for entry in entries:
        if entry.get("dst") == address:
            return ",".join(str(s) for s in entry.get("state", [])) or "NOARP"
    return ""


def neighbour(address: str, dev: Optional[str], wait: float = NEIGHBOUR_WAIT) -> str:
    """The neighbour state of ``address``; with no entry, one empty datagram to its
    port 9 makes the kernel ask, and the answer is awaited up to ``wait`` seconds."""
    state = neighbour_state(address, dev)
    if state:
        return state
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.sendto(b"", (address, 9))
    except OSError:
        return ""
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        time.sleep(0.1)
        state = neighbour_state(address, dev)
        if state and not state.startswith("INCOMPLETE"):
            return state
    return state


# /proc/net states: TCP_LISTEN, and UDP's TCP_CLOSE (a bound, unconnected socket)
LISTENING = {"tcp": "0A", "udp": "07"}


def proc_listeners(text: str, proto: str, family: int) -> List[Tuple[str, int, str]]:
    """(address, port, inode) of each listening socket in a /proc/net/{tcp,udp}[6] text."""
    out = []
    for line in text.splitlines()[1:]:
        f = line.split()
        if len(f) < 10 or f[3] != LISTENING[proto]:
            continue
        hexaddr, _, hexport = f[1].partition(":")
        raw = bytes.fromhex(hexaddr)
        if family == 4:
            address = socket.inet_ntop(socket.AF_INET, raw[::-1])
        else:  # four host-order 32-bit words
            words = b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4))
            address = socket.inet_ntop(socket.AF_INET6, words)
        out.append((address, int(hexport, 16), f[9]))
    return out


def _owners(inodes: Set[str]) -> Dict[str, str]:
    """Socket inode → ``NAME (pid N)`` of a process holding it."""
    found: Dict[str, str] = {}
    wanted = {f"socket:[{i}]": i for i in inodes}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target in wanted and wanted[target] not in found:
                comm = hostnet.read_sysctl(f"/proc/{pid}/comm") or "?"
                found[wanted[target]] = f"{comm} (pid {pid})"
    return found


def listeners(targets: Sequence[Target]) -> List[str]:
    """Host sockets listening on a forwarded host port and listen address."""
    hits: List[Tuple[str, str, int, str]] = []
    for proto in ("tcp", "udp"):
        for family, suffix in ((4, ""), (6, "6")):
            text = hostnet.read_sysctl(f"/proc/net/{proto}{suffix}") or ""
            for address, port, inode in proc_listeners(text, proto, family):
                for t in targets:
                    first, _, last = t.host_port.partition("-")
                    wildcard = address in ("0.0.0.0", "::")
                    if (t.proto == proto and int(first) <= port <= int(last or first)
                            and (wildcard or t.listen in ("*", address))):
                        hits.append((proto, address, port, inode))
                        break
    owners = _owners({inode for *_, inode in hits})
    out = []
    for proto, address, port, inode in sorted(set(hits)):
        shown = f"[{address}]" if ":" in address else address
        out.append(f"{owners.get(inode, 'a process')} listens on {shown}:{port}/{proto}")
    return out


# -- the rule set -------------------------------------------------------------------

SKIPPED_TABLES = {("ip", "filter"), ("ip6", "filter"), ("ip", "libvirt_network"),
                  ("ip6", "libvirt_network"), ("inet", "firewalld")}  # compat.py reads those


def own_drops(engine: Engine, targets: Sequence[Target], bridge_of: Dict[str, str],
              table: str) -> List[str]:
    """Drops and rejects in forward base chains of the host's own tables (not
    libvirt's, firewalld's or portfwd's, which compat.py judges) that surely hit a
    forwarded connection to one of ``targets``; each names table, chain and rule."""
    chains = [c["chain"] for c in engine.nft.list({"chains": {}}) or [] if "chain" in c]
    out: List[str] = []
    for c in chains:
        where = (c["family"], c["table"])
        if c.get("hook") != "forward" or where in SKIPPED_TABLES or where == ("inet", table):
            continue
        listed = engine.nft.list({"chain": {"family": c["family"], "table": c["table"],
                                            "name": c["name"]}}) or []
        rules = [o["rule"] for o in listed if "rule" in o]
        for t in targets:
            if t.address is None or t.family not in _families(c["family"]):
                continue
            first = int(t.guest_port.partition("-")[0])
            packet = Packet(t.family, bridge_of.get(t.address, ""), t.address, t.proto, first)
            hit = chain_verdict(rules, packet, MARK)
            if hit and hit[0] in ("drop", "reject"):
                out.append(f"table {c['family']} {c['table']} chain {c['name']}: rule handle"
                           f" {hit[1].get('handle', '?')} {hit[0]}s {t.address}:{first}/{t.proto}")
                break
    return out


def _families(family: str) -> Tuple[int, ...]:
    return (4,) if family == "ip" else (6,) if family == "ip6" else (4, 6) if family == "inet" else ()


# -- per guest ---------------------------------------------------------------------

def targets_of(engine: Engine, config: Optional[Config], name: str, uuid: Optional[str],
               live: Dict[str, Dict[str, Dict[Tuple[Any, ...], Any]]]) -> List[Target]:
    """The guest's forwards: recorded (with the kernel's verdict, as ``portfwd status``
    gives it), else configured and not applied."""
    st = engine.read_state(name)
    out: List[Target] = []
    if st is not None and not st.empty:
        if st.table not in live:
            live[st.table] = live_elements(engine.nft.list_table(st.table) or [])
        for b in st.bindings:
            state, reason, _, _ = live_state(b, live[st.table])
            out.append(Target(b.family, b.proto, b.listen, b.host_ports, b.address,
                              b.guest_ports, f"{state} ({reason})" if state == "differs"
                              else state))
        for b, why in st.pending:
            state = str(why) if why.cause == Reason.INACTIVE else f"pending: {why}"
            out.append(Target(b.family, b.proto, b.listen, b.host_ports, None, b.guest_ports,
                              state))
        return out
    if config is not None:
        for b in plan.forwards_bindings(config.forwards_for(name, uuid), name):
            address = b.target if isinstance(b.target, str) else None
            out.append(Target(b.family, b.proto, b.listen, b.host_ports, address,
                              b.guest_ports, "not applied"))
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
    for other, other_xml in (domains or {}).items():
        for nic in domain_nics(other_xml):
            if nic.bridge:
                macs.setdefault((nic.bridge, nic.mac), []).append(other)
    fw = compat.read(engine.nft)
    routes = hostnet.RouteTable()
    live: Dict[str, Dict[str, Dict[Tuple[Any, ...], Any]]] = {}
    out = []
    for name in names:
        xml = (domains or {}).get(name)
        running = None if domains is None else xml is not None
        nics = domain_nics(xml) if xml else []
        uuid = _uuid(xml) if xml else None
        links: Dict[str, Optional[Link]] = {}
        for nic in nics:
            for iface in (nic.bridge, nic.tap):
                if iface:
                    links[iface] = link(iface)
        ipv6_off = {str(n.bridge): why for n in nics if n.bridge
                    for why in [hostnet.ipv6_off(n.bridge)] if why}
        targets = targets_of(engine, config, name, uuid, live)
        bridge_of = {str(t.address): routes.interface_for(str(t.address)) or ""
                     for t in targets if t.address}
        wanted: Dict[int, Set[str]] = {4: set(), 6: set()}
        for t in targets:
            if t.address and bridge_of.get(t.address):
                wanted[t.family].add(bridge_of[t.address])
        blocked = compat.blockers(fw, wanted) + own_drops(engine, targets, bridge_of, table)
        neighbours = {}
        if running:
            for address in sorted(bridge_of):
                neighbours[address] = neighbour(address, bridge_of[address] or None)
        out.append(GuestFacts(name, running, domains_from, nics, links, ipv6_off, targets,
                              neighbours, blocked, listeners(targets), macs))
    return out


def _uuid(xml: bytes) -> Optional[str]:
    from xml.etree import ElementTree

    try:
        root = ElementTree.fromstring(xml)
    except ElementTree.ParseError:
        return None
    found = root.find("uuid") if root.tag == "domain" else root.find("domain/uuid")
    return found.text.strip().lower() if found is not None and found.text else None


def diagnose(config_path: str, guest: Optional[str], uri: str,
             status_dir: Optional[str]) -> List[Check]:
    """Every layer's check, in the packet's order (see doctor.walk). The running
    domains come from ``status_dir`` when given, else from libvirt (bounded wait),
    else from libvirt's status files."""
    from . import doctor, log
    from .config import load
    from .errors import ConfigError

    config: Optional[Config] = None
    try:
        config = load(config_path)
    except ConfigError as e:
        for line in e.lines:
            log.warning(line)
        log.warning("configuration invalid: looking at the applied forwards only")
    if status_dir is not None:
        domains, source = domains_from_status_files(status_dir), f"status files in {status_dir}"
    else:
        domains, source = domains_from_libvirt(uri)
        if domains is None:
            fallback = os.environ.get("PORTFWD_QEMU_STATUS_DIR") or "/run/libvirt/qemu"
            domains = domains_from_status_files(fallback)
            source = f"{source}; from status files in {fallback}"
    engine = Engine(config_path)
    names = [guest] if guest else guest_names(config, engine)
    return doctor.walk(host_facts(), gather(engine, config, names, domains, source))
