"""``portfwd doctor``: every layer passes on a working lab, and breaking exactly one
layer makes doctor stop there, name it and give its fix.

The lab's guest is a namespace behind veth ``vnet0`` on ``br0``; its "running
domain" is a domain XML naming that tap and bridge, in a folder doctor reads as
libvirt's status files (``--libvirt-status``). test_libvirt_doctor.py checks the
gathering from a real libvirtd once.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable, Dict, List, Tuple

import pytest

from netlab import GUEST4, GUEST6, Lab
from pfhost import PortfwdHost, domain_xml, web1_config

from portfwd.commands import doctor
from portfwd.host import listening

CONFIG = web1_config("8080:80", "5353:53/udp")
LAYERS = ["ipv4 forwarding", "ipv6 forwarding", "guest", "bridge", "tap", "mac", "address",
          "neighbour", "table", "filter", "listener", "hairpin", "service"]


class DoctorLab:
    """A working forward to web1, and the folder of its domain XML."""

    def __init__(self, lab: Lab, pf: PortfwdHost) -> None:
        self.lab, self.pf = lab, pf
        self.status = os.path.join(os.path.dirname(pf.config), "..", "status")
        os.makedirs(self.status)
        self.mac = lab.ns(lab.guest, "cat", "/sys/class/net/eth0/address").stdout.decode().strip()
        self.write_domain("web1", self.mac)
        pf.write_config(CONFIG)
        r = pf.hook("web1", "started", xml=self.xml("web1", self.mac))
        assert r.returncode == 0, r.stderr
        # br_netfilter is on in every namespace of this kernel: hairpin on, as it must be
        lab.ns(lab.host, "bridge", "link", "set", "dev", "vnet0", "hairpin", "on")
        lab.serve("tcp", [80])  # the service doctor connects to, from the host

    def xml(self, name: str, mac: str) -> bytes:
        return domain_xml(name, mac=mac).replace(b"virbr0", b"br0")

    def write_domain(self, name: str, mac: str) -> None:
        with open(os.path.join(self.status, f"{name}.xml"), "wb") as f:
            f.write(self.xml(name, mac))

    def host(self, *cmd: str) -> None:
        self.lab.ns(self.lab.host, *cmd)

    def doctor(self, *args: str) -> Tuple[int, List[Dict[str, Any]]]:
        r = self.pf.cli("doctor", "--libvirt-status", self.status, "--json", *args)
        assert r.returncode in (0, 5), r.stderr
        checks: List[Dict[str, Any]] = json.loads(r.stdout)
        return r.returncode, checks


@pytest.fixture
def dlab(lab: Lab, pf: PortfwdHost) -> DoctorLab:
    return DoctorLab(lab, pf)


def ruleset(d: DoctorLab) -> str:
    return d.lab.ns(d.lab.host, "nft", "list", "ruleset").stdout.decode()


@pytest.mark.kernel
def test_every_layer_passes_and_nothing_changes(dlab: DoctorLab) -> None:
    before = ruleset(dlab)
    rc, checks = dlab.doctor()
    assert rc == 0, checks
    assert [c["layer"] for c in checks] == LAYERS
    assert all(c["ok"] and c["fix"] == "" for c in checks)
    assert set(checks[0]) == {"layer", "guest", "ok", "detail", "fix", "skipped"}
    assert checks[-1]["detail"] == (f"{GUEST4}:80, [{GUEST6}]:80/tcp accept connections from the"
                                    " host; 53/udp not probed: TCP answers a connection; a UDP"
                                    " service may stay silent")
    assert ruleset(dlab) == before  # read-only
    human = dlab.pf.cli("doctor", "--libvirt-status", dlab.status, "web1")
    assert human.returncode == 0
    lines = human.stdout.decode().splitlines()
    assert len(lines) == len(LAYERS) and all(line.startswith("ok ") for line in lines)


def _drop_rule(d: DoctorLab) -> None:
    d.lab.ns(d.lab.host, "nft", "-f", "-",
             input=b"add table inet filter\nadd chain inet filter forward"
                   b" { type filter hook forward priority 0; }\n"
                   b"add rule inet filter forward oifname \"br0\" tcp dport 80 drop\n")


def _drop_policy(d: DoctorLab) -> None:
    d.lab.ns(d.lab.host, "nft", "-f", "-",
             input=b"add table ip dock\nadd chain ip dock forward"
                   b" { type filter hook forward priority 0; policy drop; }\n")


def _unanswered(d: DoctorLab) -> None:
    d.lab.ns(d.lab.guest, "ip", "addr", "del", f"{GUEST4}/24", "dev", "eth0")
    d.host("ip", "neigh", "flush", "dev", "br0")


def _guest_firewall(d: DoctorLab, verdict: str) -> None:
    d.lab.ns(d.lab.guest, "nft", "-f", "-",
             input=b"add table inet pfguest\nadd chain inet pfguest input"
                   b" { type filter hook input priority 0; }\n"
                   b"add rule inet pfguest input tcp dport 80 " + verdict.encode() + b"\n")


def _listener(d: DoctorLab) -> None:
    d.lab.serve("tcp", [8080], ns=d.lab.host)


# layer broken → (how, the layer doctor must stop at, words its detail must hold)
BREAKS: Dict[str, Tuple[Callable[[DoctorLab], None], str, str]] = {
    "ipv4 forwarding off": (lambda d: d.host("sysctl", "-qw", "net.ipv4.ip_forward=0"),
                            "ipv4 forwarding", "net.ipv4.ip_forward = 0"),
    "ipv6 forwarding off": (lambda d: d.host("sysctl", "-qw", "net.ipv6.conf.all.forwarding=0"),
                            "ipv6 forwarding", "net.ipv6.conf.all.forwarding = 0"),
    "ipv6 off on the host": (lambda d: d.host("sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1"),
                             "ipv6", "disabled on this host"),
    "ipv6 off on the bridge": (lambda d: d.host("sysctl", "-qw",
                                                "net.ipv6.conf.br0.disable_ipv6=1"),
                               "ipv6", "disabled on br0"),
    "guest not running": (lambda d: os.unlink(os.path.join(d.status, "web1.xml")),
                          "guest", "not running"),
    "bridge down": (lambda d: d.host("ip", "link", "set", "br0", "down"), "bridge", "br0 is down"),
    "tap not on the bridge": (lambda d: d.host("ip", "link", "set", "vnet0", "nomaster"),
                              "tap", "vnet0 is not a port of any bridge"),
    "multicast MAC": (lambda d: d.write_domain("web1", "01:00:5e:00:00:01"),
                      "mac", "multicast"),
    "MAC shared": (lambda d: d.write_domain("web2", d.mac), "mac", "also used on br0 by web2"),
    "no neighbour": (_unanswered, "neighbour", f"{GUEST4} does not answer"),
    "forward missing": (lambda d: d.host("nft", "delete", "table", "inet", "portfwd"),
                        "table", "missing"),
    "foreign drop rule": (_drop_rule, "filter", "table inet filter chain forward"),
    "forward drop policy": (_drop_policy, "filter", "table ip dock chain forward: policy drop"),
    "host listener": (_listener, "listener", ":8080/tcp"),
    "nothing listens in the guest": (lambda d: _guest_firewall(d, "reject with tcp reset"),
                                     "service", f"nothing listens on port 80 in the guest"
                                                f" {GUEST4} (connection refused)"),
    "guest drops the connection": (lambda d: _guest_firewall(d, "drop"),
                                   "service", f"guest {GUEST4} does not answer on port 80"),
    "hairpin off": (lambda d: d.host("bridge", "link", "set", "dev", "vnet0", "hairpin", "off"),
                    "hairpin", "vnet0 has hairpin mode off"),
}


# the fix named for some of them
FIXES = {"ipv4 forwarding off": "sysctl -w net.ipv4.ip_forward=1",
         "bridge down": "ip link set br0 up", "tap not on the bridge": "master br0",
         "forward missing": "portfwd reapply", "hairpin off": "hairpin on",
         "foreign drop rule": "nft delete rule inet filter forward handle",
         "forward drop policy": "in table ip dock chain forward, accept",
         "ipv6 off on the bridge": "net.ipv6.conf.br0.disable_ipv6=0"}


@pytest.mark.kernel
@pytest.mark.parametrize("name", list(BREAKS))
def test_one_broken_layer_is_named_with_its_fix(dlab: DoctorLab, name: str) -> None:
    brk, layer, words = BREAKS[name]
    brk(dlab)
    rc, checks = dlab.doctor("web1")
    assert rc == 5, checks
    *passed, failed = checks
    assert all(c["ok"] for c in passed), checks
    assert (failed["layer"], failed["ok"]) == (layer, False), checks
    assert words in failed["detail"] and failed["fix"], failed
    assert FIXES.get(name, "") in failed["fix"], failed
    # the layers before it passed, in the packet's order, and the walk stopped there
    where = {"ipv6 off on the host": 1, "ipv6 off on the bridge": LAYERS.index("mac") + 1}
    stop = where.get(name, LAYERS.index(layer) if layer in LAYERS else -1)
    assert [c["layer"] for c in passed] == LAYERS[:stop], checks


@pytest.mark.kernel
def test_no_address_yet(lab: Lab, pf: PortfwdHost) -> None:
    """A forward whose address is to be discovered and that no lease gives: pending."""
    d = DoctorLab(lab, pf)
    pf.write_config('\n[[forward]]\nguest = "web1"\nports = ["8080:80"]\n')
    assert pf.hook("web1", "started", xml=d.xml("web1", d.mac)).returncode == 0
    rc, checks = d.doctor()
    assert rc == 5 and checks[-1]["layer"] == "address" and not checks[-1]["ok"], checks
    assert "pending" in checks[-1]["detail"], checks


@pytest.mark.kernel
def test_configured_but_never_applied(lab: Lab, pf: PortfwdHost) -> None:
    d = DoctorLab(lab, pf)
    assert pf.hook("web1", "stopped", "end", xml=d.xml("web1", d.mac)).returncode == 0
    rc, checks = d.doctor()
    assert rc == 5 and checks[-1]["layer"] == "table", checks
    assert "not applied" in checks[-1]["detail"] and "portfwd sync" in checks[-1]["fix"]


# -- pure parts ---------------------------------------------------------------------

def _rule(*exprs: Dict[str, Any]) -> Dict[str, Any]:
    return {"handle": 7, "expr": list(exprs)}


def _m(left: Dict[str, Any], right: Any, op: str = "==") -> Dict[str, Any]:
    return {"match": {"op": op, "left": left, "right": right}}


OIF = {"meta": {"key": "oifname"}}
DPORT = {"payload": {"protocol": "tcp", "field": "dport"}}
SADDR = {"payload": {"protocol": "ip", "field": "saddr"}}
DADDR = {"payload": {"protocol": "ip", "field": "daddr"}}


def test_chain_verdict_names_only_sure_drops() -> None:
    p = doctor.Packet(4, "br0", "192.168.150.10", "tcp", 80)
    drop = _rule(_m(OIF, "br0"), _m(DPORT, 80), {"drop": None})
    assert doctor.chain_verdict([drop], p, 0) == ("drop", drop)
    # a match on the source cannot be told: passed over
    assert doctor.chain_verdict([_rule(_m(SADDR, "10.0.0.1"), {"drop": None})], p, 0) is None
    # another bridge, another port, another subnet: no match
    assert doctor.chain_verdict([_rule(_m(OIF, "br1"), {"drop": None})], p, 0) is None
    assert doctor.chain_verdict([_rule(_m(DPORT, {"set": [22, 443]}), {"drop": None})], p, 0) is None
    assert doctor.chain_verdict([_rule(_m(DADDR, {"prefix": {"addr": "10.0.0.0", "len": 8}}),
                                       {"drop": None})], p, 0) is None
    # an accept that surely matches first ends the chain (ct status dnat, portfwd's mark)
    dnat = _rule(_m({"ct": {"key": "status"}}, "dnat", "in"), {"accept": None})
    assert doctor.chain_verdict([dnat, drop], p, 0) == ("accept", dnat)
    mark = _rule(_m({"&": [{"ct": {"key": "mark"}}, 0x01000000]}, 0x01000000), {"accept": None})
    assert doctor.chain_verdict([mark, drop], p, 0x01000000) == ("accept", mark)
    assert doctor.chain_verdict([mark, drop], p, 0) == ("drop", drop)
    # a port range, an interface wildcard, a negation
    assert doctor.chain_verdict([_rule(_m(OIF, "br*"), _m(DPORT, {"range": [1, 1023]}),
                                       {"reject": None})], p, 0) is not None
    assert doctor.chain_verdict([_rule(_m(OIF, "br0", "!="), {"drop": None})], p, 0) is None


def test_listening_sockets_from_proc_net(tmp_path: "os.PathLike[str]") -> None:
    """/proc/net/tcp and tcp6 of a fake /proc: listening sockets only, addresses in
    host byte order, no process named when none holds the socket."""
    proc = str(tmp_path)
    os.makedirs(os.path.join(proc, "net"))
    with open(os.path.join(proc, "net", "tcp"), "w") as f:
        f.write("  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid"
                "  timeout inode\n"
                "   0: 00000000:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000"
                "     0        0 12345 1 0000000000000000 100 0 0 10 0\n"
                "   1: 0100007F:0050 0200007F:9C40 01 00000000:00000000 00:00000000 00000000"
                "     0        0 999 1 0000000000000000 100 0 0 10 0\n")
    with open(os.path.join(proc, "net", "tcp6"), "w") as f:
        f.write("  sl  local_address                         remote_address st tx rx tr tm retr"
                " uid timeout inode\n"
                "   0: 00000000000000000000000001000000:1F90 00000000000000000000000000000000:0000"
                " 0A 00000000:00000000 00:00000000 00000000     0        0 777 1\n")
    found = [(s.family, s.endpoint, s.process) for s in listening.sockets(proc)]
    assert found == [(4, "0.0.0.0:8080", ""), (6, "[::1]:8080", "")]


@pytest.mark.kernel
def test_a_cached_reachable_neighbour_is_asked_again(dlab: DoctorLab) -> None:
    """The guest's link goes down while the host's neighbour entry still says
    REACHABLE: doctor asks again instead of trusting the cache."""
    assert dlab.doctor()[0] == 0
    state = dlab.lab.ns(dlab.lab.host, "ip", "neigh", "show", GUEST4, "dev", "br0").stdout
    assert b"REACHABLE" in state, state
    dlab.lab.ns(dlab.lab.guest, "ip", "link", "set", "eth0", "down")
    rc, checks = dlab.doctor()
    assert rc == 5 and not checks[-1]["ok"], checks
    assert f"guest {GUEST4} does not answer" in checks[-1]["detail"], checks
    assert all(c["ok"] for c in checks[:-1]), checks


@pytest.mark.kernel
def test_no_forwards_configured_is_said_and_fine(pf: PortfwdHost) -> None:
    pf.write_config("# nothing yet\n")
    r = pf.cli("doctor", "--libvirt-status", os.path.dirname(pf.config))
    assert r.returncode == 0, r
    assert r.stdout.decode() == (f"skip forwards: no forwards configured in {pf.config} and none"
                                 " applied: nothing to check\n")
