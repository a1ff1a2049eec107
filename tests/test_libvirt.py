"""End to end with the real thing: libvirtd, its NAT networks and firewall rules, QEMU guests,
portfwd's hooks installed in qemu.d/ and network.d/, real TCP and UDP through the forward."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Iterator, List, Optional

import pytest

from libvirtlab import NET6_XML, LibvirtLab
from netlab import CLIENT4, CLIENT6, HOST4, HOST6, TRAFFIC
from portfwd.rundir import state

pytestmark = pytest.mark.kernel

WEB1_IP = "192.168.122.10"
WEB1 = ("pf-web1", "default", "52:54:00:70:66:01")
WEB6_IP4, WEB6_IP6 = "192.168.151.10", "fd00:151::10"
CONFIG = f"""
[[forward]]
guest = "pf-web1"
ipv4  = "{WEB1_IP}"
ports = ["8080:80", "5353:53/udp"]

[[forward]]
guest = "pf-web6"
ipv4  = "{WEB6_IP4}"
ipv6  = "{WEB6_IP6}"
ports = ["8086:80", "5356:53/udp"]
"""


class Servers:
    def __init__(self) -> None:
        self.procs: List["subprocess.Popen[bytes]"] = []

    def start(self, ns: str) -> None:
        for proto, port in (("tcp", "80"), ("udp", "53")):
            p = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, TRAFFIC, "serve", proto,
                                  port], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            self.procs.append(p)
            assert p.stdout is not None and p.stdout.readline().strip() == b"ready"

    def stop(self) -> None:
        for p in self.procs:
            p.terminate()
            p.wait(timeout=10)


@pytest.fixture(scope="module")
def vlab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LibvirtLab]:
    lab = LibvirtLab(str(tmp_path_factory.mktemp("libvirt")))
    servers = Servers()
    try:
        lab.write_config(CONFIG)
        lab.ensure_network("default")
        lab.ensure_network("pfv6", NET6_XML)
        lab.web1 = lab.standin("virbr0", WEB1_IP, "192.168.122.1")  # type: ignore[attr-defined]
        lab.web6 = lab.standin("pfv6br", WEB6_IP4, "192.168.151.1", WEB6_IP6,  # type: ignore
                               "fd00:151::1")
        servers.start(lab.web1)  # type: ignore[attr-defined]
        servers.start(lab.web6)  # type: ignore[attr-defined]
        yield lab
    finally:
        servers.stop()
        lab.close()
    assert lab.pids() == {}, "processes left behind"


def probe(lab: LibvirtLab, proto: str, addr: str, port: int, tries: int = 3) -> Optional[str]:
    for _ in range(tries):
        r = lab.ns(lab.client, sys.executable, TRAFFIC, "probe", proto, addr, str(port), check=False)
        if r.returncode == 0:
            return r.stdout.decode().strip()
    return None


def probe_after_restart(lab: LibvirtLab, proto: str, addr: str, port: int) -> Optional[str]:
    """libvirtd answers before its reconnect hooks (one thread per guest) have all run:
    poll for a while instead of probing once."""
    deadline = time.monotonic() + 20
    while True:
        got = probe(lab, proto, addr, port, tries=1)
        if got is not None or time.monotonic() > deadline:
            return got
        time.sleep(0.2)


def portfwd(lab: LibvirtLab, *args: str) -> subprocess.CompletedProcess[bytes]:
    env = dict(os.environ, PORTFWD_CONFIG=lab.config, PORTFWD_RUNDIR=lab.run_dir)
    return subprocess.run(lab.argv(lab.lab, sys.executable, "-m", "portfwd.cli", *args),
                          capture_output=True, env=env)


def elements(lab: LibvirtLab) -> int:
    r = lab.ns(lab.lab, "nft", "-j", "list", "table", "inet", "portfwd", check=False)
    if r.returncode != 0:
        return 0
    return sum(len(o["map"].get("elem", [])) for o in json.loads(r.stdout)["nftables"] if "map" in o)


def fwi(lab: LibvirtLab, tool: str = "iptables") -> List[str]:
    return lab.ns(lab.lab, tool, "-w", "-S", "LIBVIRT_FWI").stdout.decode().splitlines()


def test_forward_reaches_guest_until_destroy(vlab: LibvirtLab) -> None:
    assert probe(vlab, "tcp", HOST4, 8080, tries=1) is None
    vlab.start(*WEB1)
    assert probe(vlab, "tcp", HOST4, 8080) == f"tcp 80 {CLIENT4}"
    assert probe(vlab, "udp", HOST4, 5353) == f"udp 53 {CLIENT4}"
    # libvirt's own reject is still there, below portfwd's accept
    rules = fwi(vlab)
    assert rules[1] == "-A LIBVIRT_FWI -o virbr0 -j PORTFWD_FWI"
    assert any("REJECT" in r for r in rules[2:])
    vlab.virsh("destroy", "pf-web1")
    assert probe(vlab, "tcp", HOST4, 8080, tries=1) is None
    assert probe(vlab, "udp", HOST4, 5353, tries=1) is None
    assert elements(vlab) == 0
    assert not any("PORTFWD_FWI" in r for r in fwi(vlab))


def test_ipv6_network(vlab: LibvirtLab) -> None:
    vlab.start("pf-web6", "pfv6", "52:54:00:70:66:06")
    try:
        for host, client in ((HOST4, CLIENT4), (HOST6, CLIENT6)):
            assert probe(vlab, "tcp", host, 8086) == f"tcp 80 {client}"
            assert probe(vlab, "udp", host, 5356) == f"udp 53 {client}"
    finally:
        vlab.virsh("destroy", "pf-web6")
    assert probe(vlab, "tcp", HOST6, 8086, tries=1) is None


def test_network_restart_is_followed_by_the_network_hook(vlab: LibvirtLab) -> None:
    vlab.start(*WEB1)
    try:
        assert probe(vlab, "tcp", HOST4, 8080) is not None
        vlab.virsh("net-destroy", "default")
        vlab.virsh("net-start", "default")
        # libvirt 9.0 does not re-plug running guests into the new bridge; plug the stand-in
        vlab.plug("pfs1", "virbr0")
        assert probe(vlab, "tcp", HOST4, 8080) == f"tcp 80 {CLIENT4}"
        assert fwi(vlab)[1] == "-A LIBVIRT_FWI -o virbr0 -j PORTFWD_FWI"
    finally:
        vlab.virsh("destroy", "pf-web1")


def test_libvirtd_restart_reconnect_keeps_one_copy(vlab: LibvirtLab) -> None:
    vlab.start(*WEB1)
    try:
        before = elements(vlab)
        assert before == 4  # 2 ports, address and port maps
        vlab.restart_libvirtd()
        assert probe_after_restart(vlab, "tcp", HOST4, 8080) == f"tcp 80 {CLIENT4}"
        assert elements(vlab) == before
        assert sum("PORTFWD_FWI" in r for r in fwi(vlab)) == 1
        assert fwi(vlab)[1] == "-A LIBVIRT_FWI -o virbr0 -j PORTFWD_FWI"
    finally:
        vlab.virsh("destroy", "pf-web1")


def test_nft_flush_ruleset_then_reapply(vlab: LibvirtLab) -> None:
    vlab.start(*WEB1)
    try:
        assert probe(vlab, "tcp", HOST4, 8080) is not None
        vlab.ns(vlab.lab, "nft", "flush", "ruleset")
        assert probe(vlab, "tcp", HOST4, 8080, tries=1) is None
        r = portfwd(vlab, "reapply")
        assert r.returncode == 0, r.stderr
        assert probe(vlab, "tcp", HOST4, 8080) == f"tcp 80 {CLIENT4}"
        # libvirt 9.0 rebuilds its top-level chains only when libvirtd starts; then
        # reconnect puts portfwd's accept back on top of its reject
        vlab.restart_libvirtd()
        assert any("REJECT" in r for r in fwi(vlab))
        assert probe_after_restart(vlab, "tcp", HOST4, 8080) == f"tcp 80 {CLIENT4}"
        assert fwi(vlab)[1] == "-A LIBVIRT_FWI -o virbr0 -j PORTFWD_FWI"
    finally:
        vlab.virsh("destroy", "pf-web1")


def test_docker_like_forward_drop_policy(vlab: LibvirtLab) -> None:
    vlab.ns(vlab.lab, "iptables", "-w", "-P", "FORWARD", "DROP")
    vlab.start(*WEB1)
    try:
        assert probe(vlab, "tcp", HOST4, 8080) == f"tcp 80 {CLIENT4}"
        status = json.loads(portfwd(vlab, "status", "--json").stdout)
        assert status["firewall"]["blocked"] == []
        assert any("iptables-nft backend" in line for line in status["firewall"]["seen"])
    finally:
        vlab.virsh("destroy", "pf-web1")
        vlab.ns(vlab.lab, "iptables", "-w", "-P", "FORWARD", "ACCEPT")


def hairpin_mode(lab: LibvirtLab, port: str) -> Optional[str]:
    r = lab.ns(lab.lab, "cat", f"/sys/class/net/{port}/brport/hairpin_mode", check=False)
    return r.stdout.decode().strip() if r.returncode == 0 else None


def test_hairpin_mode_of_the_guest_tap(vlab: LibvirtLab) -> None:
    """The hooks find the guest's tap in the XML libvirt gives them: hairpin mode is on
    while the guest has forwards, turned on again by ``reconnect`` after a libvirtd
    restart and by ``sync``, and forgotten when the guest stops (libvirt removes the
    tap)."""
    vlab.start(*WEB1)
    try:
        listed = vlab.virsh("domiflist", "pf-web1").stdout.decode().split()
        tap = listed[0]
        assert tap.startswith("vnet") and "default" in listed
        assert hairpin_mode(vlab, tap) == "1"
        assert hairpin_mode(vlab, "pfs1") == "0"  # the stand-in's port is no tap of a guest
        vlab.ns(vlab.lab, "ip", "link", "set", "dev", tap, "type", "bridge_slave", "hairpin", "off")
        vlab.restart_libvirtd()
        deadline = time.monotonic() + 20
        while hairpin_mode(vlab, tap) != "1" and time.monotonic() < deadline:
            time.sleep(0.2)
        assert hairpin_mode(vlab, tap) == "1"
        assert list(state.Store(vlab.run_dir).hairpin_ports()["pf-web1"]) == [tap]
        # sync reads the taps from libvirt's XML of each running guest
        vlab.ns(vlab.lab, "ip", "link", "set", "dev", tap, "type", "bridge_slave", "hairpin", "off")
        r = portfwd(vlab, "sync")
        assert r.returncode == 0, r.stderr
        assert hairpin_mode(vlab, tap) == "1"
    finally:
        vlab.virsh("destroy", "pf-web1")
    assert hairpin_mode(vlab, tap) in (None, "0")
    assert state.Store(vlab.run_dir).hairpin_ports() == {}
