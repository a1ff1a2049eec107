"""The host's listening sockets, read from /proc/net (of the caller's network
namespace), with the process that holds each when /proc/PID/fd tells: the one
reader of them (``portfwd check`` and ``portfwd doctor``)."""

from __future__ import annotations

import os
import socket
from typing import Dict, List, NamedTuple, Set, Tuple

TCP_LISTEN = b"0A"
UDP_UNCONNECTED = b"07"  # a bound UDP socket without a peer
NO_PEER = (b"00000000:0000", b"00000000000000000000000000000000:0000")


class Socket(NamedTuple):
    """A socket waiting for connections (tcp) or datagrams (udp)."""

    proto: str
    family: int
    address: str  # "0.0.0.0" / "::" for every address
    port: int
    process: str  # "sshd (pid 812)", or "" when no process could be named

    @property
    def wildcard(self) -> bool:
        return self.address in ("0.0.0.0", "::")

    @property
    def endpoint(self) -> str:
        """``0.0.0.0:22``, ``[::1]:631``."""
        return f"[{self.address}]:{self.port}" if self.family == 6 else f"{self.address}:{self.port}"

    @property
    def loopback(self) -> bool:
        return self.address.startswith("127.") or self.address == "::1"


def sockets(proc: str = "/proc") -> List[Socket]:
    """Listening tcp and bound udp sockets of this network namespace."""
    found: List[Tuple[str, int, str, int, str]] = []  # proto, family, address, port, inode
    for proto, family, state in (("tcp", 4, TCP_LISTEN), ("tcp", 6, TCP_LISTEN),
                                 ("udp", 4, UDP_UNCONNECTED), ("udp", 6, UDP_UNCONNECTED)):
        try:
            with open(f"{proc}/net/{proto}{'6' if family == 6 else ''}", "rb") as f:
                lines = f.read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) < 10 or fields[3] != state or fields[2] not in NO_PEER:
                continue
            try:
                address, _, port = fields[1].decode("ascii").partition(":")
                found.append((proto, family, _address(address, family), int(port, 16),
                              fields[9].decode("ascii")))
            except ValueError:  # not what the kernel prints: skipped
                continue
    owners = _owners({inode for *_, inode in found}, proc) if found else {}
    return sorted({Socket(p, f, a, port, owners.get(inode, "")) for p, f, a, port, inode in found})


def _address(hexed: str, family: int) -> str:
    """/proc/net's address: 32-bit words in host byte order."""
    raw = bytes.fromhex(hexed)
    words = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
    return socket.inet_ntop(socket.AF_INET if family == 4 else socket.AF_INET6, words)


def _owners(inodes: Set[str], proc: str) -> Dict[str, str]:
    """Socket inode → ``"NAME (pid N)"`` of the first process holding it."""
    out: Dict[str, str] = {}
    try:
        pids = [p for p in os.listdir(proc) if p.isdigit()]
    except OSError:
        return out
    for pid in sorted(pids, key=int):
        fd_dir = f"{proc}/{pid}/fd"
        try:
            links = [os.readlink(f"{fd_dir}/{fd}") for fd in os.listdir(fd_dir)]
            with open(f"{proc}/{pid}/comm", "rb") as f:  # any bytes its process chose
                name = f.read().strip().decode("utf-8", "surrogateescape")
        except OSError:
            continue
        for link in links:
            if link.startswith("socket:[") and link[8:-1] in inodes:
                out.setdefault(link[8:-1], f"{name} (pid {pid})")
    return out
