"""Address discovery from libvirt's files: domain XML, network XML, dnsmasq leases."""

from __future__ import annotations

import json
import os
from typing import Any, Dict, List

import pytest

from portfwd.libvirt.discover import Resolver, read_network
from portfwd.libvirt.domainxml import parse
from portfwd.host.evidence import NUD_REACHABLE, Evidence
from portfwd.host.hostnet import RouteTable
from portfwd.plan.resolve import resolve
from portfwd.plan import Binding
from portfwd.values import PortSpan, Reason, Selector

# the routes of a host with these networks up: virbr0 192.168.122.0/24, virbr6
# 192.168.150.0/24 and fd00:150::/64 (as /proc/net/route and /proc/net/ipv6_route print them)
ROUTES = RouteTable(
    "Iface\tDestination\tGateway\tFlags\tRefCnt\tUse\tMetric\tMask\tMTU\tWindow\tIRTT\n"
    "virbr0\t007AA8C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n"
    "virbr6\t0096A8C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n",
    "fd000150000000000000000000000000 40 00000000000000000000000000000000 00"
    " 00000000000000000000000000000000 00000100 00000001 00000000 00000001 virbr6\n")
HOST = {"192.168.122.1", "192.168.150.1", "fd00:150::1"}
# web1's NICs on libvirt networks: MAC → (bridge, tap)
NICS = {"52:54:00:aa:00:01": ("virbr0", "vnet0"), "52:54:00:aa:00:02": ("virbr6", "vnet1")}


def proof(*owned: "tuple[str, str]") -> Evidence:
    """The kernel's evidence that each (address, MAC) is that NIC's: a reachable
    neighbour entry on its bridge with that MAC, and every NIC's MAC learned on its tap."""
    return Evidence([(NICS[mac][0], address, mac, NUD_REACHABLE) for address, mac in owned],
                    [(bridge, tap, mac, NUD_REACHABLE) for mac, (bridge, tap) in NICS.items()])


# the addresses these tests find for web1's NICs, as the host's neighbour table knows them
KNOWN = proof(("192.168.122.50", "52:54:00:aa:00:01"), ("192.168.122.9", "52:54:00:aa:00:01"),
              *[(a, "52:54:00:aa:00:02") for a in ("192.168.150.10", "192.168.150.11",
                                                   "192.168.150.44", "fd00:150::77",
                                                   "fd00:150::10", "fd00:150::42")])


def resolver(files: "tuple[str, str]", **kwargs: object) -> Resolver:
    """A resolver over the test's files, this fake host's routes, addresses and
    neighbour table and FDB."""
    nets, leases = files
    kwargs.setdefault("routes", ROUTES)
    kwargs.setdefault("local", HOST)
    kwargs.setdefault("evidence", KNOWN)
    return Resolver("web1", DOMAIN, lease_dir=leases, network_dirs=(nets,), **kwargs)  # type: ignore[arg-type]

DOMAIN = b"""<domain type='qemu' id='3'>
  <name>web1</name>
  <devices>
    <interface type='bridge'>
      <mac address='52:54:00:00:00:09'/>
      <source bridge='br-lan'/>
    </interface>
    <interface type='network'>
      <mac address='52:54:00:AA:00:01'/>
      <source network='default' portid='x' bridge='virbr0'/>
      <target dev='vnet0'/>
    </interface>
    <interface type='network'>
      <mac address='52:54:00:aa:00:02'/>
      <source network='v6net' bridge='virbr6'/>
      <target dev='vnet1'/>
    </interface>
  </devices>
</domain>"""

NETWORK_STATUS = """<networkstatus>
  <class_id bitmap='0-2'/>
  <network>
    <name>default</name>
    <bridge name='virbr0' stp='on' delay='0'/>
    <ip address='192.168.122.1' netmask='255.255.255.0'>
      <dhcp>
        <range start='192.168.122.2' end='192.168.122.254'/>
        <host mac='52:54:00:aa:00:01' name='web1' ip='192.168.122.50'/>
      </dhcp>
    </ip>
  </network>
</networkstatus>"""

V6_NETWORK = """<network>
  <name>v6net</name>
  <bridge name='virbr6'/>
  <ip address='192.168.150.1' prefix='24'/>
  <ip family='ipv6' address='fd00:150::1' prefix='64'>
    <dhcp>
      <range start='fd00:150::100' end='fd00:150::1ff'/>
      <host id='0:3:0:1:52:54:0:aa:0:2' ip='fd00:150::77'/>
    </dhcp>
  </ip>
</network>"""


def lay_out(base: str, v6net: str = V6_NETWORK) -> "tuple[str, str]":
    """libvirt's network files and an empty lease folder below ``base``."""
    nets = os.path.join(base, "networks")
    leases = os.path.join(base, "dnsmasq")
    os.mkdir(nets)
    os.mkdir(leases)
    for name, text in (("default", NETWORK_STATUS), ("v6net", v6net)):
        with open(os.path.join(nets, f"{name}.xml"), "w") as f:
            f.write(text)
    return nets, leases


@pytest.fixture
def files(tmp_path: "os.PathLike[str]") -> "tuple[str, str]":
    return lay_out(str(tmp_path))


def write_leases(folder: str, bridge: str, entries: List[Dict[str, Any]]) -> None:
    with open(os.path.join(folder, f"{bridge}.status"), "w") as f:
        json.dump(entries, f)


def test_domain_nics() -> None:
    nics = [(n.mac, n.network, n.bridge) for n in parse(DOMAIN).nics]
    assert nics == [("52:54:00:00:00:09", None, "br-lan"),
                    ("52:54:00:aa:00:01", "default", "virbr0"),
                    ("52:54:00:aa:00:02", "v6net", "virbr6")]
    assert parse(b"<domain").nics == ()


def test_network_files(files: "tuple[str, str]") -> None:
    nets, _ = files
    net = read_network("default", (nets,))
    assert net is not None and net.bridge == "virbr0"
    assert net.hosts4 == {"52:54:00:aa:00:01": "192.168.122.50"}
    v6 = read_network("v6net", (nets,))
    assert v6 is not None and v6.prefix6 is not None and v6.prefix6[1] == 64
    assert read_network("missing", (nets,)) is None


def test_reservation_comes_before_lease(files: "tuple[str, str]") -> None:
    nets, leases = files
    write_leases(leases, "virbr0", [{"ip-address": "192.168.122.9",
                                     "mac-address": "52:54:00:aa:00:01", "expiry-time": 2e9}])
    r = resolver(files, now=1e9)
    # the default NIC is the first one on a libvirt network, not the bridged one
    assert r.resolve(Selector(""), 4) == ("192.168.122.50", "reservation on network default")


def test_lease_newest_unexpired_wins_and_mac_case_is_ignored(files: "tuple[str, str]") -> None:
    nets, leases = files
    write_leases(leases, "virbr6", [
        {"ip-address": "192.168.150.10", "mac-address": "52:54:00:AA:00:02", "expiry-time": 100},
        {"ip-address": "192.168.150.11", "mac-address": "52:54:00:aa:00:02", "expiry-time": 3000},
        {"ip-address": "192.168.150.12", "mac-address": "52:54:00:aa:00:02", "expiry-time": 2000},
        {"ip-address": "192.168.150.13", "mac-address": "52:54:00:aa:00:03", "expiry-time": 9000},
        {"ip-address": "fd00:150::1aa", "iaid": "1", "client-id": "00:03:00:01:52:54:00:aa:00:02",
         "expiry-time": 3000},
    ])
    r = resolver(files, now=1000)
    assert r.resolve(Selector("52:54:00:aa:00:02"), 4) == ("192.168.150.11", "lease on virbr6")
    later = resolver(files, now=5000)
    assert isinstance(later.resolve(Selector("52:54:00:aa:00:02"), 4), Reason)


def test_ipv6_reservation_by_duid_and_suffix(files: "tuple[str, str]") -> None:
    nets, leases = files
    r = resolver(files)
    assert r.resolve(Selector("52:54:00:aa:00:02"), 6) == ("fd00:150::77", "reservation on network v6net")
    assert r.resolve(Selector("52:54:00:aa:00:02", "::10"), 6) == ("fd00:150::10",
                                                                  "suffix on network v6net")
    why = r.resolve(Selector("", "::10"), 6)  # the default NIC's network has no IPv6
    assert isinstance(why, Reason) and why.cause == Reason.WAITING and "has no IPv6 range" in why.text


def test_reasons_when_nothing_is_known(files: "tuple[str, str]") -> None:
    nets, leases = files
    r = resolver(files)
    assert r.resolve(Selector("52:54:00:aa:00:02"), 4) == Reason(
        Reason.WAITING, "no IPv4 address yet for NIC 52:54:00:aa:00:02 on network v6net")
    assert r.resolve(Selector("52:54:00:ff:ff:ff"), 4) == Reason(
        Reason.WAITING, "the domain has no NIC with MAC 52:54:00:ff:ff:ff")


def test_libvirt_lookup_is_the_last_source(files: "tuple[str, str]") -> None:
    nets, leases = files
    asked = []

    def lookup(mac: str, family: int) -> "tuple[str, str] | None":
        asked.append((mac, family))
        return ("192.168.150.44", "guest agent") if family == 4 else None

    r = resolver(files, lookup=lookup)
    assert r.resolve(Selector("52:54:00:aa:00:02"), 4) == ("192.168.150.44", "guest agent")
    assert r.resolve(Selector(""), 4) == ("192.168.122.50", "reservation on network default")
    assert asked == [("52:54:00:aa:00:02", 4)]


def test_resolve_splits_known_and_pending(files: "tuple[str, str]") -> None:
    nets, leases = files
    r = resolver(files)
    known = Binding("any", 4, ("tcp", PortSpan(8080)), Selector(), 80, "web1", "c")
    waiting = Binding("any", 4, ("tcp", PortSpan(8081)), Selector("52:54:00:aa:00:02"), 80, "web1", "c")
    fixed = Binding("any", 4, ("tcp", PortSpan(8082)), "192.0.2.1", 80, "web1", "c")
    st = resolve([known, waiting, fixed], r)
    assert [b.target for b in st.bindings] == ["192.168.122.50", "192.0.2.1"]
    assert [(b.key, str(why)) for b, why in st.pending] == [
        (("tcp", PortSpan(8081)), "no IPv4 address yet for NIC 52:54:00:aa:00:02 on network v6net")]
    assert st.address_from == {"192.168.122.50": "reservation on network default"}
