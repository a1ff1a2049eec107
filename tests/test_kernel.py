"""Real traffic through the forward: client namespace → host namespace → guest namespace."""

from __future__ import annotations

import pytest

from netlab import CLIENT4, CLIENT6, GUEST4, GUEST6, HOST4, HOST6, Lab
from pfhost import DNAT_RULES, PortfwdHost, web1_config

pytestmark = pytest.mark.kernel

CONFIG = web1_config("8080:80", "5353:53/udp", "5000-5003/udp", "6000-6003:7000-7003")


@pytest.fixture
def served(lab: Lab) -> Lab:
    lab.serve("tcp", [80, 7000, 7001, 7002, 7003])
    lab.serve("udp", [53, 5000, 5001, 5002, 5003])
    return lab


@pytest.mark.parametrize("host, client", [(HOST4, CLIENT4), (HOST6, CLIENT6)], ids=["ipv4", "ipv6"])
def test_tcp_and_udp_reach_the_guest_until_stopped(served: Lab, pf: PortfwdHost, host: str,
                                                    client: str) -> None:
    pf.write_config(CONFIG)
    assert served.probe("tcp", host, 8080) is None  # nothing forwards before the hook
    assert pf.hook("web1", "started").returncode == 0
    # the guest answers from its own port and sees the client's own address
    assert served.reach("tcp", host, 8080) == f"tcp 80 {client}"
    assert served.reach("udp", host, 5353) == f"udp 53 {client}"
    assert pf.hook("web1", "stopped", "end").returncode == 0
    assert served.probe("tcp", host, 8080) is None
    assert served.probe("udp", host, 5353) is None


def test_started_then_reconnect_leaves_one_copy_that_works(served: Lab, pf: PortfwdHost) -> None:
    pf.write_config(CONFIG)
    assert pf.hook("web1", "started").returncode == 0
    first = pf.table()
    assert pf.hook("web1", "reconnect").returncode == 0
    assert pf.table() == first
    assert len(pf.rules()) == DNAT_RULES
    for host in (HOST4, HOST6):
        assert served.reach("tcp", host, 8080) is not None


def test_every_port_of_a_range_is_forwarded(served: Lab, pf: PortfwdHost) -> None:
    pf.write_config(CONFIG)
    assert pf.hook("web1", "started").returncode == 0
    for host in (HOST4, HOST6):
        for i in range(4):
            assert served.reach("udp", host, 5000 + i) == \
                f"udp {5000 + i} {CLIENT4 if host == HOST4 else CLIENT6}"
            assert served.reach("tcp", host, 6000 + i) == \
                f"tcp {7000 + i} {CLIENT4 if host == HOST4 else CLIENT6}"
        assert served.probe("udp", host, 5004) is None
        assert served.probe("tcp", host, 6004) is None


def test_listen_address_limits_where_the_forward_answers(served: Lab, pf: PortfwdHost) -> None:
    lab = served
    lab.ns(lab.host, "ip", "addr", "add", "203.0.113.9/24", "dev", "uplink")
    lab.ns(lab.host, "ip", "addr", "add", "2001:db8:1::9/64", "dev", "uplink")
    pf.write_config(f"""
[[forward]]
guest = "web1"
ipv4 = "{GUEST4}"
ipv6 = "{GUEST6}"
listen = ["203.0.113.9", "2001:db8:1::9"]
ports = ["8080:80"]
""")
    assert pf.hook("web1", "started").returncode == 0
    assert lab.reach("tcp", "203.0.113.9", 8080) == f"tcp 80 {CLIENT4}"
    assert lab.reach("tcp", "2001:db8:1::9", 8080) == f"tcp 80 {CLIENT6}"
    assert lab.probe("tcp", HOST4, 8080) is None
    assert lab.probe("tcp", HOST6, 8080) is None


def test_from_admits_listed_sources_only(served: Lab, pf: PortfwdHost) -> None:
    pf.write_config(f"""
[[forward]]
guest = "web1"
ipv4 = "{GUEST4}"
ipv6 = "{GUEST6}"
ports = [
  {{ host = 8080, guest = 80, from = ["203.0.113.0/24", "2001:db8:1::/64"] }},
  {{ host = 8081, guest = 80, from = ["198.51.100.0/24", "2001:db8:2::/64"] }},
]
""")
    assert pf.hook("web1", "started").returncode == 0
    for host, client in ((HOST4, CLIENT4), (HOST6, CLIENT6)):
        assert served.reach("tcp", host, 8080) == f"tcp 80 {client}"
        assert served.probe("tcp", host, 8081) is None


def test_port_taken_over_by_another_guest_after_config_change(served: Lab, pf: PortfwdHost) -> None:
    """web1 holds 8080 from an old config; web2 gets it in the new one and starts."""
    lab = served
    pf.write_config(f'[[forward]]\nguest = "web1"\nipv4 = "{GUEST4}"\nports = ["8080:80"]\n')
    assert pf.hook("web1", "started").returncode == 0
    pf.write_config(f'[[forward]]\nguest = "web2"\nipv4 = "{GUEST4}"\nports = ["8080:7000"]\n')
    r = pf.hook("web2", "started")
    assert r.returncode == 0
    assert "now belong to guest web2" in r.stderr.decode()
    assert lab.reach("tcp", HOST4, 8080) == f"tcp 7000 {CLIENT4}"
    assert pf.hook("web1", "stopped", "end").returncode == 0  # must not take web2's port away
    assert lab.reach("tcp", HOST4, 8080) == f"tcp 7000 {CLIENT4}"
