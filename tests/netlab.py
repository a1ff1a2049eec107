"""Throwaway network namespaces standing in for a libvirt host, a guest and a client.

    client (203.0.113.2, 2001:db8:1::2) ── host (203.0.113.1 | br 192.168.150.1) ── guest (192.168.150.10)
                                                   2001:db8:1::1 | fd00:150::1          fd00:150::10

Everything is named with a per-lab prefix and removed by ``close()``.
"""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence

HERE = os.path.dirname(os.path.abspath(__file__))
TRAFFIC = os.path.join(HERE, "traffic.py")
_counter = itertools.count()

HOST4, HOST6 = "203.0.113.1", "2001:db8:1::1"
CLIENT4, CLIENT6 = "203.0.113.2", "2001:db8:1::2"
BRIDGE4, BRIDGE6 = "192.168.150.1", "fd00:150::1"
GUEST4, GUEST6 = "192.168.150.10", "fd00:150::10"


def run(*cmd: str, check: bool = True, input: Optional[bytes] = None,
        env: Optional[Dict[str, str]] = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(list(cmd), check=check, input=input, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def stop_processes(procs: "Sequence[subprocess.Popen[bytes]]") -> None:
    """Terminate, then if need be kill, every process of ``procs`` and reap it."""
    for p in procs:
        p.terminate()
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


RunIn = Callable[..., "subprocess.CompletedProcess[bytes]"]  # (ns, *cmd) → the finished run


def standin_namespace(run_in: RunIn, host: str, ns: str, peer: str, mac: Optional[str],
                      addr4: Optional[str], addr6: Optional[str]) -> None:
    """Namespace ``ns`` standing in for a guest's network stack: its eth0 (with ``mac``
    and the addresses given) is the far end of veth ``peer`` in namespace ``host``."""
    run("ip", "netns", "add", ns)
    run_in(ns, "sysctl", "-qw", "net.ipv6.conf.all.accept_dad=0",
           "net.ipv6.conf.default.accept_dad=0")
    run_in(ns, "ip", "link", "set", "lo", "up")
    run_in(host, "ip", "link", "add", peer, "type", "veth", "peer", "name", "eth0", "netns", ns)
    if mac:
        run_in(ns, "ip", "link", "set", "eth0", "address", mac)
    if addr4:
        run_in(ns, "ip", "addr", "add", f"{addr4}/24", "dev", "eth0")
    if addr6:
        run_in(ns, "ip", "addr", "add", f"{addr6}/64", "dev", "eth0", "nodad")
    run_in(ns, "ip", "link", "set", "eth0", "up")


def default_route(run_in: RunIn, ns: str, family: str, gateway: str) -> None:
    """Namespace ``ns``'s default route via ``gateway``, once the kernel has the route
    to it (the prefix route of a new address can lag behind its link coming up:
    "Network is unreachable", exit 2)."""
    deadline = time.monotonic() + 20
    while True:
        r = run_in(ns, "ip", family, "route", "replace", "default", "via", gateway, check=False)
        if r.returncode == 0:
            return
        assert time.monotonic() < deadline, r.stderr.decode()
        time.sleep(0.1)


def plug_and_wait(run_in: RunIn, host: str, peer: str, bridge: str) -> None:
    """Attach veth ``peer`` to ``bridge`` and wait until the port forwards (libvirt's
    bridges run STP: a new port listens and learns for a few seconds)."""
    run_in(host, "ip", "link", "set", peer, "master", bridge, "up")
    deadline = time.monotonic() + 30
    shown = ""
    while time.monotonic() < deadline:
        shown = run_in(host, "bridge", "link", "show", "dev", peer).stdout.decode()
        if " state forwarding " in shown:
            return
        time.sleep(0.1)
    raise RuntimeError(f"bridge port {peer} on {bridge} did not reach forwarding: {shown}")


def take_tap(run_in: RunIn, host: str, port: str, xml: bytes) -> str:
    """Put veth ``port`` (a stand-in's end in namespace ``host``) in the place of the tap
    of the first NIC of a running QEMU guest (``xml``: its live domain XML): the tap
    leaves its bridge under another name, and the port takes the tap's name and place.
    What the domain XML calls the guest's tap (``<target dev>``) then carries the
    stand-in's frames, and the bridge learns the stand-in's MAC where it would learn a
    real guest's. Returns the port's new name."""
    from portfwd.libvirt.domainxml import parse

    nic = parse(xml).nics[0]
    tap, bridge = nic.tap, nic.bridge
    assert tap and bridge, xml
    if port != tap:
        for cmd in (("nomaster",), ("down",), ("name", f"q{tap}"[:15])):
            run_in(host, "ip", "link", "set", tap, *cmd)
        for cmd in (("nomaster",), ("down",), ("name", tap)):
            run_in(host, "ip", "link", "set", port, *cmd)
    plug_and_wait(run_in, host, tap, bridge)
    return tap


class Lab:
    def __init__(self) -> None:
        tag = f"pf{os.getpid() % 100000}x{next(_counter)}"
        self.host, self.guest, self.client = f"{tag}h", f"{tag}g", f"{tag}c"
        self.tag = tag
        self.procs: List["subprocess.Popen[bytes]"] = []
        try:
            self._build()
        except BaseException:
            self.close()
            raise

    def _build(self) -> None:
        h, g, c = self.host, self.guest, self.client
        for ns in (h, g, c):
            run("ip", "netns", "add", ns)
            # no duplicate address detection: addresses (link-local too) usable at once
            self.ns(ns, "sysctl", "-qw", "net.ipv6.conf.all.accept_dad=0",
                    "net.ipv6.conf.default.accept_dad=0")
            self.ns(ns, "ip", "link", "set", "lo", "up")
        self.ns(h, "sysctl", "-qw", "net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1")
        self.ns(h, "ip", "link", "add", "br0", "type", "bridge")
        self.ns(h, "ip", "addr", "add", f"{BRIDGE4}/24", "dev", "br0")
        self.ns(h, "ip", "addr", "add", f"{BRIDGE6}/64", "dev", "br0", "nodad")
        self.ns(h, "ip", "link", "set", "br0", "up")
        # guest
        self.ns(h, "ip", "link", "add", "vnet0", "type", "veth", "peer", "name", "eth0", "netns", g)
        self.ns(h, "ip", "link", "set", "vnet0", "master", "br0", "up")
        self.ns(g, "ip", "addr", "add", f"{GUEST4}/24", "dev", "eth0")
        self.ns(g, "ip", "addr", "add", f"{GUEST6}/64", "dev", "eth0", "nodad")
        self.ns(g, "ip", "link", "set", "eth0", "up")
        default_route(self.ns, g, "-4", BRIDGE4)
        default_route(self.ns, g, "-6", BRIDGE6)
        # client
        self.ns(h, "ip", "link", "add", "uplink", "type", "veth", "peer", "name", "eth0", "netns", c)
        self.ns(h, "ip", "addr", "add", f"{HOST4}/24", "dev", "uplink")
        self.ns(h, "ip", "addr", "add", f"{HOST6}/64", "dev", "uplink", "nodad")
        self.ns(h, "ip", "link", "set", "uplink", "up")
        self.ns(c, "ip", "addr", "add", f"{CLIENT4}/24", "dev", "eth0")
        self.ns(c, "ip", "addr", "add", f"{CLIENT6}/64", "dev", "eth0", "nodad")
        self.ns(c, "ip", "link", "set", "eth0", "up")
        default_route(self.ns, c, "-4", HOST4)
        default_route(self.ns, c, "-6", HOST6)

    def ns(self, ns: str, *cmd: str, check: bool = True, input: Optional[bytes] = None,
           env: Optional[Dict[str, str]] = None) -> subprocess.CompletedProcess[bytes]:
        return run("ip", "netns", "exec", ns, *cmd, check=check, input=input, env=env)

    def serve(self, proto: str, ports: Sequence[int], ns: Optional[str] = None) -> None:
        """Start an answering server in the guest (or ``ns``) and wait until it listens."""
        p = subprocess.Popen(["ip", "netns", "exec", ns or self.guest, sys.executable, TRAFFIC,
                              "serve", proto, *map(str, ports)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
        self.procs.append(p)
        assert p.stdout is not None
        line = p.stdout.readline()
        if line.strip() != b"ready":
            raise RuntimeError(f"server did not start: {line!r} {p.stderr.read() if p.stderr else b''!r}")

    def probe(self, proto: str, addr: str, port: int, ns: Optional[str] = None) -> Optional[str]:
        """The server's answer through ``addr:port`` from the client, or None."""
        r = self.ns(ns or self.client, sys.executable, TRAFFIC, "probe", proto, addr, str(port),
                    check=False)
        out = r.stdout.decode().strip()
        return out if r.returncode == 0 else None

    def reach(self, proto: str, addr: str, port: int, ns: Optional[str] = None,
              tries: int = 3) -> Optional[str]:
        """Like ``probe``, with a few tries (neighbour discovery is asynchronous):
        for asserting that something answers; ``probe`` once for that nothing does."""
        for _ in range(tries):
            answer = self.probe(proto, addr, port, ns=ns)
            if answer is not None:
                return answer
        return None

    def close(self) -> None:
        for p in self.procs:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        self.procs.clear()
        for ns in (self.client, self.guest, self.host):
            run("ip", "netns", "del", ns, check=False)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            listed = run("ip", "netns", "list").stdout.decode()
            if self.tag not in listed:
                break
            time.sleep(0.05)
