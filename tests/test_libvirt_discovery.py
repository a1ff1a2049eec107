"""Addresses found, not typed: real libvirtd, its dnsmasq, DHCP from a stand-in guest whose
MAC is the domain's NIC's and whose port is the domain's tap, and `portfwd daemon`
following leases, the evidence that an address is its NIC's, and config edits."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import pytest

from libvirtlab import LibvirtLab
from netlab import CLIENT4, HOST4, TRAFFIC, stop_processes

pytestmark = pytest.mark.kernel

HERE = os.path.dirname(os.path.abspath(__file__))
UDHCPC_SCRIPT = os.path.join(HERE, "udhcpc.script")
RES = ("pf-res", "default", "52:54:00:70:66:11")
DHCP = ("pf-dhcp", "default", "52:54:00:70:66:12")
RESERVED_IP = "192.168.122.61"
CONFIG = f"""
[[forward]]
guest = "pf-res"
ports = ["8090:80"]

[[forward]]
guest = "pf-dhcp"
interface = "{DHCP[2]}"
ports = ["8091:80"]
"""


class Lab:
    """The libvirt lab plus a running `portfwd daemon` and traffic servers."""

    def __init__(self, lab: LibvirtLab) -> None:
        self.lab = lab
        self.procs: List["subprocess.Popen[bytes]"] = []
        self.standins: Dict[str, str] = {}  # guest → its stand-in namespace
        self.daemon_log = os.path.join(lab.base, "daemon.log")

    def env(self) -> Dict[str, str]:
        return dict(os.environ, PORTFWD_CONFIG=self.lab.config, PORTFWD_RUNDIR=self.lab.run_dir)

    def start_daemon(self) -> None:
        log = open(self.daemon_log, "ab")
        self.procs.append(subprocess.Popen(
            self.lab.argv(self.lab.lab, sys.executable, "-m", "portfwd.cli", "daemon"),
            stdout=log, stderr=log, env=self.env()))

    def serve(self, ns: str) -> None:
        p = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, TRAFFIC, "serve", "tcp",
                              "80"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.procs.append(p)
        assert p.stdout is not None and p.stdout.readline().strip() == b"ready"

    def status(self) -> List[Dict[str, str]]:
        r = subprocess.run(self.lab.argv(self.lab.lab, sys.executable, "-m", "portfwd.cli",
                                         "status", "--json"), capture_output=True, env=self.env())
        assert r.returncode == 0, r.stderr
        rows: List[Dict[str, str]] = json.loads(r.stdout)["forwards"]
        return rows

    def probe(self, port: int) -> Optional[str]:
        r = self.lab.ns(self.lab.client, sys.executable, TRAFFIC, "probe", "tcp", HOST4, str(port),
                        check=False)
        return r.stdout.decode().strip() if r.returncode == 0 else None

    def sync(self) -> Tuple[str, str]:
        r = subprocess.run(self.lab.argv(self.lab.lab, sys.executable, "-m", "portfwd.cli",
                                         "sync"), capture_output=True, env=self.env())
        assert r.returncode == 0, r.stderr
        return r.stdout.decode(), r.stderr.decode()

    def dhcp(self, ns: str, *args: str) -> None:
        self.lab.ns(ns, "busybox", "udhcpc", "-i", "eth0", "-s", UDHCPC_SCRIPT, "-q", "-n",
                    "-t", "5", "-T", "1", *args)

    def release(self, ns: str) -> None:
        """The stand-in's DHCP client (default client-id) takes its lease once more and
        releases it (busybox's udhcpc releases on SIGTERM with -R, not when -q quits)."""
        p = subprocess.Popen(self.lab.argv(ns, "busybox", "udhcpc", "-i", "eth0", "-s",
                                           UDHCPC_SCRIPT, "-f", "-R", "-n", "-t", "5", "-T", "1"),
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        assert p.stderr is not None
        said = [p.stderr.readline() for _ in range(3)]  # started, discover, select …
        while said[-1] and b"obtained" not in said[-1]:
            said.append(p.stderr.readline())
        p.terminate()
        said += p.stderr.readlines()
        p.wait(timeout=30)
        assert any(b"unicasting a release" in line for line in said), said

    def close(self) -> None:
        stop_processes(self.procs)


def until(what: Callable[[], object], timeout: float = 15.0) -> object:
    """Poll ``what`` until it is truthy; return its last value."""
    deadline = time.monotonic() + timeout
    value = what()
    while not value and time.monotonic() < deadline:
        time.sleep(0.2)
        value = what()
    return value


@contextlib.contextmanager
def default_network_lab(base: str, config: str) -> Iterator[Lab]:
    """A libvirt lab with ``config`` and libvirt's `default` network; afterwards,
    nothing of it runs."""
    lab = LibvirtLab(base)
    wrap = Lab(lab)
    try:
        lab.write_config(config)
        lab.ensure_network("default")
        yield wrap
    finally:
        wrap.close()
        lab.close()
    assert lab.pids() == {}, "processes left behind"


@pytest.fixture(scope="module")
def dlab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    with default_network_lab(str(tmp_path_factory.mktemp("discovery")), CONFIG) as lab:
        yield lab


def rows(dlab: Lab, guest: str) -> List[Tuple[str, str, str]]:
    """(target, "STATE" or "STATE: REASON", where the address came from) per row."""
    return [(r["target"], r["state"] + (f": {r['reason']}" if r["reason"] else ""),
             r["address_from"]) for r in dlab.status() if r["guest"] == guest]


def test_reservation_works_before_any_lease(dlab: Lab) -> None:
    """The reservation is the admin's word (the network XML), as an address in
    forward.toml is: the forward is live at the guest's start, with no lease and no
    evidence from the kernel yet."""
    lab = dlab.lab
    # a live reservation (the network hook sees `updated`); no DHCP happens at all
    lab.virsh("net-update", "default", "add", "ip-dhcp-host",
              f"<host mac='{RES[2]}' ip='{RESERVED_IP}'/>", "--live")
    standin = lab.standin("virbr0", RESERVED_IP, "192.168.122.1", mac=RES[2])
    dlab.serve(standin)
    lab.start(*RES)
    assert until(lambda: dlab.probe(8090)) == f"tcp 80 {CLIENT4}"
    assert rows(dlab, "pf-res") == [(f"{RESERVED_IP}:80", "active", "reservation on network default")]
    lab.virsh("destroy", "pf-res")
    assert dlab.probe(8090) is None


def test_dhcp_lease_makes_a_pending_forward_live_and_follows_it(dlab: Lab) -> None:
    lab = dlab.lab
    dlab.start_daemon()
    standin = lab.standin("virbr0", None, None, mac=DHCP[2], plug=False)
    dlab.standins[DHCP[0]] = standin
    dlab.serve(standin)
    lab.start(*DHCP)
    lab.as_tap(standin, DHCP[0])
    # no address yet: the forward waits, and says why
    assert until(lambda: rows(dlab, "pf-dhcp")) == [(
        "<IPv4 of 52:54:00:70:66:12>:80", f"pending: no IPv4 address yet for NIC {DHCP[2]}"
        " on network default", "")]
    dlab.dhcp(standin)  # the stand-in asks libvirt's dnsmasq for a lease
    leased = lab.ns(standin, "ip", "-4", "-o", "addr", "show", "dev", "eth0").stdout.decode()
    first = leased.split("inet ")[1].split("/")[0]
    assert until(lambda: dlab.probe(8091), timeout=30) == f"tcp 80 {CLIENT4}"
    assert rows(dlab, "pf-dhcp") == [(f"{first}:80", "active", "lease on virbr0")]

    # another DHCP client on the same MAC (another client-id: a second operating system,
    # or a guest that borrowed this MAC as its chaddr): both leases live, so neither
    # address is trusted, and the forward goes
    time.sleep(1.1)  # lease expiry times have a resolution of one second
    other = "192.168.122.199" if first != "192.168.122.199" else "192.168.122.198"
    new_id = "0x3d:ff0102030405060708"
    dlab.dhcp(standin, "-r", other, "-x", new_id)
    refused = (f"pending: refused the IPv4 leases of MAC {DHCP[2]} on virbr0: they are held"
               " under 2 different client-ids (one NIC is one DHCP client); waiting until only"
               " one is left (expired or released)")
    assert until(lambda: rows(dlab, "pf-dhcp") == [(
        "<IPv4 of 52:54:00:70:66:12>:80", refused, "")])
    assert dlab.probe(8091) is None
    # the first client releases its lease: the forward follows the one left
    dlab.release(standin)
    dlab.dhcp(standin, "-r", other, "-x", new_id)
    assert until(lambda: rows(dlab, "pf-dhcp") == [(f"{other}:80", "active", "lease on virbr0")],
                 timeout=30)
    assert dlab.probe(8091) == f"tcp 80 {CLIENT4}"
    elements = lab.ns(lab.lab, "nft", "-j", "list", "map", "inet", "portfwd", "any4_ip").stdout
    assert first not in elements.decode() and other in elements.decode()


def test_daemon_applies_a_live_config_edit_and_keeps_rules_on_a_bad_one(dlab: Lab) -> None:
    lab = dlab.lab
    assert until(lambda: dlab.probe(8091))  # from the test before
    start = time.monotonic()
    lab.write_config(CONFIG.replace('ports = ["8091:80"]', 'ports = ["8091:80", "8092:80"]'))
    assert until(lambda: dlab.probe(8092), timeout=10) == f"tcp 80 {CLIENT4}"
    print(f"config edit live after {time.monotonic() - start:.2f} s")
    before = lab.ns(lab.lab, "nft", "list", "table", "inet", "portfwd").stdout
    lab.write_config(CONFIG + '[[forward]]\nguest = "x"\nports = ["99999"]\n')
    assert until(lambda: "configuration invalid" in open(dlab.daemon_log).read(), timeout=10)
    with open(dlab.daemon_log) as f:
        log = f.read()
    assert f"{lab.config}:12:10: forward[2].ports[0]: '99999': port 99999 not in 1..65535" in log
    assert "Traceback" not in log
    assert lab.ns(lab.lab, "nft", "list", "table", "inet", "portfwd").stdout == before
    assert dlab.probe(8092) == f"tcp 80 {CLIENT4}"
    lab.virsh("destroy", "pf-dhcp")
    assert until(lambda: dlab.probe(8091) is None)


def test_daemon_reconnects_when_libvirtd_restarts(dlab: Lab) -> None:
    lab = dlab.lab
    lab.write_config(CONFIG)  # the test before left an invalid one
    lab.virsh("start", "pf-dhcp")
    lab.as_tap(dlab.standins["pf-dhcp"], "pf-dhcp")  # a new tap: the daemon sees it so
    assert until(lambda: dlab.probe(8091), timeout=45) == f"tcp 80 {CLIENT4}"

    def connects() -> int:
        with open(dlab.daemon_log) as f:
            return f.read().count("connected to libvirt")

    before = connects()
    lab.restart_libvirtd()
    assert until(lambda: connects() > before), "the daemon did not reconnect"
    # the new connection works: a guest stop is seen, and so is a config edit
    lab.virsh("destroy", "pf-dhcp")
    assert until(lambda: dlab.probe(8091) is None)
    lab.virsh("start", "pf-dhcp")
    lab.as_tap(dlab.standins["pf-dhcp"], "pf-dhcp")
    lab.write_config(CONFIG.replace('ports = ["8091:80"]', 'ports = ["8093:80"]'))
    assert until(lambda: dlab.probe(8093), timeout=45) == f"tcp 80 {CLIENT4}"
    assert dlab.probe(8091) is None
    lab.virsh("destroy", "pf-dhcp")


def test_sync_and_daemon_never_hang_while_guests_start(dlab: Lab) -> None:
    """Discovery asks libvirt (interfaceAddresses: lease, agent, ARP) before portfwd's
    lock is taken, never under it: libvirt runs the hooks of a starting guest while it
    holds its own locks, and those hooks wait for portfwd's lock. Here `portfwd sync`
    and the daemon resolve a guest without a lease, over and over, while other guests
    start and stop (port-created, started, stopped hooks): nothing may hang."""
    lab = dlab.lab
    lab.write_config('[options]\ndiscover = ["reservation", "lease", "agent", "arp"]\n' + CONFIG
                     + '[[forward]]\nguest = "pf-x1"\nipv4 = "192.168.122.71"\nports = ["8071:80"]\n'
                     + '[[forward]]\nguest = "pf-x2"\nipv4 = "192.168.122.72"\nports = ["8072:80"]\n'
                     + '[[forward]]\nguest = "pf-nolease"\nports = ["8073:80"]\n')
    lab.start("pf-nolease", "default", "52:54:00:70:66:20")  # never asks for a lease
    others = [("pf-x1", "default", "52:54:00:70:66:21"), ("pf-x2", "default", "52:54:00:70:66:22")]
    for name, network, mac in others:
        lab.start(name, network, mac)
        lab.virsh("destroy", name)
    syncs: List[subprocess.CompletedProcess[bytes]] = []
    failures: List[str] = []

    def sync_loop() -> None:
        for _ in range(8):
            try:
                syncs.append(subprocess.run(
                    lab.argv(lab.lab, sys.executable, "-m", "portfwd.cli", "sync"),
                    capture_output=True, env=dlab.env(), timeout=120))
            except subprocess.TimeoutExpired:
                failures.append("portfwd sync hung")
                return

    import threading

    t = threading.Thread(target=sync_loop)
    t.start()
    try:
        for _ in range(3):
            for name, _, _ in others:
                for action in ("start", "destroy"):
                    try:
                        r = subprocess.run(lab.argv(None, "virsh", "-q", "-c", "qemu:///system",
                                                    action, name), capture_output=True, timeout=120)
                    except subprocess.TimeoutExpired:
                        failures.append(f"virsh {action} {name} hung")
                        continue
                    if r.returncode != 0:
                        failures.append(f"virsh {action} {name}: {r.stderr.decode().strip()}")
    finally:
        t.join(timeout=600)
    assert not failures
    assert len(syncs) == 8 and all(s.returncode == 0 for s in syncs), [s.stderr for s in syncs]
    assert rows(dlab, "pf-nolease") == [(
        "<IPv4 of the first NIC>:80", "pending: no IPv4 address yet for NIC 52:54:00:70:66:20"
        " on network default", "")]
    with open(dlab.daemon_log) as f:
        assert "Traceback" not in f.read()
    lab.virsh("destroy", "pf-nolease")
