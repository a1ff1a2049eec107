"""Debian 13 end to end: libvirt 11 (its nftables backend, and its own default),
nftables 1.1, Python 3.13, a QEMU guest, portfwd installed with the root's Python.

Forwards reach the guest over IPv4 and IPv6, tcp and udp, and keep reaching it
after a network restart, a libvirtd restart, and `nft flush ruleset` followed
by `portfwd reapply`; a forward without an address follows the guest's lease.
nftables 1.1 gets the table's ``concat`` variant (one map of address . port per
kind); a table built as ``split`` (the variant of nftables 1.0.6) becomes
``concat`` whole when rebuilt.
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict, Iterator, Optional

import pytest

from portfwd.constants import LAYOUT

from libvirtlab import NET6_XML, domain_xml
from netlab import CLIENT4, CLIENT6, HOST4, HOST6
from trixielab import TrixieLab

pytestmark = [pytest.mark.kernel, pytest.mark.trixie]

WEB = ("pf-web6", "pfv6", "52:54:00:70:66:26")
DHCP = ("pf-dhcp", "default", "52:54:00:70:66:27")
WEB4, WEB6 = "192.168.151.10", "fd00:151::10"
CONFIG = f"""
[[forward]]
guest = "pf-web6"
ipv4  = "{WEB4}"
ipv6  = "{WEB6}"
ports = ["8086:80", "5356:53/udp"]

[[forward]]
guest = "pf-dhcp"
ports = ["8087:80"]
"""


@pytest.fixture(scope="module", params=["nftables", None], ids=["nftables backend", "default backend"])
def tlab(request: pytest.FixtureRequest,
         tmp_path_factory: pytest.TempPathFactory) -> Iterator[TrixieLab]:
    lab = TrixieLab(str(tmp_path_factory.mktemp("trixie")), request.param)
    try:
        print(f"\n{lab.versions()}")
        lab.write_config(CONFIG)
        lab.define_network(NET6_XML)
        lab.virsh("net-start", "default", check=False)
        lab.web = lab.standin("pfv6br", WEB[2], WEB4, "192.168.151.1", WEB6,  # type: ignore
                              "fd00:151::1")
        lab.start(WEB[0], domain_xml(*WEB))
        yield lab
    finally:
        lab.close()


def both_families(lab: TrixieLab, wait: float = 0.0) -> "list[Optional[str]]":
    return [lab.probe("tcp", HOST4, 8086, wait), lab.probe("udp", HOST4, 5356, wait),
            lab.probe("tcp", HOST6, 8086, wait), lab.probe("udp", HOST6, 5356, wait)]


EXPECTED = [f"tcp 80 {CLIENT4}", f"udp 53 {CLIENT4}", f"tcp 80 {CLIENT6}", f"udp 53 {CLIENT6}"]
CONCAT_MAPS = {"any4_to": ["ipv4_addr", "inet_service"], "any6_to": ["ipv6_addr", "inet_service"]}
SPLIT_MAPS = {"any4_ip": "ipv4_addr", "any4_port": "inet_service",
              "any6_ip": "ipv6_addr", "any6_port": "inet_service"}
# the table rebuilt from the records as the split variant, as nftables 1.0.6 builds it
REBUILD_SPLIT = ("from portfwd import engine\nfrom portfwd.engine import tables, wholehost\n"
                 "from portfwd.plan import rules\nfrom portfwd.rundir import state\n"
                 "tables.variant = lambda e: rules.SPLIT\n"
                 "with state.locked():\n"
                 "    wholehost.reapply(engine.Engine(state.config_path(None)))\n")


def value_types(lab: TrixieLab) -> Dict[str, Any]:
    """Map name → its value type, of the live table; elements per map under "#NAME"."""
    listing = json.loads(lab.sh("nft -j list table inet portfwd").stdout)
    out: Dict[str, Any] = {}
    for obj in listing["nftables"]:
        if "map" in obj:
            out[obj["map"]["name"]] = obj["map"]["map"]
            out["#" + obj["map"]["name"]] = len(obj["map"].get("elem", []))
    return out


def assert_variant(lab: TrixieLab, maps: Dict[str, Any]) -> None:
    live = value_types(lab)
    assert {name: live.get(name) for name in maps} == maps
    assert all(live["#" + name] > 0 for name in maps)
    other = SPLIT_MAPS if maps == CONCAT_MAPS else CONCAT_MAPS
    assert not set(other) & set(live), f"maps of the other variant left: {sorted(live)}"


def test_forward_reaches_the_guest_over_both_families(tlab: TrixieLab) -> None:
    assert both_families(tlab, wait=10) == EXPECTED
    r = tlab.portfwd("status", "--json")
    assert r.returncode == 0, (r.stdout.decode(), r.stderr)
    assert b'"state": "active"' in r.stdout
    assert b'"state": "missing"' not in r.stdout
    assert_variant(tlab, CONCAT_MAPS)  # the forwards above crossed these maps
    ruleset = tlab.sh("nft list table inet portfwd").stdout.decode()
    assert "dnat ip to meta l4proto . th dport map @any4_to" in ruleset
    assert "dnat ip6 to meta l4proto . th dport map @any6_to" in ruleset


def test_split_table_becomes_concat_when_rebuilt(tlab: TrixieLab) -> None:
    tlab.sh("nft delete table inet portfwd")  # built anew, as before nftables' upgrade
    tlab.sh(f"/opt/portfwd/bin/python -c '{REBUILD_SPLIT}'")
    assert_variant(tlab, SPLIT_MAPS)
    with open(tlab.file("/run/portfwd/layout.portfwd")) as f:
        assert f.read() == LAYOUT
    assert both_families(tlab, wait=10) == EXPECTED
    r = tlab.portfwd("reapply")
    assert r.returncode == 0, r.stderr
    assert_variant(tlab, CONCAT_MAPS)
    with open(tlab.file("/run/portfwd/layout.portfwd")) as f:
        assert f.read() == f"{LAYOUT}+concat"
    assert both_families(tlab, wait=10) == EXPECTED


def test_backend_is_the_one_asked_for(tlab: TrixieLab) -> None:
    ruleset = tlab.sh("nft list ruleset").stdout.decode()
    if tlab.backend == "nftables":
        assert "table ip libvirt_network" in ruleset
        assert 'comment "portfwd"' in ruleset  # portfwd's accept in guest_input
    else:
        assert "chain LIBVIRT_FWI" in ruleset
        assert "PORTFWD_FWI" in ruleset


def test_network_restart(tlab: TrixieLab) -> None:
    tlab.virsh("net-destroy", "pfv6")
    tlab.virsh("net-start", "pfv6")
    # the stand-in is ours: plug it into the new bridge (libvirt re-plugs only its taps)
    tlab.plug("pft1", "pfv6br")
    assert both_families(tlab, wait=10) == EXPECTED


def test_libvirtd_restart(tlab: TrixieLab) -> None:
    tlab.restart_libvirtd()
    assert both_families(tlab, wait=20) == EXPECTED


def test_nft_flush_ruleset_then_reapply(tlab: TrixieLab) -> None:
    tlab.sh("nft flush ruleset")
    assert tlab.probe("tcp", HOST4, 8086) is None
    r = tlab.portfwd("reapply")
    assert r.returncode == 0, r.stderr
    assert both_families(tlab, wait=10) == EXPECTED


def test_lease_discovery(tlab: TrixieLab) -> None:
    standin = tlab.standin("virbr0", DHCP[2])
    tlab.start(DHCP[0], domain_xml(*DHCP))
    tlab.as_tap(standin, DHCP[0])
    udhcpc = os.path.join(os.path.dirname(os.path.abspath(__file__)), "udhcpc.script")
    tlab.ns(standin, "busybox", "udhcpc", "-i", "eth0", "-s", udhcpc, "-q", "-n", "-t", "5",
            "-T", "1")
    for _ in range(30):  # until the host's neighbour table and the bridge show the lease's NIC
        r = tlab.portfwd("sync")
        assert r.returncode == 0, r.stderr
        if tlab.probe("tcp", HOST4, 8087, wait=1) is not None:
            break
    assert tlab.probe("tcp", HOST4, 8087, wait=10) == f"tcp 80 {CLIENT4}"
    status = tlab.portfwd("status").stdout.decode()
    assert "lease on virbr0" in status
    tlab.virsh("destroy", DHCP[0])
    assert tlab.probe("tcp", HOST4, 8087) is None
