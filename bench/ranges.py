"""portfwd benchmark, part 2: a full-range guest beside a 1-port guest, and the
cost of a new connection through the DNAT with 10,000 forwards loaded.

Run as root: ``sudo .venv/bin/python bench/ranges.py`` (see bench/README.md).
Everything runs in network namespaces made for the run, removed at the end.

1. hook ``started`` and ``stopped`` of one guest with an IPv4 and an IPv6
   address: wall time (median) and peak resident memory of the hook process
   (``/usr/bin/time -f %M``, maximum over the runs), for ``ports = ["8080:80"]``
   and for ``ports = ["1024-65535/tcp", "1024-65535/udp"]``.
2. a client namespace → host namespace (1,000 guests x 10 forwards applied,
   plus the measured guest) → guest namespace: round trips of one UDP
   datagram, each from a new socket (so each is a new conntrack entry and
   passes the nat chains), to a single-port forward, to a port of a range
   forward, and straight to the guest address (no DNAT, the floor).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Sequence, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
HOOK = os.path.join(os.path.dirname(HERE), "hook", "qemu")
SYNC_RUN = os.path.join(HERE, "sync_run.py")
TMPFS = "/dev/shm"
GUEST4, GUEST6 = "192.168.150.10", "fd00:150::10"
HOST4 = "203.0.113.1"
CLIENT4 = "203.0.113.2"
HOOK_REPEATS = {"1 port": 15, "full range": 7}  # PFBENCH_REPEATS=N overrides both
ROUND_TRIPS = 3000
OTHERS, OTHER_FORWARDS = 1000, 10
SHAPES = {"1 port": ['"8080:80"'],
          "full range": ['"1024-65535/tcp"', '"1024-65535/udp"']}


def sh(*cmd: str, ns: str = "", check: bool = True, stdin: bytes = b"",
       env: Dict[str, str] | None = None) -> subprocess.CompletedProcess:
    full = (["ip", "netns", "exec", ns] if ns else []) + list(cmd)
    return subprocess.run(full, input=stdin, capture_output=True, check=check, env=env)


def forward(guest: str, ipv4: str, ports: Sequence[str], ipv6: str = "") -> str:
    six = f'ipv6 = "{ipv6}"\n' if ipv6 else ""
    return f'[[forward]]\nguest = "{guest}"\nipv4 = "{ipv4}"\n{six}ports = [{", ".join(ports)}]\n\n'


class Site:
    def __init__(self, base: str, ns: str) -> None:
        self.ns = ns
        etc = os.path.join(base, "etc")
        os.makedirs(etc, mode=0o755)
        os.chmod(base, 0o755)
        self.config = os.path.join(etc, "forward.toml")
        self.rundir = os.path.join(base, "run")
        self.env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "PORTFWD_CONFIG": self.config,
                    "PORTFWD_RUNDIR": self.rundir}

    def write(self, text: str) -> None:
        with open(self.config + ".new", "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(self.config + ".new", 0o644)
        os.replace(self.config + ".new", self.config)

    def hook(self, op: str, sub: str) -> Tuple[float, int]:
        """One hook run: (wall ms, peak RSS in kB)."""
        xml = b"<domain><name>web1</name><uuid>6b1f0c2e-0000-4000-8000-000000000001</uuid></domain>"
        t0 = time.perf_counter()
        p = sh("/usr/bin/time", "-f", "%M", sys.executable, "-I", HOOK, "web1", op, sub, "-",
               ns=self.ns, stdin=xml, env=self.env)
        ms = (time.perf_counter() - t0) * 1e3
        lines = p.stderr.decode().strip().splitlines()
        bad = [line for line in lines[:-1] if "error" in line]
        if bad:
            raise RuntimeError("\n".join(bad))
        return ms, int(lines[-1])

    def elements(self) -> int:
        p = sh("nft", "-j", "list", "table", "inet", "portfwd", ns=self.ns, check=False)
        if p.returncode:
            return 0
        return sum(len(o["map"].get("elem", [])) for o in json.loads(p.stdout)["nftables"]
                   if "map" in o)


def hooks(site: Site) -> List[Tuple[str, str, float, int, int]]:
    """(shape, op, median ms, peak kB, elements after started)"""
    out = []
    for shape, ports in SHAPES.items():
        site.write(forward("web1", GUEST4, ports, GUEST6))
        site.hook("started", "begin")  # compiles the configuration
        site.hook("stopped", "end")
        runs: Dict[str, List[Tuple[float, int]]] = {"started": [], "stopped": []}
        count = 0
        for _ in range(int(os.environ.get("PFBENCH_REPEATS", 0)) or HOOK_REPEATS[shape]):
            runs["started"].append(site.hook("started", "begin"))
            count = site.elements()
            runs["stopped"].append(site.hook("stopped", "end"))
        for op, values in runs.items():
            out.append((shape, op, statistics.median(v[0] for v in values),
                        max(v[1] for v in values), count))
    return out


# -- a new connection through the DNAT ----------------------------------------

ECHO = """
import selectors, socket, sys
sel = selectors.DefaultSelector()
for port in map(int, sys.argv[1:]):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("0.0.0.0", port))
    sel.register(s, selectors.EVENT_READ)
print("ready", flush=True)
while True:
    for key, _ in sel.select():
        data, peer = key.fileobj.recvfrom(100)
        key.fileobj.sendto(data, peer)
"""

CLIENT = """
import json, socket, sys, time
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
out = []
for _ in range(n):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(1)
    t0 = time.perf_counter()
    s.sendto(b"x", (host, port))
    s.recv(10)
    out.append((time.perf_counter() - t0) * 1e6)
    s.close()
print(json.dumps(out))
"""


def lab(tag: str) -> Tuple[str, str, str]:
    h, g, c = f"{tag}h", f"{tag}g", f"{tag}c"
    for ns in (h, g, c):
        sh("ip", "netns", "add", ns)
        sh("ip", "link", "set", "lo", "up", ns=ns)
    sh("sysctl", "-qw", "net.ipv4.ip_forward=1", ns=h)
    sh("ip", "link", "add", "br0", "type", "bridge", ns=h)
    sh("ip", "addr", "add", "192.168.150.1/24", "dev", "br0", ns=h)
    sh("ip", "link", "set", "br0", "up", ns=h)
    sh("ip", "link", "add", "vnet0", "type", "veth", "peer", "name", "eth0", "netns", g, ns=h)
    sh("ip", "link", "set", "vnet0", "master", "br0", "up", ns=h)
    sh("ip", "addr", "add", f"{GUEST4}/24", "dev", "eth0", ns=g)
    sh("ip", "link", "set", "eth0", "up", ns=g)
    sh("ip", "route", "add", "default", "via", "192.168.150.1", ns=g)
    sh("ip", "link", "add", "uplink", "type", "veth", "peer", "name", "eth0", "netns", c, ns=h)
    sh("ip", "addr", "add", f"{HOST4}/24", "dev", "uplink", ns=h)
    sh("ip", "link", "set", "uplink", "up", ns=h)
    sh("ip", "addr", "add", f"{CLIENT4}/24", "dev", "eth0", ns=c)
    sh("ip", "link", "set", "eth0", "up", ns=c)
    sh("ip", "route", "add", "default", "via", HOST4, ns=c)
    return h, g, c


def connections(base: str, tag: str) -> Dict[str, float]:
    h, g, c = lab(tag)
    site = Site(base, h)
    others = [f"o{i:04d}" for i in range(OTHERS)]
    text = forward("web1", GUEST4, ['"8080:80/udp"', '"20000-20009/udp"'])
    for i, name in enumerate(others):
        ports = []
        for j in range(OTHER_FORWARDS):
            k = i * OTHER_FORWARDS + j
            ports.append(f'"{10001 + k % 5000}:80/{"tcp" if k < 5000 else "udp"}"')
        text += forward(name, f"10.{i // 250}.{i % 250}.10", ports)
    site.write(text)
    p = subprocess.run(["ip", "netns", "exec", h, sys.executable, SYNC_RUN, site.config,
                        site.rundir, "web1", *others], capture_output=True, env=site.env)
    if p.returncode:
        raise RuntimeError(p.stderr.decode())
    echo = subprocess.Popen(["ip", "netns", "exec", g, sys.executable, "-c", ECHO, "80", "20005"],
                            stdout=subprocess.PIPE, start_new_session=True)
    try:
        assert echo.stdout is not None and echo.stdout.readline().strip() == b"ready"
        out: Dict[str, float] = {"elements": float(site.elements())}
        targets = {"single port": (HOST4, 8080), "range port": (HOST4, 20005),
                   "no DNAT (floor)": (GUEST4, 80)}
        samples: Dict[str, List[float]] = {k: [] for k in targets}
        for _ in range(3):  # interleaved rounds: drift hits all alike
            for what, (addr, port) in targets.items():
                r = sh(sys.executable, "-c", CLIENT, addr, str(port), str(ROUND_TRIPS // 3), ns=c)
                samples[what] += json.loads(r.stdout)
        for what, values in samples.items():
            out[what] = statistics.median(values)
        return out
    finally:
        os.killpg(echo.pid, 15)
        echo.wait()
        for ns in (c, g, h):
            sh("ip", "netns", "del", ns, check=False)


def main() -> int:
    if os.geteuid() != 0:
        sys.stderr.write("ranges.py: run as root (it makes network namespaces)\n")
        return 2
    tmp = tempfile.mkdtemp(prefix="pfbench.", dir=TMPFS if os.path.isdir(TMPFS) else None)
    tag = f"pfr{os.getpid()}"
    try:
        sh("ip", "netns", "add", tag)
        try:
            rows = hooks(Site(os.path.join(tmp, "a"), tag))
        finally:
            sh("ip", "netns", "del", tag, check=False)
        conn = connections(os.path.join(tmp, "b"), tag)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"nft: {sh('nft', '--version').stdout.decode().strip()}; python {sys.version.split()[0]};"
          f" nproc {os.cpu_count()}; {socket.gethostname()}\n")
    print(f"{'guest (IPv4 + IPv6)':<28}{'hook':>9}{'median ms':>11}{'peak RSS MB':>13}"
          f"{'elements':>10}")  # elements: after started
    for shape, op, ms, kb, count in rows:
        print(f"{shape:<28}{op:>9}{ms:>11.1f}{kb / 1024:>13.1f}{count:>10}")
    print(f"\nnew UDP connection, round trip, {int(conn.pop('elements'))} elements loaded"
          f" ({ROUND_TRIPS} each, median):")
    for what, us in conn.items():
        print(f"  {what:<18}{us:>8.1f} us")
    return 0


if __name__ == "__main__":
    sys.exit(main())
