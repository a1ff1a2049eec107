"""What the per-forward counters cost: new connections per second and bytes per
second through one forward, with the table as portfwd builds it (counters on
the maps the DNAT reads) and with the same table without counters.

As root: ``.venv/bin/python bench/counters.py [ROUNDS]``. Three network namespaces
(``pfcnt<pid>c|h|g``: client → host with portfwd's table → guest), removed at the
end; nothing reaches the root namespace. Rounds alternate the two tables, so a
noisy machine hits both alike; medians are printed.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from typing import Any, Dict, List

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "src"))

from portfwd.plan import rules  # noqa: E402
from portfwd.plan import Binding  # noqa: E402

TAG = f"pfcnt{os.getpid() % 100000}"
CLIENT, HOST, GUEST = f"{TAG}c", f"{TAG}h", f"{TAG}g"
CONNECTS = 3000
STREAM_MB = 512

SERVER = r"""
import socket, sys, threading
def drain(c):
    while c.recv(1 << 20):
        pass
    c.close()
def serve(port, stream):
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", port)); s.listen(512)
    while True:
        c, _ = s.accept()
        if stream:
            threading.Thread(target=drain, args=(c,), daemon=True).start()
        else:
            c.close()
threading.Thread(target=serve, args=(80, False), daemon=True).start()
threading.Thread(target=serve, args=(81, True), daemon=True).start()
print("ready", flush=True)
sys.stdin.read()
"""

CONNECTOR = r"""
import socket, struct, sys, time
n = int(sys.argv[1])
linger = struct.pack("ii", 1, 0)  # close with RST: no TIME_WAIT piles up
t0 = time.perf_counter()
for _ in range(n):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
    s.connect(("203.0.113.1", 8080))
    s.close()
print(n / (time.perf_counter() - t0))
"""

STREAMER = r"""
import socket, sys, time
total = int(sys.argv[1]) << 20
chunk = b"x" * (1 << 16)
s = socket.create_connection(("203.0.113.1", 8081))
t0 = time.perf_counter()
sent = 0
while sent < total:
    s.sendall(chunk); sent += len(chunk)
s.shutdown(socket.SHUT_WR); s.recv(1); s.close()
print(sent / (time.perf_counter() - t0) / 1e6)
"""


def ns(name: str, *cmd: str, input: "bytes | None" = None) -> "subprocess.CompletedProcess[bytes]":
    return subprocess.run(["ip", "netns", "exec", name, *cmd], check=True, input=input,
                          capture_output=True)


def build() -> None:
    for name in (CLIENT, HOST, GUEST):
        subprocess.run(["ip", "netns", "add", name], check=True)
        ns(name, "ip", "link", "set", "lo", "up")
    ns(HOST, "sysctl", "-qw", "net.ipv4.ip_forward=1")
    ns(HOST, "ip", "link", "add", "up0", "type", "veth", "peer", "name", "eth0", "netns", CLIENT)
    ns(HOST, "ip", "link", "add", "vnet0", "type", "veth", "peer", "name", "eth0", "netns", GUEST)
    for args in (("up0", "203.0.113.1/24"), ("vnet0", "192.168.150.1/24")):
        ns(HOST, "ip", "addr", "add", args[1], "dev", args[0])
        ns(HOST, "ip", "link", "set", args[0], "up")
    for name, address, gateway in ((CLIENT, "203.0.113.2/24", "203.0.113.1"),
                                   (GUEST, "192.168.150.10/24", "192.168.150.1")):
        ns(name, "ip", "addr", "add", address, "dev", "eth0")
        ns(name, "ip", "link", "set", "eth0", "up")
        ns(name, "ip", "route", "add", "default", "via", gateway)


def table(counters: bool) -> Dict[str, Any]:
    bindings = [Binding("any", 4, ("tcp", port), "192.168.150.10", port - 8000, "bench",
                        f"bench forward[0].ports[{i}]") for i, port in enumerate((8080, 8081))]
    cmds: List[Dict[str, Any]] = rules.drop_table("portfwd") + rules.full_rebuild("portfwd",
                                                                                   bindings)
    if not counters:
        for cmd in cmds:
            cmd.get("add", {}).get("map", {}).pop("stmt", None)
    return {"nftables": cmds}


def main() -> None:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    build()
    server = subprocess.Popen(["ip", "netns", "exec", GUEST, sys.executable, "-c", SERVER],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert server.stdout is not None and server.stdout.readline() == b"ready\n"
        results: Dict[bool, Dict[str, List[float]]] = {
            c: {"connects": [], "stream": []} for c in (True, False)}
        counted: List[Any] = []
        for i in range(rounds):
            for counters in ((True, False) if i % 2 else (False, True)):
                ns(HOST, "nft", "-j", "-f", "-", input=json.dumps(table(counters)).encode())
                out = ns(CLIENT, sys.executable, "-c", CONNECTOR, str(CONNECTS)).stdout
                results[counters]["connects"].append(float(out))
                out = ns(CLIENT, sys.executable, "-c", STREAMER, str(STREAM_MB)).stdout
                results[counters]["stream"].append(float(out))
                if counters:  # the DNAT counted each connection once, the stream once
                    listing = json.loads(ns(HOST, "nft", "-j", "list", "map", "inet", "portfwd",
                                            "any4_ip").stdout)
                    counted = [e[0]["elem"]["counter"]["packets"] for m in listing["nftables"]
                               if "map" in m for e in m["map"].get("elem", [])]
    finally:
        server.kill()
        server.wait()
        for name in (CLIENT, HOST, GUEST):
            subprocess.run(["ip", "netns", "del", name], check=False)
    print(f"portfwd counters: {rounds} rounds alternating, medians;"
          f" {CONNECTS} sequential connections, then one {STREAM_MB} MB stream, per round")
    print(f"{'table':<24}{'connections/s':>16}{'stream MB/s':>14}")
    for counters in (False, True):
        r = results[counters]
        name = "with counters (layout 5)" if counters else "without counters"
        print(f"{name:<24}{statistics.median(r['connects']):>16.0f}"
              f"{statistics.median(r['stream']):>14.0f}")
    base, new = results[False], results[True]
    print(f"ratio with/without: connections {statistics.median(new['connects']) / statistics.median(base['connects']):.3f},"
          f" stream {statistics.median(new['stream']) / statistics.median(base['stream']):.3f}")
    print(f"connections the counters saw in one round (8080, 8081): {counted}")


if __name__ == "__main__":
    main()
