"""What the benchmark scripts share: running commands in namespaces, forward.toml
text, the client → host → guest lab, one in-process sync, and the report table.

Everything is named per run and removed by the caller (``Lab.close``,
``Site`` directories under a temporary directory).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from typing import Callable, Dict, List, Optional, Sequence

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
HOOK = os.path.join(ROOT, "hook", "qemu")
SYNC_RUN = os.path.join(HERE, "sync_run.py")
TMPFS = "/dev/shm"  # /run/portfwd is on tmpfs on a host: here too
PATH = "/usr/sbin:/usr/bin:/sbin:/bin"

GUEST4, GUEST6 = "192.168.150.10", "fd00:150::10"
BRIDGE4 = "192.168.150.1"
HOST4, CLIENT4 = "203.0.113.1", "203.0.113.2"
OTHERS, OTHER_FORWARDS = 1000, 10  # the "10,000 forwards loaded"


def sh(*cmd: str, ns: str = "", check: bool = True, stdin: bytes = b"",
       env: Optional[Dict[str, str]] = None) -> "subprocess.CompletedProcess[bytes]":
    """Run ``cmd`` (in namespace ``ns``), output captured."""
    full = (["ip", "netns", "exec", ns] if ns else []) + list(cmd)
    return subprocess.run(full, input=stdin, capture_output=True, check=check, env=env)


def forward_toml(guest: str, ipv4: Optional[str], ports: Sequence[str],
                 ipv6: Optional[str] = None) -> str:
    """One ``[[forward]]`` table; ``ports`` unquoted (``8080:80``); no address: discovered."""
    lines = [f'[[forward]]\nguest = "{guest}"\n']
    if ipv4:
        lines.append(f'ipv4 = "{ipv4}"\n')
    if ipv6:
        lines.append(f'ipv6 = "{ipv6}"\n')
    lines.append("ports = [" + ", ".join(f'"{p}"' for p in ports) + "]\n\n")
    return "".join(lines)


def other_name(g: int) -> str:
    return f"o{g:04d}"


def others_toml() -> str:
    """1,000 other guests x 10 forwards (5,000 tcp + 5,000 udp host ports)."""
    parts = []
    for g in range(OTHERS):
        ports = []
        for j in range(OTHER_FORWARDS):
            k = g * OTHER_FORWARDS + j
            ports.append(f"{10001 + k % 5000}:80/{'tcp' if k < 5000 else 'udp'}")
        parts.append(forward_toml(other_name(g), f"10.{g // 250}.{g % 250}.10", ports))
    return "".join(parts)


class Site:
    """A forward.toml and a run directory (under ``base``) for namespace ``ns``."""

    def __init__(self, base: str, ns: str) -> None:
        self.ns = ns
        etc = os.path.join(base, "etc")
        os.makedirs(etc, mode=0o755)
        os.chmod(base, 0o755)
        os.chmod(etc, 0o755)  # portfwd refuses a config others may write
        self.config = os.path.join(etc, "forward.toml")
        self.rundir = os.path.join(base, "run")
        self.env = {"PATH": PATH, "PORTFWD_CONFIG": self.config, "PORTFWD_RUNDIR": self.rundir,
                    # these guests are not libvirt's: never judge them by its status files
                    "PORTFWD_QEMU_STATUS_DIR": os.path.join(base, "no-libvirt")}

    def write(self, text: str) -> None:
        tmp = self.config + ".new"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, self.config)

    def sync(self, guests: Sequence[str]) -> Dict[str, float]:
        """One in-process sync (bench/sync_run.py) of ``guests`` in the namespace."""
        p = sh(sys.executable, SYNC_RUN, self.config, self.rundir, *guests, ns=self.ns,
               check=False, env=self.env)
        if p.returncode != 0:
            raise RuntimeError(f"sync_run.py exited {p.returncode}: {p.stderr.decode()}")
        out: Dict[str, float] = json.loads(p.stdout)
        return out

    def elements(self, map_name: Optional[str] = None) -> int:
        """Elements in portfwd's maps (or in one of them); 0 without the table."""
        what = ["map", "inet", "portfwd", map_name] if map_name else ["table", "inet", "portfwd"]
        p = sh("nft", "-j", "list", *what, ns=self.ns, check=False)
        if p.returncode:
            return 0
        return sum(len(o["map"].get("elem", [])) for o in json.loads(p.stdout)["nftables"]
                   if "map" in o)


class Lab:
    """client (CLIENT4) → host (HOST4 | bridge BRIDGE4) → guest (GUEST4), as three
    namespaces ``TAGc``, ``TAGh``, ``TAGg``; portfwd's rules live in the host's."""

    def __init__(self, tag: str) -> None:
        self.host, self.guest, self.client = f"{tag}h", f"{tag}g", f"{tag}c"
        self.made: List[str] = []
        try:
            self._build()
        except BaseException:
            self.close()
            raise

    def _build(self) -> None:
        h, g, c = self.host, self.guest, self.client
        for ns in (h, g, c):
            sh("ip", "netns", "add", ns)
            self.made.append(ns)
            sh("ip", "link", "set", "lo", "up", ns=ns)
        sh("sysctl", "-qw", "net.ipv4.ip_forward=1", ns=h)
        sh("ip", "link", "add", "br0", "type", "bridge", ns=h)
        sh("ip", "addr", "add", f"{BRIDGE4}/24", "dev", "br0", ns=h)
        sh("ip", "link", "set", "br0", "up", ns=h)
        sh("ip", "link", "add", "vnet0", "type", "veth", "peer", "name", "eth0", "netns", g, ns=h)
        sh("ip", "link", "set", "vnet0", "master", "br0", "up", ns=h)
        sh("ip", "addr", "add", f"{GUEST4}/24", "dev", "eth0", ns=g)
        sh("ip", "link", "set", "eth0", "up", ns=g)
        sh("ip", "route", "add", "default", "via", BRIDGE4, ns=g)
        sh("ip", "link", "add", "uplink", "type", "veth", "peer", "name", "eth0", "netns", c, ns=h)
        sh("ip", "addr", "add", f"{HOST4}/24", "dev", "uplink", ns=h)
        sh("ip", "link", "set", "uplink", "up", ns=h)
        sh("ip", "addr", "add", f"{CLIENT4}/24", "dev", "eth0", ns=c)
        sh("ip", "link", "set", "eth0", "up", ns=c)
        sh("ip", "route", "add", "default", "via", HOST4, ns=c)

    def close(self) -> None:
        for ns in reversed(self.made):
            sh("ip", "netns", "del", ns, check=False)
        self.made.clear()


# -- the report -------------------------------------------------------------------

class Row:
    """One figure: ``value`` in ``unit``, beside what it is compared with (``ref``,
    a figure of the same run), the ratio, the target and whether it is met."""

    __slots__ = ("what", "value", "unit", "ref", "ratio", "target", "ok")

    def __init__(self, what: str, value: Optional[float], unit: str,
                 ref: Optional[float] = None, ratio: Optional[float] = None,
                 target: str = "-", ok: Optional[bool] = None) -> None:
        self.what, self.value, self.unit, self.ref = what, value, unit, ref
        self.ratio, self.target, self.ok = ratio, target, ok


def _num(value: Optional[float]) -> str:
    if value is None:
        return "-"
    return f"{value:.0f}" if abs(value) >= 1000 else f"{value:.1f}"


def table(rows: Sequence[Row]) -> str:
    """The rows as an aligned plain-text table."""
    head = ("what", "value", "unit", "vs", "ratio", "target", "ok?")
    body = [(r.what, _num(r.value), r.unit, _num(r.ref),
             "-" if r.ratio is None else f"{r.ratio:.2f}x", r.target,
             "-" if r.ok is None else ("ok" if r.ok else "MISS")) for r in rows]
    widths = [max(len(line[i]) for line in [head, *body]) for i in range(len(head))]
    lines = []
    for line in [head, *body]:
        cells = [c.ljust(w) if i in (0, 2, 5) else c.rjust(w)
                 for i, (c, w) in enumerate(zip(line, widths))]
        lines.append("  ".join(cells).rstrip())
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def require_root(name: str) -> bool:
    if os.geteuid() != 0:
        sys.stderr.write(f"{name}: run as root (it makes network namespaces)\n")
        return False
    return True


def part_main(name: str, run: Callable[[str], List[Row]], notes: str) -> int:
    """A part run as a script: its rows measured under a temporary directory on tmpfs
    (removed after), printed as a table with its notes."""
    import shutil
    import tempfile

    if not require_root(name):
        return 2
    tmp = tempfile.mkdtemp(prefix="pfbench.", dir=TMPFS if os.path.isdir(TMPFS) else None)
    os.chmod(tmp, 0o755)  # portfwd refuses a config others may write, or its folders
    try:
        rows = run(os.path.join(tmp, "part"))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(table(rows))
    print()
    print(notes)
    return 0
