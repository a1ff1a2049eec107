"""libvirt's rejects and other firewalls, rebuilt in a namespace exactly as libvirt lays them out.

These tests need no libvirtd: they write libvirt's rules themselves (the
iptables backend as libvirt 9.0 on Debian 12 writes them, and a
reconstruction of the nftables backend of libvirt >= 10.4), so that every
layout is proven with real traffic. tests/test_libvirt.py does the same
against a real libvirtd.
"""

from __future__ import annotations

import json
import os
import subprocess
from typing import Callable, List

import pytest

from netlab import CLIENT4, CLIENT6, HOST4, HOST6, Lab
from pfhost import PortfwdHost, web1_config

pytestmark = pytest.mark.kernel

CONFIG = web1_config("8080:80", "5353:53/udp")


def libvirt_iptables(lab: Lab, bridge: str = "br0", variant: str = "") -> None:
    """LIBVIRT_* chains and rules as libvirt 9.0 (iptables backend) writes them for a NAT
    network with an IPv6 range, in the order it writes them (``variant``: "-legacy")."""
    h = lab.host
    for tool, net in ((f"iptables{variant}", "192.168.150.0/24"),
                      (f"ip6tables{variant}", "fd00:150::/64")):
        for chain in ("LIBVIRT_FWX", "LIBVIRT_FWI", "LIBVIRT_FWO"):
            lab.ns(h, tool, "-w", "-N", chain)
            lab.ns(h, tool, "-w", "-A", "FORWARD", "-j", chain)
        lab.ns(h, tool, "-w", "-A", "LIBVIRT_FWX", "-i", bridge, "-o", bridge, "-j", "ACCEPT")
        lab.ns(h, tool, "-w", "-A", "LIBVIRT_FWO", "-i", bridge, "-s", net, "-j", "ACCEPT")
        lab.ns(h, tool, "-w", "-A", "LIBVIRT_FWO", "-i", bridge, "-j", "REJECT")
        if tool.startswith("iptables"):  # NAT: only related/established inbound
            lab.ns(h, tool, "-w", "-A", "LIBVIRT_FWI", "-o", bridge, "-d", net, "-m", "conntrack",
                   "--ctstate", "RELATED,ESTABLISHED", "-j", "ACCEPT")
        else:  # IPv6 on a NAT network is routed: inbound to the prefix is accepted
            lab.ns(h, tool, "-w", "-A", "LIBVIRT_FWI", "-o", bridge, "-d", net, "-j", "ACCEPT")
        lab.ns(h, tool, "-w", "-A", "LIBVIRT_FWI", "-o", bridge, "-j", "REJECT")


def libvirt_rebuild(lab: Lab, bridge: str = "br0") -> None:
    """What libvirt does on a network or daemon restart: its rules out, then in again on top."""
    h = lab.host
    spec = ["-o", bridge, "-d", "192.168.150.0/24", "-m", "conntrack", "--ctstate",
            "RELATED,ESTABLISHED", "-j", "ACCEPT"]
    lab.ns(h, "iptables", "-w", "-D", "LIBVIRT_FWI", *spec)
    lab.ns(h, "iptables", "-w", "-D", "LIBVIRT_FWI", "-o", bridge, "-j", "REJECT")
    lab.ns(h, "iptables", "-w", "-I", "LIBVIRT_FWI", "1", "-o", bridge, "-j", "REJECT")
    lab.ns(h, "iptables", "-w", "-I", "LIBVIRT_FWI", "1", *spec)


# Reconstruction (not libvirt's code): the tables libvirt >= 10.4 creates with
# firewall_backend = "nftables" for a NAT network with an IPv6 range, as
# described in DESIGN.md section 2. Debian 12's libvirt 9.0 has no such backend.
LIBVIRT_NFT = """
table ip libvirt_network {
  chain forward {
    type filter hook forward priority filter; policy accept;
    counter jump guest_cross
    counter jump guest_input
    counter jump guest_output
  }
  chain guest_output {
    iif "br0" ip saddr 192.168.150.0/24 counter accept
    iif "br0" counter reject
  }
  chain guest_input {
    oif "br0" ip daddr 192.168.150.0/24 ct state related,established counter accept
    oif "br0" counter reject
  }
  chain guest_cross {
    iif "br0" oif "br0" counter accept
  }
  chain guest_nat {
    type nat hook postrouting priority srcnat; policy accept;
    ip saddr 192.168.150.0/24 ip daddr 224.0.0.0/24 counter return
    ip saddr 192.168.150.0/24 ip daddr 255.255.255.255 counter return
    meta l4proto tcp ip saddr 192.168.150.0/24 ip daddr != 192.168.150.0/24 counter masquerade to :1024-65535
    meta l4proto udp ip saddr 192.168.150.0/24 ip daddr != 192.168.150.0/24 counter masquerade to :1024-65535
    ip saddr 192.168.150.0/24 ip daddr != 192.168.150.0/24 counter masquerade
  }
}
table ip6 libvirt_network {
  chain forward {
    type filter hook forward priority filter; policy accept;
    counter jump guest_cross
    counter jump guest_input
    counter jump guest_output
  }
  chain guest_output {
    iif "br0" ip6 saddr fd00:150::/64 counter accept
    iif "br0" counter reject
  }
  chain guest_input {
    oif "br0" ip6 daddr fd00:150::/64 counter accept
    oif "br0" counter reject
  }
  chain guest_cross {
    iif "br0" oif "br0" counter accept
  }
}
"""


def iptables_save(lab: Lab, variant: str = "") -> str:
    out = ""
    for tool in (f"iptables{variant}-save", f"ip6tables{variant}-save"):
        r = lab.ns(lab.host, tool, check=False)
        assert r.returncode == 0 and b"incompatible" not in r.stderr, r.stderr
        out += r.stdout.decode()
    return out


def test_libvirt_iptables_reject_is_passed_narrowly(lab: Lab, pf: PortfwdHost) -> None:
    lab.serve("tcp", [80])
    lab.serve("udp", [53])
    libvirt_iptables(lab)
    pf.write_config(CONFIG)
    assert pf.hook("web1", "started").returncode == 0
    assert lab.reach("tcp", HOST4, 8080) == f"tcp 80 {CLIENT4}"
    assert lab.reach("udp", HOST4, 5353) == f"udp 53 {CLIENT4}"
    assert lab.reach("tcp", HOST6, 8080) == f"tcp 80 {CLIENT6}"
    saved = iptables_save(lab)  # iptables-save and iptables -S still understand the chains
    assert "-A LIBVIRT_FWI -o br0 -j PORTFWD_FWI" in saved
    assert ('-A PORTFWD_FWI -m conntrack --ctstate DNAT -m connmark --mark 0x1000000/0x1000000'
            ' -m comment --comment "portfwd: connections portfwd forwarded" -j ACCEPT') in saved
    first = lab.ns(lab.host, "iptables", "-S", "LIBVIRT_FWI").stdout.decode().splitlines()
    assert first[1] == "-A LIBVIRT_FWI -o br0 -j PORTFWD_FWI"  # at the head, once
    # not every DNAT: a foreign DNAT to the guest stays rejected
    lab.ns(lab.host, "nft", "add table ip other; add chain ip other pre { type nat hook prerouting"
           " priority dstnat; }; add rule ip other pre tcp dport 9090 dnat to 192.168.150.10:80")
    assert lab.probe("tcp", HOST4, 9090) is None
    # stopped: the accept goes with the last forward on the bridge
    assert pf.hook("web1", "stopped", "end").returncode == 0
    saved = iptables_save(lab)
    assert "PORTFWD_FWI" not in saved


def test_started_twice_and_reconnect_keep_one_accept(lab: Lab, pf: PortfwdHost) -> None:
    libvirt_iptables(lab)
    pf.write_config(CONFIG)
    for op in ("started", "started", "reconnect"):
        assert pf.hook("web1", op).returncode == 0
    rules = lab.ns(lab.host, "iptables", "-S", "LIBVIRT_FWI").stdout.decode()
    assert rules.count("PORTFWD_FWI") == 1


def test_libvirt_rebuild_is_repaired_by_reconnect_network_hook_and_reapply(
        lab: Lab, pf: PortfwdHost) -> None:
    lab.serve("tcp", [80])
    libvirt_iptables(lab)
    pf.write_config(CONFIG)
    assert pf.hook("web1", "started").returncode == 0
    assert lab.reach("tcp", HOST4, 8080) is not None
    network_hook = [pf.network_hook("net", "started"), pf.network_hook("net", "updated"),
                    pf.network_hook("net", "port-created")]
    repairs: List[Callable[[], "subprocess.CompletedProcess[bytes]"]] = [
        lambda: pf.hook("web1", "reconnect"), *network_hook, lambda: pf.cli("reapply")]
    for repair in repairs:
        libvirt_rebuild(lab)
        assert lab.probe("tcp", HOST4, 8080) is None  # libvirt's reject is on top again
        status = json.loads(pf.cli("status", "--json").stdout)
        assert any("LIBVIRT_FWI: libvirt's reject comes before portfwd's accept for br0" in line
                   for line in status["firewall"]["blocked"])
        r = repair()
        assert r.returncode == 0, r.stderr
        assert r.stdout == b"" or r.stdout.startswith(b"reapplied: 4 forwards")
        assert lab.reach("tcp", HOST4, 8080) == f"tcp 80 {CLIENT4}"
        assert lab.ns(lab.host, "iptables", "-S", "LIBVIRT_FWI").stdout.decode().count(
            "PORTFWD_FWI") == 1


def test_docker_like_forward_drop_policy(lab: Lab, pf: PortfwdHost) -> None:
    lab.serve("tcp", [80])
    libvirt_iptables(lab)
    lab.ns(lab.host, "iptables", "-w", "-P", "FORWARD", "DROP")
    pf.write_config(CONFIG)
    assert pf.hook("web1", "started").returncode == 0
    # the accept inside LIBVIRT_FWI ends the FORWARD chain before its drop policy
    assert lab.reach("tcp", HOST4, 8080) == f"tcp 80 {CLIENT4}"
    status = json.loads(pf.cli("status", "--json").stdout)
    assert status["firewall"]["blocked"] == []


def test_forward_drop_without_libvirt_chain_is_reported(lab: Lab, pf: PortfwdHost) -> None:
    """A routed/open network (no libvirt rules) behind a foreign drop policy portfwd must not touch."""
    lab.serve("tcp", [80])
    lab.ns(lab.host, "nft", "add table inet filter; add chain inet filter forward"
           " { type filter hook forward priority filter; policy drop; }")
    pf.write_config(CONFIG)
    r = pf.hook("web1", "started")
    assert r.returncode == 0
    assert lab.probe("tcp", HOST4, 8080) is None
    expected = ("table inet filter chain forward: policy drop drops forwarded connections to br0"
                " (IPv4); portfwd does not change that chain: accept"
                " `ct mark & 0x01000000 == 0x01000000` there")
    assert f"forwarded traffic blocked: {expected}" in r.stderr.decode()
    status = json.loads(pf.cli("status", "--json").stdout)
    assert expected in status["firewall"]["blocked"]
    assert status["firewall"]["seen"] == ["IPv4 to br0: no libvirt reject (an open or routed"
                                          " network, or not libvirt's): nothing to pass",
                                          "IPv6 to br0: no libvirt reject (an open or routed"
                                          " network, or not libvirt's): nothing to pass"]
    check = pf.cli("check")
    assert check.returncode == 0
    assert f"warning: forwarded traffic blocked: {expected}" in check.stderr.decode()
    # following the advice makes it work
    lab.ns(lab.host, "nft", "add rule inet filter forward ct mark & 0x01000000 == 0x01000000 accept")
    assert lab.reach("tcp", HOST4, 8080) == f"tcp 80 {CLIENT4}"


def test_libvirt_nftables_backend_reconstruction(lab: Lab, pf: PortfwdHost) -> None:
    lab.serve("tcp", [80])
    lab.serve("udp", [53])
    lab.ns(lab.host, "nft", "-f", "-", input=LIBVIRT_NFT.encode())
    assert lab.probe("tcp", HOST4, 8080) is None
    pf.write_config(CONFIG)
    assert pf.hook("web1", "started").returncode == 0
    for host, client in ((HOST4, CLIENT4), (HOST6, CLIENT6)):
        assert lab.reach("tcp", host, 8080) == f"tcp 80 {client}"
        assert lab.reach("udp", host, 5353) == f"udp 53 {client}"
    listing = lab.ns(lab.host, "nft", "list", "chain", "ip", "libvirt_network",
                     "guest_input").stdout.decode()
    ours = [line.split(" counter ")[0].strip() for line in listing.splitlines()
            if 'comment "portfwd"' in line]
    assert ours == ['oifname "br0" ct status dnat ct mark & 0x01000000 == 0x01000000']
    assert listing.index('comment "portfwd"') < listing.index("reject")
    # a foreign DNAT to the guest is still rejected by libvirt
    lab.ns(lab.host, "nft", "add table ip other; add chain ip other pre { type nat hook prerouting"
           " priority dstnat; }; add rule ip other pre tcp dport 9090 dnat to 192.168.150.10:80")
    assert lab.probe("tcp", HOST4, 9090) is None
    assert pf.hook("web1", "reconnect").returncode == 0
    assert lab.ns(lab.host, "nft", "list", "table", "ip", "libvirt_network").stdout.decode().count(
        'comment "portfwd"') == 1
    assert pf.hook("web1", "stopped", "end").returncode == 0
    assert 'comment "portfwd"' not in lab.ns(lab.host, "nft", "list", "ruleset").stdout.decode()


def test_nft_flush_ruleset_then_reapply(lab: Lab, pf: PortfwdHost) -> None:
    lab.serve("tcp", [80])
    libvirt_iptables(lab)
    pf.write_config(CONFIG)
    assert pf.hook("web1", "started").returncode == 0
    before = pf.table()
    lab.ns(lab.host, "nft", "flush", "ruleset")
    assert lab.probe("tcp", HOST4, 8080) is None
    libvirt_iptables(lab)  # libvirt puts its rules back (network restart)
    r = pf.cli("reapply")
    assert r.returncode == 0, r.stderr
    assert r.stdout.decode().strip().startswith("reapplied: 4 forwards for 1 guest")
    assert pf.table() == before
    assert lab.reach("tcp", HOST4, 8080) == f"tcp 80 {CLIENT4}"


def test_flush_removes_accepts_too(lab: Lab, pf: PortfwdHost) -> None:
    libvirt_iptables(lab)
    lab.ns(lab.host, "nft", "-f", "-", input=LIBVIRT_NFT.encode())
    pf.write_config(CONFIG)
    assert pf.hook("web1", "started").returncode == 0
    assert "PORTFWD_FWI" in iptables_save(lab)
    assert pf.cli("flush").returncode == 0
    assert "PORTFWD_FWI" not in iptables_save(lab)
    ruleset = lab.ns(lab.host, "nft", "list", "ruleset").stdout.decode()
    assert "portfwd" not in ruleset


def test_libvirt_on_iptables_legacy(lab: Lab, pf: PortfwdHost) -> None:
    """libvirt's chains in legacy x_tables (hosts whose iptables points to iptables-legacy)."""
    lab.serve("tcp", [80])
    libvirt_iptables(lab, variant="-legacy")
    pf.write_config(CONFIG)
    assert pf.hook("web1", "started").returncode == 0
    assert lab.reach("tcp", HOST4, 8080) == f"tcp 80 {CLIENT4}"
    saved = iptables_save(lab, "-legacy")
    assert "-A LIBVIRT_FWI -o br0 -j PORTFWD_FWI" in saved
    assert lab.ns(lab.host, "iptables-legacy", "-S", "LIBVIRT_FWI").stdout.decode().splitlines()[1] \
        == "-A LIBVIRT_FWI -o br0 -j PORTFWD_FWI"
    status = json.loads(pf.cli("status", "--json").stdout)
    assert any("iptables-legacy backend" in line for line in status["firewall"]["seen"])
    assert pf.hook("web1", "stopped", "end").returncode == 0
    assert "PORTFWD_FWI" not in iptables_save(lab, "-legacy")


@pytest.mark.parametrize("variant", ["", "-legacy"], ids=["iptables-nft", "iptables-legacy"])
@pytest.mark.parametrize("content", ["empty", "foreign"])
def test_existing_portfwd_chain_is_content_checked_and_refilled(lab: Lab, pf: PortfwdHost,
                                                                variant: str, content: str) -> None:
    """A PORTFWD_FWI that exists already (left by a crash, or filled by someone) is not
    trusted by its name: portfwd fills it with exactly its accept before jumping to it."""
    lab.serve("tcp", [80])
    libvirt_iptables(lab, variant=variant)
    for tool in (f"iptables{variant}", f"ip6tables{variant}"):
        lab.ns(lab.host, tool, "-w", "-N", "PORTFWD_FWI")
        if content == "foreign":
            lab.ns(lab.host, tool, "-w", "-A", "PORTFWD_FWI", "-j", "DROP")
    pf.write_config(CONFIG)
    r = pf.hook("web1", "started")
    assert r.returncode == 0 and b"error" not in r.stderr, r.stderr
    assert lab.reach("tcp", HOST4, 8080) == f"tcp 80 {CLIENT4}"
    assert lab.reach("tcp", HOST6, 8080) == f"tcp 80 {CLIENT6}"
    chain = lab.ns(lab.host, f"iptables{variant}", "-S", "PORTFWD_FWI").stdout.decode()
    assert chain.splitlines()[1:] == [
        '-A PORTFWD_FWI -m conntrack --ctstate DNAT -m connmark --mark 0x1000000/0x1000000'
        ' -m comment --comment "portfwd: connections portfwd forwarded" -j ACCEPT']
    assert pf.hook("web1", "stopped", "end").returncode == 0
    assert "PORTFWD_FWI" not in iptables_save(lab, variant)


def test_foreign_chain_of_that_name_is_left_alone_when_unneeded(lab: Lab, pf: PortfwdHost) -> None:
    libvirt_iptables(lab)
    lab.ns(lab.host, "iptables", "-w", "-N", "PORTFWD_FWI")
    lab.ns(lab.host, "iptables", "-w", "-A", "PORTFWD_FWI", "-s", "198.51.100.7", "-j", "DROP")
    def rules() -> str:
        return lab.ns(lab.host, "iptables", "-S").stdout.decode()

    before = rules()
    assert pf.cli("flush").returncode == 0
    assert rules() == before and "-A PORTFWD_FWI -s 198.51.100.7/32 -j DROP" in before


def test_rule_with_portfwd_comment_is_touched_only_if_it_is_portfwds(lab: Lab,
                                                                      pf: PortfwdHost) -> None:
    """On libvirt's nftables backend portfwd finds its accept by comment *and* content:
    an admin's rule that happens to carry the comment "portfwd" stays where it is."""
    lab.serve("tcp", [80])
    lab.ns(lab.host, "nft", "-f", "-", input=LIBVIRT_NFT.encode())
    lab.ns(lab.host, "nft", "insert", "rule", "ip", "libvirt_network", "guest_input", "ip",
           "saddr", "198.51.100.7", "counter", "drop", "comment", '"portfwd"')
    pf.write_config(CONFIG)
    assert pf.hook("web1", "started").returncode == 0
    assert lab.reach("tcp", HOST4, 8080) == f"tcp 80 {CLIENT4}"
    assert pf.hook("web1", "stopped", "end").returncode == 0
    listing = lab.ns(lab.host, "nft", "list", "chain", "ip", "libvirt_network",
                     "guest_input").stdout.decode()
    assert [line.strip().split(" counter")[0] for line in listing.splitlines()
            if "portfwd" in line] == ["ip saddr 198.51.100.7"]


# Reconstruction (not firewalld's code) of the forward chain firewalld's nftables backend
# keeps in table inet firewalld; with StrictForwardPorts=no it holds `ct status dnat accept`.
FIREWALLD = """
table inet firewalld {
  chain filter_FORWARD {
    type filter hook forward priority filter + 10; policy accept;
    ct state established,related accept
    DNAT_RULE
    iifname "lo" accept
    reject with icmpx admin-prohibited
  }
}
"""


@pytest.mark.parametrize("strict", [True, False], ids=["StrictForwardPorts=yes", "no"])
def test_firewalld_strict_forward_ports(lab: Lab, pf: PortfwdHost, strict: bool) -> None:
    lab.serve("tcp", [80])
    ruleset = FIREWALLD.replace("DNAT_RULE", "" if strict else "ct status dnat accept")
    lab.ns(lab.host, "nft", "-f", "-", input=ruleset.encode())
    pf.write_config(CONFIG)
    r = pf.hook("web1", "started")
    assert r.returncode == 0
    firewall = json.loads(pf.cli("status", "--json").stdout)["firewall"]
    blocked = firewall["blocked"]
    assert any(line.startswith("firewalld: table inet firewalld, ") for line in firewall["seen"])
    if strict:
        assert lab.probe("tcp", HOST4, 8080) is None
        assert blocked == ["table inet firewalld chain filter_FORWARD: firewalld"
                           " (StrictForwardPorts=yes) rejects DNATed connections it was not told"
                           " about; declare the forwards to firewalld or set StrictForwardPorts=no"]
    else:
        assert lab.reach("tcp", HOST4, 8080) == f"tcp 80 {CLIENT4}"
        assert blocked == []


def test_a_held_xtables_lock_cannot_hold_a_guest_start(lab: Lab, pf: PortfwdHost,
                                                       tmp_path: "os.PathLike[str]") -> None:
    """Another program keeps iptables-legacy's lock (its own lock file here, through
    XTABLES_LOCKFILE, so that nothing else on the machine waits): the guest start
    ends within the hook's bound, says why libvirt's chain is not done, and keeps
    its records in step with the table; once the lock is free, reapply finishes."""
    import sys
    import time

    from pfhost import HOOK, LockHolder, domain_xml

    lab.serve("tcp", [80])
    libvirt_iptables(lab, variant="-legacy")
    pf.write_config(CONFIG)
    lock = os.path.join(str(tmp_path), "xtables.lock")
    pf.env["XTABLES_LOCKFILE"] = lock
    with LockHolder(str(tmp_path), lock):
        start = time.monotonic()
        r = subprocess.run(["ip", "netns", "exec", lab.host, sys.executable, "-I", HOOK, "web1",
                            "started", "begin", "-"], input=domain_xml("web1"),
                           capture_output=True, env=pf.env, timeout=120)
        took = time.monotonic() - start
    assert (r.returncode, r.stdout) == (0, b""), r.stderr
    err = r.stderr.decode()
    assert "another program held the xtables lock" in err and "Traceback" not in err, err
    assert took < 30, took  # bounded: ~2 s of lock wait, not forever
    # the records say what the table holds
    with open(os.path.join(pf.run_dir, "guests", "web1.json"), encoding="utf-8") as f:
        recorded = {(b[2][-2], b[2][-1]) for b in json.load(f)["bindings"]}
    live = {(k["concat"][-2], k["concat"][-1]) for elems in pf.targets().values()
            for k, _ in elems}
    assert recorded == live == {("tcp", 8080), ("udp", 5353)}
    assert "PORTFWD_FWI" not in iptables_save(lab, "-legacy")
    assert pf.cli("reapply").returncode == 0
    assert "-A LIBVIRT_FWI -o br0 -j PORTFWD_FWI" in iptables_save(lab, "-legacy")
    assert lab.reach("tcp", HOST4, 8080) == f"tcp 80 {CLIENT4}"
