"""``portfwd doctor``: the path of a forwarded packet, layer by layer (pure).

Every check here is a function of facts that ``doctorfacts`` gathered (sysctls,
links, neighbours, the domain XML, the live rule set, listening sockets): no I/O,
so each layer can be tested by breaking exactly that layer. The walk follows the
packet: whether libvirt may run the hooks at all (AppArmor), host forwarding and
IPv6, then per guest: running, bridge, tap, MAC, IPv6 on the bridge, address,
neighbour, table, filter, listener, hairpin, and whether the guest's service
accepts a connection. It stops at the first broken layer, which it names with its
fix.

Longer than ~450 lines on purpose: one small check per layer, in the order the
packet meets them, over the same facts' types; split, the walk would no longer
read in one place.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence, Tuple

from portfwd.host.apparmor import Profile, Verdict, refusal
from portfwd.libvirt.domainxml import Nic, mac_problem
from portfwd.host.hookchain import Step
from portfwd.host.hostnet import Link
from portfwd.suggest import count
from portfwd.commands.status import RowState
from portfwd.values import Blocker, BlockerKind, PortSpan

EXIT_BROKEN = 5  # a layer failed (cli.py's codes 0-4 mean other things)


class Check:
    """One layer's verdict: ``ok``, what was seen (``detail``) and, if not ok, ``fix``."""

    __slots__ = ("layer", "ok", "detail", "fix", "guest", "skipped")

    def __init__(self, layer: str, ok: bool, detail: str, fix: str = "",
                 guest: Optional[str] = None, skipped: bool = False) -> None:
        self.layer = layer
        self.ok = ok
        self.detail = detail
        self.fix = fix
        self.guest = guest
        self.skipped = skipped  # not broken, but not checked either: ``detail`` says why

    def to_json(self) -> Dict[str, object]:
        return {"layer": self.layer, "guest": self.guest, "ok": self.ok, "detail": self.detail,
                "fix": self.fix, "skipped": self.skipped}


class ForwardFacts:
    """One forward of the guest as doctor sees it: where it leads and what the table says."""

    __slots__ = ("family", "proto", "listen", "host_ports", "address", "guest_ports", "state",
                 "detail")

    def __init__(self, family: int, proto: str, listen: str, host_ports: PortSpan,
                 address: Optional[str], guest_ports: PortSpan, state: RowState,
                 detail: str = "") -> None:
        self.family = family
        self.proto = proto
        self.listen = listen  # "*" or an address
        self.host_ports = host_ports
        self.address = address  # None: no address yet (pending)
        self.guest_ports = guest_ports
        self.state = state  # as `portfwd status` says
        self.detail = detail  # why it differs, what it waits for

    @property
    def said(self) -> str:
        """The state as doctor says it: ``differs (…)``, ``pending: …``, ``missing``."""
        if self.state == RowState.DIFFERS:
            return f"{self.state} ({self.detail})"
        if self.state in (RowState.PENDING, RowState.INACTIVE):
            return f"{self.state}: {self.detail}"
        return str(self.state)

    @property
    def text(self) -> str:
        return (f"{self.listen} {self.host_ports}/{self.proto} -> {self.address or '?'}:"
                f"{self.guest_ports}")


class Confinement:
    """libvirt's AppArmor profiles and what portfwd's hooks execute (``doctorfacts``)."""

    __slots__ = ("profiles", "hooks", "problems")

    def __init__(self, profiles: Sequence[Tuple[str, Profile, Tuple[str, ...]]],
                 hooks: Sequence[Tuple[str, str, Sequence[Step]]],
                 problems: Sequence[str] = ()) -> None:
        self.profiles = list(profiles)  # (profile file, profile, the hook kinds it runs)
        self.hooks = list(hooks)  # (kind, hook path, what running it executes)
        self.problems = list(problems)  # what could not be read of the profiles


class HostFacts:
    __slots__ = ("ip_forward", "ipv6_forwarding", "ipv6_off", "br_netfilter", "confinement")

    def __init__(self, ip_forward: Optional[str], ipv6_forwarding: Optional[str],
                 ipv6_off: Optional[str], br_netfilter: Optional[str],
                 confinement: Optional[Confinement] = None) -> None:
        self.ip_forward = ip_forward  # net.ipv4.ip_forward
        self.ipv6_forwarding = ipv6_forwarding  # net.ipv6.conf.all.forwarding
        self.ipv6_off = ipv6_off  # why IPv6 is off host-wide (hostnet.ipv6_off), or None
        self.br_netfilter = br_netfilter  # net.bridge.bridge-nf-call-iptables, None: not loaded
        self.confinement = confinement  # None: libvirt is not confined (or has no portfwd hook)


class GuestFacts:
    """Everything doctor knows about one guest with forwards."""

    __slots__ = ("name", "running", "running_from", "nics", "links", "bridge_ipv6_off",
                 "forwards", "neighbours", "blocked", "listeners", "macs_on_bridge", "services")

    def __init__(self, name: str, running: Optional[bool], running_from: str = "libvirt",
                 nics: Sequence[Nic] = (), links: Optional[Dict[str, Optional[Link]]] = None,
                 bridge_ipv6_off: Optional[Dict[str, str]] = None,
                 forwards: Sequence[ForwardFacts] = (), neighbours: Optional[Dict[str, str]] = None,
                 blocked: Sequence[Blocker] = (), listeners: Sequence[str] = (),
                 macs_on_bridge: Optional[Dict[Tuple[str, str], List[str]]] = None,
                 services: Optional[Dict[Tuple[str, int], str]] = None) -> None:
        self.name = name
        self.running = running  # None: could not be told
        self.running_from = running_from  # where that came from
        self.nics = list(nics)
        self.links = links or {}  # interface name → Link, None when it does not exist
        self.bridge_ipv6_off = bridge_ipv6_off or {}  # bridge → why IPv6 is off there
        self.forwards = list(forwards)
        self.neighbours = neighbours or {}  # guest address → neighbour state ("" = no entry)
        self.blocked = list(blocked)  # what drops forwarded traffic, table and chain named
        self.listeners = list(listeners)  # host sockets on a forwarded port
        self.macs_on_bridge = macs_on_bridge or {}  # (bridge, mac) → running guests with it
        # (address, port) → what a TCP connection from the host got: open, refused, timeout…
        self.services = services or {}


# -- host layers ----------------------------------------------------------------

def hooks_check(c: Confinement) -> Check:
    """Whether every profile of libvirt's daemons lets it execute what the hooks of the
    kinds it runs execute (the hook, its interpreters, the tools they run)."""
    for source, profile, kinds in c.profiles:
        for kind, hook, steps in c.hooks:
            if kind not in kinds:
                continue
            refused = refusal(profile, steps)
            if refused is not None:
                return _refused(source, kind, hook, *refused)
    names = sorted({source.rsplit("/", 1)[-1] for source, _, _ in c.profiles})
    count = len({s.real for _, _, steps in c.hooks for s in steps if s.real})
    unread = f" (not read: {'; '.join(c.problems)})" if c.problems else ""
    return Check("hooks", True, f"libvirt's AppArmor profile {', '.join(names)} allows the"
                                f" {count} files portfwd's hooks execute{unread}")


def _refused(source: str, kind: str, hook: str, step: Step, verdict: Verdict) -> Check:
    """The hooks layer when ``source`` refuses ``step`` of ``hook``."""
    name = source.rsplit("/", 1)[-1]
    what = "guest start" if kind == "qemu" else "start of a network"
    real = str(step.real)
    if step.role == "hook" and step.via_symlink:
        seen = f"{hook} is a symlink to {real}"
        fix = (f"make {hook} a file: upgrade portfwd's Debian package (its hooks are files"
               " in /etc since 0.2.0), or run `portfwd install` again (pip install)")
    elif step.role == "hook":
        seen = f"{hook} is {real}"
        fix = f"libvirt's profile must allow /etc/libvirt/hooks/** (Debian's does): see {source}"
    else:
        via = f" ({real})" if step.via_symlink else ""
        seen = f"{hook} runs {step.named}{via}, the {step.role}"
        local = f"/etc/apparmor.d/local/{name}"
        fix = (f"allow it in {local} (a line `{real} PUx,`) and reload the profile"
               f" (apparmor_parser -r {source})")
        if step.role == "python":
            fix = ("let the hooks run a Python under /usr/bin: a venv made by /usr/bin/python3 -m"
                   " venv links its python there (recreate it, pip install, portfwd install);"
                   f" or {fix}")
    why = (f"`{verdict.denied_by.text}` denies executing it" if verdict.denied_by is not None
           else "no exec rule allows it")
    return Check("hooks", False, f"{seen}, and libvirt's AppArmor profile {name} refuses it:"
                                 f" {why}; every {what} fails", fix)


def host_checks(host: HostFacts, families: Sequence[int]) -> List[Check]:
    """Whether libvirt may run the hooks (when it is confined), then forwarding sysctls
    and IPv6 for the families the forwards use, in order."""
    out = [hooks_check(host.confinement)] if host.confinement is not None else []
    if 4 in families:
        if host.ip_forward == "1":
            out.append(Check("ipv4 forwarding", True, "net.ipv4.ip_forward = 1"))
        else:
            out.append(Check("ipv4 forwarding", False,
                             f"net.ipv4.ip_forward = {host.ip_forward or '(missing)'}: the host"
                             " routes no IPv4 packet to a guest",
                             "sysctl -w net.ipv4.ip_forward=1 (and set it in /etc/sysctl.d/)"))
    if 6 in families:
        if host.ipv6_off:
            out.append(Check("ipv6", False, host.ipv6_off,
                             "enable IPv6 (sysctl -w net.ipv6.conf.all.disable_ipv6=0, or boot"
                             " without ipv6.disable=1), or drop the forwards' ipv6"))
        elif host.ipv6_forwarding == "1":
            out.append(Check("ipv6 forwarding", True, "net.ipv6.conf.all.forwarding = 1"))
        else:
            out.append(Check("ipv6 forwarding", False,
                             f"net.ipv6.conf.all.forwarding = {host.ipv6_forwarding or '(missing)'}:"
                             " the host routes no IPv6 packet to a guest",
                             "sysctl -w net.ipv6.conf.all.forwarding=1 (and set it in"
                             " /etc/sysctl.d/)"))
    return out


# -- guest layers -----------------------------------------------------------------

def _running(g: GuestFacts) -> Check:
    if g.running:
        return Check("guest", True, f"running ({g.running_from})")
    if g.running is None:
        return Check("guest", False, f"cannot tell whether it runs ({g.running_from})",
                     "start libvirtd, or run doctor where libvirt's status files are")
    return Check("guest", False, f"not running ({g.running_from})",
                 f"virsh start {g.name}")


def _bridges(g: GuestFacts) -> List[Check]:
    """Bridge up, tap a port of it, MAC valid and not shared, per NIC with a bridge."""
    out: List[Check] = []
    nics = [n for n in g.nics if n.bridge]
    if not nics:
        return [Check("bridge", False, "the domain XML names no NIC on a bridge",
                      f"attach a NIC on a libvirt network: virsh edit {g.name}")]
    for nic in nics:
        bridge = str(nic.bridge)
        link = g.links.get(bridge)
        if link is None:
            out.append(Check("bridge", False, f"bridge {bridge} does not exist",
                             f"virsh net-start the network of {bridge}"))
            return out
        if not link.up:
            out.append(Check("bridge", False, f"bridge {bridge} is down",
                             f"ip link set {bridge} up (or virsh net-start its network)"))
            return out
        out.append(Check("bridge", True, f"{bridge} is up"))
        tap = g.links.get(nic.tap or "") if nic.tap else None
        if tap is None:
            out.append(Check("tap", False, f"tap {nic.tap or '(none in the domain XML)'} of"
                             f" {nic.mac} does not exist",
                             f"restart the guest (virsh destroy {g.name}; virsh start {g.name})"))
            return out
        if tap.master != bridge:
            where = f"a port of {tap.master}" if tap.master else "not a port of any bridge"
            out.append(Check("tap", False, f"tap {tap.name} is {where}, not of {bridge}",
                             f"ip link set {tap.name} master {bridge}"))
            return out
        if not tap.up:
            out.append(Check("tap", False, f"tap {tap.name} is down",
                             f"ip link set {tap.name} up"))
            return out
        out.append(Check("tap", True, f"{tap.name} is a port of {bridge}, up"))
        bad = mac_problem(nic.mac)
        if bad:
            out.append(Check("mac", False, f"guest {bad}",
                             f"give the NIC a unicast MAC (virsh edit {g.name}: <mac address=…>)"))
            return out
        sharing = sorted(set(g.macs_on_bridge.get((bridge, nic.mac.lower()), [])) - {g.name})
        if sharing:
            out.append(Check("mac", False, f"guest MAC {nic.mac} is also used on {bridge} by"
                             f" {', '.join(sharing)}: the bridge delivers to one of them",
                             "give each guest its own MAC (virsh edit; remove <mac> to have"
                             " libvirt pick one)"))
            return out
        out.append(Check("mac", True, f"{nic.mac} valid, the only one on {bridge}"))
        if any(t.family == 6 for t in g.forwards) and bridge in g.bridge_ipv6_off:
            out.append(Check("ipv6", False, g.bridge_ipv6_off[bridge],
                             f"sysctl -w net.ipv6.conf.{bridge}.disable_ipv6=0"))
            return out
    return out


def _addresses(g: GuestFacts) -> Check:
    if not g.forwards:
        return Check("address", False, "no forward of this guest is configured or recorded",
                     "add it to forward.toml, then portfwd sync")
    waiting = [t for t in g.forwards if t.address is None]
    if waiting:
        why = waiting[0].said
        return Check("address", False, f"{waiting[0].text}: {why}",
                     "give the guest an address (DHCP lease or reservation) or set ipv4/ipv6 in"
                     " forward.toml, then portfwd sync")
    found = sorted({str(t.address) for t in g.forwards})
    return Check("address", True, ", ".join(found))


# states after doctor asked again (PROBE: still no answer)
GOOD_NEIGHBOUR = ("REACHABLE", "STALE", "DELAY", "PERMANENT", "NOARP")


def _neighbours(g: GuestFacts) -> Check:
    for address in sorted({str(t.address) for t in g.forwards if t.address}):
        state = g.neighbours.get(address, "")
        if state.split(",")[0] not in GOOD_NEIGHBOUR:
            seen = f"neighbour entry {state}" if state else "no neighbour entry"
            return Check("neighbour", False,
                         f"guest {address} does not answer on the bridge (asked again; {seen}):"
                         " the guest is down,"
                         " has another address, or its network inside is not up",
                         f"check the guest's address (virsh console {g.name}; ip addr), or the"
                         " address in forward.toml / its DHCP lease")
    states = ", ".join(f"{a} {g.neighbours.get(a, '')}" for a in
                       sorted({str(t.address) for t in g.forwards if t.address}))
    return Check("neighbour", True, states)


def _table(g: GuestFacts) -> Check:
    for t in g.forwards:
        if t.state == RowState.ACTIVE:
            continue
        if t.state == RowState.MISSING:
            fix = "portfwd reapply (the table lost it, e.g. nft flush ruleset)"
        elif t.state == RowState.DIFFERS:
            fix = "portfwd sync"
        elif t.state == RowState.NOT_APPLIED:
            fix = "portfwd sync (the hook did not apply it: was portfwd installed after the guest" \
                  " started, or libvirtd not restarted since?)"
        else:
            fix = "portfwd sync"
        return Check("table", False, f"{t.text}: {t.said}", fix)
    return Check("table", True, f"{count(len(g.forwards), 'forward')} active in the kernel")


def blocker_fix(blocker: Blocker) -> str:
    """The fix for one of ``compat.blockers`` or ``doctorfacts.own_drops``."""
    from portfwd.constants import MARK

    if blocker.kind is BlockerKind.ORDER:
        return "portfwd reapply (puts portfwd's accept back at the head of libvirt's chain)"
    if blocker.kind is BlockerKind.FIREWALLD:
        return "declare the forwards to firewalld (firewall-cmd --add-forward-port) or set" \
               " StrictForwardPorts=no in /etc/firewalld/firewalld.conf"
    where = f"table {blocker.family} {blocker.table} chain {blocker.chain}"
    if blocker.kind is BlockerKind.POLICY:
        return f"in {where}, accept what portfwd forwarded before the policy applies:" \
               f" ct mark & {MARK:#010x} == {MARK:#010x} accept"
    handle = "?" if blocker.handle is None else blocker.handle
    return f"narrow or delete that rule (nft delete rule {blocker.family} {blocker.table}" \
           f" {blocker.chain} handle {handle}), or accept ct mark & {MARK:#010x} ==" \
           f" {MARK:#010x} before it"


def _filter(g: GuestFacts) -> Check:
    if g.blocked:
        return Check("filter", False, "; ".join(str(b) for b in g.blocked),
                     blocker_fix(g.blocked[0]))
    return Check("filter", True, "nothing drops forwarded connections to the guest's bridge")


def _listeners(g: GuestFacts) -> Check:
    if g.listeners:
        return Check("listener", False, "; ".join(g.listeners) +
                     ": the host answers that port itself wherever the forward does not catch"
                     " the connection (from 127.0.0.1, before the forward is applied)",
                     "stop that service or move it, or forward another host port")
    return Check("listener", True, "no host process listens on the forwarded ports")


def _hairpin(g: GuestFacts, host: HostFacts) -> Check:
    if host.br_netfilter != "1":
        return Check("hairpin", True, "br_netfilter off: portfwd's masquerade handles hairpin")
    for nic in g.nics:
        tap = g.links.get(nic.tap or "") if nic.tap else None
        if tap is not None and tap.hairpin is False:
            return Check("hairpin", False,
                         f"br_netfilter is on (net.bridge.bridge-nf-call-iptables = 1) and tap"
                         f" {tap.name} has hairpin mode off: {g.name} cannot reach its own forward",
                         f"portfwd reapply (it turns hairpin mode on for the taps of guests"
                         f" with forwards; by hand: bridge link set dev {tap.name} hairpin on)")
    return Check("hairpin", True, "br_netfilter on, hairpin mode on")


def _service(g: GuestFacts) -> Check:
    """Whether the guest itself accepts a connection to each TCP forward's port."""
    for (address, port), got in sorted(g.services.items()):
        if got == "refused":
            return Check("service", False, f"nothing listens on port {port} in the guest"
                         f" {address} (connection refused)",
                         f"start the service in {g.name}, or make it listen on {address}"
                         " (not only on 127.0.0.1), or fix the guest port in forward.toml")
        if got != "open":
            why = "no answer within the time limit" if got == "timeout" else got
            return Check("service", False, f"guest {address} does not answer on port {port}"
                         f" ({why}): the guest's network is down, or its firewall drops the"
                         " connection", f"look inside the guest (virsh console {g.name}):"
                         f" ip link, and its firewall for port {port}")
    udp = sorted({f"{t.guest_ports}/{t.proto}" for t in g.forwards if t.proto != "tcp"})
    unprobed = (f"{', '.join(udp)} not probed: {'only ' if not g.services else ''}TCP answers"
                " a connection; a UDP service may stay silent") if udp else ""
    if not g.services:
        return Check("service", True, unprobed, skipped=True)
    opened = ", ".join(f"{a}:{p}" if ":" not in a else f"[{a}]:{p}" for a, p in sorted(g.services))
    return Check("service", True, f"{opened}/tcp accept connections from the host"
                 + (f"; {unprobed}" if unprobed else ""))


def guest_checks(g: GuestFacts, host: HostFacts) -> List[Check]:
    """The guest's layers in the packet's order, up to and including the first failure."""
    out: List[Check] = []
    steps: List[Callable[[], List[Check]]] = [
        lambda: [_running(g)], lambda: _bridges(g), lambda: [_addresses(g)],
        lambda: [_neighbours(g)], lambda: [_table(g)], lambda: [_filter(g)],
        lambda: [_listeners(g)], lambda: [_hairpin(g, host)], lambda: [_service(g)]]
    for step in steps:
        for check in step():
            check.guest = g.name
            out.append(check)
            if not check.ok:
                return out
    return out


def walk(host: HostFacts, guests: Sequence[GuestFacts]) -> List[Check]:
    """Host layers, then each guest's; a broken host layer ends the walk."""
    families = sorted({t.family for g in guests for t in g.forwards}) or [4]
    out: List[Check] = []
    for check in host_checks(host, families):
        out.append(check)
        if not check.ok:
            return out
    for g in guests:
        out += guest_checks(g, host)
    return out


def render(checks: Sequence[Check]) -> List[str]:
    """One line per layer: ``ok``/``FAIL``, the guest, the layer, what was seen; the
    fix of a failed one on a line of its own."""
    lines = []
    for c in checks:
        who = f"{c.guest}: " if c.guest else ""
        mark = "skip" if c.skipped else "ok  " if c.ok else "FAIL"
        lines.append(f"{mark} {who}{c.layer}: {c.detail}")
        if not c.ok and c.fix:
            lines.append(f"     fix: {c.fix}")
    return lines


# -- the host's own rules -------------------------------------------------------------

class Packet:
    """A forwarded connection's first packet as a forward chain sees it."""

    __slots__ = ("family", "oifname", "daddr", "proto", "dport")

    def __init__(self, family: int, oifname: str, daddr: str, proto: str, dport: int) -> None:
        self.family = family
        self.oifname = oifname
        self.daddr = daddr
        self.proto = proto
        self.dport = dport


UNKNOWN = None


def _match(m: Dict[str, object], p: Packet, mark: int) -> Optional[bool]:
    """Whether one ``match`` expression (nft JSON) holds for ``p``; None: cannot tell."""
    left, right, op = m.get("left"), m.get("right"), m.get("op", "==")
    if not isinstance(left, dict):
        return UNKNOWN
    value: object = UNKNOWN
    meta = left.get("meta")
    payload = left.get("payload")
    ct = left.get("ct")
    if isinstance(meta, dict) and meta.get("key") in ("oifname", "oif"):
        value = p.oifname
    elif isinstance(meta, dict) and meta.get("key") == "l4proto":
        value = p.proto
    elif isinstance(meta, dict) and meta.get("key") == "nfproto":
        value = "ipv4" if p.family == 4 else "ipv6"
    elif isinstance(payload, dict) and payload.get("field") == "daddr" and payload.get(
            "protocol") in ("ip", "ip6"):
        if payload["protocol"] != ("ip" if p.family == 4 else "ip6"):
            return False
        value = p.daddr
    elif isinstance(payload, dict) and payload.get("field") == "dport":
        if payload.get("protocol") not in ("th", p.proto):
            return False
        value = p.dport
    elif isinstance(ct, dict) and ct.get("key") == "state":
        value = "new"
    elif isinstance(ct, dict) and ct.get("key") == "status":
        value = "dnat"
    elif "&" in left:
        and_ = left["&"]
        if (isinstance(and_, list) and len(and_) == 2 and and_[0] == {"ct": {"key": "mark"}}
                and isinstance(and_[1], int) and isinstance(right, int)):
            masked = (mark & and_[1]) == right
            return masked if op == "==" else not masked if op == "!=" else UNKNOWN
        return UNKNOWN
    if value is UNKNOWN:
        return UNKNOWN
    hit = _in(value, right)
    if hit is UNKNOWN:
        return UNKNOWN
    if op in ("==", "in"):
        return hit
    if op == "!=":
        return not hit
    return UNKNOWN


def _in(value: object, right: object) -> Optional[bool]:
    """``value`` against a match's right side: a value, a set, a prefix, a range, flags."""
    import ipaddress

    if isinstance(right, dict) and "set" in right:
        results = [_in(value, r) for r in right["set"]]
        if any(results):
            return True
        return UNKNOWN if UNKNOWN in results else False
    if isinstance(right, list):  # ct state { established, related } as a list
        return _in(value, {"set": right})
    if isinstance(right, dict) and "prefix" in right and isinstance(value, str):
        net = ipaddress.ip_network(f"{right['prefix']['addr']}/{right['prefix']['len']}",
                                   strict=False)
        try:
            return ipaddress.ip_address(value) in net
        except ValueError:
            return UNKNOWN
    if isinstance(right, dict) and "range" in right:
        first, last = right["range"]
        if isinstance(value, int) and isinstance(first, int) and isinstance(last, int):
            return first <= value <= last
        return UNKNOWN
    if isinstance(right, (str, int)):
        if isinstance(value, str) and isinstance(right, str) and right.endswith("*"):
            return value.startswith(right[:-1])
        return str(value) == str(right)
    return UNKNOWN


VERDICTS = ("accept", "drop", "reject")


def chain_verdict(rules: Sequence[Dict[str, object]], p: Packet, mark: int
                  ) -> Optional[Tuple[str, Dict[str, object]]]:
    """The first rule of a chain that surely matches ``p`` and ends it (accept, drop,
    reject), with that rule; None when none does. Rules with matches doctor cannot
    evaluate (the source, the input interface, …) are passed over: doctor names only
    drops it is sure of."""
    for rule in rules:
        exprs = rule.get("expr")
        if not isinstance(exprs, list):
            continue
        verdict: Optional[str] = None
        sure = True
        for e in exprs:
            if not isinstance(e, dict):
                sure = False
                break
            if "match" in e:
                hit = _match(e["match"], p, mark)
                if hit is not True:
                    sure = False
                    break
            elif any(k in e for k in VERDICTS):
                verdict = next(k for k in VERDICTS if k in e)
            elif any(k in e for k in ("counter", "log", "comment")):
                continue
            else:  # jump, goto, xt, set lookups, …: not evaluated
                sure = False
                break
        if sure and verdict:
            return verdict, rule
    return None
