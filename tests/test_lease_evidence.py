"""A discovered address becomes a DNAT target only with the kernel's evidence that it is
its NIC's: the host's neighbour entry for it has the NIC's MAC, and the bridge has
learned that MAC on the NIC's tap alone. Real kernel: two stand-in guests on their
taps of one bridge, the hook as libvirt runs it, libvirt's files (network XML, lease
file, status files) at libvirt's paths in a private mount namespace.

    client ── host (br0: 192.168.150.1, fd00:150::1) ─┬─ vnet0 ── web1 (MA, .10, fd00:150::10)
                                                       └─ vnet1 ── db1  (MB, .11)
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any, Dict, Iterator, List, Tuple

import pytest

from netlab import (BRIDGE6, CLIENT4, GUEST4, GUEST6, HOST4, Lab, plug_and_wait, run,
                    standin_namespace)
from pfhost import HOOK, PortfwdHost

pytestmark = pytest.mark.kernel

MA, MB = "52:54:00:aa:00:0a", "52:54:00:bb:00:0b"
A4, B4 = GUEST4, "192.168.150.11"
FOREVER = 4_000_000_000  # a lease expiry far ahead
CONFIG = f'\n[[forward]]\nguest = "web1"\ninterface = "{MA}"\nports = ["8080:80"]\n'
# the hook's and sync's view of libvirt's files: the test's folders bound over libvirt's
MOUNT = ('mount --bind "$1" /etc/libvirt/qemu/networks && mount --bind "$2" /var/lib/libvirt'
         ' && shift 2 && exec "$@"')
# what `portfwd sync` does once libvirt has listed the running guests (NAME XMLFILE ...)
SYNC = """import sys
from portfwd.rundir import state
from portfwd.engine import wholehost
from portfwd.libvirt.discover import Resolver
from portfwd.engine import Engine
from portfwd.config.model import Guest
listed = [(n, open(p, "rb").read()) for n, p in zip(sys.argv[1::2], sys.argv[2::2])]
with state.locked():
    engine = Engine(state.config_path())
    wholehost.sync(engine, engine.compile(), [Guest(n) for n, _ in listed],
                resolvers={n: Resolver(n, x) for n, x in listed})
"""


def domain(name: str, network: str, mac: str, tap: str) -> bytes:
    return (f"<domain type='qemu' id='1'><name>{name}</name><devices>"
            f"<interface type='network'><mac address='{mac}'/>"
            f"<source network='{network}' bridge='br0'/><target dev='{tap}'/>"
            "</interface></devices></domain>").encode()


class Host:
    """netlab's lab with web1 (its guest, MAC MA on vnet0) and db1 (a second stand-in,
    MAC MB on vnet1) running, and libvirt's files for them."""

    def __init__(self, lab: Lab, pf: PortfwdHost, base: str) -> None:
        self.lab, self.pf = lab, pf
        self.network = f"pflab{os.getpid() % 100000}"  # no host's network has this name
        self.nets = os.path.join(base, "networks")
        self.varlib = os.path.join(base, "var-lib-libvirt")
        status = os.path.join(base, "status")
        for folder in (self.nets, os.path.join(self.varlib, "dnsmasq"), status):
            os.makedirs(folder)
        self.reserve()
        self.xml = {"web1": domain("web1", self.network, MA, "vnet0"),
                    "db1": domain("db1", self.network, MB, "vnet1")}
        self.xml_files: List[str] = []
        for name, xml in self.xml.items():
            path = os.path.join(status, f"{name}.xml")  # libvirt's status file: it runs
            with open(path, "wb") as f:
                f.write(b"<domstatus state='running'>" + xml + b"</domstatus>")
            self.xml_files += [name, path]
        pf.env["PORTFWD_QEMU_STATUS_DIR"] = status
        pf.write_config(CONFIG)
        lab.ns(lab.guest, "ip", "link", "set", "eth0", "address", MA)
        self.db1 = f"{lab.tag}d"
        standin_namespace(lab.ns, lab.host, self.db1, "vnet1", MB, B4, None)
        plug_and_wait(lab.ns, lab.host, "vnet1", "br0")
        lab.serve("tcp", [80])
        lab.serve("tcp", [80], ns=self.db1)

    def close(self) -> None:
        run("ip", "netns", "del", self.db1, check=False)

    def reserve(self, hosts4: str = "") -> None:
        """The network's XML, with these ``<host …/>`` in its IPv4 ``<dhcp>``."""
        with open(os.path.join(self.nets, f"{self.network}.xml"), "w") as f:
            f.write(f"""<network><name>{self.network}</name><bridge name='br0'/>
  <ip address='192.168.150.1' prefix='24'><dhcp>
    <range start='192.168.150.100' end='192.168.150.200'/>{hosts4}</dhcp></ip>
  <ip family='ipv6' address='{BRIDGE6}' prefix='64'><dhcp>
    <range start='fd00:150::100' end='fd00:150::1ff'/></dhcp></ip>
</network>""")

    def leases(self, *entries: Dict[str, Any]) -> None:
        """libvirt's lease file of br0 (expiring far ahead unless said)."""
        with open(os.path.join(self.varlib, "dnsmasq", "br0.status"), "w") as f:
            json.dump([dict({"expiry-time": FOREVER}, **e) for e in entries], f)

    def _in_files(self, *cmd: str, input: bytes = b"") -> "Any":
        return run("unshare", "-m", "--propagation", "private", "sh", "-c", MOUNT, "sh",
                   self.nets, self.varlib, "ip", "netns", "exec", self.lab.host, *cmd,
                   input=input, env=self.pf.env, check=False)

    def hook(self, guest: str = "web1", op: str = "started") -> None:
        r = self._in_files(sys.executable, "-I", HOOK, guest, op, "begin", "-",
                           input=self.xml[guest])
        assert r.returncode == 0 and b"Traceback" not in r.stderr, r.stderr

    def sync(self) -> None:
        r = self._in_files(sys.executable, "-c", SYNC, *self.xml_files)
        assert r.returncode == 0, r.stderr

    def rows(self, family: int = 4) -> List[Tuple[str, str]]:
        """(target, "STATE" or "STATE: REASON") of web1's forward of ``family``."""
        r = self.pf.cli("status", "--json")
        assert r.returncode == 0, r.stderr
        return [(row["target"], row["state"] + (f": {row['reason']}" if row["reason"] else ""))
                for row in json.loads(r.stdout)["forwards"]
                if row["guest"] == "web1" and row["family"] == family]

    def targets(self) -> List[str]:
        """Every guest address in portfwd's table."""
        return sorted({str(t) for elems in self.pf.targets().values() for _, t in elems})

    def talk(self, *addresses: str) -> None:
        """The host talks to these addresses (neighbour entries, the bridge learns the
        MACs of who answers), as a host does with guests in use."""
        for address in addresses:
            assert self.lab.reach("tcp", address, 80, ns=self.lab.host), address


@pytest.fixture
def host(lab: Lab, pf: PortfwdHost, tmp_path: "os.PathLike[str]") -> Iterator[Host]:
    h = Host(lab, pf, str(tmp_path))
    try:
        yield h
    finally:
        h.close()


WAITING = "<IPv4 of 52:54:00:aa:00:0a>:80"


def test_a_lease_of_another_guests_address_under_this_mac_gives_no_dnat(host: Host) -> None:
    """db1 holds a lease for its own address under web1's MAC (a DHCP chaddr is the
    client's to choose): web1's forward must not lead to db1. The honest lease works."""
    host.talk(A4, B4)
    host.leases({"ip-address": B4, "mac-address": MA, "client-id": "01:" + MA})
    host.hook()
    assert host.rows() == [(WAITING, f"pending: refused {B4} from lease on br0: the host's"
                                     f" neighbour entry for {B4} on br0 has MAC {MB}, not this"
                                     f" NIC's {MA}")]
    assert B4 not in host.targets()
    assert host.lab.probe("tcp", HOST4, 8080) is None  # db1 serves port 80: nothing got there

    host.leases({"ip-address": A4, "mac-address": MA, "client-id": "01:" + MA})
    host.hook(op="reconnect")
    assert host.rows() == [(f"{A4}:80", "active")]
    assert host.targets() == [A4]
    assert host.lab.reach("tcp", HOST4, 8080) == f"tcp 80 {CLIENT4}"


def test_a_guest_sending_as_another_guests_mac_is_seen_in_the_bridge(host: Host) -> None:
    """db1 also answers ARP for its address as web1's MAC and sends frames from it (the
    host's neighbour entry then says MA, as dnsmasq's ARP injection of the lease would):
    the bridge has learned MA on db1's tap, so the lease is refused."""
    host.talk(A4, B4)
    host.lab.ns(host.db1, "ip", "link", "set", "eth0", "address", MA)
    host.leases({"ip-address": B4, "mac-address": MA, "client-id": "01:" + MA})
    for _ in range(20):  # web1 talks too: the bridge's view of MA may flip back at once
        host.lab.ns(host.lab.host, "ip", "neigh", "del", B4, "dev", "br0", check=False)
        host.talk(B4)  # asked again, db1 answers as MA: the neighbour entry and the FDB follow
        host.hook()
        if "on vnet1" in host.rows()[0][1]:
            break
    assert host.rows() == [(WAITING, f"pending: refused {B4} from lease on br0: bridge br0's"
                                     f" forwarding database has MAC {MA} on vnet1, not only on"
                                     " this NIC's tap vnet0")]
    assert B4 not in host.targets()
    assert host.lab.probe("tcp", HOST4, 8080) is None


def test_without_evidence_the_forward_waits_then_sync_applies_it(host: Host) -> None:
    """web1's own lease, before the host has heard from it: pending with the reason. A
    sync asks the kernel to resolve the address; once web1 has answered, a sync applies."""
    host.lab.ns(host.lab.host, "ip", "neigh", "flush", "dev", "br0")
    host.leases({"ip-address": A4, "mac-address": MA, "client-id": "01:" + MA})
    host.hook()
    assert host.rows() == [(WAITING, f"pending: unconfirmed {A4} from lease on br0: no"
                                     f" neighbour entry for {A4} with MAC {MA} on br0 yet")]
    assert host.targets() == []
    for _ in range(50):  # the sync's solicitation is answered at once; a busy host lags
        host.sync()
        if host.rows() == [(f"{A4}:80", "active")]:
            break
    assert host.rows() == [(f"{A4}:80", "active")]
    assert host.lab.reach("tcp", HOST4, 8080) == f"tcp 80 {CLIENT4}"


def test_a_mac_with_leases_under_two_client_ids_is_refused(host: Host) -> None:
    host.talk(A4)
    host.leases({"ip-address": A4, "mac-address": MA, "client-id": "01:" + MA},
                {"ip-address": "192.168.150.150", "mac-address": MA, "client-id": "ff:00:01"})
    host.hook()
    assert host.rows() == [(WAITING, f"pending: refused the IPv4 leases of MAC {MA} on br0: they"
                                     " are held under 2 different client-ids (one NIC is one"
                                     " DHCP client); waiting until only one is left (expired or"
                                     " released)")]
    assert host.targets() == []


@pytest.mark.parametrize("spelling", ["FD00:150::1", "fd00:150:0:0:0:0:0:1", "fd00:150::0001",
                                      "FD00:0150:0000:0000:0000:0000:0000:0001"])
def test_a_host_address_in_any_spelling_is_refused(host: Host, spelling: str) -> None:
    host.leases({"ip-address": spelling, "mac-address": MA, "iaid": "1",
                 "client-id": "00:03:00:01:" + MA})
    host.hook()
    assert host.rows(6) == [("<IPv6 of 52:54:00:aa:00:0a>:80", f"pending: refused {BRIDGE6} from"
                             " lease on br0: an address of the host itself")]
    assert BRIDGE6 not in host.targets()


def test_an_ipv4_address_with_leading_zeros_is_refused(host: Host) -> None:
    host.leases({"ip-address": "192.168.150.010", "mac-address": MA})
    host.hook()
    assert host.rows() == [(WAITING, "pending: refused 192.168.150.010 from lease on br0: not an"
                                     " IPv4 address (inet_pton refuses it)")]
    assert host.targets() == []


@pytest.mark.parametrize("holds", ["reservation", "lease"])
def test_the_address_of_a_running_guest_without_forwards_is_refused(host: Host,
                                                                    holds: str) -> None:
    """db1 has no forwards, so nothing recorded names its address; its reservation or its
    (older, still live) lease does, and db1 runs (libvirt's status file)."""
    host.talk(A4, B4)
    mine = {"ip-address": B4, "mac-address": MA, "client-id": "01:" + MA}
    if holds == "reservation":
        host.reserve(f"<host mac='{MB}' ip='{B4}'/>")
        host.leases(mine)
        what = f"reserved on network {host.network}"
    else:
        host.leases({"ip-address": B4, "mac-address": MB, "client-id": "01:" + MB,
                     "expiry-time": FOREVER - 100}, mine)
        what = "lease on br0"
    for run_it in (host.hook, host.sync):
        run_it()
        assert host.rows() == [(WAITING, f"pending: refused {B4} from lease on br0: the address"
                                         f" of guest db1 ({what})")]
        assert host.targets() == []


def test_an_applied_address_stays_until_something_contradicts_it(host: Host) -> None:
    """Evidence fades (a silent guest: the bridge forgets its MAC after minutes, the
    neighbour entry goes): an address already applied stays. A contradiction removes
    it: here db1 sends as web1's MAC, and the bridge learns that MAC on db1's tap."""
    host.talk(A4)
    host.leases({"ip-address": A4, "mac-address": MA, "client-id": "01:" + MA})
    host.hook()
    assert host.rows() == [(f"{A4}:80", "active")]
    host.lab.ns(host.lab.host, "ip", "neigh", "flush", "dev", "br0")
    host.lab.ns(host.lab.host, "bridge", "fdb", "del", MA, "dev", "vnet0", "master")
    host.sync()
    assert host.rows() == [(f"{A4}:80", "active")]
    host.lab.ns(host.db1, "ip", "link", "set", "eth0", "address", MA)
    for _ in range(20):  # web1 talks too: the bridge's view of MA may flip back at once
        host.lab.probe("tcp", "192.168.150.1", 9, ns=host.db1)  # any frame from db1 will do
        host.sync()
        if host.rows() != [(f"{A4}:80", "active")]:
            break
    assert host.rows() == [(WAITING, f"pending: refused {A4} from lease on br0: bridge br0's"
                                     f" forwarding database has MAC {MA} on vnet1, not only on"
                                     " this NIC's tap vnet0")]
    assert host.targets() == []


# the daemon's look for evidence (evidence.Recheck), its clock driven by the test: it
# looks no sooner than due, solicits what is missing, and names an address once proven
RECHECK = """import sys, time
from portfwd.host.evidence import Recheck
r = Recheck()
r.arm([("web1", sys.argv[1], sys.argv[2], "br0", "vnet0")], now=0.0)
assert r.due(now=1.0) is None
for _ in range(int(sys.argv[3])):
    found = r.due(now=r.next)
    if found:
        print(" ".join(found))
        break
    time.sleep(0.1)
"""


def test_the_daemons_recheck_solicits_and_sees_the_evidence(host: Host) -> None:
    host.lab.ns(host.lab.host, "ip", "neigh", "flush", "dev", "br0")
    r = host.lab.ns(host.lab.host, sys.executable, "-c", RECHECK, A4, MA, "100")
    assert r.stdout.decode().split() == ["web1", A4, MA, "br0", "vnet0"], r.stderr
    # an address nobody answers for, or that another NIC holds, never becomes due
    for address in ("192.168.150.99", B4):
        r = host.lab.ns(host.lab.host, sys.executable, "-c", RECHECK, address, MA, "20")
        assert r.returncode == 0 and r.stdout == b"", r.stderr
