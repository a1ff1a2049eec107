"""Port ranges kept as ranges: a 64k-port forward is a handful of elements, and
traffic still reaches every port of it (the DNAT keeps the destination port)."""

from __future__ import annotations

import itertools
import json
import time
from typing import Any, Dict, List

import pytest

from netlab import CLIENT4, CLIENT6, GUEST4, GUEST6, HOST4, HOST6, Lab
from pfhost import PortfwdHost, web1_config
from portfwd import config
from portfwd.config import portspec
from portfwd.errors import ConfigError

FULL = web1_config("1024-65535/tcp", "1024-65535/udp")
PROBED = [1024, 33333, 65535]  # the first, a middle and the last port of the range


def elements(pf: PortfwdHost) -> Dict[str, List[Any]]:
    return pf.elements()


def count(pf: PortfwdHost) -> int:
    return sum(len(e) for e in pf.elements().values())


@pytest.mark.kernel
def test_full_range_guest_is_four_elements_and_reaches_every_probed_port(lab: Lab,
                                                                       pf: PortfwdHost) -> None:
    lab.serve("tcp", PROBED)
    lab.serve("udp", PROBED)
    pf.write_config(FULL)
    assert pf.hook("web1", "prepare").returncode == 0  # compiles the configuration
    t0 = time.monotonic()
    r = pf.hook("web1", "started")
    took = time.monotonic() - t0
    assert (r.returncode, r.stdout) == (0, b""), r.stderr
    assert took < 2.0  # was 11.8 s when a range was stored port by port (bench/ has figures)
    found = elements(pf)
    assert sorted(found) == ["any4_range", "any6_range"]
    for name, target in (("any4_range", GUEST4), ("any6_range", GUEST6)):
        assert sorted((e[0]["elem"]["val"]["concat"][0], e[0]["elem"]["val"]["concat"][1]["range"],
                       e[1]) for e in found[name]) == [
            ("tcp", [1024, 65535], target), ("udp", [1024, 65535], target)]
    for (host, client), proto, port in itertools.product(((HOST4, CLIENT4), (HOST6, CLIENT6)),
                                                          ("tcp", "udp"), PROBED):
        assert lab.reach(proto, host, port) == f"{proto} {port} {client}"
    # one status row per range, not per port
    rows = json.loads(pf.cli("status", "--json", "--connect", "test:///default").stdout)["forwards"]
    assert sorted((row["proto"], row["listen"], row["target"], row["state"]) for row in rows) == [
        ("tcp", "*:1024-65535", f"{GUEST4}:1024-65535", "active"),
        ("tcp", "[*]:1024-65535", f"[{GUEST6}]:1024-65535", "active"),
        ("udp", "*:1024-65535", f"{GUEST4}:1024-65535", "active"),
        ("udp", "[*]:1024-65535", f"[{GUEST6}]:1024-65535", "active"),
    ]
    t0 = time.monotonic()
    r = pf.hook("web1", "stopped", "end")
    took = time.monotonic() - t0
    assert (r.returncode, r.stdout) == (0, b""), r.stderr
    assert took < 2.0
    assert count(pf) == 0
    for host in (HOST4, HOST6):
        assert lab.probe("tcp", host, 33333) is None
        assert lab.probe("udp", host, 1024) is None


@pytest.mark.kernel
def test_ranges_with_listen_and_from_reach_the_guest(lab: Lab, pf: PortfwdHost) -> None:
    lab.serve("udp", [5000, 5003, 6000, 6003])
    lab.ns(lab.host, "ip", "addr", "add", "203.0.113.9/24", "dev", "uplink")
    lab.ns(lab.host, "ip", "addr", "add", "2001:db8:1::9/64", "dev", "uplink", "nodad")
    pf.write_config(f"""
[[forward]]
guest = "web1"
ipv4 = "{GUEST4}"
ipv6 = "{GUEST6}"
ports = [
  {{ host = "5000-5003", guest = "5000-5003", proto = "udp", listen = ["203.0.113.9", "2001:db8:1::9"] }},
  {{ host = "6000-6003", guest = "6000-6003", proto = "udp", from = ["203.0.113.0/24", "2001:db8:1::/64"] }},
  {{ host = "6004-6005", guest = "6004-6005", proto = "udp", from = ["198.51.100.0/24", "2001:db8:2::/64"] }},
]
""")
    r = pf.hook("web1", "started")
    assert r.returncode == 0, r.stderr
    assert {name: len(e) for name, e in elements(pf).items()} == {
        "fwd4_range": 1, "fwd6_range": 1, "src4_range": 2, "src6_range": 2}
    for listen, host, client in (("203.0.113.9", HOST4, CLIENT4),
                                 ("2001:db8:1::9", HOST6, CLIENT6)):
        for port in (5000, 5003):
            assert lab.reach("udp", listen, port) == f"udp {port} {client}"
        assert lab.probe("udp", host, 5000) is None  # another local address
        for port in (6000, 6003):
            assert lab.reach("udp", host, port) == f"udp {port} {client}"
        assert lab.probe("udp", host, 6004) is None  # not from this client's network
    rows = json.loads(pf.cli("status", "--json", "--connect", "test:///default").stdout)["forwards"]
    assert len(rows) == 6 and {row["state"] for row in rows} == {"active"}
    assert pf.hook("web1", "stopped", "end").returncode == 0
    assert count(pf) == 0


@pytest.mark.kernel
def test_sync_dry_run_and_sync_keep_ranges_whole(pf: PortfwdHost) -> None:
    """libvirt's test driver always runs a domain named "test"."""
    pf.write_config(FULL.replace('"web1"', '"test"')
                    + web1_config("80").replace('"web1"', '"stopped-guest"'))
    r = pf.cli("sync", "--connect", "test:///default", "--dry-run")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.decode().splitlines()
    assert lines[0].startswith("# table inet portfwd, 1 running guest: dry run")
    assert f"+ test\tudp\t[*]:1024-65535 -> [{GUEST6}]:1024-65535\tfrom *" in "\n".join(lines)
    assert lines[-1] == "added 4, removed 0, unchanged 0"
    assert pf.table() is None
    r = pf.cli("sync", "--connect", "test:///default")
    assert r.returncode == 0, r.stderr
    assert count(pf) == 4
    rows = json.loads(pf.cli("status", "--json", "--connect", "test:///default").stdout)["forwards"]
    assert sorted((row["guest"], row["listen"], row["state"]) for row in rows) == [
        ("stopped-guest", "*:80", "guest not running"),
        ("stopped-guest", "[*]:80", "guest not running"),
        ("test", "*:1024-65535", "active"), ("test", "*:1024-65535", "active"),
        ("test", "[*]:1024-65535", "active"), ("test", "[*]:1024-65535", "active"),
    ]
    with open(f"{pf.run_dir}/guests/test.json", encoding="utf-8") as f:
        recorded = json.load(f)
    assert len(recorded["bindings"]) == 4
    assert {tuple(b[2]) for b in recorded["bindings"]} == {("tcp", "1024-65535"),
                                                           ("udp", "1024-65535")}
    # a flushed rule set shows the ranges as missing; reapply brings them back
    pf.lab.ns(pf.lab.host, "nft", "flush", "ruleset")
    rows = json.loads(pf.cli("status", "--json", "--connect", "test:///default").stdout)["forwards"]
    assert {row["state"] for row in rows if row["guest"] == "test"} == {"missing"}
    assert pf.cli("reapply").returncode == 0
    assert count(pf) == 4
    assert pf.cli("flush").returncode == 0


# -- configuration ----------------------------------------------------------

LISTEN = {"listen": ', listen = ["203.0.113.5"]', "every": "", "from": ', from = ["198.51.100.0/24"]'}


@pytest.mark.parametrize("single, wide", list(itertools.product(LISTEN, LISTEN)))
def test_range_overlapping_a_single_port_of_another_guest_is_refused(single: str,
                                                                      wide: str) -> None:
    text = f"""
[[forward]]
guest = "a"
ipv4 = "192.168.150.10"
ports = [{{ host = 8080, guest = 80{LISTEN[single]} }}]

[[forward]]
guest = "b"
ipv4 = "192.168.150.11"
ports = [{{ host = "1024-65535", guest = "1024-65535"{LISTEN[wide]} }}]
"""
    with pytest.raises(ConfigError) as e:
        config.parse(text, "f.toml")
    assert len(e.value.lines) == 1
    assert "host port 8080/tcp on " in e.value.lines[0]
    assert "is claimed twice: here for b and at f.toml:5:" in e.value.lines[0]


def test_range_and_single_port_on_different_addresses_or_protocols_coexist() -> None:
    parsed = config.parse("""
[[forward]]
guest = "a"
ipv4 = "192.168.150.10"
ports = [{ host = 8080, guest = 80, listen = ["203.0.113.5"] }, "53/udp"]

[[forward]]
guest = "b"
ipv4 = "192.168.150.11"
ports = [{ host = "1024-65535", guest = "1024-65535", listen = ["203.0.113.6"] }, "1-1000/tcp"]
""", "f.toml")
    assert len(parsed.forwards) == 2


def test_large_shifted_range_is_refused_with_what_to_write() -> None:
    limit = portspec.SHIFTED_MAX
    assert portspec.parse(f"2000-{2000 + limit - 1}:3000-{3000 + limit - 1}").count == limit
    with pytest.raises(ConfigError) as e:
        config.parse('[[forward]]\nguest = "a"\nipv4 = "192.168.150.10"\n'
                     'ports = ["10000-20000:20000-30000/udp"]\n', "f.toml")
    line, = e.value.lines
    assert line.startswith("f.toml:4:")
    assert f"at most {limit} ports, this one 10001" in line
    assert "nftables cannot shift a port range" in line
    assert '"20000-30000" is one element' in line
    # the same ports on both sides are one element, whatever the size
    assert portspec.parse("1-65535/udp").count == 65535
