"""Reaching a forward from wherever users stand: the host itself, other guests on the same
or another bridge, the guest itself, 127.0.0.1, listen by interface, and a host with IPv6 off.

    client ── uplink ── host ── br0 ── guest (target, 192.168.150.10), guest2 (192.168.150.20)
                          └──── br1 ── guest3 (192.168.160.10)
"""

from __future__ import annotations

import json
import time
from typing import Any, Dict, Iterator

import pytest

from netlab import BRIDGE4, BRIDGE6, CLIENT4, CLIENT6, HOST4, HOST6, Lab, run
from pfhost import PortfwdHost, domain_xml, web1_config

pytestmark = pytest.mark.kernel

CONFIG = web1_config("8080:80", "5353:53/udp")
GUEST2_4, GUEST2_6 = "192.168.150.20", "fd00:150::20"
GUEST3_4, GUEST3_6 = "192.168.160.10", "fd00:160::10"


class ReachLab(Lab):
    """The standard lab plus a second guest on br0 and a third on another bridge."""

    def __init__(self) -> None:
        super().__init__()
        self.guest2, self.guest3 = f"{self.tag}g2", f"{self.tag}g3"
        try:
            h = self.host
            self.ns(h, "ip", "link", "add", "br1", "type", "bridge")
            self.ns(h, "ip", "addr", "add", "192.168.160.1/24", "dev", "br1")
            self.ns(h, "ip", "addr", "add", "fd00:160::1/64", "dev", "br1")
            self.ns(h, "ip", "link", "set", "br1", "up")
            for ns, bridge, port, addr4, addr6, gw4, gw6 in (
                    (self.guest2, "br0", "vnet1", GUEST2_4, GUEST2_6, BRIDGE4, BRIDGE6),
                    (self.guest3, "br1", "vnet2", GUEST3_4, GUEST3_6, "192.168.160.1",
                     "fd00:160::1")):
                run("ip", "netns", "add", ns)
                self.ns(ns, "sysctl", "-qw", "net.ipv6.conf.all.accept_dad=0",
                        "net.ipv6.conf.default.accept_dad=0")
                self.ns(ns, "ip", "link", "set", "lo", "up")
                self.ns(h, "ip", "link", "add", port, "type", "veth", "peer", "name", "eth0",
                        "netns", ns)
                self.ns(h, "ip", "link", "set", port, "master", bridge, "up")
                self.ns(ns, "ip", "addr", "add", f"{addr4}/24", "dev", "eth0")
                self.ns(ns, "ip", "addr", "add", f"{addr6}/64", "dev", "eth0")
                self.ns(ns, "ip", "link", "set", "eth0", "up")
                self.ns(ns, "ip", "route", "add", "default", "via", gw4)
                self.ns(ns, "ip", "-6", "route", "add", "default", "via", gw6)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        for ns in (getattr(self, "guest2", None), getattr(self, "guest3", None)):
            if ns:
                run("ip", "netns", "del", ns, check=False)
        super().close()


@pytest.fixture
def lab() -> Iterator[ReachLab]:
    """Replaces conftest's lab, so that ``pf`` runs portfwd in this lab's host."""
    lab = ReachLab()
    try:
        yield lab
    finally:
        lab.close()


@pytest.fixture
def rlab(lab: ReachLab) -> ReachLab:
    lab.serve("tcp", [80])
    lab.serve("udp", [53])
    return lab


def status(pf: PortfwdHost) -> Dict[str, Any]:
    r = pf.cli("status", "--json")
    assert r.returncode == 0, r.stderr
    out: Dict[str, Any] = json.loads(r.stdout)
    return out


def test_from_the_host_itself(rlab: ReachLab, pf: PortfwdHost) -> None:
    pf.write_config(CONFIG)
    assert pf.hook("web1", "started").returncode == 0
    h = rlab.host
    for addr, seen in ((HOST4, HOST4), (BRIDGE4, BRIDGE4), (HOST6, HOST6)):
        assert rlab.reach("tcp", addr, 8080, ns=h) == f"tcp 80 {seen}"
    assert rlab.reach("udp", HOST4, 5353, ns=h) == f"udp 53 {HOST4}"
    # the host's own services are not caught: another port, and 127.0.0.1 on the same port
    rlab.serve("tcp", [9999, 8080], ns=h)
    assert rlab.reach("tcp", HOST4, 9999, ns=h) == f"tcp 9999 {HOST4}"
    assert rlab.reach("tcp", "127.0.0.1", 8080, ns=h) == "tcp 8080 127.0.0.1"
    assert rlab.reach("tcp", "::1", 8080, ns=h) == "tcp 8080 ::1"


def set_br_netfilter(lab: Lab, on: bool) -> None:
    """net.bridge.bridge-nf-call-ip(6)tables in the lab's host (per network namespace);
    skips the test where the kernel has no br_netfilter at all."""
    sysctl = "/proc/sys/net/bridge/bridge-nf-call-iptables"
    loaded = lab.ns(lab.host, "test", "-e", sysctl, check=False).returncode == 0
    if on and not loaded:
        run("modprobe", "br_netfilter", check=False)
        loaded = lab.ns(lab.host, "test", "-e", sysctl, check=False).returncode == 0
        if not loaded:
            pytest.skip("br_netfilter is not available on this kernel")
    if loaded:
        value = "1" if on else "0"
        lab.ns(lab.host, "sysctl", "-qw", f"net.bridge.bridge-nf-call-iptables={value}",
               f"net.bridge.bridge-nf-call-ip6tables={value}")


def hairpin_mode(lab: Lab, port: str) -> str:
    return lab.ns(lab.host, "cat", f"/sys/class/net/{port}/brport/hairpin_mode").stdout.decode().strip()


@pytest.mark.parametrize("br_netfilter", [False, True], ids=["plain bridge", "br_netfilter"])
def test_hairpin_from_other_guests_and_the_guest_itself(rlab: ReachLab, pf: PortfwdHost,
                                                        br_netfilter: bool) -> None:
    """Another guest of the same bridge, and the guest itself, reach the forward and are
    masqueraded to the bridge address: the reply then goes back through the host, which
    undoes both NATs. On a plain bridge the host routes the connection back out of
    br0; with br_netfilter (Docker's hosts) the bridge sends the DNATed packet back
    out of the port it came from, which needs the tap's hairpin mode: portfwd turns it
    on while the guest has forwards, and off again after."""
    set_br_netfilter(rlab, br_netfilter)
    pf.write_config(CONFIG)
    assert hairpin_mode(rlab, "vnet0") == "0"
    assert pf.hook("web1", "started").returncode == 0
    assert hairpin_mode(rlab, "vnet0") == "1"
    assert hairpin_mode(rlab, "vnet1") == "0"  # guest2's port: it has no forwards
    for ns in (rlab.guest2, rlab.guest):
        assert rlab.reach("tcp", HOST4, 8080, ns=ns) == f"tcp 80 {BRIDGE4}"
        assert rlab.reach("udp", HOST4, 5353, ns=ns) == f"udp 53 {BRIDGE4}"
        assert rlab.reach("tcp", HOST6, 8080, ns=ns) == f"tcp 80 {BRIDGE6}"
        assert rlab.reach("udp", HOST6, 5353, ns=ns) == f"udp 53 {BRIDGE6}"
    # another bridge: routed back through the host anyway, so the source is kept
    assert rlab.reach("tcp", HOST4, 8080, ns=rlab.guest3) == f"tcp 80 {GUEST3_4}"
    assert rlab.reach("tcp", HOST6, 8080, ns=rlab.guest3) == f"tcp 80 {GUEST3_6}"
    # and an outside client keeps its own address
    assert rlab.reach("tcp", HOST4, 8080) == f"tcp 80 {CLIENT4}"
    assert rlab.reach("tcp", HOST6, 8080) == f"tcp 80 {CLIENT6}"
    # the hairpin set and the port's hairpin mode follow the guest's forwards
    assert pf.hook("web1", "stopped", "end").returncode == 0
    hairpin = rlab.ns(rlab.host, "nft", "-j", "list", "set", "inet", "portfwd", "hairpin").stdout
    assert "elem" not in json.loads(hairpin)["nftables"][1]["set"]
    assert hairpin_mode(rlab, "vnet0") == "0"
    if br_netfilter:  # the proof that hairpin mode is what makes it work there
        assert pf.hook("web1", "started").returncode == 0
        rlab.ns(rlab.host, "ip", "link", "set", "dev", "vnet0", "type", "bridge_slave",
                "hairpin", "off")
        assert rlab.probe("tcp", HOST4, 8080, ns=rlab.guest) is None
        assert rlab.reach("tcp", HOST4, 8080, ns=rlab.guest2) == f"tcp 80 {BRIDGE4}"


def test_hairpin_mode_is_repaired_and_put_back_as_found(rlab: ReachLab, pf: PortfwdHost) -> None:
    """reapply turns a tap's hairpin mode back on; a forward removed from the
    configuration, and flush, put it back as portfwd found it (left on where it was)."""
    set_br_netfilter(rlab, True)
    pf.write_config(CONFIG)
    assert pf.hook("web1", "started").returncode == 0
    rlab.ns(rlab.host, "ip", "link", "set", "dev", "vnet0", "type", "bridge_slave", "hairpin", "off")
    assert pf.cli("reapply").returncode == 0
    assert hairpin_mode(rlab, "vnet0") == "1"
    assert rlab.reach("tcp", HOST4, 8080, ns=rlab.guest) == f"tcp 80 {BRIDGE4}"
    # the forward leaves the configuration: the next hook run for the guest puts it back
    pf.write_config("")
    assert pf.hook("web1", "reconnect").returncode == 0
    assert hairpin_mode(rlab, "vnet0") == "0"
    assert rlab.probe("tcp", HOST4, 8080, ns=rlab.guest) is None
    # on before portfwd came: stays on when the forwards go (here: flush)
    rlab.ns(rlab.host, "ip", "link", "set", "dev", "vnet0", "type", "bridge_slave", "hairpin", "on")
    pf.write_config(CONFIG)
    assert pf.hook("web1", "started").returncode == 0
    assert rlab.reach("tcp", HOST4, 8080, ns=rlab.guest) == f"tcp 80 {BRIDGE4}"
    assert pf.cli("flush").returncode == 0
    assert hairpin_mode(rlab, "vnet0") == "1"
    # a tap that was on no bridge of the forwards is never touched
    pf.write_config(CONFIG)
    xml = domain_xml("web1", taps=("vnet0", "vnet2"))
    rlab.ns(rlab.host, "ip", "link", "set", "dev", "vnet0", "type", "bridge_slave", "hairpin", "off")
    assert pf.hook("web1", "started", xml=xml).returncode == 0
    assert (hairpin_mode(rlab, "vnet0"), hairpin_mode(rlab, "vnet2")) == ("1", "0")
    assert pf.hook("web1", "stopped", "end", xml=xml).returncode == 0
    assert (hairpin_mode(rlab, "vnet0"), hairpin_mode(rlab, "vnet2")) == ("0", "0")


def route_localnet(lab: Lab, dev: str) -> str:
    return lab.ns(lab.host, "sysctl", "-n", f"net.ipv4.conf.{dev}.route_localnet").stdout.decode().strip()


def test_localhost(rlab: ReachLab, pf: PortfwdHost) -> None:
    h = rlab.host
    pf.write_config(CONFIG)
    assert pf.hook("web1", "started").returncode == 0
    assert rlab.probe("tcp", "127.0.0.1", 8080, ns=h) is None  # not asked for
    assert route_localnet(rlab, "br0") == "0"
    pf.write_config("[options]\nlocalhost = true\n" + CONFIG)
    assert pf.hook("web1", "reconnect").returncode == 0
    assert rlab.reach("tcp", "127.0.0.1", 8080, ns=h) == f"tcp 80 {BRIDGE4}"
    assert rlab.reach("udp", "127.0.0.1", 5353, ns=h) == f"udp 53 {BRIDGE4}"
    assert route_localnet(rlab, "br0") == "1" and route_localnet(rlab, "br1") == "0"
    # outside packets to 127.0.0.0/8 are dropped before routing
    raw = [r for r in pf.rules(chain="raw_prerouting")]
    assert len(raw) == 1 and {"drop": None} in raw[0]["expr"]
    # other host addresses keep working; 127.0.0.1 goes with the forward
    assert rlab.reach("tcp", HOST4, 8080) == f"tcp 80 {CLIENT4}"
    assert pf.hook("web1", "stopped", "end").returncode == 0
    assert rlab.probe("tcp", "127.0.0.1", 8080, ns=h) is None
    assert route_localnet(rlab, "br0") == "0"


def test_route_localnet_follows_the_live_sysctl(rlab: ReachLab, pf: PortfwdHost) -> None:
    """A network restart recreates the bridge with route_localnet off, while portfwd's
    record still says it turned it on: the network hook compares with the live value."""
    h = rlab.host
    pf.write_config("[options]\nlocalhost = true\n" + CONFIG)
    assert pf.hook("web1", "started").returncode == 0
    assert route_localnet(rlab, "br0") == "1"
    rlab.ns(h, "sysctl", "-qw", "net.ipv4.conf.br0.route_localnet=0")  # as a bridge re-made
    assert rlab.probe("tcp", "127.0.0.1", 8080, ns=h) is None
    assert pf.network_hook("default", "started")().returncode == 0
    assert route_localnet(rlab, "br0") == "1"
    assert rlab.reach("tcp", "127.0.0.1", 8080, ns=h) == f"tcp 80 {BRIDGE4}"
    assert pf.hook("web1", "stopped", "end").returncode == 0
    assert route_localnet(rlab, "br0") == "0"


def test_listen_by_interface_skips_unusable_addresses(rlab: ReachLab, pf: PortfwdHost) -> None:
    h = rlab.host
    rlab.ns(h, "ip", "addr", "add", "203.0.113.9/24", "dev", "uplink")
    # an address DAD finds a duplicate of (the client has it): tentative, then dadfailed
    rlab.ns(h, "sysctl", "-qw", "net.ipv6.conf.uplink.accept_dad=1",
            "net.ipv6.conf.uplink.dad_transmits=1")
    rlab.ns(h, "ip", "addr", "add", f"{CLIENT6}/64", "dev", "uplink")
    deadline = time.monotonic() + 10
    while "dadfailed" not in rlab.ns(h, "ip", "-6", "addr", "show", "dev", "uplink").stdout.decode():
        assert time.monotonic() < deadline, "DAD did not fail"
        time.sleep(0.1)
    pf.write_config(CONFIG.replace('ports = [', 'listen = ["uplink"]\nports = ['))
    assert pf.hook("web1", "started").returncode == 0
    for addr in (HOST4, "203.0.113.9"):
        assert rlab.reach("tcp", addr, 8080) == f"tcp 80 {CLIENT4}"
    assert rlab.reach("tcp", HOST6, 8080) == f"tcp 80 {CLIENT6}"
    assert rlab.probe("tcp", BRIDGE4, 8080) is None  # an address of another interface
    st = status(pf)
    assert st["warnings"] == [f"guest web1: {CLIENT6} on uplink skipped: tentative, DAD failed"]
    listens = {r["listen"] for r in st["forwards"] if r["proto"] == "tcp"}
    assert listens == {f"{HOST4}:8080", "203.0.113.9:8080", f"[{HOST6}]:8080"}


@pytest.mark.parametrize("where", ["all", "br0"])
def test_ipv6_disabled(rlab: ReachLab, pf: PortfwdHost, where: str) -> None:
    rlab.ns(rlab.host, "sysctl", "-qw", f"net.ipv6.conf.{where}.disable_ipv6=1")
    pf.write_config(CONFIG)
    r = pf.hook("web1", "started")
    assert (r.returncode, r.stdout) == (0, b""), r.stderr
    assert "Traceback" not in r.stderr.decode()
    assert rlab.reach("tcp", HOST4, 8080) == f"tcp 80 {CLIENT4}"
    reason = ("IPv6 is disabled on this host (net.ipv6.conf.all.disable_ipv6 = 1)" if where == "all"
              else "IPv6 is disabled on br0 (net.ipv6.conf.br0.disable_ipv6 = 1)")
    rows = status(pf)["forwards"]
    assert {(r["state"], r["reason"]) for r in rows if r["target"].startswith("[")} == \
        {("inactive", reason)}
    assert {r["state"] for r in rows if not r["target"].startswith("[")} == {"active"}
    assert not any("6_" in name for name in pf.elements())
    assert pf.hook("web1", "reconnect").returncode == 0
    assert pf.hook("web1", "stopped", "end").returncode == 0
    assert pf.elements() == {}


def test_ranges_from_the_host_another_guest_and_localhost(lab: ReachLab, pf: PortfwdHost) -> None:
    """A range kept as one element is reached like a single port: from the host
    itself (chain output), from another guest of the bridge (hairpin) and, with
    localhost = true, through 127.0.0.1."""
    h = lab.host
    if lab.ns(h, "test", "-e", "/proc/sys/net/bridge/bridge-nf-call-iptables",
              check=False).returncode == 0:  # a plain bridge, as on a libvirt host
        lab.ns(h, "sysctl", "-qw", "net.bridge.bridge-nf-call-iptables=0",
               "net.bridge.bridge-nf-call-ip6tables=0")
    lab.serve("tcp", [6000, 6003])
    lab.serve("udp", [5000])
    pf.write_config("[options]\nlocalhost = true\n" + web1_config("6000-6003", "5000-5003/udp"))
    assert pf.hook("web1", "started").returncode == 0
    for port in (6000, 6003):
        assert lab.reach("tcp", HOST4, port, ns=h) == f"tcp {port} {HOST4}"
        assert lab.reach("tcp", HOST6, port, ns=h) == f"tcp {port} {HOST6}"
        assert lab.reach("tcp", HOST4, port, ns=lab.guest2) == f"tcp {port} {BRIDGE4}"
        assert lab.reach("tcp", HOST6, port, ns=lab.guest2) == f"tcp {port} {BRIDGE6}"
        assert lab.reach("tcp", "127.0.0.1", port, ns=h) == f"tcp {port} {BRIDGE4}"
    assert lab.reach("udp", HOST4, 5000, ns=lab.guest3) == f"udp 5000 {GUEST3_4}"
    assert lab.reach("udp", "127.0.0.1", 5000, ns=h) == f"udp 5000 {BRIDGE4}"
    assert lab.probe("tcp", "127.0.0.1", 6004, ns=h) is None
    assert pf.hook("web1", "stopped", "end").returncode == 0
    assert lab.probe("tcp", "127.0.0.1", 6000, ns=h) is None
    assert lab.probe("tcp", HOST4, 6000, ns=h) is None
