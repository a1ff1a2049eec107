"""`portfwd import` against the old hook itself: same hooks.json, same reachability.

Two labs (tests/netlab.py) side by side. In one, the iptables rules that
libvirt-hook-qemu creates when a guest starts, rebuilt here from its documented
behaviour (its README's "Networking" section and its hook): per hooks.json
entry, chains DNAT-x (nat; reached from PREROUTING and OUTPUT for packets to
``public_ip``), SNAT-x (nat POSTROUTING; the guest reaching its own forward)
and FWD-x (filter FORWARD accept); in DNAT-x one ``-p PROTO -d PUBLIC --dport
PORT -j DNAT --to PRIVATE:PORT`` per port, carrying ``-s SOURCE_IP`` for
``port_map`` ports only, and ``--dport A:B -j DNAT --to PRIVATE:A-B`` per
``port_range``; ``public_ip`` defaults to the address of the host's default-route
interface. In the other lab, portfwd with the file ``portfwd import`` made,
applied by its libvirt hook. Every configured port is probed, tcp or udp, on
two host addresses, from an address ``source_ip`` admits and one it does not,
and from the host itself (the old hook's OUTPUT rules, portfwd's output chain);
both labs must give the same answers (guest port and the source the guest
sees), with one documented exception:

- the old hook leaves ``source_ip`` out of its ``port_range`` rules, so a range
  of an entry with ``source_ip`` answers every source there; the converted
  forward keeps the restriction (``from``) for ranges too.

Not compared: a guest reaching its own forward (hairpin). The old hook makes it
work by writing 0 to the host's ``net.bridge.bridge-nf-call-iptables`` (for
every bridge, Docker's too) and SNATs it to ``public_ip``; portfwd leaves that
setting alone and masquerades to the bridge address (see "Reaching a
forward" in the README and docs/how-it-works.md), so the guest sees a different source by design.
"""

from __future__ import annotations

import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from ipaddress import ip_address, ip_network
from typing import Any, Dict, Iterator, List, Optional, Tuple

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from netlab import CLIENT4, GUEST4, HOST4, TRAFFIC, Lab, run
from pfhost import PortfwdHost
from portfwd.commands.importer import convert

pytestmark = pytest.mark.kernel

HOST2, CLIENT2 = "198.51.100.1", "198.51.100.2"  # a second uplink of the host, a second client
SERVED = [22, 80, 443, 3000, 5000, 5001, 5002]  # guest ports answering, tcp and udp
RANGE_FIRST = 5000
EXAMPLE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "import",
                       "example.json")

Probe = Tuple[str, str, int, str]  # proto, destination, port, who sends (a role)
ROLES = ("client", "client2", "host")  # the host's own connections take the destination as source


class Twin:
    """One lab with a second client on its own uplink, a default route (the old
    hook's public address) and servers on the guest ports of the corpus."""

    def __init__(self, base: str) -> None:
        self.lab = Lab()
        lab = self.lab
        self.client2 = f"{lab.tag}d"
        try:
            run("ip", "netns", "add", self.client2)
            lab.ns(self.client2, "ip", "link", "set", "lo", "up")
            lab.ns(lab.host, "ip", "link", "add", "uplink2", "type", "veth", "peer", "name",
                   "eth0", "netns", self.client2)
            lab.ns(lab.host, "ip", "addr", "add", f"{HOST2}/24", "dev", "uplink2")
            lab.ns(lab.host, "ip", "link", "set", "uplink2", "up")
            lab.ns(self.client2, "ip", "addr", "add", f"{CLIENT2}/24", "dev", "eth0")
            lab.ns(self.client2, "ip", "link", "set", "eth0", "up")
            lab.ns(self.client2, "ip", "route", "add", "default", "via", HOST2)
            lab.ns(lab.host, "ip", "route", "add", "default", "via", CLIENT4)  # dev uplink
            lab.serve("tcp", SERVED)
            lab.serve("udp", SERVED)
        except BaseException:
            self.close()
            raise
        self.pf = PortfwdHost(lab, base)

    def namespace(self, role: str) -> str:
        """Where a probe of ``role`` runs: a client, or the host itself."""
        return {"client": self.lab.client, "client2": self.client2, "host": self.lab.host}[role]

    def probe_all(self, probes: List[Probe], answers: List[bool]) -> List[Optional[str]]:
        """The answers to ``probes``, all sent at once, one process per client. A probe
        the old hook's rules answer is tried 3 times (a first packet may wait for
        neighbour discovery); one whose expected answer is silence once, briefly
        (the lab answers in microseconds)."""
        out: List[Optional[str]] = [None] * len(probes)

        def role_probes(role: str) -> None:  # one process per role, the roles in parallel
            mine = [i for i, p in enumerate(probes) if p[3] == role]
            if not mine:
                return
            specs = [f"{probes[i][0]},{probes[i][1]},{probes[i][2]},"
                     + ("3,1.5" if answers[i] else "1,0.5") for i in mine]
            r = self.lab.ns(self.namespace(role), sys.executable, TRAFFIC, "probes", *specs)
            for i, answer in zip(mine, json.loads(r.stdout)):
                out[i] = answer

        with ThreadPoolExecutor(max_workers=len(ROLES)) as pool:
            list(pool.map(role_probes, ROLES))
        return out

    def close(self) -> None:
        run("ip", "netns", "del", self.client2, check=False)
        self.lab.close()


@pytest.fixture(scope="module")
def twins(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tuple[Twin, Twin]]:
    old = Twin(str(tmp_path_factory.mktemp("old")))
    try:
        new = Twin(str(tmp_path_factory.mktemp("new")))
    except BaseException:
        old.close()
        raise
    try:
        yield old, new
    finally:
        old.close()
        new.close()


# -- the old hook, as documented ----------------------------------------------

def entries_of(doc: Dict[str, Any]) -> List[Tuple[str, Dict[str, Any]]]:
    return [(g, e) for g, v in doc.items() for e in (v if isinstance(v, list) else [v])]


def old_hook_rules(doc: Dict[str, Any], default_public: str) -> str:
    """The rules the old hook creates when every guest of ``doc`` starts, as one
    iptables-restore input (which also wipes the previous example's rules)."""
    nat: List[str] = []
    filt: List[str] = []
    heads: List[str] = []
    for n, (_, e) in enumerate(entries_of(doc)):
        dnat, snat, fwd = f"DNAT-{n}", f"SNAT-{n}", f"FWD-{n}"
        public, private = e.get("public_ip", default_public), e["private_ip"]
        src = ["-s", e["source_ip"]] if "source_ip" in e else []
        nat += [f":{dnat} - [0:0]", f":{snat} - [0:0]"]
        filt.append(f":{fwd} - [0:0]")
        rules: List[Tuple[str, str, str, str, List[str]]] = []  # proto, dport, to-port, guest dport, -s
        for proto, items in e.get("port_map", {}).items():
            for item in items:
                pub, priv = item if isinstance(item, list) else (item, item)
                rules.append((proto, str(pub), str(priv), str(priv), src))
        for r in e.get("port_range", []):
            first, last = r["init_port"], r["init_port"] + r["ports_num"] - 1
            rules.append((r["protocol"], f"{first}:{last}", f"{first}-{last}", f"{first}:{last}",
                          []))  # the old hook gives ranges no -s
        for proto, dport, to, gport, s in rules:
            nat.append(" ".join([f"-A {dnat} -p {proto} -d {public} --dport {dport} -j DNAT"
                                 f" --to-destination {private}:{to}"] + s))
            nat.append(f"-A {snat} -p {proto} -s {private} -d {private} --dport {dport}"
                       " -j MASQUERADE")
            filt.append(f"-A {fwd} -p {proto} -d {private} --dport {gport} -j ACCEPT")
        heads += [f"nat -I OUTPUT -d {public} -j {dnat}", f"nat -I PREROUTING -d {public} -j {dnat}",
                  f"nat -I POSTROUTING -s {private} -d {private} -j {snat}",
                  f"filter -I FORWARD -d {private} -j {fwd}"]
    for head in heads:
        table, rule = head.split(" ", 1)
        (nat if table == "nat" else filt).append(rule)
    return "\n".join(["*nat"] + nat + ["COMMIT", "*filter"] + filt + ["COMMIT", ""])


def old_answer(doc: Dict[str, Any], p: Probe, default_public: str) -> Tuple[Optional[str], bool]:
    """What the old hook's rules answer to ``p``, and whether portfwd is documented
    to differ there (a range of an entry with source_ip, from another source)."""
    proto, dest, port, role = p
    source = {"client": CLIENT4, "client2": CLIENT2, "host": dest}[role]
    for _, e in entries_of(doc):
        if e.get("public_ip", default_public) != dest:
            continue
        admitted = "source_ip" not in e or ip_address(source) in ip_network(e["source_ip"],
                                                                            strict=False)
        for proto_, items in e.get("port_map", {}).items():
            for item in items:
                pub, priv = item if isinstance(item, list) else (item, item)
                if (proto_, pub) == (proto, port) and admitted:
                    return f"{proto} {priv} {source}", False
        for r in e.get("port_range", []):
            if r["protocol"] == proto and r["init_port"] <= port < r["init_port"] + r["ports_num"]:
                return f"{proto} {port} {source}", not admitted
    return None, False


def probes_of(doc: Dict[str, Any]) -> List[Probe]:
    ports = set()
    for _, e in entries_of(doc):
        for proto, items in e.get("port_map", {}).items():
            ports |= {(proto, item[0] if isinstance(item, list) else item) for item in items}
        for r in e.get("port_range", []):
            ports |= {(r["protocol"], p) for p in range(r["init_port"],
                                                       r["init_port"] + r["ports_num"])}
    return [(proto, dest, port, role) for proto, port in sorted(ports)
            for dest in (HOST4, HOST2) for role in ROLES]


def compare(twins: Tuple[Twin, Twin], doc: Dict[str, Any]) -> None:
    old, new = twins
    text = json.dumps(doc, indent=2)
    result = convert(text, "hooks.json", "uplink")  # the lab host's default-route interface
    assert result.errors == [], result.errors
    restore = old_hook_rules(doc, HOST4)
    r = old.lab.ns(old.lab.host, "iptables-restore", input=restore.encode(), check=False)
    assert r.returncode == 0, (r.stderr, restore)
    assert new.pf.cli("flush").returncode == 0
    new.pf.write_config(result.toml)
    for guest in result.guests:
        r = new.pf.hook(guest, "started")
        assert r.returncode == 0 and b"error" not in r.stderr.lower(), r.stderr
    probes = probes_of(doc)
    wants = [old_answer(doc, p, HOST4) for p in probes]
    with ThreadPoolExecutor(max_workers=2) as pool:
        old_run = pool.submit(old.probe_all, probes, [want is not None for want, _ in wants])
        new_answers = new.probe_all(probes, [want is not None and not differs
                                             for want, differs in wants])
        old_answers = old_run.result()
    report = []
    for p, (want, differs), got_old, got_new in zip(probes, wants, old_answers, new_answers):
        if got_old != want:
            report.append(f"{p}: old hook rules answered {got_old!r}, documented {want!r}")
        if differs:  # the old hook admits every source to a range despite source_ip
            if got_new is not None:
                report.append(f"{p}: portfwd answered {got_new!r} outside source_ip")
        elif got_new != got_old:
            report.append(f"{p}: old hook {got_old!r}, portfwd {got_new!r}")
    assert report == [], "\n".join(report + [text, result.toml, restore])


# -- the corpus ---------------------------------------------------------------

def example_doc(source: Optional[str]) -> Dict[str, Any]:
    """The old project's example with its guests' addresses moved to the lab's guest."""
    from portfwd.commands.hooksjson import strip_comments

    with open(EXAMPLE, encoding="utf-8") as f:
        doc: Dict[str, Any] = json.loads(strip_comments(f.read()))
    for entry in doc.values():
        entry["private_ip"] = GUEST4
    if source is not None:
        doc["cloud-admin"]["source_ip"] = source
    return doc


@pytest.mark.parametrize("source", [None, CLIENT4, "198.51.100.0/24"],
                         ids=["as-shipped", "source-client", "source-client2"])
def test_the_old_projects_example_reaches_the_same(twins: Tuple[Twin, Twin],
                                                   source: Optional[str]) -> None:
    compare(twins, example_doc(source))


GUEST_PORTS = [22, 80, 443, 3000]
PUBLIC_PORTS = GUEST_PORTS + [1100, 1101, 1102, 1103]


@st.composite
def hooks_docs(draw: Any) -> Dict[str, Any]:
    """Small hooks.json documents without conflicts: every (protocol, public port)
    once; a range only in an entry that also has a port_map port (the old hook
    fails an entry with a range and no port_map)."""
    singles = draw(st.lists(st.tuples(st.sampled_from(["tcp", "udp"]),
                                      st.sampled_from(PUBLIC_PORTS),
                                      st.sampled_from(GUEST_PORTS), st.booleans()),
                            min_size=1, max_size=5, unique_by=lambda t: (t[0], t[1])))
    count = draw(st.integers(1, min(3, len(singles))))
    entries: List[Dict[str, Any]] = []
    for i in range(count):
        entry: Dict[str, Any] = {"private_ip": GUEST4, "port_map": {}}
        public = draw(st.sampled_from([None, HOST4, HOST2]))
        if public is not None:
            entry["public_ip"] = public
        source = draw(st.sampled_from([None, CLIENT4, "203.0.113.0/24", "198.51.100.0/24",
                                       CLIENT2]))
        if source is not None:
            entry["source_ip"] = source
        entries.append(entry)
    for n, (proto, pub, priv, pair) in enumerate(singles):
        entry = entries[n if n < count else draw(st.integers(0, count - 1))]
        if pub in GUEST_PORTS and not pair:
            priv = pub
        entry["port_map"].setdefault(proto, []).append([pub, priv] if pub != priv or pair else pub)
    for proto in draw(st.lists(st.sampled_from(["tcp", "udp"]), max_size=2, unique=True)):
        entry = entries[draw(st.integers(0, count - 1))]
        entry.setdefault("port_range", []).append(
            {"init_port": RANGE_FIRST, "ports_num": draw(st.integers(1, 3)), "protocol": proto})
    doc: Dict[str, Any] = {}
    for entry in entries:
        guest = draw(st.sampled_from(["web1", "db", "x y"]))
        if guest in doc:
            doc[guest] = (doc[guest] if isinstance(doc[guest], list) else [doc[guest]]) + [entry]
        else:
            doc[guest] = [entry] if draw(st.booleans()) else entry
    return doc


EVERY_KIND = {  # each case at least once, whatever hypothesis draws
    "web1": [{"private_ip": GUEST4, "public_ip": HOST2, "source_ip": "198.51.100.0/24",
              "port_map": {"tcp": [22, [1100, 80]], "udp": [[1101, 3000]]},
              "port_range": [{"init_port": RANGE_FIRST, "ports_num": 3, "protocol": "udp"}]},
             {"private_ip": GUEST4, "port_map": {"udp": [443]}}],
    "x y": {"private_ip": GUEST4, "source_ip": CLIENT4, "port_map": {"tcp": [[1102, 443]]},
            "port_range": [{"init_port": RANGE_FIRST, "ports_num": 2, "protocol": "tcp"}]},
}


@example(doc=EVERY_KIND)
@settings(max_examples=15, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(doc=hooks_docs())
def test_generated_hooks_json_reaches_the_same(twins: Tuple[Twin, Twin],
                                               doc: Dict[str, Any]) -> None:
    compare(twins, doc)


def test_portfwd_binds_before_the_old_hooks_rules(twins: Tuple[Twin, Twin]) -> None:
    """Both forward host port 1100 (old: to guest 22, portfwd: to guest 80): portfwd's
    nat chain (priority dstnat - 5) binds the connection first, and the old rule,
    still present, is not consulted for it; without portfwd's table the old rule works."""
    lab, pf = twins[0].lab, twins[0].pf
    doc = {"web1": {"private_ip": GUEST4, "port_map": {"tcp": [[1100, 22]], "udp": [[1100, 22]]}}}
    r = lab.ns(lab.host, "iptables-restore", input=old_hook_rules(doc, HOST4).encode())
    assert r.returncode == 0
    assert pf.cli("flush").returncode == 0
    pf.write_config(f'[[forward]]\nguest = "web1"\nipv4 = "{GUEST4}"\n'
                    'ports = ["1100:80/tcp", "1100:80/udp"]\n')
    assert pf.hook("web1", "started").returncode == 0
    for proto in ("tcp", "udp"):
        assert lab.reach(proto, HOST4, 1100) == f"{proto} 80 {CLIENT4}"
        assert lab.reach(proto, HOST4, 1100, ns=lab.host) == f"{proto} 80 {HOST4}"  # OUTPUT
    assert pf.hook("web1", "stopped", "end").returncode == 0
    for proto in ("tcp", "udp"):
        assert lab.reach(proto, HOST4, 1100) == f"{proto} 22 {CLIENT4}"
    lab.ns(lab.host, "iptables-restore", input=b"*nat\nCOMMIT\n*filter\nCOMMIT\n")
    assert lab.probe("tcp", HOST4, 1100) is None
