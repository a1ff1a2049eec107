"""portfwd benchmark: the libvirt hook and ``sync`` against floors.

Run as root: ``sudo .venv/bin/python bench/bench.py`` (see bench/README.md).
Everything runs inside network namespaces made for the run; they and the
temporary directory are removed at the end. A report, not a test: exits 0
even when a target is missed (marked MISS).

Two sites, each a namespace with its own config and run directory: "alone"
holds only the measured guest, "loaded" also 1,000 other guests x 10
forwards. Their runs alternate, so drift of a shared, noisy machine hits
both alike; each hook run alternates with its floor run the same way.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import common

HERE = os.path.dirname(os.path.abspath(__file__))
HOOK = os.path.join(os.path.dirname(HERE), "hook", "qemu")
FLOOR_NFT = os.path.join(HERE, "floor_nft.py")
COUNTED_HOOK = os.path.join(os.path.dirname(HERE), "tests", "counted_hook.py")
SYNC_RUN = os.path.join(HERE, "sync_run.py")

SUBJECT = "bench"
NOBODY = "nosuchguest"
SIZES = (1, 10, 100, 1000)
REPEATS = {1: 25, 10: 25, 100: 25, 1000: 11}
PASS_REPEATS = 31
SH_REPEATS = 51
RECONNECTS = 100
SYNC_REPEATS = 9
OTHERS = 1000
OTHER_FORWARDS = 10
FLOOR_TABLE = "pffloor"
TIMEOUT = 300.0
# The run directory is /run/portfwd on a host: tmpfs. Use tmpfs here too.
TMPFS = "/dev/shm"


@dataclass
class Row:
    """One line of the report."""

    what: str
    median: float
    floor: Optional[float]
    ratio: Optional[float]
    target: str
    ok: Optional[bool]


class Site(common.Site):
    """A network namespace of its own with a forward.toml and run directory."""

    def __init__(self, ns: str, base: str) -> None:
        super().__init__(base, ns)
        self.made = False

    def create(self) -> None:
        subprocess.run(["ip", "netns", "add", self.ns], check=True)
        self.made = True

    def delete(self) -> None:
        """Remove the namespace, and with it every table in it."""
        if self.made:
            subprocess.run(["ip", "netns", "del", self.ns], check=False)
            self.made = False

    # -- running things ----------------------------------------------------
    def run(self, cmd: Sequence[str], stdin: bytes = b"", check: bool = True) -> float:
        """Run ``cmd`` in the namespace; its wall time in ms."""
        full = ["ip", "netns", "exec", self.ns, *cmd]
        t0 = time.perf_counter()
        p = subprocess.run(full, input=stdin, capture_output=True, env=self.env, timeout=TIMEOUT)
        elapsed = (time.perf_counter() - t0) * 1e3
        if check:
            complaints = [line for line in p.stderr.decode().splitlines()
                          if "error" in line or "warning" in line]
            if p.returncode != 0 or complaints:
                raise RuntimeError(f"{' '.join(full)} exited {p.returncode}: {p.stderr.decode()}")
        return elapsed

    def hook(self, guest: str, op: str, sub: str) -> float:
        """One hook call as libvirt makes it; its wall time in ms."""
        xml = f"<domain><name>{guest}</name><uuid>{uuid_of(guest)}</uuid></domain>".encode()
        return self.run([sys.executable, "-I", HOOK, guest, op, sub, "-"], stdin=xml)

    def counted(self, guest: str, op: str, sub: str) -> Dict[str, List[object]]:
        """One hook call through tests/counted_hook.py: what it did to the host."""
        out = self.rundir + ".counts.json"
        xml = f"<domain><name>{guest}</name><uuid>{uuid_of(guest)}</uuid></domain>".encode()
        env = dict(self.env, COUNTS_OUT=out)
        full = ["ip", "netns", "exec", self.ns, sys.executable, "-I", COUNTED_HOOK, guest, op,
                sub, "-"]
        subprocess.run(full, input=xml, capture_output=True, env=env, timeout=TIMEOUT, check=True)
        with open(out, encoding="utf-8") as f:
            counts: Dict[str, List[object]] = json.load(f)
        os.unlink(out)
        return counts

    def restart(self, guest: str) -> float:
        """``stopped`` (untimed), then ``started``: the wall time of the start."""
        self.hook(guest, "stopped", "end")
        return self.hook(guest, "started", "begin")

    def floor_nft(self, count: int) -> float:
        """Floor (b) into a fresh table: its wall time in ms."""
        self.run(["nft", "delete", "table", "inet", FLOOR_TABLE], check=False)
        return self.run([sys.executable, "-I", FLOOR_NFT, str(count), FLOOR_TABLE])

    def direct(self, cmd: Sequence[str], stdin: bytes = b"") -> float:
        """Run ``cmd`` outside the namespace (the sh lines touch no network); its wall
        time in ms. Fails on a non-zero exit or any output."""
        t0 = time.perf_counter()
        p = subprocess.run(cmd, input=stdin, capture_output=True, env=self.env, timeout=TIMEOUT)
        elapsed = (time.perf_counter() - t0) * 1e3
        if p.returncode != 0 or p.stdout or p.stderr:
            raise RuntimeError(f"{' '.join(cmd)} exited {p.returncode}: {p.stderr.decode()}")
        return elapsed

    def sh_hook(self, hook: str, guest: str, op: str, sub: str) -> float:
        """One call of the hook's sh lines (``hook``: hook/qemu run by /bin/sh, or the
        file libvirt runs from /etc) with a domain XML of libvirt's size (5 kB)."""
        cmd = [hook] if os.access(hook, os.X_OK) else ["/bin/sh", hook]
        return self.direct([*cmd, guest, op, sub, "-"], stdin=big_xml(guest))

    def age_config(self) -> None:
        """forward.toml and its folder as if edited a minute ago, then a Python run
        (which compiles it again): the hook index is current, its sh lines trust it."""
        from portfwd import hookindex

        past = time.time_ns() - 60 * 10**9
        for path in (self.config, os.path.dirname(self.config)):
            os.utime(path, ns=(past, past))
        self.hook(NOBODY, "started", "begin")
        if not hookindex.trusted(self.rundir, self.config):
            raise RuntimeError(f"{self.rundir}: the hook index is not current")

    def through_daemon(self, forwards: int) -> Dict[str, List[float]]:
        """``stopped``/``started`` of the subject while ``portfwd daemon`` runs here
        (libvirt's test driver says the subject runs), with floor (a) between them."""
        from portfwd import hooksocket

        self.write_config(forwards, others=False)
        node = os.path.join(os.path.dirname(self.config), "node.xml")
        with open(node, "w", encoding="utf-8") as f:
            f.write(f"<node><domain type='test'><name>{SUBJECT}</name><memory>65536</memory>"
                    "<os><type>hvm</type></os></domain></node>\n")
        daemon = subprocess.Popen(["ip", "netns", "exec", self.ns, sys.executable, "-m",
                                   "portfwd.cli", "daemon", "--connect", f"test://{node}"],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                  env=self.env, start_new_session=True)
        out: Dict[str, List[float]] = {"started": [], "stopped": [], "floor": []}
        try:
            deadline = time.monotonic() + 60
            while not os.path.exists(hooksocket.socket_path(self.rundir)):
                if time.monotonic() > deadline or daemon.poll() is not None:
                    raise RuntimeError("portfwd daemon: no hook.sock within 60 s")
                time.sleep(0.05)
            self.restart(SUBJECT)  # warm
            for _ in range(REPEATS[forwards]):
                out["stopped"].append(self.hook(SUBJECT, "stopped", "end"))
                out["started"].append(self.hook(SUBJECT, "started", "begin"))
                out["floor"].append(self.floor_pass())
            self.check_forwards(forwards)
        finally:
            os.killpg(daemon.pid, signal.SIGTERM)
            daemon.wait(60)
        return out

    def floor_pass(self) -> float:
        """Floor (a): a bare interpreter start; its wall time in ms."""
        return self.run([sys.executable, "-I", "-c", "pass"])

    def sync(self, guests: Sequence[str]) -> Dict[str, float]:
        """One sync in a subprocess: its wall time and what it measured inside."""
        full = ["ip", "netns", "exec", self.ns, sys.executable, SYNC_RUN, self.config,
                self.rundir, *guests]
        t0 = time.perf_counter()
        p = subprocess.run(full, capture_output=True, env=self.env, timeout=TIMEOUT, check=False)
        wall = (time.perf_counter() - t0) * 1e3
        if p.returncode != 0:
            raise RuntimeError(f"sync_run.py exited {p.returncode}: {p.stderr.decode()}")
        out: Dict[str, float] = json.loads(p.stdout)
        out["wall_ms"] = wall
        return out

    def check_forwards(self, expected: int) -> None:
        """Fail unless the portfwd table holds ``expected`` IPv4 forwards."""
        full = ["ip", "netns", "exec", self.ns, "nft", "-j", "list", "map", "inet", "portfwd",
                "any4_port"]
        p = subprocess.run(full, capture_output=True, env=self.env, timeout=TIMEOUT, check=True)
        found = sum(len(o["map"].get("elem", [])) for o in json.loads(p.stdout)["nftables"]
                    if "map" in o)
        if found != expected:
            raise RuntimeError(f"{self.ns}: expected {expected} forwards in the table, found {found}")

    def write_config(self, forwards: int, others: bool) -> None:
        """The subject guest with ``forwards`` forwards, plus the others if asked."""
        parts = [forward_toml(SUBJECT, "192.168.150.10",
                              [f"{40001 + i}:80" for i in range(forwards)])]
        if others:
            for g in range(OTHERS):
                ports = []
                for j in range(OTHER_FORWARDS):
                    k = g * OTHER_FORWARDS + j  # 10,000 = 5,000 tcp + 5,000 udp ports
                    ports.append(f"{10001 + k % 5000}:80/{'tcp' if k < 5000 else 'udp'}")
                parts.append(forward_toml(other_name(g), f"10.{g // 250}.{g % 250}.10", ports))
        tmp = self.config + ".new"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write("".join(parts))
        os.chmod(tmp, 0o644)
        os.replace(tmp, self.config)


def uuid_of(guest: str) -> str:
    """A stable made-up UUID per guest name."""
    n = sum(ord(c) << (8 * (i % 6)) for i, c in enumerate(guest)) & 0xFFFFFFFFFFFF
    return f"6b1f0c2e-0000-4000-8000-{n:012x}"


def big_xml(guest: str) -> bytes:
    """A domain XML about the size libvirt writes (5 kB)."""
    return (f"<domain><name>{guest}</name><uuid>{uuid_of(guest)}</uuid><!--"
            + "x" * 5000 + "--></domain>\n").encode()


def etc_hook(tmp: str) -> str:
    """debian/libvirt-hook as the package installs it in /etc, naming hook/qemu."""
    with open(os.path.join(os.path.dirname(HERE), "debian", "libvirt-hook"), encoding="utf-8") as f:
        text = f.read().replace("@HOOK@", HOOK).replace("@KIND@", "qemu")
    path = os.path.join(tmp, "etc-hook-qemu")
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    os.chmod(path, 0o755)
    return path


def other_name(g: int) -> str:
    """The name of other guest number ``g``."""
    return f"o{g:04d}"


def forward_toml(guest: str, ipv4: str, ports: Sequence[str]) -> str:
    """One ``[[forward]]`` table, IPv4 only."""
    quoted = ", ".join(f'"{p}"' for p in ports)
    return f'[[forward]]\nguest = "{guest}"\nipv4 = "{ipv4}"\nports = [{quoted}]\n\n'


def source_digest() -> str:
    """A short digest of the hook and the portfwd sources, to tie figures to code."""
    h = hashlib.sha256()
    src = os.path.join(os.path.dirname(HERE), "src", "portfwd")
    for path in [HOOK, *sorted(glob.glob(os.path.join(src, "*.py")))]:
        with open(path, "rb") as f:
            h.update(f.read())
    return h.hexdigest()[:12]


def machine() -> List[str]:
    """What the figures were measured on."""
    nft = subprocess.run(["nft", "--version"], capture_output=True, text=True, check=False)
    return [f"nproc: {os.cpu_count()}",
            f"python: {sys.version.split()[0]} ({sys.executable})",
            f"nft: {nft.stdout.strip() or nft.stderr.strip()}",
            f"kernel: {os.uname().release}",
            f"portfwd sources (hook/qemu + src/portfwd/*.py) sha256: {source_digest()}"]


def fmt(value: Optional[float], digits: int = 1, suffix: str = "") -> str:
    """A number for the table, ``-`` for none."""
    return "-" if value is None else f"{value:.{digits}f}{suffix}"


def table(rows: Sequence[Row]) -> str:
    """The rows as an aligned plain-text table."""
    head = ("what", "median ms", "floor ms", "ratio", "target", "ok?")
    body = [(r.what, fmt(r.median), fmt(r.floor), fmt(r.ratio, 2, "x"), r.target,
             "-" if r.ok is None else ("ok" if r.ok else "MISS")) for r in rows]
    widths = [max(len(line[i]) for line in [head, *body]) for i in range(len(head))]
    lines = []
    for line in [head, *body]:
        cells = [c.ljust(w) if i in (0, 4) else c.rjust(w)
                 for i, (c, w) in enumerate(zip(line, widths))]
        lines.append("  ".join(cells).rstrip())
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def measure(alone: Site, loaded: Site) -> List[Row]:
    """Every figure of the report, in table order."""
    med = statistics.median
    others = [other_name(g) for g in range(OTHERS)]
    loaded.write_config(1, others=True)
    loaded.sync(others)  # the 10,000 other forwards, applied once
    loaded.check_forwards(OTHERS * OTHER_FORWARDS)

    # 1, 2, 3: starts of the subject guest and floor (b), alone and loaded, interleaved
    times: Dict[str, Dict[int, List[float]]] = {k: {n: [] for n in SIZES}
                                                for k in ("hook", "floor", "hook+", "floor+",
                                                          "stop")}
    for n in SIZES:
        for site in (alone, loaded):
            site.write_config(n, others=site is loaded)
            site.restart(SUBJECT)  # warm: the first run after a change compiles the config
            site.floor_nft(n)
        for _ in range(REPEATS[n]):
            times["stop"][n].append(alone.hook(SUBJECT, "stopped", "end"))
            times["hook"][n].append(alone.hook(SUBJECT, "started", "begin"))
            times["floor"][n].append(alone.floor_nft(n))
            times["hook+"][n].append(loaded.restart(SUBJECT))
            times["floor+"][n].append(loaded.floor_nft(n))
        alone.check_forwards(n)
        loaded.check_forwards(n + OTHERS * OTHER_FORWARDS)
        loaded.hook(SUBJECT, "stopped", "end")
    m = {k: {n: med(v) for n, v in per.items()} for k, per in times.items()}

    # 4: a guest the config does not name (config present, cache warm) and floor (a)
    loaded.hook(NOBODY, "started", "begin")
    nobody: List[float] = []
    passes: List[float] = []
    for _ in range(PASS_REPEATS):
        nobody.append(loaded.hook(NOBODY, "started", "begin"))
        passes.append(loaded.floor_pass())

    # 4b: the sh lines with a current index (beside the 1,000 others), against /bin/true
    loaded.age_config()
    wrapper = etc_hook(os.path.dirname(loaded.rundir))  # not beside forward.toml: its
    # folder's mtime would make the index stale
    sh_rows: Dict[str, List[float]] = {k: [] for k in ("sh", "sh via /etc", "sh prepare",
                                                      "sh stopped", "true")}
    for _ in range(SH_REPEATS):
        sh_rows["sh"].append(loaded.sh_hook(HOOK, NOBODY, "started", "begin"))
        sh_rows["sh via /etc"].append(loaded.sh_hook(wrapper, NOBODY, "started", "begin"))
        sh_rows["sh prepare"].append(loaded.sh_hook(HOOK, SUBJECT, "prepare", "begin"))
        sh_rows["sh stopped"].append(loaded.sh_hook(HOOK, NOBODY, "stopped", "end"))
        sh_rows["true"].append(loaded.direct(["/bin/true"], stdin=big_xml(NOBODY)))
    # libvirtd restarting: one `reconnect` per running guest, RECONNECTS of them, none
    # of them managed: through the sh lines, and through Python (as before the index)
    reconnect: Dict[str, List[float]] = {"sh": [], "python": []}
    for kind in reconnect:
        for _ in range(3):
            t0 = time.perf_counter()
            for g in range(RECONNECTS):
                guest = f"running{g}"
                if kind == "sh":
                    loaded.sh_hook(HOOK, guest, "reconnect", "begin")
                else:
                    loaded.direct([sys.executable, "-I", HOOK, guest, "reconnect", "begin", "-"],
                                  stdin=big_xml(guest))
            reconnect[kind].append((time.perf_counter() - t0) * 1e3)

    # 4c: started/stopped of the subject (10 fwd, alone) handed to `portfwd daemon`
    with_daemon = alone.through_daemon(10)

    # 5: sync of 1,000 guests x 10 forwards
    loaded.sync(others)  # warm
    syncs = [loaded.sync(others) for _ in range(SYNC_REPEATS)]
    loaded.check_forwards(OTHERS * OTHER_FORWARDS)

    # 6: what one steady start and stop of the subject do, beside the 10,000 others
    loaded.write_config(10, others=True)
    loaded.restart(SUBJECT)
    loaded.hook(SUBJECT, "stopped", "end")
    counts = {"started": loaded.counted(SUBJECT, "started", "begin"),
              "stopped": loaded.counted(SUBJECT, "stopped", "end")}

    pass_ms = med(passes)
    rows = [Row("floor (a) python -I -c pass", pass_ms, None, None, "-", None)]
    for n in SIZES:
        rows.append(Row(f"floor (b) python+nftables, {n} elem/map", m["floor"][n], None, None,
                        "-", None))
    for n in SIZES:
        ratio = m["hook"][n] / m["floor"][n]
        small = n <= 100
        rows.append(Row(f"hook started, {n} fwd", m["hook"][n], m["floor"][n], ratio,
                        "<=1.3x floor" if small else "-", ratio <= 1.3 if small else None))
    for n in SIZES:
        ratio = m["stop"][n] / m["hook"][n]
        small = n <= 100
        rows.append(Row(f"hook stopped, {n} fwd", m["stop"][n], m["hook"][n], ratio,
                        "<=1.2x started" if small else "-", ratio <= 1.2 if small else None))
    for n in SIZES:
        ratio = m["hook+"][n] / m["hook"][n]
        rows.append(Row(f"hook started, {n} fwd, +10k others", m["hook+"][n], m["floor+"][n],
                        ratio, "0.8-1.2x row 2", 0.8 <= ratio <= 1.2))
    nobody_ms = med(nobody)
    rows.append(Row("hook started, guest not in config", nobody_ms, pass_ms, nobody_ms / pass_ms,
                    "<=1.3x floor", nobody_ms / pass_ms <= 1.3))
    for op, c in counts.items():
        calls = len(c["transactions"]) + len(c["reads"])
        rows.append(Row(f"hook {op}, 10 fwd, +10k: nftables calls", calls, None, None,
                        "<=2 (1 transaction)", calls <= 2 and len(c["transactions"]) == 1))
        rows.append(Row(f"hook {op}, 10 fwd, +10k: subprocesses", len(c["subprocesses"]),
                        None, None, "0", not c["subprocesses"]))
        rows.append(Row(f"hook {op}, 10 fwd, +10k: run-dir writes", len(c["writes"]), None,
                        None, "<=2", len(c["writes"]) <= 2))
    true_ms = med(sh_rows["true"])
    rows.append(Row("floor (c) /bin/true", true_ms, None, None, "-", None))
    for key, what in (("sh", "hook started, guest not in config, sh lines"),
                      ("sh via /etc", "  same, through the hook file in /etc"),
                      ("sh prepare", "hook prepare, managed guest, sh lines"),
                      ("sh stopped", "hook stopped, guest without state, sh lines")):
        ms = med(sh_rows[key])
        rows.append(Row(what, ms, true_ms, ms / true_ms, "<=2 ms", ms <= 2.0))
    for kind, ms in reconnect.items():
        rows.append(Row(f"libvirtd restart: {RECONNECTS} x reconnect, unmanaged, {kind}",
                        med(ms), None, None, "-", None))
    floor_a = med(with_daemon["floor"])
    for op in ("started", "stopped"):
        ms = med(with_daemon[op])
        rows.append(Row(f"hook {op}, 10 fwd, through the daemon", ms, floor_a, ms / floor_a,
                        "<=1.3x floor (a)", ms / floor_a <= 1.3))
    sync_ms = med(r["sync_ms"] for r in syncs)
    rows.append(Row("sync 10k fwd: wholehost.sync() in-process", sync_ms, None, None, "<1000 ms",
                    sync_ms < 1000))
    rows.append(Row("sync 10k fwd: wholehost.sync() CPU time", med(r["sync_cpu_ms"] for r in syncs),
                    None, None, "-", None))
    rows.append(Row("sync 10k fwd: config load() in-process", med(r["load_ms"] for r in syncs),
                    None, None, "-", None))
    rows.append(Row("sync 10k fwd: subprocess wall", med(r["wall_ms"] for r in syncs),
                    None, None, "-", None))
    return rows


NOTES = """\
hook rows: wall time of `ip netns exec NS python -I hook/qemu GUEST started begin -`,
each after a `stopped end` (timed alone: the "stopped" rows, whose floor column is the
start of the same N); floors also run under `ip netns exec`.
'+10k others': ratio is to the same N without others (row 2, measured interleaved);
its floor column is floor (b) measured in that loaded namespace.
'guest not in config': floor is floor (a). Subprocess sync = interpreter start +
imports + load() + sync() (load() also shown on its own).
'sh lines' rows: /bin/sh hook/qemu (or the file in /etc that execs it), run without
`ip netns exec` (nothing there touches the network), 5 kB of XML on stdin, the hook
index current (forward.toml aged a minute, then compiled); floor (c): /bin/true fed
the same XML. 'libvirtd restart': that many `reconnect` calls one after the other
(direct invocation, no libvirtd), total ms, median of 3."""


def run(tmp: str) -> List[Row]:
    """Every row of this part, in namespaces (and under ``tmp``) made for it."""
    sites: List[Site] = []
    try:
        sites = [Site(f"pfbench{os.getpid()}{k}", os.path.join(tmp, k)) for k in ("a", "b")]
        for site in sites:
            site.create()
        return measure(*sites)
    finally:
        for site in sites:
            site.delete()


def main() -> int:
    if os.geteuid() != 0:
        sys.stderr.write("bench.py: run as root (it makes network namespaces)\n")
        return 2
    started = time.perf_counter()
    tmp = tempfile.mkdtemp(prefix="pfbench.", dir=TMPFS if os.path.isdir(TMPFS) else None)
    try:
        print("\n".join(machine()))
        print(f"temp dir (configs + run dirs): {tmp}\n", flush=True)
        digest = source_digest()
        rows = run(tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(table(rows))
    print()
    print(NOTES)
    if source_digest() != digest:
        print("NOTE: the portfwd sources changed during the run; figures may mix versions")
    print(f"total {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
