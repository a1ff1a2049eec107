"""Traffic endpoints run inside test namespaces (``ip netns exec NS python3 traffic.py``).

serve PROTO PORT...   answer every TCP connection / UDP datagram with
                      "<proto> <local port> <peer address>" and keep running
probe PROTO HOST PORT send one request, print the answer (exit 1 on silence or refusal)
probes PROTO,HOST,PORT,TRIES,TIMEOUT...
                      many probes at once, each tried up to TRIES times with TIMEOUT
                      seconds each; prints one JSON list of the answers (null: none)
"""

from __future__ import annotations

import selectors
import socket
import sys


def serve(proto: str, ports: "list[int]") -> None:
    sel = selectors.DefaultSelector()
    for port in ports:
        for family, addr in ((socket.AF_INET6, "::"),):
            kind = socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM
            s = socket.socket(family, kind)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            s.bind((addr, port))
            if proto == "tcp":
                s.listen(16)
            sel.register(s, selectors.EVENT_READ, port)
    print("ready", flush=True)
    while True:
        for key, _ in sel.select():
            listener = key.fileobj
            assert isinstance(listener, socket.socket)
            s = listener
            port = key.data
            if proto == "tcp":
                conn, peer = s.accept()
                conn.settimeout(2)
                try:
                    conn.recv(100)
                    conn.sendall(f"tcp {port} {_plain(peer[0])}".encode())
                except OSError:
                    pass
                conn.close()
            else:
                _, peer = s.recvfrom(100)
                s.sendto(f"udp {port} {_plain(peer[0])}".encode(), peer)


def _plain(addr: str) -> str:
    return addr[7:] if addr.startswith("::ffff:") else addr


def ask(proto: str, host: str, port: int, timeout: float = 1.5) -> str:
    """The answer, or ``error NAME`` (OSError, timeout), or "" (an empty answer)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    kind = socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM
    with socket.socket(family, kind) as s:
        s.settimeout(timeout)
        try:
            if proto == "tcp":
                s.connect((host, port))
                s.sendall(b"hello")
                data = s.recv(200)
            else:
                s.sendto(b"hello", (host, port))
                data, _ = s.recvfrom(200)
        except OSError as e:
            return f"error {type(e).__name__}"
    return data.decode()


def probe(proto: str, host: str, port: int) -> int:
    answer = ask(proto, host, port)
    print(answer, flush=True)
    return 0 if answer and not answer.startswith("error ") else 1


def probes(specs: "list[str]") -> None:
    import json
    import threading

    answers: "list[object]" = [None] * len(specs)

    def one(i: int, proto: str, host: str, port: str, tries: str, timeout: str) -> None:
        for _ in range(int(tries)):
            answer = ask(proto, host, int(port), float(timeout))
            if answer and not answer.startswith("error "):
                answers[i] = answer
                return

    threads = [threading.Thread(target=one, args=(i, *spec.split(",")))
               for i, spec in enumerate(specs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print(json.dumps(answers), flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        serve(sys.argv[2], [int(p) for p in sys.argv[3:]])
    elif sys.argv[1] == "probes":
        probes(sys.argv[2:])
    else:
        sys.exit(probe(sys.argv[2], sys.argv[3], int(sys.argv[4])))
