"""portfwd benchmark, data path: what a forward costs per new connection and per
packet, with 1 forward in the table and with 10,000, and through a full-range
forward.

Run as root: ``.venv/bin/python bench/datapath.py`` (see bench/README.md). Four
labs, each a client → host → guest set of namespaces made for the run (removed
at the end), portfwd's rules in the host's:

- "1 fwd": guest web1 with ``8080:80`` (tcp) and ``8080:80/udp``, nothing else;
- "10k fwd": the same plus 1,000 other guests x 10 forwards;
- "full range": web1 with ``1-65535/tcp`` and ``1-65535/udp`` (DNAT keeps the port).
- "floor": as "1 fwd", for the traffic that bypasses the DNAT.

Per lab, from the client: TCP connections opened and reset one after another
(each a new conntrack entry, so each passes the nat chains: the connect rate),
64-byte echo round trips over one established TCP connection (per packet), and
one-datagram UDP round trips each from a new socket (a new flow). The floor is the
same traffic to the guest's own address (routed, no DNAT) in a fourth lab set up
as "1 fwd" (each lab carries one kind of traffic: conntrack alike).
Rounds alternate between the labs (each first in turn), so drift of a shared machine
hits all alike.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any, Dict, List, Tuple

from common import (GUEST4, HOST4, Lab, Row, Site, forward_toml, median, other_name,
                    others_toml, part_main, sh)

ROUNDS = int(os.environ.get("PFBENCH_ROUNDS", "5"))
CONNECTS, ECHOES, DATAGRAMS = 3000, 2000, 1000  # per round and lab
SUBJECT = "web1"
LABS = {"1 fwd": ["8080:80", "8080:80/udp"],
        "10k fwd": ["8080:80", "8080:80/udp"],
        "full range": ["1-65535/tcp", "1-65535/udp"],
        "floor": ["8080:80", "8080:80/udp"]}  # a lab of its own: each carries one kind of traffic
TARGET_SPREAD = 0.10  # 10k fwd within 10 % of 1 fwd

SERVER = r"""
import selectors, socket, sys
sel = selectors.DefaultSelector()
port = int(sys.argv[1])
t = socket.socket(); t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
t.bind(("0.0.0.0", port)); t.listen(4096); t.setblocking(False)
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.bind(("0.0.0.0", port))
sel.register(t, selectors.EVENT_READ, "accept"); sel.register(u, selectors.EVENT_READ, "udp")
print("ready", flush=True)
while True:
    for key, _ in sel.select():
        s = key.fileobj
        if key.data == "accept":
            try:
                c, _ = s.accept()
            except OSError:
                continue
            c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sel.register(c, selectors.EVENT_READ, "tcp")
        elif key.data == "udp":
            data, peer = s.recvfrom(100)
            s.sendto(data, peer)
        else:
            try:
                data = s.recv(4096)
            except OSError:
                data = b""
            if data:
                s.sendall(data)
            else:
                sel.unregister(s); s.close()
"""

CLIENT = r"""
import json, socket, struct, sys, time
host, port, connects, echoes, datagrams = sys.argv[1], int(sys.argv[2]), *map(int, sys.argv[3:6])
reset = struct.pack("ii", 1, 0)  # close with RST: no TIME_WAIT piling up
t0 = time.perf_counter()
for _ in range(connects):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, reset)
    s.settimeout(2)
    s.connect((host, port))
    s.close()
rate = connects / (time.perf_counter() - t0)
s = socket.create_connection((host, port), timeout=2)
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
msg, rtt = b"x" * 64, []
for _ in range(echoes):
    t = time.perf_counter()
    s.sendall(msg)
    got = 0
    while got < 64:
        got += len(s.recv(64 - got))
    rtt.append((time.perf_counter() - t) * 1e6)
s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, reset)
s.close()
udp = []
for _ in range(datagrams):
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    u.settimeout(2)
    t = time.perf_counter()
    u.sendto(b"x", (host, port))
    u.recv(10)
    udp.append((time.perf_counter() - t) * 1e6)
    u.close()
print(json.dumps({"rate": rate, "rtt": rtt, "udp": udp}))
"""


def build(base: str, tag: str, name: str, ports: List[str]) -> Tuple[Lab, Site]:
    """A lab with portfwd's forwards for ``name`` applied in its host namespace."""
    lab = Lab(tag)
    site = Site(base, lab.host)
    text = forward_toml(SUBJECT, GUEST4, ports)
    guests = [SUBJECT]
    if name == "10k fwd":
        text += others_toml()
        guests += [other_name(g) for g in range(1000)]
    site.write(text)
    site.sync(guests)
    return lab, site


def measure(lab: Lab, host: str, port: int) -> Dict[str, Any]:
    """One client run: {"rate": connections/s, "rtt": [us], "udp": [us]}."""
    r = sh(sys.executable, "-c", CLIENT, host, str(port), str(CONNECTS), str(ECHOES),
           str(DATAGRAMS), ns=lab.client)
    out: Dict[str, Any] = json.loads(r.stdout)
    return out


def run(base: str) -> List[Row]:
    """Every data-path figure, as report rows."""
    os.makedirs(base, mode=0o755, exist_ok=True)
    labs: Dict[str, Tuple[Lab, Site]] = {}
    servers: List["subprocess.Popen[bytes]"] = []
    try:
        for i, (name, ports) in enumerate(LABS.items()):
            labs[name] = build(os.path.join(base, f"d{i}"), f"pfd{os.getpid()}{i}", name, ports)
            lab = labs[name][0]
            p = subprocess.Popen(["ip", "netns", "exec", lab.guest, sys.executable, "-c", SERVER,
                                  "80"], stdout=subprocess.PIPE, start_new_session=True)
            servers.append(p)
            assert p.stdout is not None and p.stdout.readline().strip() == b"ready"
        elements = {name: site.elements() for name, (_, site) in labs.items()}
        targets = {"1 fwd": (labs["1 fwd"][0], HOST4, 8080),
                   "10k fwd": (labs["10k fwd"][0], HOST4, 8080),
                   "full range": (labs["full range"][0], HOST4, 80),
                   "no DNAT (floor)": (labs["floor"][0], GUEST4, 80)}
        samples: Dict[str, Dict[str, List[float]]] = {
            k: {"rate": [], "rtt": [], "udp": []} for k in targets}
        for lab, host, port in targets.values():
            measure(lab, host, port)  # warm: neighbours, caches
        order = list(targets)
        for _ in range(ROUNDS):
            order = order[1:] + order[:1]  # each lab first in turn: no place is favoured
            for what in order:
                lab, host, port = targets[what]
                got = measure(lab, host, port)
                samples[what]["rate"].append(float(got["rate"]))
                samples[what]["rtt"] += got["rtt"]
                samples[what]["udp"] += got["udp"]
    finally:
        for p in servers:
            os.killpg(p.pid, 15)
            p.wait()
        for lab, _ in labs.values():
            lab.close()
    return rows(samples, elements)


def rows(samples: Dict[str, Dict[str, List[float]]], elements: Dict[str, int]) -> List[Row]:
    rate = {k: median(v["rate"]) for k, v in samples.items()}
    rtt = {k: median(v["rtt"]) for k, v in samples.items()}
    udp = {k: median(v["udp"]) for k, v in samples.items()}
    out = []

    def spread(ratio: float) -> bool:
        return abs(ratio - 1) <= TARGET_SPREAD

    within = f"1+-{TARGET_SPREAD:.2f}x 1 fwd"
    for what, unit, figures, text in (
            ("TCP connect rate", "conn/s", rate, "new connection, opened and reset"),
            ("TCP echo round trip", "us", rtt, "64 B on an established connection"),
            ("UDP round trip, new flow", "us", udp, "one datagram from a new socket")):
        base = figures["1 fwd"]
        out.append(Row(f"{what}, 1 fwd ({elements['1 fwd']} elements)", base, unit,
                       figures["no DNAT (floor)"], base / figures["no DNAT (floor)"]))
        ratio = figures["10k fwd"] / base
        out.append(Row(f"{what}, 10k fwd ({elements['10k fwd']} elements)", figures["10k fwd"],
                       unit, base, ratio, within, spread(ratio)))
        ratio = figures["full range"] / base
        out.append(Row(f"{what}, full range 1-65535 (port 80)", figures["full range"], unit,
                       base, ratio))
        out.append(Row(f"{what}, no DNAT (floor, {text})", figures["no DNAT (floor)"], unit))
    return out


NOTES = """\
'vs' of a '1 fwd' row: the floor (no DNAT); of '10k fwd' and 'full range' rows: the
'1 fwd' row. Connect rate: connections per second, one after another, each closed
with RST; round trips: median of every sample over all rounds."""


def main() -> int:
    return part_main("datapath.py", run, NOTES)


if __name__ == "__main__":
    sys.exit(main())
