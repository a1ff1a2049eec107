"""Discovered addresses are untrusted input: what a lease file, the guest agent or
the ARP table says becomes a DNAT target only if it is this guest's unicast
address inside its libvirt network, routed out of that network's bridge, not
the host's own and not another guest's."""

from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Optional, Tuple, Union

import pytest

from portfwd.libvirt import libvirtapi
from portfwd.libvirt.discover import Resolver, canonical, canonical_keys, duid_mac
from portfwd.host.evidence import (NUD_DELAY, NUD_FAILED, NUD_INCOMPLETE, NUD_NOARP, NUD_PERMANENT,
                              NUD_PROBE, NUD_REACHABLE, NUD_STALE, Evidence)
from portfwd.plan.claims import refuse_shared_discoveries
from portfwd.plan import Binding
from portfwd.values import Cause, PortSpan, Reason, Selector
from portfwd.rundir.record import GuestState
from test_discover import DOMAIN, HOST, KNOWN, ROUTES, V6_NETWORK, lay_out

VICTIM = "52:54:00:aa:00:02"  # web1's NIC on v6net (virbr6: 192.168.150.0/24, fd00:150::/64)


@pytest.fixture
def files(tmp_path: "os.PathLike[str]") -> "tuple[str, str]":
    """The networks of test_discover, without the IPv6 reservation of web1's NIC."""
    return lay_out(str(tmp_path), V6_NETWORK.replace(
        "<host id='0:3:0:1:52:54:0:aa:0:2' ip='fd00:150::77'/>", ""))


def lease_file(leases: str, entries: List[Dict[str, Any]]) -> None:
    with open(os.path.join(leases, "virbr6.status"), "w") as f:
        json.dump(entries, f)


def found(files: "tuple[str, str]", family: int, **kwargs: Any) -> Tuple[Optional[str], str]:
    nets, leases = files
    kwargs.setdefault("routes", ROUTES)
    kwargs.setdefault("local", HOST)
    kwargs.setdefault("evidence", KNOWN)
    r = Resolver("web1", DOMAIN, lease_dir=leases, network_dirs=(nets,), now=1000, **kwargs)
    return outcome(r.resolve(Selector(VICTIM), family))


def outcome(hit: Union[Tuple[str, str], Reason]) -> Tuple[Optional[str], str]:
    """(address, source), or (None, why) where a refusal is REFUSED and the rest WAITING."""
    if isinstance(hit, Reason):
        assert hit.cause == (Reason.REFUSED if hit.text.startswith("refused ") else Reason.WAITING)
        return None, hit.text
    return hit


@pytest.mark.parametrize("address, why", [
    ("10.9.9.9", "outside the IPv4 prefix of network v6net"),
    ("192.168.122.50", "outside the IPv4 prefix of network v6net"),  # another network
    ("192.168.150.1", "an address of the host itself"),
    ("127.0.0.1", "not a unicast address"),
    ("169.254.1.1", "not a unicast address"),
    ("224.0.0.1", "not a unicast address"),
    ("192.168.150.0", "the network or broadcast address of network v6net"),
    ("192.168.150.255", "the network or broadcast address of network v6net"),
    ("fe80::1", "not a unicast address"),
    ("::1", "not a unicast address"),
    ("ff02::1", "not a unicast address"),
    ("2001:db8::5", "outside the IPv6 prefix of network v6net"),
    ("fd00:150::1", "an address of the host itself"),
])
def test_crafted_lease_addresses_are_refused(files: "tuple[str, str]", address: str,
                                             why: str) -> None:
    lease_file(files[1], [{"ip-address": address, "mac-address": VICTIM, "expiry-time": 3000}])
    got, reason = found(files, 6 if ":" in address else 4)
    assert got is None
    assert reason.startswith(f"refused {address} from lease on virbr6: {why}")


def test_a_good_lease_is_taken(files: "tuple[str, str]") -> None:
    lease_file(files[1], [{"ip-address": "192.168.150.10", "mac-address": VICTIM,
                           "expiry-time": 3000}])
    assert found(files, 4) == ("192.168.150.10", "lease on virbr6")


def test_address_not_routed_out_of_the_bridge_is_refused(files: "tuple[str, str]") -> None:
    """An address inside the network's prefix that the host routes elsewhere (a more
    specific route someone added) is not the guest's."""
    from portfwd.host.hostnet import RouteTable

    routes = RouteTable(
        "Iface\tDestination\tGateway\tFlags\tRefCnt\tUse\tMetric\tMask\tMTU\tWindow\tIRTT\n"
        "virbr6\t0096A8C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n"
        "eth9\t0A96A8C0\t00000000\t0001\t0\t0\t0\tFFFFFFFF\t0\t0\t0\n", "")
    lease_file(files[1], [{"ip-address": "192.168.150.10", "mac-address": VICTIM,
                           "expiry-time": 3000}])
    got, why = found(files, 4, routes=routes)
    assert got is None and "routed out of eth9, not bridge virbr6" in why


def test_ipv6_lease_of_another_mac_whose_client_id_ends_with_the_victims_mac(
        files: "tuple[str, str]") -> None:
    """The attacker's DHCPv6 client-id is its own choice: a DUID-LL ending in the
    victim's MAC must not make the victim's forward lead to the attacker."""
    lease_file(files[1], [
        {"ip-address": "fd00:150::666", "mac-address": "52:54:00:66:66:66", "iaid": "1",
         "client-id": "00:03:00:01:" + VICTIM, "expiry-time": 3000},
        {"ip-address": "fd00:150::667", "iaid": "1",  # no MAC known: the DUID alone decides
         "client-id": "00:03:00:01:" + VICTIM, "expiry-time": 3000},
        {"ip-address": "fd00:150::668", "mac-address": "52:54:00:66:66:66", "iaid": "1",
         "client-id": "ff:00:00:00:00:03:00:01:" + VICTIM, "expiry-time": 3000},
    ])
    got, why = found(files, 6)
    assert got is None and why == f"no IPv6 address yet for NIC {VICTIM} on network v6net"
    # the victim's own lease (the MAC dnsmasq saw) is found
    lease_file(files[1], [{"ip-address": "fd00:150::10", "mac-address": VICTIM, "iaid": "9",
                           "client-id": "00:04:aa:bb", "expiry-time": 3000}])
    assert found(files, 6) == ("fd00:150::10", "lease on virbr6")


def test_ipv6_lease_by_a_duid_the_network_reserves(files: "tuple[str, str]") -> None:
    nets, leases = files
    with open(os.path.join(nets, "v6net.xml"), "w") as f:
        f.write(V6_NETWORK.replace("<host id='0:3:0:1:52:54:0:aa:0:2' ip='fd00:150::77'/>",
                                   "<host id='0:4:1:2:3:4' name='web1' ip='fd00:150::42'/>"))
    lease_file(leases, [{"ip-address": "fd00:150::42", "iaid": "1", "client-id": "00:04:01:02:03:04",
                         "expiry-time": 3000}])
    assert found(files, 6) == ("fd00:150::42", "reservation on network v6net")
    # with reservations left out of [options] discover, the lease of that DUID is found
    assert found(files, 6, discover=("lease",)) == ("fd00:150::42", "lease on virbr6")


def test_duid_mac_reads_only_whole_link_layer_addresses() -> None:
    assert duid_mac("0:3:0:1:52:54:0:aa:0:2") == VICTIM
    assert duid_mac("00:01:00:01:2a:2b:2c:2d:52:54:00:aa:00:02") == VICTIM  # DUID-LLT
    assert duid_mac("ff:00:03:00:01:52:54:00:aa:00:02") is None
    assert duid_mac("00:02:00:00:00:09:52:54:00:aa:00:02") is None  # DUID-EN
    assert duid_mac("zz") is None


def test_address_reserved_for_another_mac_or_used_by_another_guest(
        files: "tuple[str, str]") -> None:
    nets, leases = files
    with open(os.path.join(nets, "v6net.xml"), "w") as f:
        f.write(V6_NETWORK.replace("<range", "<host mac='52:54:00:77:77:77' ip='192.168.150.77'/>"
                                             "<range").replace("family='ipv6' ", "family='ipv6' "))
    # the reservation sits in the IPv6 <dhcp>, which does not reserve IPv4: use the v4 <ip>
    with open(os.path.join(nets, "v6net.xml"), "w") as f:
        f.write(V6_NETWORK.replace("<ip address='192.168.150.1' prefix='24'/>",
                                   "<ip address='192.168.150.1' prefix='24'><dhcp>"
                                   "<host mac='52:54:00:77:77:77' ip='192.168.150.77'/>"
                                   "</dhcp></ip>"))
    lease_file(leases, [{"ip-address": "192.168.150.77", "mac-address": VICTIM,
                         "expiry-time": 3000}])
    got, why = found(files, 4)
    assert got is None and "reserved on network v6net for MAC 52:54:00:77:77:77" in why
    lease_file(leases, [{"ip-address": "192.168.150.30", "mac-address": VICTIM,
                         "expiry-time": 3000}])
    nets, leases = files
    r = Resolver("web1", DOMAIN, lease_dir=leases, network_dirs=(nets,), now=1000,
                 routes=ROUTES, local=HOST, evidence=KNOWN, taken={"192.168.150.30": "db1"})
    got, why = outcome(r.resolve(Selector(VICTIM), 4))
    assert got is None and why.endswith("the address of guest db1")


def test_a_newer_lease_of_another_client_on_the_same_address_wins(
        files: "tuple[str, str]") -> None:
    lease_file(files[1], [
        {"ip-address": "192.168.150.10", "mac-address": VICTIM, "expiry-time": 2000},
        {"ip-address": "192.168.150.10", "mac-address": "52:54:00:66:66:66", "expiry-time": 3000},
    ])
    assert found(files, 4)[0] is None


def test_two_running_guests_discovering_one_address_get_neither() -> None:
    def state(guest: str, target: str, discovered: bool) -> GuestState:
        b = Binding("any", 4, ("tcp", PortSpan(80 if guest == "a" else 81)), target, 80, guest, guest)
        return GuestState(guest, None, "portfwd", [b], [],
                          {target: "lease on virbr6"} if discovered else {})

    wanted = {"a": state("a", "192.168.150.10", True), "b": state("b", "192.168.150.10", True),
              "c": state("c", "192.168.150.11", True)}
    refuse_shared_discoveries(wanted)
    assert [len(wanted[g].bindings) for g in "abc"] == [0, 0, 1]
    assert str(wanted["a"].pending[0][1]) == ("refused 192.168.150.10 from lease on virbr6: also the"
                                         " address of guest b")


class FakeLibvirt:
    """The constants of libvirt-python's interfaceAddresses, and its error type."""

    VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_LEASE = 0
    VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_AGENT = 1
    VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_ARP = 2
    VIR_IP_ADDR_TYPE_IPV4 = 0
    VIR_IP_ADDR_TYPE_IPV6 = 1

    class libvirtError(Exception):
        pass


class FakeDomain:
    """A domain whose agent claims an address: what libvirt would pass on."""

    def __init__(self) -> None:
        self.asked: List[int] = []

    def interfaceAddresses(self, source: int, flags: int) -> Dict[str, Any]:
        self.asked.append(source)
        if source != FakeLibvirt.VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_AGENT:
            return {}
        return {"eth0": {"hwaddr": VICTIM, "addrs": [{"type": 0, "addr": "192.168.150.99"}]}}


@pytest.mark.parametrize("allowed, expected", [
    (("reservation", "lease"), None),
    (("reservation", "lease", "agent"), ("192.168.150.99", "guest agent")),
])
def test_agent_and_arp_are_asked_only_when_listed(allowed: Tuple[str, ...],
                                                  expected: Optional[Tuple[str, str]]) -> None:
    dom = FakeDomain()
    lookup = libvirtapi._lookup(FakeLibvirt, dom, allowed)
    assert lookup(VICTIM, 4) == expected
    assert (FakeLibvirt.VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_AGENT in dom.asked) == ("agent" in allowed)
    assert FakeLibvirt.VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_ARP not in dom.asked
    calls = len(dom.asked)
    lookup(VICTIM, 6)
    assert len(dom.asked) == calls  # asked once, up front: never later, under the lock


def test_a_host_port_two_running_guests_claim_stays_with_the_first() -> None:
    from portfwd.plan.claims import refuse_shared_keys

    def state(guest: str) -> GuestState:
        b = Binding("fwd", 4, ("203.0.113.1", "tcp", PortSpan(8080)), "192.168.150.10", 80, guest, guest)
        return GuestState(guest, None, "portfwd", [b])

    wanted = {"web2": state("web2"), "web1": state("web1")}
    refuse_shared_keys(wanted)
    assert [len(wanted[g].bindings) for g in ("web1", "web2")] == [1, 0]
    assert str(wanted["web2"].pending[0][1]).startswith(
        "host port 203.0.113.1:8080/tcp is held by guest web1")


def test_a_range_and_a_port_inside_it_claimed_at_run_time_stay_with_one_guest() -> None:
    from portfwd.plan.claims import refuse_shared_keys

    def state(guest: str, port: "int | str") -> GuestState:
        ports = PortSpan.from_json(port)
        b = Binding("fwd", 4, ("203.0.113.1", "tcp", ports), "192.168.150.10", ports.first,
                    guest, guest)
        return GuestState(guest, None, "portfwd", [b])

    wanted = {"a": state("a", "5000-5010"), "b": state("b", 5005), "c": state("c", 5011)}
    refuse_shared_keys(wanted)
    assert [len(wanted[g].bindings) for g in "abc"] == [1, 0, 1]
    assert "is held by guest a" in str(wanted["b"].pending[0][1])


# -- evidence: the host's neighbour table and the bridge's FDB (given, as the kernel's) ----

LEASE = {"ip-address": "192.168.150.10", "mac-address": VICTIM, "expiry-time": 3000}
OTHER = "52:54:00:66:66:66"


def with_kernel(files: "tuple[str, str]", neighbours: List[Tuple[str, str, str, int]],
                fdb: List[Tuple[str, str, str, int]], kept: Tuple[str, ...] = ()
                ) -> Tuple[Optional[str], str, Resolver]:
    """The lease LEASE resolved against this neighbour table and FDB."""
    nets, leases = files
    lease_file(leases, [LEASE])
    r = Resolver("web1", DOMAIN, lease_dir=leases, network_dirs=(nets,), now=1000,
                 routes=ROUTES, local=HOST, evidence=Evidence(neighbours, fdb), kept=set(kept))
    hit = r.resolve(Selector(VICTIM), 4)
    got, why = (None, hit.text) if isinstance(hit, Reason) else hit
    return got, why, r


ON_TAP = [("virbr6", "vnet1", VICTIM, NUD_REACHABLE)]


@pytest.mark.parametrize("state", [NUD_REACHABLE, NUD_STALE, NUD_DELAY, NUD_PROBE,
                                   NUD_PERMANENT, NUD_NOARP])
def test_a_neighbour_entry_in_a_usable_state_is_evidence(files: "tuple[str, str]",
                                                         state: int) -> None:
    got, _, r = with_kernel(files, [("virbr6", "192.168.150.10", VICTIM, state)], ON_TAP)
    assert got == "192.168.150.10" and r.awaiting == []


@pytest.mark.parametrize("neighbours, fdb, cause, why", [
    ([], ON_TAP, Reason.WAITING,
     f"no neighbour entry for 192.168.150.10 with MAC {VICTIM} on virbr6 yet"),
    ([("virbr6", "192.168.150.10", VICTIM, NUD_INCOMPLETE)], ON_TAP, Reason.WAITING,
     f"no neighbour entry for 192.168.150.10 with MAC {VICTIM} on virbr6 yet"),
    ([("virbr6", "192.168.150.10", VICTIM, NUD_FAILED)], ON_TAP, Reason.WAITING,
     f"no neighbour entry for 192.168.150.10 with MAC {VICTIM} on virbr6 yet"),
    ([("virbr0", "192.168.150.10", VICTIM, NUD_REACHABLE)], ON_TAP, Reason.WAITING,
     f"no neighbour entry for 192.168.150.10 with MAC {VICTIM} on virbr6 yet"),  # other bridge
    ([("virbr6", "192.168.150.10", VICTIM, NUD_STALE)], [("virbr6", "vnet1", OTHER, 2)],
     Reason.WAITING, f"MAC {VICTIM} not seen on its tap vnet1 yet (forwarding database of"
                     " bridge virbr6)"),
    ([("virbr6", "192.168.150.10", OTHER, NUD_STALE)], ON_TAP, Reason.REFUSED,
     f"the host's neighbour entry for 192.168.150.10 on virbr6 has MAC {OTHER}, not this NIC's"
     f" {VICTIM}"),
    ([("virbr6", "192.168.150.10", VICTIM, NUD_STALE)], ON_TAP + [("virbr6", "vnet7", VICTIM, 2)],
     Reason.REFUSED, f"bridge virbr6's forwarding database has MAC {VICTIM} on vnet7, not only"
                     " on this NIC's tap vnet1"),
    ([("virbr6", "192.168.150.10", VICTIM, NUD_STALE)], [("virbr6", "vnet1", VICTIM, NUD_PERMANENT)],
     Reason.REFUSED, f"MAC {VICTIM} is the host's own address on vnet1 (bridge virbr6)"),
    ([("virbr6", "192.168.150.10", VICTIM, NUD_STALE)], [("br-other", "eth1", VICTIM, 2)],
     Reason.WAITING, f"virbr6 is not a Linux bridge (no forwarding database shows where MAC"
                     f" {VICTIM} is): set ipv4/ipv6 in forward.toml"),
])
def test_missing_or_contrary_evidence(files: "tuple[str, str]", neighbours: Any, fdb: Any,
                                      cause: Cause, why: str) -> None:
    got, text, r = with_kernel(files, neighbours, fdb)
    what = "refused" if cause == Reason.REFUSED else "unconfirmed"
    assert got is None and text == f"{what} 192.168.150.10 from lease on virbr6: {why}"
    assert r.awaiting == [("192.168.150.10", VICTIM, "virbr6", "vnet1")]
    # an address applied before stays without evidence, never against contrary evidence
    got, text, _ = with_kernel(files, neighbours, fdb, kept=("192.168.150.10",))
    assert (got is None) == (cause == Reason.REFUSED), text


def test_a_nic_without_a_tap_in_the_xml_cannot_be_proven(files: "tuple[str, str]") -> None:
    nets, leases = files
    lease_file(leases, [LEASE])
    r = Resolver("web1", DOMAIN.replace(b"<target dev='vnet1'/>", b""), lease_dir=leases,
                 network_dirs=(nets,), now=1000, routes=ROUTES, local=HOST, evidence=KNOWN)
    assert r.resolve(Selector(VICTIM), 4) == Reason(
        Reason.WAITING, "unconfirmed 192.168.150.10 from lease on virbr6: the domain XML names no"
                        f" tap (<target dev>) for NIC {VICTIM}")


# -- one NIC, one DHCP client -------------------------------------------------------------

@pytest.mark.parametrize("entries, taken", [
    ([("192.168.150.10", "01:" + VICTIM), ("192.168.150.11", "ff:00:01")], None),
    ([("192.168.150.10", "01:" + VICTIM), ("192.168.150.11", "")], None),
    ([("192.168.150.10", "01:" + VICTIM), ("192.168.150.11", "01:" + VICTIM.upper())],
     "192.168.150.11"),  # one client, two leases: the newest
    ([("192.168.150.10", ""), ("fd00:150::10", "00:03:00:01:" + VICTIM)],
     "192.168.150.10"),  # a DHCPv4 and a DHCPv6 client-id of one NIC differ by nature
])
def test_leases_of_one_mac_under_several_client_ids(files: "tuple[str, str]",
                                                    entries: List[Tuple[str, str]],
                                                    taken: Optional[str]) -> None:
    lease_file(files[1], [{"ip-address": a, "mac-address": VICTIM, "client-id": c,
                           "expiry-time": 2000 + i} for i, (a, c) in enumerate(entries)])
    got, why = found(files, 4)
    assert got == taken, why
    if taken is None:
        assert why == (
            f"refused the IPv4 leases of MAC {VICTIM} on virbr6: they are held under 2 different"
            " client-ids (one NIC is one DHCP client); waiting until only one is left (expired"
            " or released)")


def test_an_expired_lease_of_another_client_id_does_not_count(files: "tuple[str, str]") -> None:
    lease_file(files[1], [{"ip-address": "192.168.150.11", "mac-address": VICTIM,
                           "client-id": "ff:00:01", "expiry-time": 900},
                          dict(LEASE, **{"client-id": "01:" + VICTIM})])
    assert found(files, 4) == ("192.168.150.10", "lease on virbr6")


# -- canonical form -----------------------------------------------------------------------

@pytest.mark.parametrize("spelling", ["FD00:150::1", "fd00:150:0:0:0:0:0:1", "fd00:150::0001",
                                      "fd00:0150:0000:0000:0000:0000:0000:0001"])
def test_a_host_address_in_any_spelling_is_refused(files: "tuple[str, str]",
                                                   spelling: str) -> None:
    lease_file(files[1], [{"ip-address": spelling, "mac-address": VICTIM, "iaid": "1",
                           "client-id": "00:03:00:01:" + VICTIM, "expiry-time": 3000}])
    assert found(files, 6) == (None, "refused fd00:150::1 from lease on virbr6: an address of"
                                     " the host itself")
    # the host's addresses as given in any spelling, the lease's canonical
    lease_file(files[1], [{"ip-address": "fd00:150::1", "mac-address": VICTIM,
                           "expiry-time": 3000}])
    assert found(files, 6, local={spelling.upper()})[1].endswith("an address of the host itself")


def test_addresses_are_normalised_right_after_lookup(files: "tuple[str, str]") -> None:
    def agent(mac: str, family: int) -> Optional[Tuple[str, str]]:
        return ("FD00:150:0::0010", "guest agent") if family == 6 else (
            "192.168.150.010", "guest agent")

    assert found(files, 6, lookup=agent) == ("fd00:150::10", "guest agent")
    assert found(files, 4, lookup=agent) == (
        None, "refused 192.168.150.010 from guest agent: not an IPv4 address (inet_pton"
              " refuses it)")
    for bad in ("192.168.150.10 ", "0xc0.168.150.10", "3232273930", "192.168.150.10/24",
                "fd00:150::10%eth0", ""):
        assert canonical(bad, 4 if "." in bad or not bad else 6) is None, bad
    assert canonical("::FFFF:192.168.150.10", 6) == "::ffff:192.168.150.10"


def test_claimed_and_reserved_addresses_compare_canonically(files: "tuple[str, str]") -> None:
    nets, leases = files
    with open(os.path.join(nets, "v6net.xml"), "w") as f:
        f.write(V6_NETWORK.replace("<host id='0:3:0:1:52:54:0:aa:0:2' ip='fd00:150::77'/>",
                                   "<host id='0:3:0:1:52:54:0:aa:0:2' ip='FD00:150::0077'/>"))
    assert found(files, 6) == ("fd00:150::77", "reservation on network v6net")
    r = Resolver("web1", DOMAIN, lease_dir=leases, network_dirs=(nets,), now=1000,
                 routes=ROUTES, local=HOST, evidence=KNOWN,
                 taken=canonical_keys({"FD00:150::77": "db1"}))
    assert outcome(r.resolve(Selector(VICTIM), 6)) == (
        None, "refused fd00:150::77 from reservation on network v6net: the address of guest db1")


# -- the addresses running guests hold, forwards or not ----------------------------------

def test_a_running_guests_lease_or_reservation_is_claimed(files: "tuple[str, str]") -> None:
    nets, leases = files
    with open(os.path.join(nets, "v6net.xml"), "w") as f:
        f.write(V6_NETWORK.replace("<ip address='192.168.150.1' prefix='24'/>",
                                   "<ip address='192.168.150.1' prefix='24'><dhcp>"
                                   f"<host mac='{OTHER}' ip='192.168.150.10'/></dhcp></ip>"))

    def resolved(running: Dict[str, str]) -> Tuple[Optional[str], str]:
        r = Resolver("web1", DOMAIN, lease_dir=leases, network_dirs=(nets,), now=1000,
                     routes=ROUTES, local=HOST, evidence=KNOWN, running=running)
        return outcome(r.resolve(Selector(VICTIM), 4))

    lease_file(leases, [LEASE])
    assert resolved({OTHER: "db1", VICTIM: "web1"}) == (
        None, "refused 192.168.150.10 from lease on virbr6: the address of guest db1 (reserved"
              " on network v6net)")
    assert resolved({VICTIM: "web1"})[1].endswith("reserved on network v6net for MAC"
                                                  f" {OTHER}")  # db1 does not run
    with open(os.path.join(nets, "v6net.xml"), "w") as f:  # no reservation: leases alone
        f.write(V6_NETWORK)
    lease_file(leases, [dict(LEASE, **{"mac-address": OTHER, "expiry-time": 2000}), LEASE])
    assert resolved({OTHER: "db1", VICTIM: "web1"}) == (
        None, "refused 192.168.150.10 from lease on virbr6: the address of guest db1 (lease on"
              " virbr6)")
    assert resolved({VICTIM: "web1"}) == ("192.168.150.10", "lease on virbr6")
