"""Coexistence with the firewalls around us, libvirt's above all.

libvirt's NAT networks end their inbound chain with a reject for the bridge
(``LIBVIRT_FWI`` with its iptables backend, ``guest_input`` in ``table ip|ip6
libvirt_network`` with its nftables backend). An accept in our own table
cannot beat a reject in another base chain, so portfwd puts one narrow accept
at the head of libvirt's chain, per bridge that has forwards, for connections
carrying the conntrack mark portfwd's DNAT sets (``constants.MARK``) and nothing
else. Everything here is found from the live ruleset.

iptables backend: ``-o BRIDGE -j PORTFWD_FWI`` at the head of LIBVIRT_FWI,
and chain PORTFWD_FWI holding ``-m conntrack --ctstate DNAT -m connmark --mark
M/M -j ACCEPT``, written with the iptables tools so that ``iptables -S`` and
``iptables-save`` keep working. nftables backend: one native rule per bridge,
tagged with the comment ``portfwd``.
"""

from __future__ import annotations

import os

from portfwd.errors import HostError
from portfwd.constants import MARK
from portfwd.values import Blocker, BlockerKind, FirewallBackend, RuleRole

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Dict, List, Optional, Set, Tuple

    import subprocess

    from portfwd.host.nft import Command, NftLike

CHAIN = "PORTFWD_FWI"
COMMENT = "portfwd"
TABLE_FAMILY = {4: "ip", 6: "ip6"}  # address family → the nftables family of its tables

OURS, REJECT, OTHER, EMPTY = RuleRole.OURS, RuleRole.REJECT, RuleRole.OTHER, RuleRole.EMPTY
ACCEPT_SPEC = ["-m", "conntrack", "--ctstate", "DNAT", "-m", "connmark", "--mark",
               f"{MARK:#x}/{MARK:#x}", "-m", "comment", "--comment",
               "portfwd: connections portfwd forwarded", "-j", "ACCEPT"]


class Rule:
    """One rule of libvirt's inbound chain, as far as we care."""

    __slots__ = ("role", "bridge", "handle")

    def __init__(self, role: RuleRole, bridge: Optional[str], handle: int = 0) -> None:
        self.role = role  # OURS, REJECT or OTHER
        self.bridge = bridge
        self.handle = handle


class Firewall:
    """What the live ruleset says about forwarded traffic."""

    def __init__(self) -> None:
        self.xtables: Dict[int, FirewallBackend] = {}  # which iptables holds LIBVIRT_FWI
        self.fwi: Dict[int, List[Rule]] = {}  # LIBVIRT_FWI, iptables backend
        # PORTFWD_FWI: absent (no key), OURS (exactly portfwd's accept), EMPTY or OTHER
        self.our_chain: Dict[int, RuleRole] = {}
        self.guest_input: Dict[int, List[Rule]] = {}  # nftables backend
        self.drop_policies: List[Tuple[str, str, str]] = []  # (family, table, chain)
        self.firewalld = False  # table inet firewalld exists
        self.firewalld_strict: Optional[str] = None  # the firewalld chain rejecting DNAT

def _rejected(rules: List[Rule]) -> Set[str]:
    return {r.bridge for r in rules if r.role == REJECT and r.bridge}


# -- reading ------------------------------------------------------------------

def _bridge_of(exprs: List[Dict[str, Any]]) -> Optional[str]:
    for e in exprs:
        m = e.get("match")
        if m and isinstance(m.get("left"), dict) and m["left"].get("meta", {}).get("key") in (
                "oifname", "oif") and isinstance(m.get("right"), str):
            return str(m["right"])
    return None


def _is_our_accept(rule: Dict[str, Any]) -> bool:
    """Whether a guest_input rule is the one portfwd inserts: comment ``portfwd``, the
    bridge, ``ct status dnat``, ``ct mark & MARK == MARK``, a counter and accept."""
    if rule.get("comment") != COMMENT:
        return False
    shape = []
    for e in rule.get("expr", []):
        m = e.get("match")
        if m is not None:
            left = m.get("left", {})
            if isinstance(left, dict) and left.get("meta", {}).get("key") in ("oifname", "oif"):
                shape.append("bridge")
            elif isinstance(left, dict) and left.get("ct", {}).get("key") == "status":
                shape.append("dnat" if "dnat" in str(m.get("right")) else "?")
            elif isinstance(left, dict) and "&" in left and m.get("right") == MARK:
                shape.append("mark")
            else:
                shape.append("?")
        elif "counter" in e:
            continue
        else:
            shape.append("accept" if "accept" in e else "?")
    return shape == ["bridge", "dnat", "mark", "accept"]


def _chain_content(rules: List[Dict[str, Any]]) -> RuleRole:
    """PORTFWD_FWI as iptables-nft stores it: EMPTY, OURS (one rule: the conntrack,
    connmark and comment matches and ACCEPT that portfwd writes) or OTHER."""
    if not rules:
        return EMPTY
    names = [(e["xt"].get("type"), e["xt"].get("name")) if "xt" in e else
             ("verdict", "accept") if "accept" in e else None
             for e in rules[0].get("expr", []) if "counter" not in e]
    ours = [("match", "conntrack"), ("match", "connmark"), ("match", "comment"),
            ("verdict", "accept")]
    return OURS if len(rules) == 1 and names == ours else OTHER


def _legacy_chain_content(tool: str, deadline: float) -> Optional[RuleRole]:
    """PORTFWD_FWI as ``iptables-legacy -S`` prints it; None when it does not exist."""
    import shlex

    r = xtables([tool, "-S", CHAIN], deadline)
    if r.returncode != 0:
        return None
    rules = [shlex.split(line)[2:] for line in r.stdout.splitlines() if line.startswith("-A ")]
    if not rules:
        return EMPTY
    return OURS if rules == [ACCEPT_SPEC] else OTHER


def _classify(rule: Dict[str, Any], ours: bool) -> Rule:
    exprs = rule.get("expr", [])
    role = OTHER
    if ours:
        role = OURS
    elif any("reject" in e or "drop" in e
             or (e.get("xt", {}).get("type") == "target" and e["xt"].get("name") == "REJECT")
             for e in exprs):
        role = REJECT
    return Rule(role, _bridge_of(exprs), int(rule.get("handle", 0)))


def _chain_rules(nft: NftLike, family: str, table: str,
                 chain: str) -> Optional[List[Dict[str, Any]]]:
    objects = nft.list({"chain": {"family": family, "table": table, "name": chain}})
    if objects is None:
        return None
    return [o["rule"] for o in objects if "rule" in o]


def _legacy_rules(fam: int, deadline: float) -> Optional[List[Rule]]:
    """LIBVIRT_FWI as iptables-legacy holds it, or None when legacy does not hold it."""
    names = "/proc/net/ip_tables_names" if fam == 4 else "/proc/net/ip6_tables_names"
    try:
        with open(names, encoding="ascii") as f:
            if "filter" not in f.read().split():
                return None
    except OSError:
        return None
    tool = which("iptables-legacy" if fam == 4 else "ip6tables-legacy")
    if not tool:
        return None
    r = xtables([tool, "-S", "LIBVIRT_FWI"], deadline)
    if r.returncode != 0:
        return None
    rules = []
    for line in r.stdout.splitlines():
        words = line.split()
        if words[:2] != ["-A", "LIBVIRT_FWI"]:
            continue
        bridge = words[words.index("-o") + 1] if "-o" in words else None
        target = words[words.index("-j") + 1] if "-j" in words else ""
        role = OURS if target == CHAIN else REJECT if target in ("REJECT", "DROP") else OTHER
        rules.append(Rule(role, bridge))
    return rules


def read(nft: NftLike, deadline: Optional[float] = None) -> Firewall:
    """Look at the live ruleset (a few small listings, never our own maps);
    ``deadline``: see ``xtables``."""
    deadline = new_deadline() if deadline is None else deadline
    fw = Firewall()
    # `list chains` and `list chain` of a foreign table stay cheap; on nftables 1.0.6
    # `list tables` or `list ruleset` would fetch every element of our maps too
    chains = [c["chain"] for c in nft.list({"chains": {}}) or [] if "chain" in c]
    names = {(c["family"], c["table"], c["name"]) for c in chains}
    tables = {(c["family"], c["table"]) for c in chains}
    for fam, family in TABLE_FAMILY.items():
        legacy = _legacy_rules(fam, deadline)
        if legacy is not None:
            fw.xtables[fam] = FirewallBackend.IPTABLES_LEGACY
            fw.fwi[fam] = legacy
            content = _legacy_chain_content(_tool(fam, fw.xtables[fam]), deadline)
            if content is not None:
                fw.our_chain[fam] = content
        elif (family, "filter", "LIBVIRT_FWI") in names:
            rules = _chain_rules(nft, family, "filter", "LIBVIRT_FWI") or []
            fw.xtables[fam] = FirewallBackend.IPTABLES_NFT
            fw.fwi[fam] = [_classify(r, any(e.get("jump", {}).get("target") == CHAIN
                                            for e in r.get("expr", []))) for r in rules]
        if (fw.xtables.get(fam) != FirewallBackend.IPTABLES_LEGACY
                and (family, "filter", CHAIN) in names):
            fw.our_chain[fam] = _chain_content(_chain_rules(nft, family, "filter", CHAIN) or [])
        if (family, "libvirt_network", "guest_input") in names:
            rules = _chain_rules(nft, family, "libvirt_network", "guest_input") or []
            fw.guest_input[fam] = [_classify(r, _is_our_accept(r)) for r in rules]
    for c in chains:
        if c.get("hook") == "forward" and c.get("policy") == "drop":
            fw.drop_policies.append((c["family"], c["table"], c["name"]))
    if ("inet", "firewalld") in tables:
        fw.firewalld = True
        fw.firewalld_strict = _firewalld_strict(nft, chains)
    return fw


def _firewalld_strict(nft: NftLike, chains: List[Dict[str, Any]]) -> Optional[str]:
    """firewalld accepts DNATed traffic with ``ct status dnat accept`` in its forward
    chain, unless StrictForwardPorts=yes; returns the chain when that rule is missing."""
    forward = [c["name"] for c in chains if c["family"] == "inet" and c["table"] == "firewalld"
               and c.get("hook") == "forward"]
    for name in forward:
        for rule in _chain_rules(nft, "inet", "firewalld", name) or []:
            for e in rule.get("expr", []):
                m = e.get("match", {})
                if m.get("left", {}).get("ct", {}).get("key") == "status" and "dnat" in str(m.get("right")):
                    return None
    return f"table inet firewalld chain {forward[0] if forward else 'filter_FORWARD'}"


# -- changing -----------------------------------------------------------------

def _in_place(rules: List[Rule], need: List[str]) -> bool:
    """Our rules are exactly one per needed bridge, all at the head of the chain."""
    ours = sorted(r.bridge or "" for r in rules if r.role == OURS)
    head = rules[:len(need)]
    return ours == need and all(r.role == OURS for r in head)


def _needed(rules: List[Rule], wanted: Set[str]) -> List[str]:
    return sorted(wanted & _rejected(rules))


def changes(fw: Firewall, wanted: Dict[int, Set[str]]) -> Tuple[List[Command], List[List[str]]]:
    """JSON commands (nftables backend) and iptables argv lists (iptables backend)
    that put our accepts where ``wanted`` bridges need them, and nowhere else."""
    commands: List[Command] = []
    argvs: List[List[str]] = []
    for fam in TABLE_FAMILY:
        argvs += _iptables_changes(fw, fam, wanted.get(fam, set()))
        commands += _nft_changes(fw, fam, wanted.get(fam, set()))
    return commands, argvs


def _iptables_changes(fw: Firewall, fam: int, wanted: Set[str]) -> List[List[str]]:
    rules = fw.fwi.get(fam)
    need = _needed(rules, wanted) if rules is not None else []
    tool = _tool(fam, fw.xtables.get(fam, FirewallBackend.IPTABLES_NFT))
    content = fw.our_chain.get(fam)  # None: PORTFWD_FWI does not exist
    out: List[List[str]] = []
    if need and content != OURS:  # made, or refilled: its content is checked, not its name
        out.append([tool, "-N", CHAIN] if content is None else [tool, "-F", CHAIN])
        out.append([tool, "-A", CHAIN] + ACCEPT_SPEC)
    if rules is not None and not _in_place(rules, need):
        for r in rules:
            if r.role == OURS:
                out.append([tool, "-D", "LIBVIRT_FWI", "-o", r.bridge or "", "-j", CHAIN])
        for bridge in reversed(need):
            out.append([tool, "-I", "LIBVIRT_FWI", "1", "-o", bridge, "-j", CHAIN])
    if not need and content in (OURS, EMPTY):  # someone else's rules in it: left alone
        out.append([tool, "-F", CHAIN])
        out.append([tool, "-X", CHAIN])
    return out


def _tool(fam: int, backend: FirewallBackend) -> str:
    base = "iptables" if fam == 4 else "ip6tables"
    legacy = backend == FirewallBackend.IPTABLES_LEGACY
    for name in ((f"{base}-legacy",) if legacy else (f"{base}-nft", base)):
        if which(name):
            return name
    return base


def which(name: str) -> Optional[str]:
    """``shutil.which`` without importing shutil (the hook counts milliseconds)."""
    for folder in (os.environ.get("PATH") or "/usr/sbin:/usr/bin:/sbin:/bin").split(":"):
        path = os.path.join(folder, name)
        if os.access(path, os.X_OK) and not os.path.isdir(path):
            return path
    return None


def _nft_changes(fw: Firewall, fam: int, wanted: Set[str]) -> List[Command]:
    rules = fw.guest_input.get(fam)
    if rules is None:
        return []
    need = _needed(rules, wanted)
    if _in_place(rules, need):
        return []
    family = TABLE_FAMILY[fam]
    where = {"family": family, "table": "libvirt_network", "chain": "guest_input"}
    out: List[Command] = [{"delete": {"rule": dict(where, handle=r.handle)}}
                          for r in rules if r.role == OURS]
    mark = {"ct": {"key": "mark"}}
    for bridge in reversed(need):
        out.append({"insert": {"rule": dict(where, comment=COMMENT, expr=[
            {"match": {"op": "==", "left": {"meta": {"key": "oifname"}}, "right": bridge}},
            {"match": {"op": "in", "left": {"ct": {"key": "status"}}, "right": "dnat"}},
            {"match": {"op": "==", "left": {"&": [mark, MARK]}, "right": MARK}},
            {"counter": None},
            {"accept": None},
        ])}})
    return out


def run_iptables(argvs: List[List[str]], deadline: Optional[float] = None) -> None:
    """Run iptables commands in order; HostError with what the tool said.
    ``deadline``: see ``xtables``."""
    deadline = new_deadline() if deadline is None else deadline
    for argv in argvs:
        r = xtables(argv, deadline)
        if r.returncode != 0:
            raise HostError(f"{' '.join(argv)} failed: {r.stderr.strip() or r.returncode}")


# Seconds the iptables runs of one portfwd run may wait, together, for the xtables lock
# (iptables-legacy takes it for every command, iptables-nft for none), and the time a
# tool gets beyond its ``-w`` to finish. A held lock delays a run (a guest start) by at
# most XTABLES_WAIT + 1 + EXIT_MARGIN seconds: the hook's bound for portfwd's own lock
# (hook.LOCK_WAIT); the first refusal ends the run.
XTABLES_WAIT = 2.0
EXIT_MARGIN = 2.0
RESOURCE_PROBLEM = 4  # iptables' exit status when it gave up waiting for the lock


def new_deadline() -> float:
    """When the iptables runs of one portfwd run should be done (``time.monotonic``)."""
    import time

    return time.monotonic() + XTABLES_WAIT


def xtables(argv: List[str], deadline: float) -> subprocess.CompletedProcess[str]:
    """Run one iptables command (``argv`` without ``-w``) that waits for the xtables
    lock until ``deadline`` (``-w`` the seconds left, rounded up, at least 1) and is
    killed EXIT_MARGIN seconds after; HostError when the lock stayed held, or the
    tool is missing or did not finish."""
    import time

    from portfwd.host import proc

    wait = max(1, -int((time.monotonic() - deadline) // 1))  # ceil of the time left
    r = proc.run([argv[0], "-w", str(wait)] + argv[1:], wait + EXIT_MARGIN, package="iptables")
    if r.returncode == RESOURCE_PROBLEM and "xtables lock" in r.stderr:
        raise HostError(f"`{' '.join(argv)}`: another program held the xtables lock for"
                        f" {wait} s; portfwd gave up (run `portfwd reapply` once it is free)")
    return r


# -- reporting ----------------------------------------------------------------

def seen(fw: Firewall, wanted: Dict[int, Set[str]]) -> List[str]:
    """How the host filters forwarded traffic to the bridges with forwards."""
    out = []
    rejecting: Dict[int, Set[str]] = {4: set(), 6: set()}
    for fam, rules in sorted(fw.fwi.items()):
        backend = fw.xtables.get(fam, FirewallBackend.IPTABLES_NFT).value
        rejecting[fam] |= _rejected(rules)
        out.append(f"libvirt {backend} backend: table {TABLE_FAMILY[fam]} filter chain LIBVIRT_FWI"
                   f" rejects {', '.join(sorted(_rejected(rules))) or 'no bridge'}")
    for fam, rules in sorted(fw.guest_input.items()):
        rejecting[fam] |= _rejected(rules)
        out.append(f"libvirt {FirewallBackend.NFTABLES.value} backend: table"
                   f" {TABLE_FAMILY[fam]} libvirt_network chain"
                   f" guest_input rejects {', '.join(sorted(_rejected(rules))) or 'no bridge'}")
    for fam in TABLE_FAMILY:
        free = sorted(wanted.get(fam, set()) - rejecting[fam])
        if free:
            out.append(f"IPv{fam} to {', '.join(free)}: no libvirt reject (an open or routed"
                       " network, or not libvirt's): nothing to pass")
    if fw.firewalld:
        how = ("StrictForwardPorts=yes: rejects DNAT it was not told about"
               if fw.firewalld_strict else "lets DNATed connections through")
        out.append(f"firewalld: table inet firewalld, {how}")
    return out


def blockers(fw: Firewall, wanted: Dict[int, Set[str]]) -> List[Blocker]:
    """Where forwarded connections to ``wanted`` bridges are dropped and portfwd
    does not, or must not, change that; each names the table and chain."""
    out: List[Blocker] = []
    covered: Dict[int, Set[str]] = {}
    for fam in TABLE_FAMILY:
        family = TABLE_FAMILY[fam]
        # libvirt's iptables chain (its accepts cover the bridges for what follows), then
        # its nftables backend's chain
        for chains, table, chain, covers in ((fw.fwi, "filter", "LIBVIRT_FWI", True),
                                             (fw.guest_input, "libvirt_network", "guest_input",
                                              False)):
            rules = chains.get(fam)
            if rules is None:
                continue
            need = _needed(rules, wanted.get(fam, set()))
            if not _in_place(rules, need):
                out.append(Blocker(BlockerKind.ORDER, family, table, chain,
                                   f"table {family} {table} chain {chain}: libvirt's reject"
                                   f" comes before portfwd's accept for {', '.join(need)}; run"
                                   " `portfwd reapply`", [(fam, b) for b in need]))
            if covers:
                covered[fam] = set(need)
    for family, table, chain in fw.drop_policies:
        fams = [4] if family == "ip" else [6] if family == "ip6" else [4, 6]
        for fam in fams:
            # an accept in LIBVIRT_FWI ends the iptables FORWARD chain before its policy
            through_libvirt = (family, table, chain) == (TABLE_FAMILY[fam], "filter", "FORWARD")
            left = sorted(wanted.get(fam, set()) - (covered.get(fam, set()) if through_libvirt
                                                     else set()))
            if left:
                out.append(Blocker(BlockerKind.POLICY, family, table, chain,
                                   f"table {family} {table} chain {chain}: policy drop drops"
                                   f" forwarded connections to {', '.join(left)} (IPv{fam});"
                                   " portfwd does not change that chain: accept"
                                   f" `ct mark & {MARK:#010x} == {MARK:#010x}` there",
                                   [(fam, b) for b in left]))
    if fw.firewalld_strict and any(wanted.values()):
        out.append(Blocker(BlockerKind.FIREWALLD, "inet", "firewalld",
                           fw.firewalld_strict.rpartition(" chain ")[2],
                           f"{fw.firewalld_strict}: firewalld (StrictForwardPorts=yes) rejects"
                           " DNATed connections it was not told about; declare the forwards"
                           " to firewalld or set StrictForwardPorts=no",
                           [(fam, b) for fam, bridges in sorted(wanted.items())
                            for b in sorted(bridges)]))
    return out


def blocked_bridges(fw: Firewall, wanted: Dict[int, Set[str]]) -> Dict[Tuple[int, str], List[str]]:
    """The lines of ``blockers`` per (family, bridge) they concern."""
    out: Dict[Tuple[int, str], List[str]] = {}
    for blocker in blockers(fw, wanted):
        for key in blocker.concerned:
            out.setdefault(key, []).append(str(blocker))
    return out
