"""The daemon stays bounded: a reconcile that changes nothing sends nftables nothing,
lease changes reconcile at most once per interval however fast a guest churns its
lease (10,000 forwards in the table, built as bench/daemon.py builds them), and a
reconcile that hangs is killed by the watchdog while the daemon carries on.

Counted, not timed: tests/daemon_counted.py runs the daemon with every call into
nftables' bindings and every reconcile written to an events file."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from typing import Callable, Dict, List, Optional, Tuple

import pytest

from netlab import BRIDGE4, Lab
from pfhost import LockHolder, PortfwdHost, RunningDaemon, driver_uri, web1_config

pytestmark = pytest.mark.kernel

HERE = os.path.dirname(os.path.abspath(__file__))
COUNTED = os.path.join(HERE, "daemon_counted.py")
INTERVAL = 0.5  # the daemon's default
LEASE_GUEST, LEASE_MAC = "lease1", "52:54:00:aa:00:01"
ADDRESSES = ("192.168.150.20", "192.168.150.21")
OTHERS, PER_GUEST = 1000, 10  # 10,000 forwards beside lease1's
NETWORK = (f"<network><name>pflab</name><bridge name='br0'/><ip address='{BRIDGE4}'"
           " netmask='255.255.255.0'><dhcp><range start='192.168.150.2'"
           " end='192.168.150.254'/></dhcp></ip></network>\n")

Event = Tuple[str, int, float]  # kind, pid, monotonic time


def others_config() -> str:
    """1,000 guests x 10 forwards: the benchmarks' "10,000 forwards loaded"."""
    sys.path.insert(0, os.path.join(os.path.dirname(HERE), "bench"))
    try:
        from common import OTHER_FORWARDS, OTHERS as BENCH_OTHERS, others_toml  # type: ignore
    finally:
        sys.path.pop(0)
    assert (BENCH_OTHERS, OTHER_FORWARDS) == (OTHERS, PER_GUEST)
    return str(others_toml())


def node_xml(path: str) -> str:
    """The test driver's node: lease1 (one NIC on network pflab) and 1,000 without NICs."""
    domains = [f"<domain type='test'><name>{LEASE_GUEST}</name>"
               "<uuid>6b1f0c2e-0000-4000-8000-000000000001</uuid><memory>65536</memory>"
               "<os><type>hvm</type></os><devices><interface type='network'>"
               f"<mac address='{LEASE_MAC}'/><source network='pflab'/></interface></devices>"
               "</domain>"]
    domains += [f"<domain type='test'><name>o{g:04d}</name><memory>65536</memory>"
                "<os><type>hvm</type></os></domain>" for g in range(OTHERS)]
    with open(path, "w", encoding="utf-8") as f:
        f.write("<node>\n" + "\n".join(domains) + "\n</node>\n")
    return f"test://{path}"


class Counted(RunningDaemon):
    """The daemon under tests/daemon_counted.py, in a private mount namespace."""

    def __init__(self, pf: PortfwdHost, uri: str, *extra: str) -> None:
        self.events_path = os.path.join(os.path.dirname(pf.etc), "events")
        super().__init__(pf, uri, argv=[
            "unshare", "-m", "--propagation", "private", sys.executable, COUNTED,
            self.events_path, pf.config, uri, str(INTERVAL), *extra])

    def events(self, since: float = 0.0) -> List[Event]:
        """What daemon_counted.py wrote, from monotonic time ``since`` on."""
        try:
            with open(self.events_path, encoding="ascii") as f:
                lines = f.read().splitlines()
        except FileNotFoundError:
            return []
        out = []
        for line in lines:
            kind, pid, at = line.split()
            if float(at) >= since:
                out.append((kind, int(pid), float(at)))
        return out

    def reconciles(self, since: float = 0.0) -> List[Tuple[float, Optional[float]]]:
        """(start, end or None while running) of each reconcile begun since ``since``."""
        out: List[Tuple[float, Optional[float]]] = []
        for kind, _, at in self.events(since):
            if kind == "reconcile-start":
                out.append((at, None))
            elif kind == "reconcile-end" and out and out[-1][1] is None:
                out[-1] = (out[-1][0], at)
        return out

    def settle(self, after: float) -> None:
        """Wait until a reconcile begun after ``after`` (the last write) has ended: the
        daemon has seen everything written."""
        self.until(lambda: any(start > after and end is not None
                               for start, end in self.reconciles(after)),
                   "a reconcile after the last write", 60.0)


NFT_CALLS = ("read", "probe", "rebuild", "write")


def lease(address: str, mac: str = LEASE_MAC, expiry: int = 0,
          hostname: str = LEASE_GUEST) -> Dict[str, object]:
    return {"ip-address": address, "mac-address": mac, "hostname": hostname,
            "expiry-time": expiry or int(time.time()) + 3600}


def write_leases(folder: str, leases: List[Dict[str, object]]) -> None:
    """br0.status, replaced whole (a rename, as libvirt's lease helper does)."""
    path = os.path.join(folder, "br0.status")
    with open(path + ".new", "w", encoding="utf-8") as f:
        json.dump(leases, f)
    os.replace(path + ".new", path)


def churn(write: Callable[[int], None], seconds: float = 4.0) -> Tuple[float, int]:
    """``write(i)`` some 25 times a second for ``seconds``; the time of the last write,
    and its ``i``."""
    end = time.monotonic() + seconds
    i = 0
    while time.monotonic() < end:
        write(i)
        i += 1
        time.sleep(0.04)
    write(i)
    return time.monotonic(), i


def stamps(folder: str) -> Dict[str, int]:
    """Every file under ``folder`` (but the lock) → its modification time."""
    out = {}
    for where, _, names in os.walk(folder):
        for name in names:
            if name != "lock":
                path = os.path.join(where, name)
                out[path] = os.stat(path).st_mtime_ns
    return out


def lease_target(lab: Lab) -> Optional[str]:
    """Where lease1's forward (listen on the bridge address: map fwd4) leads now."""
    for name in ("fwd4_ip", "fwd4_to"):
        r = lab.ns(lab.host, "nft", "-j", "list", "map", "inet", "portfwd", name, check=False)
        if r.returncode == 0:
            for obj in json.loads(r.stdout)["nftables"]:
                for _, value in obj.get("map", {}).get("elem", []):
                    return str(value["concat"][0] if isinstance(value, dict) else value)
    return None


def test_lease_churn_at_10000_forwards_rebuilds_at_most_once_per_interval(
        lab: Lab, pf: PortfwdHost) -> None:
    base = os.path.dirname(pf.etc)
    leases = os.path.join(base, "leases")
    os.mkdir(leases)
    network = os.path.join(base, "pflab.xml")
    with open(network, "w", encoding="utf-8") as f:
        f.write(NETWORK)
    # the kernel's word that both addresses are lease1's NIC's: its tap (the test driver
    # names it testnet0) on br0, the bridge sending its MAC there, the neighbour entries
    h = lab.host
    lab.ns(h, "ip", "link", "add", "testnet0", "type", "veth", "peer", "name", "testnet0p")
    lab.ns(h, "ip", "link", "set", "testnet0", "master", "br0", "up")
    lab.ns(h, "ip", "link", "set", "testnet0p", "up")
    lab.ns(h, "bridge", "fdb", "replace", LEASE_MAC, "dev", "testnet0", "master", "static")
    for address in ADDRESSES:
        lab.ns(h, "ip", "neigh", "replace", address, "lladdr", LEASE_MAC, "dev", "br0",
               "nud", "permanent")
    write_leases(leases, [lease(ADDRESSES[0])])
    pf.write_config(f'[[forward]]\nguest = "{LEASE_GUEST}"\nports = [{{ host = 8080, guest = 80,'
                    f' proto = "tcp", listen = ["{BRIDGE4}"] }}]\n\n' + others_config())
    uri = node_xml(os.path.join(base, "node.xml"))
    with Counted(pf, uri, "--leases", leases, "--network", network) as d:
        d.until(lambda: "synced: " in d.text(), "the first sync", 180.0)
        assert f"synced: {OTHERS * PER_GUEST + 1} forward(s)" in d.text(), d.text()
        assert lease_target(lab) == ADDRESSES[0], d.text()
        rebuilt = ["first sync"]
        expiry = int(time.time()) + 3600

        def same(i: int) -> None:
            write_leases(leases, [lease(ADDRESSES[0], expiry=expiry)])

        def other_guest(i: int) -> None:
            write_leases(leases, [lease(ADDRESSES[0], expiry=expiry),
                                  lease(f"192.168.150.{100 + i % 100}", f"52:54:00:bb:00:{i % 100:02x}",
                                        expiry + i, f"other{i}")])

        def same_address(i: int) -> None:
            write_leases(leases, [lease(ADDRESSES[0], expiry=expiry + i)])

        for name, write in (("same content", same), ("a guest without forwards", other_guest),
                            ("the same address", same_address)):
            start = time.monotonic()
            files = stamps(pf.run_dir)
            d.settle(churn(write)[0])
            assert stamps(pf.run_dir) == files, f"{name}: records rewritten"
            events = d.events(start)
            starts = [s for s, _ in d.reconciles(start)]
            assert starts, f"{name}: the daemon never looked"
            assert all(b - a >= INTERVAL for a, b in zip(starts, starts[1:])), (name, starts)
            calls = [e for e in events if e[0] in NFT_CALLS]
            assert calls == [], f"{name}: {len(starts)} reconcile(s) called nftables: {calls}"
            print(f"{name}: {len(starts)} reconcile(s), no nftables call")

        # lease1 moves between two addresses with every write: each reconcile rebuilds
        start = time.monotonic()
        last, i = churn(lambda i: write_leases(leases, [lease(ADDRESSES[i % 2],
                                                               expiry=expiry + i)]))
        d.settle(last)
        assert lease_target(lab) == ADDRESSES[i % 2]  # the last lease written
        windows = d.reconciles(start)
        starts = [s for s, _ in windows]
        assert all(b - a >= INTERVAL for a, b in zip(starts, starts[1:])), starts
        rebuilds = [at for kind, _, at in d.events(start) if kind == "rebuild"]
        per_window = [sum(1 for at in rebuilds if s <= at <= (e or at)) for s, e in windows]
        assert 1 <= len(rebuilds) == sum(per_window) and max(per_window) <= 1, (windows, rebuilds)
        rebuilt += [f"churn {i}" for i in range(len(rebuilds))]
        print(f"moving lease: {len(starts)} reconcile(s), {len(rebuilds)} rebuild(s)")
        log = d.stop()
    assert f", {len(rebuilt)} of them sent to nftables" in log, log[-2000:]
    assert "Traceback" not in log


def zombies_of(pid: int) -> List[str]:
    """Children of ``pid`` that ended and were never waited for."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[1] == str(pid) and fields[0] == "Z":
            out.append(entry)
    return out


def test_a_hung_reconcile_is_killed_and_the_daemon_carries_on(lab: Lab, pf: PortfwdHost) -> None:
    """A reconcile that does not end (here: a hung run keeps portfwd's lock, and the
    lock wait is made to outlast the watchdog) is killed after the watchdog's bound;
    the daemon logs it, stays up, reaps the child and applies the next change."""
    pf.write_config(web1_config("8080:80"))
    uri = driver_uri(os.path.join(os.path.dirname(pf.etc), "node.xml"), ["web1"])
    with Counted(pf, uri, "--limit", "2") as d:
        d.until(lambda: "synced: " in d.text(), "the first sync")
        with LockHolder(pf.run_dir):
            os.kill(d.proc.pid, signal.SIGHUP)  # rebuild now: the child waits for the lock
            d.until(lambda: "did not finish within 2 s: killed" in d.text(), "the watchdog")
            assert d.proc.poll() is None
            assert zombies_of(d.proc.pid) == []
        pf.write_config(web1_config("8080:80", "9090:90"))
        d.until(lambda: "9090" in json.dumps(pf.targets()), "the next change applied")
        log = d.stop()
    assert "Traceback" not in log


def test_the_rate_limit_holds_back_lease_changes_alone(tmp_path: "os.PathLike[str]",
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """While the last reconcile is recent, a lease change waits; a libvirt event
    (``wake``), an edit of the configuration and SIGHUP reconcile at once."""
    from portfwd import daemon
    from portfwd.rundir import state

    config = os.path.join(str(tmp_path), "forward.toml")
    with open(config, "w", encoding="utf-8") as f:
        f.write("")
    leases = ["v1"]
    monkeypatch.setattr(daemon, "lease_signature", lambda: (leases[0],))
    monkeypatch.setattr(daemon, "SETTLE", 0.0)
    d = daemon.Daemon(config, "test:///default", interval=INTERVAL)
    d.conn = object()  # connected, as far as follow_changes looks
    ran: List[str] = []
    monkeypatch.setattr(d, "reconcile", lambda: ran.append("reconcile"))

    def turn(recent: bool = True) -> bool:
        """One look, due now; ``recent``: the last reconcile has just run."""
        d.next_poll = 0.0
        d.next_lease = time.monotonic() + 3600 if recent else 0.0
        before = len(ran)
        d.follow_changes()
        return len(ran) > before

    d.seen = (state.config_signature(config), ("v1",))
    assert not turn()  # nothing changed
    leases[0] = "v2"
    assert not turn() and not turn()  # a lease change, held back
    assert turn(recent=False)  # its turn came
    assert not turn(recent=False)  # and it was seen
    leases[0] = "v3"
    d.wake.set()
    assert turn()  # a libvirt event
    leases[0] = "v4"
    with open(config, "a", encoding="utf-8") as f:
        f.write("# edited\n")
    assert turn()  # an edit of the configuration
    d._reload()
    assert turn() and d.full  # SIGHUP: a full rebuild
